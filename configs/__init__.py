"""Experiment configs: one file per network, presets chosen by the argument after ':'."""
