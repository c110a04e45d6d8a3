"""Trains the paper's three networks (or a sweep over one config key) one after another, then reports.

    python -m hybridvit_jax.study --preset=paper --workdir=runs/study [--models=vit,resnet50,hybrid]
        [--config.KEY=VALUE ...]
    python -m hybridvit_jax.study --sweep=stem_depth --values=0,1,2,3 --preset=paper --workdir=runs/stem
        [--models=hybrid] [--config.KEY=VALUE ...]

The study trains configs/<model>.py with --preset in WORKDIR/<model> (vit, resnet50, hybrid); a
sweep trains one network (hybrid unless --models names another) once per value of --sweep, in
WORKDIR/<leaf>_<value>: a config key (a dotted key, or a leaf name that is unique in the schema:
learning_rate is optimizer.learning_rate) with the values parsed as its type, or `stem_depth`,
the number of conv layers kept of the preset's stem (its first ones, in their stages; 0 = no stem,
the plain ViT, as the token grid stays fixed). Then the report (python -m hybridvit_jax.report)
of all the runs goes to WORKDIR/report; a sweep adds <name>.md and <name>.png there: accuracy
and training images/s against the value (stem_depth, or sweep_<leaf>).

--config.KEY=VALUE overrides apply to every run; an unknown key or a bad value stops the command
before anything is trained, with one line and exit code 2. Running the same command again
resumes unfinished runs and trains nothing for finished ones. A stop signal stops the study with
its run (exit 0; the rerun resumes there); a run stopped by a non-finite loss is named and the
study goes on, then exits 1.
"""
import dataclasses
import importlib
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from absl import app, flags
from jax.experimental import multihost_utils
from ml_collections import config_flags

from hybridvit_jax import cli, configuration, data, models, report
from hybridvit_jax.training import loop

# The networks a study compares: every registered model, each with its config file configs/<name>.py.
STUDY_MODELS = tuple(models.MODELS)
SWEEP_MODEL = 'hybrid'
# The sweep that is not one config key: how many of the preset's stem convs to keep.
STEM_DEPTH = 'stem_depth'
REPORT_DIR = 'report'
SWEEPABLE_TYPES = (bool, int, float, str)


@dataclasses.dataclass(frozen=True)
class Experiment:
  """One training run of the study: its directory name under WORKDIR, its full config and workdir."""
  name: str
  config: ml_collections.ConfigDict
  workdir: pathlib.Path


@dataclasses.dataclass(frozen=True)
class Sweep:
  """A config key (dotted) and the values it takes, one run each, in order."""
  key: str
  values: tuple[Any, ...]

  @property
  def leaf(self) -> str:
    return self.key.rsplit('.', 1)[-1]

  def run_name(self, value: Any) -> str:
    return f'{self.leaf}_{value}'

  @property
  def report_name(self) -> str:
    return STEM_DEPTH if self.key == STEM_DEPTH else f'sweep_{self.leaf}'

  def overrides(self, config: ml_collections.ConfigDict, value: Any) -> dict[str, Any]:
    """The flat overrides that make `config` this sweep's run for `value`."""
    return stem_of_depth(config.model.stem, value) if self.key == STEM_DEPTH else {self.key: value}


# ---------------------------------------------------------------------------- configs
def schema_defaults() -> dict[str, Any]:
  """Every config key (dotted) with its default value."""
  return configuration.flatten(configuration.base_config().to_dict())


def model_config(model: str, preset: str) -> ml_collections.ConfigDict:
  """configs/<model>.py's get_config(preset), installed as hybridvit_jax.configs.<model> (so any
  directory will do); an unknown preset is the config file's ConfigError."""
  return importlib.import_module(f'hybridvit_jax.configs.{model}').get_config(preset)


def parse_models(text: str) -> list[str]:
  """'vit,hybrid' -> ['vit', 'hybrid']; an unknown or repeated name is a ConfigError."""
  names = [name.strip() for name in text.split(',') if name.strip()]
  unknown = [name for name in names if name not in STUDY_MODELS]
  if unknown or not names or len(set(names)) < len(names):
    raise configuration.ConfigError(
        f'--models={text!r} is invalid: expected distinct names among {", ".join(STUDY_MODELS)}')
  return names


