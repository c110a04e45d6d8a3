"""`train_and_evaluate(config, workdir)`: the training loop, read top to bottom in sections.

Side effects (logging, history, checkpoints, signals) live here only; everything inside the
jitted steps is pure (see steps.py).
"""
import functools
import json
import math
import pathlib
import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from hybridvit_jax import configuration, data, models
from hybridvit_jax.data import stream
from hybridvit_jax.training import optimizer as optimizer_lib
from hybridvit_jax.training import budget, inputs, steps
from hybridvit_jax.training.checkpoint import RunCheckpoints
from hybridvit_jax.training.metrics import ClassificationMetrics
from hybridvit_jax.training.state import TrainState, init_train_state, model_graphdef

HISTORY_FILE = 'history.jsonl'
# JAX dispatches steps asynchronously, so the host can queue many steps ahead of the device, and
# a stop request is only acted on once they are done: the host waits whenever it is more than this
# many seconds of steps ahead (on 2 CPU cores a ResNet50 step takes ~18 s: the 50 steps between two
# log lines would be a quarter of an hour after a SIGTERM, more than any preemption notice).
MAX_SECONDS_AHEAD = 2.0
# Training images that a fresh run fits the model's data-fitted parts to (patch whitening).
FIT_EXAMPLES = 5000


class NonFiniteLossError(RuntimeError):
  """Training hit a non-finite loss with nan_policy='stop'; the message names the step."""


class DivergedLossError(NonFiniteLossError):
  """Training diverged with nan_policy='stop': a finite train loss past DIVERGED_LOSS_FACTOR times
  chance's; the message names the step."""


# A train loss this many times chance's (log of the class count) is a run that has diverged though
# its loss stays finite (a blown-up network can train for hours at 10^13 without one inf).
DIVERGED_LOSS_FACTOR = 100.0


# ----------------------------------------------------------------------------------- mesh
def make_mesh() -> jax.sharding.Mesh:
  """All devices (of all processes) on one `data` axis; batches are split along it."""
  return jax.make_mesh((jax.device_count(),), ('data',), axis_types=(jax.sharding.AxisType.Auto,))


# ----------------------------------------------------------------------------------- eval
def evaluate_split(eval_step, state: TrainState, batches: inputs.Batches, *, batch_size: int,
                   mesh: jax.sharding.Mesh) -> dict[str, float]:
  """Loss and accuracy over every example of `batches` ((images, labels) of at most
  `batch_size`, the same on every process): {'loss', 'accuracy', 'examples'}."""
  batch_sharding = NamedSharding(mesh, P('data'))
  metrics = ClassificationMetrics.empty()
  for images, labels, mask in inputs.padded(batches, batch_size):
    metrics = eval_step(state, metrics, *(inputs.to_global(x, batch_sharding) for x in (images, labels, mask)))
  result = {name: float(value) for name, value in metrics.compute().items()}
  return {**result, 'examples': int(metrics.accuracy.count)}


def seconds_per_eval_batch(eval_step, state: TrainState, batches: inputs.Batches, *, batch_size: int,
                           mesh: jax.sharding.Mesh, timed_batches: int = 2) -> float:
  """Seconds one eval_step call takes, timed on the batches after the first (whose call compiles)."""
  batch_sharding = NamedSharding(mesh, P('data'))
  placed = []
  for batch in inputs.padded(batches, batch_size):
    placed.append(tuple(inputs.to_global(x, batch_sharding) for x in batch))
    if len(placed) > timed_batches:
      break
  jax.block_until_ready(eval_step(state, ClassificationMetrics.empty(), *placed[0]))
  timed = placed[1:] or placed
  start = time.perf_counter()
  for batch in timed:
    jax.block_until_ready(eval_step(state, ClassificationMetrics.empty(), *batch))
  return (time.perf_counter() - start) / len(timed)


