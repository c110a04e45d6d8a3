"""Evaluates a run's checkpoint on a whole split.

    python -m hybridvit_jax.evaluate --workdir=runs/vit [--checkpoint=best|latest] [--split=test]

The last line printed is one JSON object: {"accuracy", "loss", "examples", "split", "step", ...}.
--split is test, val or train (the run's configured splits) or any tfds split string. The same
object is appended to WORKDIR/evaluations.jsonl, where `report` finds the test accuracy of a run
that did not evaluate the test split while training (the :cpu presets).
"""
import json
import pathlib

import jax
from absl import app, flags

from hybridvit_jax import cli, configuration, data
from hybridvit_jax.training import history, inputs, loop
from hybridvit_jax.training.checkpoint import RunCheckpoints

EVALUATIONS_FILE = 'evaluations.jsonl'


def resolve_split(config, split: str) -> str:
  """'test' / 'val' / 'train' -> the run's configured split; anything else is a tfds split."""
  named = {'test': config.data.test_split, 'val': config.data.val_split, 'train': config.data.train_split}
  return named.get(split, split)


def restore_run(workdir: pathlib.Path, checkpoint: str = 'best'):
  """(config, info, mesh, state, eval_step) of a run's `checkpoint` ('best' or 'latest'); the
  state holds no optimizer state (None), which neither evaluation nor prediction uses."""
  config = configuration.load_run_config(workdir)
  cli.use_compilation_cache(config.compilation_cache)
  info = data.dataset_info(config.data)
  mesh = loop.make_mesh()
  init_state, _, eval_step = loop.build_training(config, info, mesh, steps_per_epoch=1)
  checkpoints = RunCheckpoints(workdir, read_only=True)
  restored = checkpoints.restore(jax.eval_shape(init_state), checkpoint, weights_only=True)
  checkpoints.close()
  if restored is None:
    raise configuration.ConfigError(f'{workdir} holds no {checkpoint} checkpoint: train it first with launch.py')
  return config, info, mesh, restored[0], eval_step


def evaluate(workdir: str, checkpoint: str = 'best', split: str = 'test', ema: bool = False) -> dict:
  """Loss and accuracy of a run's checkpoint (its EMA weights if `ema`) over every example of `split`."""
  config, _, mesh, state, eval_step = restore_run(pathlib.Path(workdir), checkpoint)
  if ema:
    if not config.ema_decay:
      raise configuration.ConfigError(f'{workdir} was trained with ema_decay=0: it has no EMA weights; drop --ema')
    state = state.replace(params=state.ema_params)
  split_spec = resolve_split(config, split)
  batches = inputs.eval_batches_source(config.data, split_spec, config.eval_batch_size, flag='--split')
  result = loop.evaluate_split(eval_step, state, batches(), batch_size=config.eval_batch_size, mesh=mesh)
  return {'workdir': str(workdir), 'checkpoint': checkpoint, 'step': int(state.step), 'split': split_spec,
          'weights': 'ema' if ema else 'trained', **result}


def record_evaluation(workdir: str | pathlib.Path, result: dict) -> None:
  """Appends one `evaluate` result to WORKDIR/evaluations.jsonl."""
  history.append_jsonl(pathlib.Path(workdir) / EVALUATIONS_FILE, result)


def read_evaluations(workdir: str | pathlib.Path) -> list[dict]:
  """The `evaluate` results recorded in WORKDIR, oldest first; [] when there are none."""
  return history.read_jsonl(pathlib.Path(workdir) / EVALUATIONS_FILE)


def define_flags() -> None:
  """The command's flags, defined only when it runs (importing this module adds none)."""
  flags.DEFINE_string('workdir', None, 'The --workdir of a training run.', required=True)
  flags.DEFINE_enum('checkpoint', 'best', ['best', 'latest'], 'best: best validation accuracy; latest: the newest.')
  flags.DEFINE_string('split', 'test', 'test, val, train, or a tfds split string.')
  flags.DEFINE_bool('ema', False, 'Evaluate the moving average of the weights (runs with ema_decay > 0).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  cli.quiet_library_logs()
  options = flags.FLAGS
  result = cli.run_and_exit(evaluate, options.workdir, options.checkpoint, options.split, options.ema)
  if jax.process_index() == 0:
    record_evaluation(options.workdir, result)
  print(json.dumps(result), flush=True)


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=cli.parse_flags_or_exit)
