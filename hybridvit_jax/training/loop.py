"""`train_and_evaluate(config, workdir)`: the training loop, read top to bottom in sections.

Side effects (logging, history, checkpoints) happen in the loop and its helpers here, and in the
time budget it calls (budget.TimeBudget); everything inside the jitted steps is pure (see
steps.py). The history file is history.py's, stop signals signals.py's, the host's pacing
pacing.py's.
"""
import dataclasses
import functools
import json
import math
import pathlib
import time
from typing import Any, Callable

import jax
import ml_collections
from absl import logging
from clu import parameter_overview
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from hybridvit_jax import configuration, data, models
from hybridvit_jax.training import optimizer as optimizer_lib
from hybridvit_jax.training import budget, history, inputs, pacing, signals, steps, writers
from hybridvit_jax.training.checkpoint import RunCheckpoints
from hybridvit_jax.training.metrics import ClassificationMetrics, TrainMetrics
from hybridvit_jax.training.state import TrainState, init_train_state, model_graphdef

# Training images that a fresh run fits the model's data-fitted parts to (patch whitening).
FIT_EXAMPLES = 5000
# Steps of a session before its profile (config.profile_steps) starts: the compile is done.
PROFILE_WARMUP_STEPS = 5


class RunStopped(Exception):
  """A stop signal (SIGTERM, SIGINT) ended the session at `step`, after its checkpoint was saved:
  rerunning the command resumes the run. `record`: the session's last evaluation record, if any."""

  def __init__(self, step: int, record: dict[str, Any]):
    super().__init__(f'stopped at step {step}')
    self.step, self.record = step, record


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