def rank_evaluation(meta: dict[str, Any], record: dict[str, Any], metric: str) -> tuple[bool, dict[str, Any]]:
  """Whether the evaluation of history record `record` makes a new best checkpoint by `metric`
  (one of configuration.BEST_CHECKPOINT_METRICS; a tie is not better), and the checkpoint meta
  updated for it: best_metric and best_score (the metric times its sign: the accuracy, or minus the
  loss), best_val_accuracy (the highest so far, whatever the metric) and epochs_without_improvement.
  A run resumed under another metric than its meta's ranks afresh from this evaluation."""
  score = configuration.BEST_CHECKPOINT_METRICS[metric] * record[metric]
  ranked_by = meta.get('best_metric', 'val_accuracy')  # runs saved before best_metric ranked by val accuracy
  best_score = meta.get('best_score', meta['best_val_accuracy']) if ranked_by == metric else None
  improved = best_score is None or score > best_score
  return improved, {**meta, 'best_metric': metric, 'best_score': score if improved else best_score,
                    'best_val_accuracy': max(record['val_accuracy'], meta['best_val_accuracy']),
                    'epochs_without_improvement': 0 if improved else meta['epochs_without_improvement'] + 1}


# ---------------------------------------------------------------------------------- model
def build_training(config: ml_collections.ConfigDict, info: data.DatasetInfo, mesh: jax.sharding.Mesh,
                   *, steps_per_epoch: int):
  """The jitted state initialiser and train and eval steps of a run.

  Returns (init_state, train_step, eval_step): `init_state()` makes a fresh state with
  replicated parameters (`jax.eval_shape(init_state)` its abstract twin, for restoring).
  train_step(state, metrics, *step_inputs, total_steps=N) takes what inputs.TrainInput.epoch
  yields for the configured input mode: (train_images, train_labels, epoch_order) for `device`,
  (images, labels) for `stream`; N, the run's planned length, is traced, so one compile serves
  every plan. The state is donated to it so its buffers are reused in place.
  """
  make_optimizer = functools.partial(optimizer_lib.make_optimizer, config.optimizer, steps_per_epoch=steps_per_epoch)
  graphdef = model_graphdef(config.model, num_classes=info.num_classes, image_shape=info.image_shape)
  replicated = NamedSharding(mesh, P())
  init = functools.partial(init_train_state, config.model, make_optimizer(total_steps=1),  # the state's structure
                           num_classes=info.num_classes, image_shape=info.image_shape, seed=config.seed,
                           keep_ema=bool(config.ema_decay), keep_slow_weights=bool(config.lookahead_decay))
  init_state = jax.jit(init, out_shardings=replicated)
  step_on_inputs = steps.train_step_on_device_data if config.data.input_mode == 'device' else steps.train_step
  train_step = jax.jit(
      functools.partial(step_on_inputs, graphdef=graphdef,
                        make_optimizer=make_optimizer,
                        seed_key=steps.training_seed_key(config.seed), num_classes=info.num_classes, config=config),
      out_shardings=replicated, donate_argnums=(0, 1))
  eval_step = jax.jit(functools.partial(steps.eval_step, graphdef=graphdef, config=config),
                      out_shardings=replicated, donate_argnums=(1,))
  return init_state, train_step, eval_step


def progress_hooks(writer: metric_writers.MetricWriter, total_steps: int) -> list:
  """The periodic progress report (steps/s, ETA) of a run of `total_steps`."""
  return [periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer, every_secs=30)]


def fit_to_training_images(state: TrainState, config: ml_collections.ConfigDict, info: data.DatasetInfo,
                           mesh: jax.sharding.Mesh, train_input: inputs.TrainInput) -> TrainState:
  """A fresh state with the model's data-fitted parts (patch whitening) set from the first
  FIT_EXAMPLES training images, computed on device."""
  graphdef = model_graphdef(config.model, num_classes=info.num_classes, image_shape=info.image_shape)
  fit = jax.jit(functools.partial(steps.fit_to_data, graphdef=graphdef, data_config=config.data),
                out_shardings=NamedSharding(mesh, P()))
  return fit(state, train_input.first_images(FIT_EXAMPLES))


# -------------------------------------------------------------------------------- history
def read_jsonl(path: pathlib.Path) -> list[dict[str, Any]]:
  """The JSON objects of a file with one per line, oldest first; [] when there is no file."""
  path = pathlib.Path(path)
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_jsonl(path: pathlib.Path, record: dict[str, Any]) -> None:
  """Appends `record` as one line of JSON to `path`."""
  with open(path, 'a') as f:
    f.write(json.dumps(record) + '\n')


