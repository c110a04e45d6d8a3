"""Orbax checkpoints of a run (the only module that imports orbax).

Layout under WORKDIR/checkpoints:
  latest/<step>/  periodic saves, the newest `keep` of them kept;
  best/<step>/    the checkpoint with the best validation score so far (config.best_checkpoint_metric), kept apart.
Each holds `state` (the TrainState arrays) and `meta` (JSON: epoch, best_metric, best_score,
best_val_accuracy, elapsed_s, ... whatever the loop needs to continue exactly).
"""
import dataclasses
import pathlib
from typing import Any

import orbax.checkpoint as ocp
from absl import logging

from hybridvit_jax.training.state import TrainState


def _manager(directory: pathlib.Path, keep: int, *, read_only: bool) -> ocp.CheckpointManager:
  # Orbax names its cross-process barriers after the step; the two managers save the same steps,
  # so each gets its own prefix or their barriers collide in multi-process runs (a deadlock).
  multiprocessing = ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=directory.name)
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only,
                                         enable_async_checkpointing=not read_only,
                                         cleanup_tmp_directories=not read_only,
                                         multiprocessing_options=multiprocessing)
  return ocp.CheckpointManager(directory, options=options, item_names=('state', 'meta'))


class UnrestorableCheckpointError(ValueError):
  """Checkpoints exist but none matches the run's state; the one-line message says what to do."""


class RunCheckpoints:
  """The latest and best checkpoints of one run; saves are asynchronous."""

  def __init__(self, workdir: pathlib.Path, *, keep: int = 2, read_only: bool = False):
    root = pathlib.Path(workdir).absolute() / 'checkpoints'
    self.read_only = read_only
    self.latest = _manager(root / 'latest', keep, read_only=read_only)
    self.best = _manager(root / 'best', 1, read_only=read_only)

  def _manager_named(self, which: str) -> ocp.CheckpointManager:
    if which not in ('latest', 'best'):
      raise ValueError(f'checkpoint {which!r} is unknown: expected latest or best')
    return self.latest if which == 'latest' else self.best

  def save(self, step: int, state: TrainState, meta: dict[str, Any], *, best: bool = False) -> None:
    """Starts writing `state` and `meta` as step `step` (also as the best one if `best`)."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    for manager in (self.latest, self.best) if best else (self.latest,):
      if step not in manager.all_steps():  # e.g. a stop signal right after an epoch's save
        manager.save(step, args=args, force=True)

  def restore(self, target: TrainState, which: str = 'latest', *, weights_only: bool = False,
              ) -> tuple[TrainState, dict[str, Any]] | None:
    """The newest restorable checkpoint of `which` as (state, meta), or None if there is none.

    `target` gives shapes, dtypes and shardings (jax.eval_shape of the jitted initialiser). A
    checkpoint that fails to restore (truncated, half written) is reported in one line and the
    previous one is tried; if none can be restored, UnrestorableCheckpointError. weights_only
    restores everything but the optimizer state (then None), which evaluation does not need: a
    checkpoint stays usable for it when only the optimizer's internals differ.
    """
    manager = self._manager_named(which)
    unrestorable = []
    for step in sorted(manager.all_steps(), reverse=True):
      try:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=_weights_restore(target) if weights_only else ocp.args.StandardRestore(target),
            meta=ocp.args.JsonRestore()))
      except Exception as error:  # pylint: disable=broad-except  # any damage means: try an older one
        logging.warning('checkpoint %s/%d cannot be restored (%s: %s); trying the previous one',
                        which, step, type(error).__name__, str(error).splitlines()[0][:200] if str(error) else '')
        unrestorable.append(step)
        continue
      if not self.read_only:
        for bad_step in unrestorable:  # the run will save these steps again
          manager.delete(bad_step)
      state = target.replace(**restored.state, opt_state=None) if weights_only else restored.state
      return state, dict(restored.meta)
    if unrestorable:
      raise UnrestorableCheckpointError(
          f'none of the {which} checkpoints in {manager.directory} (steps {sorted(unrestorable)}) can be '
          'restored into this run\'s state (damaged, or written by another version or config): '
          'use another --workdir')
    return None

  def wait(self) -> None:
    """Blocks until every started save is complete on disk."""
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()


def _weights_restore(target: TrainState) -> ocp.args.PyTreeRestore:
  """Restore arguments for every field of `target` but its optimizer state."""
  fields = {field.name: getattr(target, field.name) for field in dataclasses.fields(target)
            if field.name != 'opt_state'}
  return ocp.args.PyTreeRestore(item=fields, restore_args=ocp.checkpoint_utils.construct_restore_args(fields),
                                partial_restore=True)