def with_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` (locked: no new keys) with the flat {dotted key: value} overrides applied."""
  config = config.copy_and_resolve_references()
  config.update_from_flattened_dict(overrides)
  return config


# ------------------------------------------------------------------------------ sweeps
def stem_of_depth(stem: ml_collections.ConfigDict, depth: int) -> dict[str, Any]:
  """The overrides that keep the first `depth` conv layers of `stem` (model.stem), in their
  stages; depth 0 drops the stem and its whitening: the plain ViT."""
  stages, left = [], depth
  for stage in stem.stages:
    if left > 0:
      stages.append(tuple(stage[:left]))
      left -= len(stages[-1])
  if left > 0:
    total = sum(map(len, stem.stages))
    raise configuration.ConfigError(f'--values: stem depth {depth} is deeper than the preset\'s stem of {total} '
                                    f'conv layers; give depths from 0 to {total}')
  return {'model.stem.stages': tuple(stages), 'model.stem.whiten_patch_size': stem.whiten_patch_size if depth else 0}


def resolve_key(name: str) -> str:
  """A dotted config key, or the only key whose last part is `name` ('learning_rate' -> 'optimizer.learning_rate')."""
  keys = schema_defaults()
  if name == STEM_DEPTH or name in keys:
    return name
  matches = [key for key in keys if key.rsplit('.', 1)[-1] == name]
  if len(matches) != 1:
    found = f'it could be {", ".join(matches)}' if matches else 'no config key is called that'
    raise configuration.ConfigError(f'--sweep={name!r}: {found}; give the dotted key, e.g. '
                                    f'--sweep=optimizer.learning_rate, or --sweep={STEM_DEPTH}')
  return matches[0]


def parse_value(text: str, key: str) -> Any:
  """`text` as a value of config key `key`, of the type of its default (a stem depth is an int)."""
  kind = int if key == STEM_DEPTH else type(schema_defaults()[key])
  if kind not in SWEEPABLE_TYPES:
    raise configuration.ConfigError(f'--sweep={key}: a {kind.__name__} key cannot be swept; sweep a number, '
                                    'a string or a boolean')
  try:
    if kind is bool:
      return {'true': True, '1': True, 'false': False, '0': False}[text.strip().lower()]
    return kind(text.strip())
  except (KeyError, ValueError):
    raise configuration.ConfigError(f'--values: {text!r} is not a valid {kind.__name__}, the type of {key}') from None


def parse_sweep(name: str, values: Sequence[str]) -> Sweep:
  key = resolve_key(name)
  parsed = tuple(parse_value(text, key) for text in values)
  if not parsed or len(set(parsed)) < len(parsed):
    raise configuration.ConfigError(f'--values={",".join(values)}: give distinct values of {key} to sweep')
  return Sweep(key, parsed)


# ------------------------------------------------------------------------------- plans
def study_experiments(names: Sequence[str], preset: str, overrides: dict[str, Any],
                      workdir: pathlib.Path) -> list[Experiment]:
  """Each network with `preset` and the overrides, in WORKDIR/<model>."""
  return [Experiment(model, with_overrides(model_config(model, preset), overrides), workdir / model)
          for model in names]


def sweep_experiments(model: str, preset: str, overrides: dict[str, Any], sweep: Sweep,
                      workdir: pathlib.Path) -> list[Experiment]:
  """`model` with `preset`, the overrides and each value of the sweep, in WORKDIR/<leaf>_<value>."""
  if sweep.key in overrides:
    raise configuration.ConfigError(f'--config.{sweep.key} and --sweep={sweep.key} both set it: drop one')
  base = with_overrides(model_config(model, preset), overrides)  # a stem depth counts the overridden stem's convs
  return [Experiment(sweep.run_name(value), with_overrides(base, sweep.overrides(base, value)),
                     workdir / sweep.run_name(value)) for value in sweep.values]


def check_experiments(experiments: Sequence[Experiment]) -> None:
  """Raises ConfigError (or DataError) for the first run that cannot start, before any trains.

  In a multi-process run process 0 goes first, so that it alone prepares a data set that needs it.
  """
  is_chief = jax.process_index() == 0
  if not is_chief:
    multihost_utils.sync_global_devices('study checked')
  for experiment in experiments:
    info = data.dataset_info(experiment.config.data)
    try:
      configuration.validate(experiment.config, device_count=jax.device_count(), image_shape=info.image_shape)
    except configuration.ConfigError as error:
      raise configuration.ConfigError(f'{experiment.name}: {error}') from None
    configuration.check_same_run(experiment.config, experiment.workdir)
  if is_chief and jax.process_count() > 1:
    multihost_utils.sync_global_devices('study checked')


# --------------------------------------------------------------------------------- run
def preset_name(preset: str) -> str:
  return preset or 'default'


def train_all(experiments: Sequence[Experiment], preset: str) -> list[str]:
  """Trains (or resumes) each run in turn, with one progress line per run; finished runs train nothing.

  A run that stops on a non-finite or diverged loss is named on stderr and the study goes on: the
  other runs (a sweep's other values) are still worth having. Returns the names of those runs.
  """
  failed = []
  for index, experiment in enumerate(experiments, 1):
    print(f'[{index}/{len(experiments)}] {experiment.name} (preset {preset_name(preset)}) -> {experiment.workdir}',
          flush=True)
    try:
      loop.train_and_evaluate(experiment.config, str(experiment.workdir))
    except loop.NonFiniteLossError as error:
      print(f'error: {experiment.name}: {error}', file=sys.stderr, flush=True)
      failed.append(experiment.name)
  return failed


def run_study(experiments: Sequence[Experiment], workdir: pathlib.Path, *, preset: str,
              sweep: Sweep | None = None) -> tuple[dict[str, Any] | None, list[str]]:
  """Checks every run, trains them in turn, then writes the report (and the sweep's) into
  WORKDIR/report. Returns write_report's result, with the sweep's files added (None on the
  processes other than 0 of a multi-process run, which write nothing), and the names of the runs
  that stopped on a non-finite loss (their rows hold what they trained before it)."""
  check_experiments(experiments)
  failed = train_all(experiments, preset)
  if jax.process_index() != 0:
    return None, failed
  out_dir = workdir / REPORT_DIR
  result = report.write_report([e.workdir for e in experiments], out_dir)
  if sweep is not None:
    result['files'] += report.write_sweep_report(sweep.key, sweep.values, result['rows'], out_dir,
                                                 sweep.report_name)
  return result, failed


def plan(options: flags.FlagValues, overrides: dict[str, Any]) -> tuple[list[Experiment], Sweep | None]:
  """The runs the command line asks for."""
  workdir = pathlib.Path(options.workdir)
  if options.sweep is None:
    names = parse_models(options.models) if options.models else list(STUDY_MODELS)
    return study_experiments(names, options.preset, overrides, workdir), None
  names = parse_models(options.models or SWEEP_MODEL)
  if len(names) != 1:
    raise configuration.ConfigError(f'--sweep trains one network: give --models=NAME, not {options.models!r}')
  sweep = parse_sweep(options.sweep, options.values)
  return sweep_experiments(names[0], options.preset, overrides, sweep, workdir), sweep


# -------------------------------------------------------------------------------- main
def define_flags(argv: Sequence[str]) -> None:
  """The command's flags, defined only when it runs (importing this module adds none).

  --config is the schema with every key overridable; an unknown --config.KEY is reported here in
  one line (exit code 2), as ml_collections would raise it while defining the flag.
  """
  cli.fail_on_unknown_config_keys(argv)
  flags.DEFINE_string('workdir', None, 'Directory of the study: one run per network, and report/.', required=True)
  flags.DEFINE_string('preset', '', "Preset of every config file: '' (default), paper, smoke, ...")
  flags.DEFINE_string('models', None, 'Comma-separated networks among vit,resnet50,hybrid (default: all three; '
                      'with --sweep: hybrid).')
  flags.DEFINE_string('sweep', None, 'What to sweep: stem_depth, or a config key, e.g. optimizer.learning_rate.')
  flags.DEFINE_list('values', None, 'The values of the --sweep key, e.g. 0,1,2,3,4.')
  config_flags.DEFINE_config_dict('config', configuration.base_config(),
                                  'Overrides for every run: --config.KEY=VALUE.', sys_argv=list(argv))


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments: {" ".join(argv[1:])}')
  options = flags.FLAGS
  if (options.sweep is None) != (options.values is None):
    cli.fail('--sweep and --values go together: --sweep=stem_depth --values=0,1,2,3')
  cli.quiet_library_logs()
  cli.initialize_distributed(None, None, None)
  overrides = dict(config_flags.get_override_values(options['config']))
  cli.use_compilation_cache(overrides.get('compilation_cache', True))
  experiments, sweep = cli.run_and_exit(plan, options, overrides)
  try:
    result, failed = cli.run_and_exit(run_study, experiments, pathlib.Path(options.workdir),
                                      preset=options.preset, sweep=sweep)
  except loop.RunStopped:  # the run's last line says how to resume; the runs after it wait for that
    return
  if result is not None:
    report.print_report(result)
  if failed:
    print(f'error: {len(failed)} of {len(experiments)} runs stopped on a non-finite loss ({", ".join(failed)}); '
          'the report holds what they trained, and their lines above say where each stopped and how to go on',
          file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == '__main__':
  define_flags(sys.argv)
  app.run(main, flags_parser=cli.parse_training_flags_or_exit)
