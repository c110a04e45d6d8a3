"""Dispatch pacing: how far the host may queue training steps ahead of the device."""
import time

import jax

from hybridvit_jax.training.state import TrainState

# JAX dispatches steps asynchronously, so the host can queue many steps ahead of the device, and
# a stop request is only acted on once they are done: the host waits whenever it is more than this
# many seconds of steps ahead (with slow steps, the steps queued between two log lines could take
# longer than any preemption notice leaves).
MAX_SECONDS_AHEAD = 2.0


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
