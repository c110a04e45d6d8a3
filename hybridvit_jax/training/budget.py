"""A run's step count from a time budget (`budget_minutes`): planned from the speed measured on
this machine, so that "train for 30 minutes" means the same thing on a fast hour and a slow one.

`TimeBudget` times the run's own first steps (after the compile) and one evaluation batch, then
`steps_in_budget` returns the most steps whose training and evaluations end before the deadline
(the budget less the reserve for the last evaluation, `evaluation_reserve_s`: where the loop
stops training whatever the plan), with `SAFETY_MARGIN` to spare. Every REPLAN_FRACTION of the
plan's steps, and at every evaluation and periodic checkpoint (`checkpoint_every_steps`), it plans
again from the speed since the last plan (a shared machine's speed drifts within a run). The
plan's length is an argument of the train step, so a new plan costs no compile. The plan is kept
in every checkpoint, so a resumed run follows the schedule it had. The functions are pure; the
clock is read by `TimeBudget` only.
"""
import dataclasses
import math
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from hybridvit_jax.training.state import TrainState

# Steps measured for the plan: from PROBE_FIRST_STEP (the compile and the first steps' warm-up are
# over) to PROBE_LAST_STEP. They are real training steps of the run, inside its warmup when there
# is one, where the schedule does not depend on the planned length.
PROBE_FIRST_STEP = 3
PROBE_LAST_STEP = 23
# The plan leaves this fraction of the time left unused: the speed of a shared machine drifts by
# a few per cent within an hour. The plans made at the evaluations follow the drift, and should
# the machine slow down after the last of them, the loop stops at the deadline anyway.
SAFETY_MARGIN = 0.015
# Seconds a run needs at its deadline besides its last evaluation's batches: the steps the host
# dispatched ahead of the device (up to pacing.MAX_SECONDS_AHEAD), the evaluation's input pipeline
# starting, the checkpoint. Without it a run that met its deadline ended 1 s past a 30-minute budget.
DEADLINE_SLACK_S = 10.0
# A run plans again after this fraction of its plan's steps (and at least the probe's count). The
# probe's steps can be much slower than the rest (most likely the heap growing under
# `cli.keep_freed_host_memory`: docs/experiments/vit-cpu-step.md), which left the first plan short
# until the first evaluation. The learning rate barely moves at such a
# re-plan: early in a run the schedule is near its peak, and later ones move the plan by the drift.
REPLAN_FRACTION = 0.05


@dataclasses.dataclass(frozen=True)
class Speed:
  """What the loop measured: seconds a training step and an evaluation batch."""
  seconds_per_step: float
  seconds_per_eval_batch: float


def evaluation_count(total_steps: int, *, steps_per_epoch: int, eval_every_epochs: int) -> int:
  """Evaluations a run of `total_steps` makes: after every `eval_every_epochs`-th whole epoch
  before the last step, and once at the last step."""
  whole_epochs_before_end = (total_steps - 1) // steps_per_epoch
  return whole_epochs_before_end // eval_every_epochs + 1


def evaluations_left(total_steps: int, *, step: int, steps_per_epoch: int, eval_every_epochs: int) -> int:
  """Evaluations a run of `total_steps` makes after `step`: those of `evaluation_count` less the
  ones at whole epochs up to `step` (done, or being done, when the run plans there)."""
  evaluations_done = step // steps_per_epoch // eval_every_epochs
  all_evaluations = evaluation_count(total_steps, steps_per_epoch=steps_per_epoch, eval_every_epochs=eval_every_epochs)
  return all_evaluations - evaluations_done


