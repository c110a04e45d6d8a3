"""One-line checks of model config values; each raises ValueError naming the dotted key."""
from collections.abc import Sequence


def choice(value, key: str, choices) -> None:
  if value not in choices:
    raise ValueError(f'unknown {key}={value!r}; choose one of {", ".join(map(repr, choices))}')


def positive(value, key: str) -> None:
  if value <= 0:
    raise ValueError(f'{key}={value} must be positive')


def positive_sequence(value: Sequence[int], key: str) -> None:
  if not value or min(value) <= 0:
    raise ValueError(f'{key}={tuple(value)} must be a non-empty sequence of positive integers')


def fraction(value: float, key: str) -> None:
  if not 0 <= value < 1:
    raise ValueError(f'{key}={value} must be in [0, 1)')