def evaluate(eval_step, state: TrainState, eval_sources: dict[str, Callable[[], inputs.Batches]], *,
             config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> tuple[dict[str, dict[str, float]], float]:
  """Evaluates `state` on every split of `eval_sources`, and with config.ema_decay its EMA
  weights too. Returns the results ({split: evaluate_split's result}, the EMA's as
  ema_<split>) and the seconds they took."""
  evaluated = {'': state, 'ema_': state.replace(params=state.ema_params)} if config.ema_decay else {'': state}
  evaluation_start = time.time()  # the steps are done: check_finite waited for them
  results = {f'{weights}{name}': evaluate_split(eval_step, weights_state, batches(),
                                                batch_size=config.eval_batch_size, mesh=mesh)
             for weights, weights_state in evaluated.items() for name, batches in eval_sources.items()}
  return results, time.time() - evaluation_start


def evaluation_batches(config: ml_collections.ConfigDict, splits) -> int:
  """The eval_step calls one evaluation of the named `splits` makes (twice as many with EMA
  weights): what a time budget's plans count an evaluation by."""
  return (2 if config.ema_decay else 1) * sum(
      math.ceil(data.split_size(config.data, config.data[f'{split}_split']) / config.eval_batch_size)
      for split in splits)


def evaluate_and_record(state: TrainState, metrics: TrainMetrics, *, config: ml_collections.ConfigDict,
                        evaluate_state: Callable[[TrainState], tuple[dict[str, dict[str, float]], float]],
                        time_budget: budget.TimeBudget | budget.NoTimeBudget, epoch: int, step: int,
                        epoch_first_step: int, epoch_start: float, steps_per_epoch: int, total_steps: int,
                        session_start: float) -> tuple[dict[str, Any], int]:
  """The evaluation at `step`, the end of the 0-based `epoch` (or of the run), and its history record.

  `metrics` are the epoch's train metrics since `epoch_first_step`, whose training began at time
  `epoch_start`; `evaluate_state(state)` is `evaluate` bound to the run's eval step and splits.
  The time budget plans again after the evaluation. Returns the record and the run's total steps
  after that plan (the record's planned_steps).
  """
  train_result = {k: float(v) for k, v in metrics.compute().items()}
  train_seconds = time.time() - epoch_start
  results, evaluation_s = evaluate_state(state)
  planned = time_budget.at_evaluation(step, evaluation_s, total_steps=total_steps)
  total_steps = total_steps if planned is None else planned
  return {
      'epoch': epoch + 1 if step % steps_per_epoch == 0 else round(step / steps_per_epoch, 3),
      'step': step,
      'train_loss': train_result['loss'], 'train_accuracy': train_result['accuracy'],
      **{f'{split}_{k}': v for split, result in results.items() for k, v in result.items()
         if k != 'examples'},
      'elapsed_s': round(time.time() - session_start, 2),
      'images_per_s': round((step - epoch_first_step) * config.batch_size / train_seconds, 1),
      'skipped_steps': int(optimizer_lib.skipped_updates(state.opt_state)),
      'planned_steps': total_steps,
  }, total_steps


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
  abstract = models.abstract_model(config.model, num_classes=info.num_classes, image_shape=info.image_shape)
  make_optimizer = functools.partial(optimizer_lib.make_optimizer, config.optimizer, steps_per_epoch=steps_per_epoch,
                                     param_groups=models.param_groups(abstract))
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


class StepProfile:
  """A jax.profiler trace of `num_steps` steps (config.profile_steps; 0 = none),
  PROFILE_WARMUP_STEPS steps into this session, written into WORKDIR/plugins/profile/
  (TensorBoard's profile tab and XProf read it). The host waits for each traced step, so the
  trace holds its device work."""

  def __init__(self, num_steps: int, workdir: pathlib.Path, start_step: int):
    self.first_step = start_step + PROFILE_WARMUP_STEPS
    self.last_step = self.first_step + num_steps if num_steps else -1
    self._workdir = workdir

  def after_step(self, state: TrainState, step: int) -> None:
    """Called after dispatching the step that brings the run to `step`: starts or ends the trace."""
    if not self.first_step <= step <= self.last_step:
      return
    jax.block_until_ready(state.step)
    if step == self.first_step:
      jax.profiler.start_trace(str(self._workdir))
    elif step == self.last_step:
      jax.profiler.stop_trace()
      logging.info('profile of steps %d-%d written to %s', self.first_step + 1, step, self._workdir)

  def close(self, step: int) -> None:
    """Ends a trace that the run's end (at `step`) cut short."""
    if self.first_step <= step < self.last_step:
      jax.profiler.stop_trace()


def fit_to_training_images(state: TrainState, config: ml_collections.ConfigDict, info: data.DatasetInfo,
                           mesh: jax.sharding.Mesh, train_input: inputs.TrainInput) -> TrainState:
  """A fresh state with the model's data-fitted parts (patch whitening) set from the first
  FIT_EXAMPLES training images, computed on device."""
  graphdef = model_graphdef(config.model, num_classes=info.num_classes, image_shape=info.image_shape)
  fit = jax.jit(functools.partial(steps.fit_to_data, graphdef=graphdef, data_config=config.data),
                out_shardings=NamedSharding(mesh, P()))
  return fit(state, train_input.first_images(FIT_EXAMPLES))


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


def learning_rates(opt_config: ml_collections.ConfigDict, step: int, *, steps_per_epoch: int,
                   total_steps: int) -> dict[str, float]:
  """The peak-scaled rates the update of `step` (0-based) used, as TensorBoard scalars:
  learning_rate, and muon_learning_rate for Muon's kernels."""
  rate = float(optimizer_lib.learning_rate_schedule(opt_config, steps_per_epoch=steps_per_epoch,
                                                    total_steps=total_steps)(step))
  rates = {'learning_rate': rate}
  if opt_config.name == 'muon':
    rates['muon_learning_rate'] = rate * opt_config.muon_learning_rate / opt_config.learning_rate
  return rates


def log_train_metrics(run: 'Run', state: TrainState, metrics: TrainMetrics, step: int, *,
                      progress: writers.ProgressReport, total_steps: int) -> None:
  """At a log step: stops a run whose loss is non-finite or diverged (check_finite,
  check_not_diverged), writes the epoch's train metrics so far (train_loss, train_accuracy,
  train_grad_norm) and the learning rates, and reports progress."""
  config = run.config
  check_finite(state, config, run.checkpoints)  # waits for the step: the host is not ahead here
  train_metrics = metrics.compute()
  run.writer.write_scalars(step, {**{f'train_{k}': v for k, v in train_metrics.items()},
                                  **learning_rates(config.optimizer, step - 1, steps_per_epoch=run.steps_per_epoch,
                                                   total_steps=total_steps)})
  check_not_diverged(float(train_metrics['loss']), step, num_classes=run.info.num_classes, config=config,
                     checkpoints=run.checkpoints)
  progress(step)  # here, so steps/s and the time left count finished steps, not dispatched ones


# ---------------------------------------------------------------------------------- setup
def prepared_dataset_info(data_config: ml_collections.ConfigDict) -> data.DatasetInfo:
  """The data set's info; with several processes, process 0 prepares the data set (if needed)
  before the others read it."""
  is_chief = jax.process_index() == 0
  if not is_chief:
    multihost_utils.sync_global_devices('data set prepared')
  info = data.dataset_info(data_config)
  if is_chief and jax.process_count() > 1:
    multihost_utils.sync_global_devices('data set prepared')
  return info


def eval_batch_sources(config: ml_collections.ConfigDict) -> dict[str, Callable[[], inputs.Batches]]:
  """The splits every evaluation runs, by name (val, and test with eval_test_every_epoch): each a
  function that yields its batches. A bad split is a ConfigError naming its flag."""
  return {split: inputs.eval_batches_source(config.data, config.data[f'{split}_split'], config.eval_batch_size,
                                            flag=f'--config.data.{split}_split')
          for split in (('val', 'test') if config.eval_test_every_epoch else ('val',))}


def make_writer(config: ml_collections.ConfigDict, workdir: pathlib.Path, *,
                fresh: bool) -> writers.MetricWriter:
  """The run's metric writer (TensorBoard and the log on process 0, the log only on the others);
  a `fresh` run's records the config's hyperparameters first."""
  writer = writers.MetricWriter(workdir, tensorboard=jax.process_index() == 0)
  if fresh:
    writer.write_hparams({k: v if isinstance(v, (int, float, str, bool)) else str(v)
                         for k, v in configuration.flatten(config.to_dict()).items()})
  return writer


def restore_or_init(config: ml_collections.ConfigDict, checkpoints: RunCheckpoints, init_state, *,
                    info: data.DatasetInfo, mesh: jax.sharding.Mesh, train_input: inputs.TrainInput,
                    max_total_steps: int) -> tuple[TrainState, dict[str, Any], int]:
  """The state a run trains from, the checkpoint meta it continues and the run's total steps.

  From the newest restorable checkpoint: its state and meta, and the steps its time budget
  planned (with a budget) or `max_total_steps`. Without one: a fresh state (its data-fitted
  parts fitted to the training images) and the meta of a run without evaluations.
  """
  restored = checkpoints.restore(jax.eval_shape(init_state))
  if restored is None:
    state = init_state()
    if models.fits_to_data(models.abstract_model(config.model, num_classes=info.num_classes,
                                                 image_shape=info.image_shape)):
      state = fit_to_training_images(state, config, info, mesh, train_input)
    return state, {'best_val_accuracy': -1.0, 'epochs_without_improvement': 0, 'elapsed_s': 0.0}, max_total_steps
  state, meta = restored
  planned_steps = budget.TimeBudget.planned_steps_in(meta) if config.budget_minutes else None
  total_steps = max_total_steps if planned_steps is None else planned_steps  # the schedule planned before the stop
  logging.info('resumed from step %d of %d', int(state.step), total_steps)
  return state, meta, total_steps


def checkpoint_meta(meta: dict[str, Any], time_budget: budget.TimeBudget | budget.NoTimeBudget,
                    elapsed_s: float) -> dict[str, Any]:
  """What a checkpoint saves besides the state: the loop's `meta` (the evaluations' ranking, and
  whatever the restored meta held), the time budget's state, and the run's `elapsed_s`."""
  return {**meta, **time_budget.state_dict(), 'elapsed_s': elapsed_s}


def end_at_deadline(state: TrainState, config: ml_collections.ConfigDict) -> TrainState:
  """The state a run cut by its time budget's deadline ends on: with Lookahead its slow weights,
  as at the planned last step."""
  return jax.jit(steps.end_lookahead, donate_argnums=0)(state) if config.lookahead_decay else state


def publish_record(record: dict[str, Any], workdir: pathlib.Path, writer: writers.MetricWriter) -> None:
  """An evaluation's history record: appended to history.jsonl (by process 0), written as
  TensorBoard scalars and logged."""
  if jax.process_index() == 0:
    history.append_history(workdir, record)
  writer.write_scalars(record['step'], {k: v for k, v in record.items() if k != 'step'})
  logging.info('epoch %s: %s', record['epoch'], json.dumps(record))


def stopped_early(config: ml_collections.ConfigDict, meta: dict[str, Any]) -> bool:
  """Whether early stopping ends the run of checkpoint meta `meta`."""
  return bool(config.early_stopping_patience) and meta['epochs_without_improvement'] >= config.early_stopping_patience


def follow_plan(planned: int | None, total_steps: int, progress: writers.ProgressReport) -> int:
  """The run's total steps once the time budget planned `planned` steps (None: no plan was made).
  The schedule's length is an argument of the train step, so a new plan costs no compile; the
  progress report counts toward the new end."""
  if planned is None:
    return total_steps
  progress.total_steps = planned
  return planned


def make_time_budget(run: 'Run', meta: dict[str, Any], *, start_step: int,
                     session_start: float) -> budget.TimeBudget | budget.NoTimeBudget:
  """The run's time budget, continuing the plan kept in checkpoint `meta`; a run without
  config.budget_minutes gets one that does nothing."""
  config = run.config
  if not config.budget_minutes:
    return budget.NoTimeBudget()
  return budget.TimeBudget.from_meta(
      meta, config, start_step=start_step, max_total_steps=run.max_total_steps, steps_per_epoch=run.steps_per_epoch,
      eval_batches=evaluation_batches(config, run.eval_sources), session_start=session_start,
      time_eval_batch=lambda state: seconds_per_eval_batch(run.eval_step, state, run.eval_sources['val'](),
                                                           batch_size=config.eval_batch_size, mesh=run.mesh))


# ---------------------------------------------------------------------------------- set up
@dataclasses.dataclass(frozen=True)
class Run:
  """What a training session works with, made once by set_up_run: the data, the mesh, the jitted
  steps and the run's files. The loop's changing values (state, step, ...) are not in it."""

  config: ml_collections.ConfigDict
  workdir: pathlib.Path
  info: data.DatasetInfo
  mesh: jax.sharding.Mesh
  train_input: inputs.TrainInput
  eval_sources: dict[str, Callable[[], inputs.Batches]]
  steps_per_epoch: int
  max_total_steps: int  # num_epochs (or max_steps) worth of steps: the most any plan may take
  train_step: Callable[..., Any]
  eval_step: Callable[..., Any]
  checkpoints: RunCheckpoints
  writer: writers.MetricWriter

  def evaluate(self, state: TrainState) -> dict[str, float]:
    return evaluate(self.eval_step, state, eval_sources=self.eval_sources, config=self.config, mesh=self.mesh)


def set_up_run(config: ml_collections.ConfigDict,
               workdir: pathlib.Path) -> tuple[Run, TrainState, dict[str, Any], int]:
  """Checks `config` against the data and `workdir` before anything is written or compiled, then
  builds the steps and restores the newest checkpoint (or a fresh state).

  Returns (run, state, checkpoint meta, the run's total steps).
  """
  info = prepared_dataset_info(config.data)
  configuration.validate(config, device_count=jax.device_count(), image_shape=info.image_shape)
  configuration.check_same_run(config, workdir)
  mesh = make_mesh()
  train_input = inputs.TrainInput(config, mesh)
  eval_sources = eval_batch_sources(config)
  steps_per_epoch = train_input.steps_per_epoch
  max_total_steps = config.num_epochs * steps_per_epoch
  max_total_steps = min(max_total_steps, config.max_steps or max_total_steps)
  is_chief = jax.process_index() == 0
  workdir.mkdir(parents=True, exist_ok=True)
  if is_chief:
    configuration.save_run_config(config, workdir)
  init_state, train_step, eval_step = build_training(config, info, mesh, steps_per_epoch=steps_per_epoch)

  checkpoints = RunCheckpoints(workdir, keep=config.keep_checkpoints)
  state, meta, total_steps = restore_or_init(config, checkpoints, init_state, info=info, mesh=mesh,
                                             train_input=train_input, max_total_steps=max_total_steps)
  if is_chief:
    history.truncate_history(workdir, int(state.step))
    parameter_overview.log_parameter_overview(state.params)
  run = Run(config=config, workdir=workdir, info=info, mesh=mesh, train_input=train_input,
            eval_sources=eval_sources, steps_per_epoch=steps_per_epoch, max_total_steps=max_total_steps,
            train_step=train_step, eval_step=eval_step, checkpoints=checkpoints,
            writer=make_writer(config, workdir, fresh=int(state.step) == 0))
  if stopped_early(config, meta):
    logging.info('this run stopped early (no better %s for %d evaluations): nothing to train',
                 config.best_checkpoint_metric, meta['epochs_without_improvement'])
    total_steps = int(state.step)
  return run, state, meta, total_steps


def raise_if_stopped(stop: signals.StopRequest, stopping: bool, step: int, record: dict[str, Any]) -> None:
  """After a session a stop signal ended (here, or `stopping`: agreed with another process): the
  line that says how to resume, then RunStopped, so that a caller with more to do stops too."""
  if stop or stopping:
    print(f'stopped at step {step} ({stop.signal_name or "a signal to another process"}); '
          'run the same command to resume', flush=True)
    raise RunStopped(step, record)


def close_run(run: Run, state: TrainState, step: int, *, stopping: bool, stop: signals.StopRequest,
              meta_to_save: Callable[[], dict[str, Any]], profile: 'StepProfile') -> None:
  """A session's end, however it ends: a stopped run's checkpoint (every process saves this step
  together), the pending saves, the writer and profile closed; only then the default signal
  handlers back, so that a signal during those saves cannot kill them."""
  try:
    if stopping:
      check_finite(state, run.config, run.checkpoints)
      run.checkpoints.save(step, state, meta_to_save())
    run.checkpoints.wait()
    run.checkpoints.close()
    run.writer.close()
    profile.close(step)
  finally:
    stop.restore_handlers()


def record_evaluation(run: Run, state: TrainState, metrics: TrainMetrics, meta: dict[str, Any],
                      time_budget: budget.TimeBudget | budget.NoTimeBudget, progress: writers.ProgressReport, *,
                      epoch: int, step: int, epoch_first_step: int, epoch_start: float, total_steps: int,
                      session_start: float) -> tuple[dict[str, Any], dict[str, Any], int]:
  """An epoch's evaluation (evaluate_and_record), ranked against the best so far, checkpointed (as
  the best if it is), appended to the history and written to TensorBoard.

  Returns (the history record, the checkpoint meta, the run's total steps after the time budget's
  new plan).
  """
  record, planned = evaluate_and_record(
      state, metrics, config=run.config, evaluate_state=run.evaluate, time_budget=time_budget, epoch=epoch,
      step=step, epoch_first_step=epoch_first_step, epoch_start=epoch_start, steps_per_epoch=run.steps_per_epoch,
      total_steps=total_steps, session_start=session_start)
  total_steps = follow_plan(planned, total_steps, progress)
  improved, meta = rank_evaluation({**meta, **time_budget.state_dict()}, record, run.config.best_checkpoint_metric)
  run.checkpoints.save(step, state, checkpoint_meta(meta, time_budget, record['elapsed_s']), best=improved)
  publish_record(record, run.workdir, run.writer)
  return record, meta, total_steps


# ---------------------------------------------------------------------------------- train
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config`'s model in `workdir`, resuming from its latest checkpoint if there is one.

  Writes WORKDIR/config.json, history.jsonl (one record per epoch), TensorBoard event files
  and checkpoints/. Returns the last history record (or {} when nothing was left to do); raises
  RunStopped after a stop signal, so that a caller with more to do (a study) stops as well.
  """
  # -- set up and restore: every check happens before anything is written or compiled.
  run, state, meta, total_steps = set_up_run(config, pathlib.Path(workdir))
  checkpoints, steps_per_epoch = run.checkpoints, run.steps_per_epoch
  start_step = int(state.step)
  progress = writers.ProgressReport(run.writer, total_steps)

  # -- time budget (budget.py): the steps that fit are planned from the first steps' speed, and
  # again at every evaluation and periodic checkpoint; at the deadline (the budget less the last
  # evaluation) the run ends wherever it is.
  stop, stopping = signals.StopRequest(run.mesh), False  # `stopping`: agreed by every process
  profile = StepProfile(config.profile_steps, run.workdir, start_step)
  record: dict[str, Any] = {}
  session_start = time.time() - meta['elapsed_s']
  time_budget = make_time_budget(run, meta, start_step=start_step, session_start=session_start)
  meta_to_save = lambda: checkpoint_meta(meta, time_budget, time.time() - session_start)  # pylint: disable=unnecessary-lambda-assignment

  # -- loop: an epoch's steps (each logged, checkpointed, budgeted as due), then its evaluation.
  step = start_step
  pacer = pacing.DispatchPacer(step)
  try:
    while step < total_steps and not stopping:
      epoch = step // steps_per_epoch
      metrics = TrainMetrics.empty()
      epoch_start, epoch_first_step = time.time(), step
      epoch_end = min((epoch + 1) * steps_per_epoch, total_steps)
      for step_inputs in run.train_input.epoch(epoch, first_step=step - epoch * steps_per_epoch):
        if step >= epoch_end or stopping:
          break
        state, metrics = run.train_step(state, metrics, *step_inputs, total_steps=total_steps)
        step += 1
        pacer.after_step(state, step)
        profile.after_step(state, step)
        stopping = stop.agreed()
        # The time budget plans the run after its probe's steps, and ends it at the deadline.
        total_steps = follow_plan(time_budget.after_step(state, step), total_steps, progress)
        if time_budget.deadline_reached(step, total_steps):
          total_steps, state = step, end_at_deadline(state, config)
        epoch_end = min((epoch + 1) * steps_per_epoch, total_steps)

        # -- log.
        if step % config.log_every_steps == 0:
          log_train_metrics(run, state, metrics, step, progress=progress, total_steps=total_steps)

        # -- periodic checkpoint; the time budget plans again, as at an evaluation.
        if config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0 and step < epoch_end:
          check_finite(state, config, checkpoints)
          total_steps = follow_plan(time_budget.at_checkpoint(step), total_steps, progress)
          epoch_end = min((epoch + 1) * steps_per_epoch, total_steps)
          checkpoints.save(step, state, meta_to_save())
      if stopping and step < epoch_end:  # a stop at an epoch's end first records the epoch's evaluation
        break

      # -- end of epoch (or of max_steps): checkpoint; every eval_every_epochs-th epoch and at the
      # end also evaluate and record.
      check_finite(state, config, checkpoints)
      if (epoch + 1) % config.eval_every_epochs and step < total_steps:
        checkpoints.save(step, state, meta_to_save())
        logging.info('epoch %d done at step %d (next evaluation after epoch %d)', epoch + 1, step,
                     (epoch + 1 + config.eval_every_epochs) // config.eval_every_epochs * config.eval_every_epochs)
        continue
      record, meta, total_steps = record_evaluation(
          run, state, metrics, meta, time_budget, progress, epoch=epoch, step=step, epoch_first_step=epoch_first_step,
          epoch_start=epoch_start, total_steps=total_steps, session_start=session_start)
      if stopped_early(config, meta):
        logging.info('early stopping: %s has not improved for %d evaluations', config.best_checkpoint_metric,
                     meta['epochs_without_improvement'])
        break
  finally:
    close_run(run, state, step, stopping=stopping, stop=stop, meta_to_save=meta_to_save, profile=profile)
  raise_if_stopped(stop, stopping, step, record)
  return record