def steps_in_budget(*, budget_s: float, elapsed_s: float, step: int, speed: Speed, max_steps: int,
                    steps_per_epoch: int, eval_every_epochs: int, eval_batches: int) -> int:
  """The most steps (at most `max_steps`, at least `step + 1`) a run at `step`, `elapsed_s` into a
  budget of `budget_s`, can train at `speed` with the evaluations still to come before its last
  one, keeping SAFETY_MARGIN of the time to its deadline (the budget less `evaluation_reserve_s`,
  which the last evaluation takes): a plan the deadline does not cut, so the run ends on its
  schedule (learning rates at their end values, lookahead's last pull)."""
  usable_s = (budget_s - evaluation_reserve_s(speed, eval_batches) - elapsed_s) * (1.0 - SAFETY_MARGIN)

  def seconds(total_steps: int) -> float:
    evaluations_before_last = evaluations_left(total_steps, step=step, steps_per_epoch=steps_per_epoch,
                                               eval_every_epochs=eval_every_epochs) - 1
    return ((total_steps - step) * speed.seconds_per_step
            + evaluations_before_last * eval_batches * speed.seconds_per_eval_batch)

  fits, too_many = step + 1, min(max_steps, step + max(1, math.floor(usable_s / speed.seconds_per_step))) + 1
  while too_many - fits > 1:  # seconds() grows with the steps: bisect for the last count that fits
    middle = (fits + too_many) // 2
    fits, too_many = (middle, too_many) if seconds(middle) <= usable_s else (fits, middle)
  return fits


def steps_between_plans(planned_steps: int) -> int:
  """Steps from one plan to the next made without an evaluation or a checkpoint: REPLAN_FRACTION
  of the plan, at least as many as the probe times."""
  return max(PROBE_LAST_STEP - PROBE_FIRST_STEP, math.ceil(REPLAN_FRACTION * planned_steps))


def evaluation_reserve_s(speed: Speed, eval_batches: int) -> float:
  """Seconds the loop keeps back before the deadline for the last evaluation: its batches half
  again as long as measured (for a machine that slowed down), and DEADLINE_SLACK_S."""
  return 1.5 * eval_batches * speed.seconds_per_eval_batch + DEADLINE_SLACK_S



class BudgetProbe:
  """Times a budgeted run's steps PROBE_FIRST_STEP to PROBE_LAST_STEP of this session (the
  compile and the first steps' warm-up are over by then): the speed a step."""

  def __init__(self, start_step: int, *, clock=time.time, wait=jax.block_until_ready):
    self._clock, self._wait = clock, wait
    self.first_step, self.last_step = start_step + PROBE_FIRST_STEP, start_step + PROBE_LAST_STEP
    self.times: dict[int, float] = {}

  def timed(self, state: TrainState, step: int) -> bool:
    """Called after dispatching the step that brings the run to `step`; waits for it if it is one
    of the timed steps, and is True once the last of them is done."""
    if step in (self.first_step, self.last_step):
      self._wait(state.step)
      self.times[step] = self._clock()
    return step == self.last_step

  def speed(self, seconds_per_eval_batch: float) -> Speed:
    """The timed steps' mean seconds a step, with the given seconds an evaluation batch."""
    timed_steps = self.last_step - self.first_step
    return Speed(seconds_per_step=(self.times[self.last_step] - self.times[self.first_step]) / timed_steps,
                 seconds_per_eval_batch=seconds_per_eval_batch)


class StepTimer:
  """Seconds a training step since the run's plan was last made (or this session started): from
  the first step done after it, less the evaluations between."""

  def __init__(self, *, clock=time.time, wait=jax.block_until_ready):
    self._clock, self._wait = clock, wait
    self.restart()

  def restart(self) -> None:
    """Stops the timer; the next `after_step` starts it again."""
    self.start_step, self.start_time, self.paused_s = None, 0.0, 0.0

  def after_step(self, state: TrainState, step: int) -> None:
    """Called after dispatching the step that brings the run to `step`; starts the timer (waiting
    for that step) if it is not running."""
    if self.start_step is None:
      self._wait(state.step)
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


# The checkpoint meta keys of a TimeBudget's state. Runs saved before seconds_per_eval_batch was
# kept lack that one: they take it from their next evaluation.
STATE_KEYS = ('planned_steps', 'evaluation_reserve_s', 'seconds_per_eval_batch')