def read_history(workdir: pathlib.Path) -> list[dict[str, Any]]:
  """The run's per-epoch records, oldest first."""
  return read_jsonl(pathlib.Path(workdir) / HISTORY_FILE)


def truncate_history(workdir: pathlib.Path, last_step: int) -> None:
  """Drops records written after the checkpoint a run resumes from (their work is redone)."""
  records = [r for r in read_history(workdir) if r['step'] <= last_step]
  path = pathlib.Path(workdir) / HISTORY_FILE
  path.write_text(''.join(json.dumps(r) + '\n' for r in records))


def append_history(workdir: pathlib.Path, record: dict[str, Any]) -> None:
  append_jsonl(pathlib.Path(workdir) / HISTORY_FILE, record)


# ------------------------------------------------------------------------------- signals
class StopRequest:
  """Turns SIGTERM / SIGINT into a flag the loop checks after each step."""

  def __init__(self):
    self.signal_name = None
    self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

  def _handle(self, signum, _frame):
    self.signal_name = signal.Signals(signum).name

  def __bool__(self):
    return self.signal_name is not None

  def restore_handlers(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


class DispatchPacer:
  """Keeps the host at most ~`max_seconds_ahead` of steps ahead of the device.

  After every `steps_per_wait` dispatched steps, `after_step` waits for the newest one and sets
  `steps_per_wait` to the steps that fit in `max_seconds_ahead` at the seconds a step just measured
  (at least 1): one wait per step for slow steps, few waits (and little idle device) for fast ones.
  """

  def __init__(self, step: int, *, max_seconds_ahead: float = MAX_SECONDS_AHEAD, clock=time.monotonic,
               wait=jax.block_until_ready):
    self.max_seconds_ahead = max_seconds_ahead
    self.steps_per_wait = 1
    self._clock, self._wait = clock, wait
    self._last_step, self._last_time = step, clock()

  def after_step(self, state: TrainState, step: int) -> None:
    """Called after dispatching the step that brings the run to `step`; may wait for it."""
    if step - self._last_step < self.steps_per_wait:
      return
    self._wait(state.step)
    now = self._clock()
    seconds_per_step = (now - self._last_time) / (step - self._last_step)
    self.steps_per_wait = max(1, int(self.max_seconds_ahead / max(seconds_per_step, 1e-9)))
    self._last_step, self._last_time = step, now


# --------------------------------------------------------------------------------- health
def check_finite(state: TrainState, config: ml_collections.ConfigDict, checkpoints: RunCheckpoints) -> None:
  """Raises NonFiniteLossError if a step's loss was not finite and nan_policy is 'stop'.

  The step skipped that update, so nothing non-finite reached the parameters; the run stops
  before saving anything after it, and the newest checkpoint stays the last good one.
  """
  first_bad_step = int(state.first_nonfinite_step)
  if first_bad_step < 0 or config.nan_policy != 'stop':
    return
  raise NonFiniteLossError(
      f'non-finite loss at step {first_bad_step + 1}; {last_good_checkpoint(checkpoints)}: rerun with a lower '
      '--config.optimizer.learning_rate, or --config.nan_policy=skip to skip such steps')


def check_not_diverged(train_loss: float, step: int, *, num_classes: int, config: ml_collections.ConfigDict,
                       checkpoints: RunCheckpoints) -> None:
  """Raises DivergedLossError if nan_policy is 'stop' and `train_loss` (the mean since the epoch
  began, at `step`) is over DIVERGED_LOSS_FACTOR times chance's, log(num_classes)."""
  chance = math.log(num_classes)
  if config.nan_policy != 'stop' or not train_loss > DIVERGED_LOSS_FACTOR * chance:
    return
  raise DivergedLossError(
      f'training diverged: train loss {train_loss:.3g} at step {step}, over {DIVERGED_LOSS_FACTOR:g} times '
      f"chance's {chance:.2f}; {last_good_checkpoint(checkpoints)}: rerun with a lower "
      '--config.optimizer.learning_rate')


def last_good_checkpoint(checkpoints: RunCheckpoints) -> str:
  """Where a stopped run's last good state is, in words (after waiting for pending saves)."""
  checkpoints.wait()
  last_good = checkpoints.latest.latest_step()
  return f'the last good checkpoint is step {last_good}' if last_good is not None else 'no checkpoint yet'


# --------------------------------------------------------------------------------- budget
class BudgetProbe:
  """Times a budgeted run's steps budget.PROBE_FIRST_STEP to budget.PROBE_LAST_STEP of this
  session (the compile and the first steps' warm-up are over by then): the speed a step."""

  def __init__(self, start_step: int, *, clock=time.time):
    self._clock = clock
    self.first_step, self.last_step = start_step + budget.PROBE_FIRST_STEP, start_step + budget.PROBE_LAST_STEP
    self.times: dict[int, float] = {}

  def timed(self, state: TrainState, step: int) -> bool:
    """Called after dispatching the step that brings the run to `step`; waits for it if it is one
    of the timed steps, and is True once the last of them is done."""
    if step in (self.first_step, self.last_step):
      jax.block_until_ready(state.step)
      self.times[step] = self._clock()
    return step == self.last_step

  def speed(self, seconds_per_eval_batch: float) -> budget.Speed:
    timed_steps = self.last_step - self.first_step
    return budget.Speed(
        seconds_per_step=(self.times[self.last_step] - self.times[self.first_step]) / timed_steps,
        seconds_per_eval_batch=seconds_per_eval_batch)


class StepTimer:
  """Seconds a training step since the run's plan was last made (or this session started): from
  the first step done after it, less the evaluations between."""

  def __init__(self, *, clock=time.time):
    self._clock = clock
    self.restart()

  def restart(self) -> None:
    self.start_step, self.start_time, self.paused_s = None, 0.0, 0.0

  def after_step(self, state: TrainState, step: int) -> None:
    """Called after dispatching the step that brings the run to `step`; starts the timer (waiting
    for that step) if it is not running."""
    if self.start_step is None:
      jax.block_until_ready(state.step)
      self.start_step, self.start_time = step, self._clock()

  def pause(self, seconds: float) -> None:
    """Leaves out `seconds` spent on something other than training steps (an evaluation)."""
    if self.start_step is not None:
      self.paused_s += seconds

  def seconds_per_step(self, step: int) -> float | None:
    """Mean seconds a step from the start to `step` (all done), None before a step was timed."""
    if self.start_step is None or step <= self.start_step:
      return None
    return (self._clock() - self.start_time - self.paused_s) / (step - self.start_step)


def speed_since_plan(step_timer: StepTimer, step: int, meta: dict[str, Any]) -> budget.Speed | None:
  """The speed to plan from at `step`: the steps since the last plan (`step_timer`), the last
  evaluation batch's time kept in `meta`; None before the first plan, or while no step since it
  was timed."""
  seconds_per_step = step_timer.seconds_per_step(step)
  if 'planned_steps' not in meta or 'seconds_per_eval_batch' not in meta or seconds_per_step is None:
    return None
  return budget.Speed(seconds_per_step=seconds_per_step, seconds_per_eval_batch=meta['seconds_per_eval_batch'])


def plan_budget(config: ml_collections.ConfigDict, speed: budget.Speed, *, step: int, elapsed_s: float,
                max_total_steps: int, steps_per_epoch: int, eval_batches: int,
                planned_steps: int | None = None) -> int:
  """The run's total steps under its time budget at the measured `speed`, at its first plan
  (`planned_steps` None) or at a later one (the run's plan until now: `planned_steps`). A plan made
  or changed is logged in one line."""
  new_plan = budget.steps_in_budget(
      budget_s=config.budget_minutes * 60.0, elapsed_s=elapsed_s, step=step, speed=speed,
      max_steps=max_total_steps, steps_per_epoch=steps_per_epoch, eval_every_epochs=config.eval_every_epochs,
      eval_batches=eval_batches)
  if jax.process_count() > 1:  # every process follows process 0's plan
    new_plan = int(multihost_utils.broadcast_one_to_all(np.int32(new_plan)))
  if new_plan == planned_steps:
    return planned_steps
  evaluations = budget.evaluations_left(new_plan, step=step, steps_per_epoch=steps_per_epoch,
                                        eval_every_epochs=config.eval_every_epochs)
  logging.info('time budget of %g minutes: %s%d steps (%.2f epochs; at most %d) at %.0f ms a step, %d evaluation(s) '
               'to come of %d batches at %.0f ms a batch', config.budget_minutes,
               '' if planned_steps is None else f're-planned at step {step} ({elapsed_s:.0f} s) from {planned_steps} to ',
               new_plan, new_plan / steps_per_epoch, max_total_steps, 1e3 * speed.seconds_per_step, evaluations,
               eval_batches, 1e3 * speed.seconds_per_eval_batch)
  return new_plan


def deadline_reached(elapsed_s: float, deadline_s: float, *, step: int, log_every_steps: int) -> bool:
  """Whether a budgeted run must end at `step`. With several processes, process 0's clock decides,
  at log steps only (one collective each), so that all of them end at the same step."""
  if jax.process_count() == 1:
    return elapsed_s >= deadline_s
  if step % log_every_steps:
    return False
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(elapsed_s >= deadline_s)))


