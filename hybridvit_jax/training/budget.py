"""A run's step count from a time budget (`budget_minutes`): planned from the speed measured on
this machine, so that "train for 30 minutes" means the same thing on a fast hour and a slow one.

The loop times the run's own first steps (after the compile) and one evaluation batch, then
`steps_in_budget` returns the most steps whose training and evaluations end before the deadline
(the budget less the reserve for the last evaluation, `evaluation_reserve_s`: where the loop
stops training whatever the plan), with `SAFETY_MARGIN` to spare. At every evaluation and every
periodic checkpoint (`checkpoint_every_steps`) the loop plans again from the speed since the last
plan (a shared machine's speed drifts within a run). The plan's length is an argument of the
train step, so a new plan costs no compile. The plan is kept in every checkpoint, so a resumed
run follows the schedule it had. Pure functions only: the clock is read in the loop.
"""
import dataclasses
import math

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
# dispatched ahead of the device (up to loop.MAX_SECONDS_AHEAD), the evaluation's input pipeline
# starting, the checkpoint. Without it a run that met its deadline ended 1 s past a 30-minute budget.
DEADLINE_SLACK_S = 10.0


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


def evaluation_reserve_s(speed: Speed, eval_batches: int) -> float:
  """Seconds the loop keeps back before the deadline for the last evaluation: its batches half
  again as long as measured (for a machine that slowed down), and DEADLINE_SLACK_S."""
  return 1.5 * eval_batches * speed.seconds_per_eval_batch + DEADLINE_SLACK_S