class TimeBudget:
  """The time budget of a run (config.budget_minutes): its plans and its deadline.

  The loop calls it after every step (`after_step`, then `deadline_reached`), at every periodic
  checkpoint (`at_checkpoint`) and after every evaluation (`at_evaluation`). The first plan comes
  from the probe's steps (this session's PROBE_FIRST_STEP to PROBE_LAST_STEP) and the seconds one
  evaluation batch takes; each later one (every REPLAN_FRACTION of the plan's steps, at a periodic
  checkpoint, after an evaluation) from the speed since the plan before. A method that plans
  returns the plan (the run's total steps), None when it made none. With several processes, every
  process follows process 0's plans and clock.

  Its state, kept in every checkpoint's meta (`state_dict`, `from_meta`), is the plan:
  planned_steps, evaluation_reserve_s and seconds_per_eval_batch (each absent until known).
  """

  def __init__(self, config: ml_collections.ConfigDict, *, start_step: int, max_total_steps: int,
               steps_per_epoch: int, eval_batches: int, session_start: float,
               time_eval_batch: Callable[[TrainState], float], planned_steps: int | None = None,
               evaluation_reserve_s: float | None = None, seconds_per_eval_batch: float | None = None,
               clock=time.time, wait=jax.block_until_ready):
    """`eval_batches`: the batches one evaluation runs; `session_start`: the clock's time at which
    the run, all its sessions together, began; `time_eval_batch(state)`: the seconds one
    evaluation batch takes, measured. The probe is only run by a run without a plan that has
    steps past it."""
    self._config = config
    self._max_total_steps, self._steps_per_epoch, self._eval_batches = max_total_steps, steps_per_epoch, eval_batches
    self._session_start, self._time_eval_batch, self._clock, self._wait = session_start, time_eval_batch, clock, wait
    self.planned_steps = planned_steps
    # A step-count rule, not a clock one: every process plans at the same step (a collective).
    self._next_plan_step = None if planned_steps is None else start_step + steps_between_plans(planned_steps)
    self.evaluation_reserve_s = evaluation_reserve_s
    self.seconds_per_eval_batch = seconds_per_eval_batch
    self._probe = None
    if planned_steps is None and start_step + PROBE_LAST_STEP < max_total_steps:
      self._probe = BudgetProbe(start_step, clock=clock, wait=wait)
    self._timer = StepTimer(clock=clock, wait=wait)

  @classmethod
  def from_meta(cls, meta: dict[str, Any], config: ml_collections.ConfigDict, **kwargs) -> 'TimeBudget':
    """The budget of a run whose checkpoint meta is `meta` (a fresh run's has no plan yet);
    `kwargs` as for the constructor."""
    return cls(config, **{key: meta.get(key) for key in STATE_KEYS}, **kwargs)

  @staticmethod
  def planned_steps_in(meta: dict[str, Any]) -> int | None:
    """The run's total steps planned before the stop that checkpoint meta `meta` was saved at,
    None before its first plan."""
    return meta.get('planned_steps')

  def state_dict(self) -> dict[str, Any]:
    """The checkpoint meta entries of the plan: those of STATE_KEYS known so far."""
    state = {key: getattr(self, key) for key in STATE_KEYS}
    return {key: value for key, value in state.items() if value is not None}

  def after_step(self, state: TrainState, step: int) -> int | None:
    """Called after dispatching the step that brings the run to `step`: times the probe's steps
    and at its last plans the run (the plan); after a plan, starts the step timer, and plans again
    (waiting for the step) once REPLAN_FRACTION of the plan's steps are done. The new plan, or None."""
    if self._probe is not None:
      if not self._probe.timed(state, step):
        return None
      speed = self._probe.speed(self._time_eval_batch(state))
      self._probe = None
      return self._plan(step, speed)
    if self.planned_steps is None:
      return None
    self._timer.after_step(state, step)
    if step < self._next_plan_step or step >= self.planned_steps:
      return None
    self._wait(state.step)
    speed = self._speed_since_plan(step)
    if speed is None:  # nothing timed yet: a run resumed from a checkpoint older than the eval-batch timing
      self._next_plan_step = step + steps_between_plans(self.planned_steps)
      return None
    return self._plan(step, speed)

  def deadline_reached(self, step: int, total_steps: int) -> bool:
    """Whether the run must end at `step`, before the `total_steps` it was to train: the budget
    less the last evaluation's reserve is spent. Logs the run's end there."""
    if step >= total_steps or not self._past_deadline(step):
      return False
    logging.warning('time budget of %g minutes reached at step %d of the %d planned: ending the run here',
                    self._config.budget_minutes, step, total_steps)
    return True

  def at_checkpoint(self, step: int) -> int | None:
    """Plans again at the periodic checkpoint of `step`, as at an evaluation (a plan made from a
    few slow first steps is not kept until an evaluation that may be the run's last): the new
    plan, None without a speed to plan from."""
    speed = self._speed_since_plan(step)
    return None if speed is None else self._plan(step, speed)

  def at_evaluation(self, step: int, evaluation_s: float, *, total_steps: int) -> int | None:
    """After the evaluation at `step` that took `evaluation_s`: keeps its seconds a batch and
    plans again if the run goes on past `step` (of `total_steps`): the new plan, or None."""
    self._timer.pause(evaluation_s)
    if self.planned_steps is not None:
      self.seconds_per_eval_batch = evaluation_s / max(self._eval_batches, 1)
    speed = self._speed_since_plan(step)
    if step >= total_steps or speed is None:
      return None
    return self._plan(step, speed)

  def _elapsed_s(self) -> float:
    return self._clock() - self._session_start

  def _speed_since_plan(self, step: int) -> Speed | None:
    """The speed to plan from at `step`: the steps' since the last plan, the last evaluation
    batch's; None before the first plan, or while no step since it was timed."""
    seconds_per_step = self._timer.seconds_per_step(step)
    if self.planned_steps is None or self.seconds_per_eval_batch is None or seconds_per_step is None:
      return None
    return Speed(seconds_per_step=seconds_per_step, seconds_per_eval_batch=self.seconds_per_eval_batch)

  def _plan(self, step: int, speed: Speed) -> int:
    """Plans the run's total steps at `step` from `speed` and returns them; a plan made or changed
    is logged in one line. The step timer starts again, for the speed since this plan."""
    config, steps_per_epoch, elapsed_s = self._config, self._steps_per_epoch, self._elapsed_s()
    new_plan = steps_in_budget(
        budget_s=config.budget_minutes * 60.0, elapsed_s=elapsed_s, step=step, speed=speed,
        max_steps=self._max_total_steps, steps_per_epoch=steps_per_epoch,
        eval_every_epochs=config.eval_every_epochs, eval_batches=self._eval_batches)
    if jax.process_count() > 1:  # every process follows process 0's plan
      new_plan = int(multihost_utils.broadcast_one_to_all(np.int32(new_plan)))
    if new_plan != self.planned_steps:
      evaluations = evaluations_left(new_plan, step=step, steps_per_epoch=steps_per_epoch,
                                     eval_every_epochs=config.eval_every_epochs)
      logging.info('time budget of %g minutes: %s%d steps (%.2f epochs; at most %d) at %.0f ms a step, '
                   '%d evaluation(s) to come of %d batches at %.0f ms a batch', config.budget_minutes,
                   '' if self.planned_steps is None
                   else f're-planned at step {step} ({elapsed_s:.0f} s) from {self.planned_steps} to ',
                   new_plan, new_plan / steps_per_epoch, self._max_total_steps, 1e3 * speed.seconds_per_step,
                   evaluations, self._eval_batches, 1e3 * speed.seconds_per_eval_batch)
    self.planned_steps = new_plan
    self.evaluation_reserve_s = evaluation_reserve_s(speed, self._eval_batches)
    self.seconds_per_eval_batch = speed.seconds_per_eval_batch
    self._next_plan_step = step + steps_between_plans(new_plan)
    self._timer.restart()
    return new_plan

  def _past_deadline(self, step: int) -> bool:
    """Whether the budget less the last evaluation's reserve is spent at `step`. With several
    processes, process 0's clock decides, at log steps only (one collective each), so that all of
    them end at the same step."""
    reserve_s = DEADLINE_SLACK_S if self.evaluation_reserve_s is None else self.evaluation_reserve_s
    past = self._elapsed_s() >= self._config.budget_minutes * 60.0 - reserve_s
    if jax.process_count() == 1:
      return past
    if step % self._config.log_every_steps:
      return False
    return bool(multihost_utils.broadcast_one_to_all(np.asarray(past)))


class NoTimeBudget:
  """What a run without a time budget calls where a budgeted one calls its TimeBudget: it plans
  nothing (None), has no deadline and no state."""
  planned_steps = None

  def state_dict(self) -> dict[str, Any]:
    return {}

  def after_step(self, state: TrainState, step: int) -> None:
    del state, step

  def deadline_reached(self, step: int, total_steps: int) -> bool:
    del step, total_steps
    return False

  def at_checkpoint(self, step: int) -> None:
    del step

  def at_evaluation(self, step: int, evaluation_s: float, *, total_steps: int) -> None:
    del step, evaluation_s, total_steps