# ---------------------------------------------------------------------------------- train
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config`'s model in `workdir`, resuming from its latest checkpoint if there is one.

  Writes WORKDIR/config.json, history.jsonl (one record per epoch), TensorBoard event files
  and checkpoints/. Returns the last history record (or {} when nothing was left to do).
  """
  workdir = pathlib.Path(workdir)
  is_chief = jax.process_index() == 0

  # -- config and data: every check happens before anything is written or compiled.
  if not is_chief:  # process 0 prepares the data set (if needed) before the others read it
    multihost_utils.sync_global_devices('data set prepared')
  info = data.dataset_info(config.data)
  if is_chief and jax.process_count() > 1:
    multihost_utils.sync_global_devices('data set prepared')
  configuration.validate(config, device_count=jax.device_count(), image_shape=info.image_shape)
  configuration.check_same_run(config, workdir)
  mesh = make_mesh()
  train_input = inputs.TrainInput(config, mesh)
  eval_sources = {split: inputs.eval_batches_source(config.data, config.data[f'{split}_split'],
                                                    config.eval_batch_size, flag=f'--config.data.{split}_split')
                  for split in (('val', 'test') if config.eval_test_every_epoch else ('val',))}
  steps_per_epoch = train_input.steps_per_epoch
  max_total_steps = config.num_epochs * steps_per_epoch
  if config.max_steps:
    max_total_steps = min(max_total_steps, config.max_steps)
  total_steps = max_total_steps  # a time budget plans fewer once the first steps are timed

  workdir.mkdir(parents=True, exist_ok=True)
  if is_chief:
    configuration.save_run_config(config, workdir)

  # -- state, steps.
  init_state, train_step, eval_step = build_training(config, info, mesh, steps_per_epoch=steps_per_epoch)

  # -- checkpoint: resume from the newest restorable one.
  checkpoints = RunCheckpoints(workdir, keep=config.keep_checkpoints)
  meta = {'best_val_accuracy': -1.0, 'epochs_without_improvement': 0, 'elapsed_s': 0.0}
  restored = checkpoints.restore(jax.eval_shape(init_state))
  if restored is not None:
    state, meta = restored
    if config.budget_minutes and 'planned_steps' in meta:
      total_steps = meta['planned_steps']  # the schedule the time budget planned before the stop
    logging.info('resumed from step %d of %d', int(state.step), total_steps)
  else:
    state = init_state()
    if models.fits_to_data(config.model):
      state = fit_to_training_images(state, config, info, mesh, train_input)
  start_step = int(state.step)
  if is_chief:
    truncate_history(workdir, start_step)
    parameter_overview.log_parameter_overview(state.params)

  writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief)
  if start_step == 0:
    writer.write_hparams({k: v if isinstance(v, (int, float, str, bool)) else str(v)
                         for k, v in configuration.flatten(config.to_dict()).items()})
  hooks = progress_hooks(writer, total_steps)

  if config.early_stopping_patience and meta['epochs_without_improvement'] >= config.early_stopping_patience:
    logging.info('this run stopped early (no better %s for %d evaluations): nothing to train',
                 config.best_checkpoint_metric, meta['epochs_without_improvement'])
    total_steps = start_step

  # -- time budget: the steps that fit are planned from the first steps' speed and again at every
  # evaluation and periodic checkpoint from the speed since (budget.py); at the deadline (the
  # budget less the last evaluation) the run ends wherever it is (on Lookahead's slow weights).
  budget_s = config.budget_minutes * 60.0
  probe, eval_batches, step_timer = None, 0, StepTimer()
  if budget_s:
    eval_batches = (2 if config.ema_decay else 1) * sum(  # what one evaluation runs, for the plans
        math.ceil(stream.num_examples(config.data, config.data[f'{split}_split']) / config.eval_batch_size)
        for split in eval_sources)
    if 'planned_steps' not in meta and start_step + budget.PROBE_LAST_STEP < total_steps:
      probe = BudgetProbe(start_step)
  evaluation_reserve_s = meta.get('evaluation_reserve_s', budget.DEADLINE_SLACK_S)

  # -- loop.
  stop = StopRequest()
  record: dict[str, Any] = {}
  session_start = time.time() - meta['elapsed_s']

  def plan(step: int, speed: budget.Speed) -> None:
    """Plans the run's steps at `step` from `speed`: after the probe's steps, then again at every
    evaluation and periodic checkpoint. The schedule's length is an argument of the train step,
    so a new plan costs no compile; the step timer starts again, for the speed since this plan."""
    nonlocal total_steps, hooks, meta, evaluation_reserve_s
    planned_steps = plan_budget(config, speed, step=step, elapsed_s=time.time() - session_start,
                                max_total_steps=max_total_steps, steps_per_epoch=steps_per_epoch,
                                eval_batches=eval_batches, planned_steps=meta.get('planned_steps'))
    evaluation_reserve_s = budget.evaluation_reserve_s(speed, eval_batches)
    meta = {**meta, 'planned_steps': planned_steps, 'evaluation_reserve_s': evaluation_reserve_s,
            'seconds_per_eval_batch': speed.seconds_per_eval_batch}
    if planned_steps != total_steps:
      total_steps = planned_steps
      hooks = progress_hooks(writer, total_steps)
    step_timer.restart()

  step = start_step
  pacer = DispatchPacer(step)
  try:
    while step < total_steps and not stop:
      epoch = step // steps_per_epoch
      metrics = ClassificationMetrics.empty()
      epoch_start, epoch_first_step = time.time(), step
      epoch_end = min((epoch + 1) * steps_per_epoch, total_steps)
      for step_inputs in train_input.epoch(epoch, first_step=step - epoch * steps_per_epoch):
        if step >= epoch_end or stop:
          break
        state, metrics = train_step(state, metrics, *step_inputs, total_steps=total_steps)
        step += 1
        pacer.after_step(state, step)
        if probe is not None and probe.timed(state, step):  # its last step: plan the run's length
          plan(step, probe.speed(seconds_per_eval_batch(eval_step, state, eval_sources['val'](),
                                                        batch_size=config.eval_batch_size, mesh=mesh)))
          probe = None
          epoch_end = min((epoch + 1) * steps_per_epoch, total_steps)
        elif budget_s and 'planned_steps' in meta:
          step_timer.after_step(state, step)
        if budget_s and step < total_steps and deadline_reached(
            time.time() - session_start, budget_s - evaluation_reserve_s, step=step,
            log_every_steps=config.log_every_steps):
          logging.warning('time budget of %g minutes reached at step %d of the %d planned: ending the run here',
                          config.budget_minutes, step, total_steps)
          total_steps = epoch_end = step
          if config.lookahead_decay:  # end on the slow weights, as at the planned last step
            state = jax.jit(steps.end_lookahead, donate_argnums=0)(state)
        if step % config.log_every_steps == 0:
          check_finite(state, config, checkpoints)  # waits for the step: the host is not ahead here
          train_metrics = metrics.compute()
          writer.write_scalars(step, {f'train_{k}': v for k, v in train_metrics.items()})
          check_not_diverged(float(train_metrics['loss']), step, num_classes=info.num_classes, config=config,
                             checkpoints=checkpoints)
          for hook in hooks:  # so steps/s and the ETA count finished steps, not dispatched ones
            hook(step)
        if config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0 and step < epoch_end:
          check_finite(state, config, checkpoints)
          # Plan again, as at an evaluation: a plan made from a few slow first steps is not kept
          # until an evaluation that may be the run's last.
          speed = speed_since_plan(step_timer, step, meta)
          if budget_s and speed is not None:
            plan(step, speed)
            epoch_end = min((epoch + 1) * steps_per_epoch, total_steps)
          checkpoints.save(step, state, {**meta, 'elapsed_s': time.time() - session_start})
      if stop and step < epoch_end:  # a stop at an epoch's end first records the epoch's evaluation
        break

      # -- end of epoch (or of max_steps): checkpoint; every eval_every_epochs-th epoch and at the
      # end also evaluate and record.
      check_finite(state, config, checkpoints)
      if (epoch + 1) % config.eval_every_epochs and step < total_steps:
        checkpoints.save(step, state, {**meta, 'elapsed_s': time.time() - session_start})
        logging.info('epoch %d done at step %d (next evaluation after epoch %d)', epoch + 1, step,
                     (epoch + 1) // config.eval_every_epochs * config.eval_every_epochs + config.eval_every_epochs)
        continue
      train_result = {k: float(v) for k, v in metrics.compute().items()}
      train_seconds = time.time() - epoch_start
      evaluated = {'': state, 'ema_': state.replace(params=state.ema_params)} if config.ema_decay else {'': state}
      evaluation_start = time.time()  # the steps are done: check_finite waited for them
      results = {f'{weights}{name}': evaluate_split(eval_step, weights_state, batches(),
                                                    batch_size=config.eval_batch_size, mesh=mesh)
                 for weights, weights_state in evaluated.items() for name, batches in eval_sources.items()}
      evaluation_s = time.time() - evaluation_start
      step_timer.pause(evaluation_s)
      if budget_s and 'planned_steps' in meta:
        meta = {**meta, 'seconds_per_eval_batch': evaluation_s / max(eval_batches, 1)}
      speed = speed_since_plan(step_timer, step, meta)
      if budget_s and step < total_steps and speed is not None:
        plan(step, speed)
      record = {
          'epoch': epoch + 1 if step % steps_per_epoch == 0 else round(step / steps_per_epoch, 3),
          'step': step,
          'train_loss': train_result['loss'], 'train_accuracy': train_result['accuracy'],
          **{f'{split}_{k}': v for split, result in results.items() for k, v in result.items()
             if k != 'examples'},
          'elapsed_s': round(time.time() - session_start, 2),
          'images_per_s': round((step - epoch_first_step) * config.batch_size / train_seconds, 1),
          'skipped_steps': int(optimizer_lib.skipped_updates(state.opt_state)),
          'planned_steps': total_steps,
      }
      improved, meta = rank_evaluation(meta, record, config.best_checkpoint_metric)
      meta = {**meta, 'elapsed_s': record['elapsed_s']}
      checkpoints.save(step, state, meta, best=improved)
      if is_chief:
        append_history(workdir, record)
      writer.write_scalars(step, {k: v for k, v in record.items() if k not in ('step',)})
      logging.info('epoch %s: %s', record['epoch'], json.dumps(record))
      if config.early_stopping_patience and meta['epochs_without_improvement'] >= config.early_stopping_patience:
        logging.info('early stopping: %s has not improved for %d evaluations', config.best_checkpoint_metric,
                     meta['epochs_without_improvement'])
        break
  finally:
    stop.restore_handlers()
    if stop:
      check_finite(state, config, checkpoints)
      checkpoints.save(step, state, {**meta, 'elapsed_s': time.time() - session_start})
    checkpoints.wait()
    checkpoints.close()
    writer.flush()
  if stop:
    print(f'stopped at step {step} ({stop.signal_name}); run the same command to resume', flush=True)
  return record

