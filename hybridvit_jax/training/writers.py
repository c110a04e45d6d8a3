"""The run's metric writer and progress report, without TensorFlow.

Written by hand because clu's metric_writers and periodic_actions import TensorFlow on import
(their writer is tf.summary), which accelerator images without TensorFlow lack. The event files
are TensorBoard's own (the tensorboard package's pure-Python writer): the same scalar and
hyperparameter summaries clu's writer makes, read by TensorBoard as before.
"""
import pathlib
import time
from typing import Any, Mapping

from absl import logging
from tensorboard.compat.proto import event_pb2
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.plugins.scalar import summary as scalar_summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter


class MetricWriter:
  """Scalars and hyperparameters to the log, and on process 0 to TensorBoard event files in
  `workdir` (`tensorboard=False`: the log only)."""

  def __init__(self, workdir: pathlib.Path | str, *, tensorboard: bool = True):
    self._events = EventFileWriter(str(workdir)) if tensorboard else None

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Logs `scalars` ({tag: number}) at `step` in one line and writes each as a TensorBoard scalar."""
    logging.info('[%d] %s', step, ', '.join(f'{k}={float(v):.6g}' for k, v in sorted(scalars.items())))
    if self._events is not None:
      for tag, value in scalars.items():
        self._add(step, scalar_summary.scalar_pb(tag, float(value)))

  def write_hparams(self, hparams: Mapping[str, int | float | str | bool]) -> None:
    """The run's hyperparameters, for TensorBoard's HParams tab."""
    logging.info('[hyperparameters] %s', dict(hparams))
    if self._events is not None:
      self._add(0, hparams_summary.hparams_pb(dict(hparams)))

  def _add(self, step: int, summary) -> None:
    self._events.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

  def flush(self) -> None:
    if self._events is not None:
      self._events.flush()

  def close(self) -> None:
    if self._events is not None:
      self._events.close()


class ProgressReport:
  """Every `every_secs` seconds of a run of `total_steps`: steps/s, the share done and the time
  left, in the log and as the `steps_per_sec` scalar. Called with the finished step count."""

  def __init__(self, writer: MetricWriter, total_steps: int, every_secs: float = 30.0, clock=time.monotonic):
    self._writer, self.total_steps, self._every_secs, self._clock = writer, total_steps, every_secs, clock
    self._last_step, self._last_time = None, None

  def __call__(self, step: int) -> None:
    now = self._clock()
    if self._last_step is None or step == self._last_step:
      self._last_step, self._last_time = step, now
      return
    if now - self._last_time < self._every_secs:
      return
    steps_per_sec = (step - self._last_step) / (now - self._last_time)
    seconds_left = (self.total_steps - step) / steps_per_sec
    logging.info('%.2f steps/s, %.1f%% (%d/%d), %d min %02d s left', steps_per_sec, 100 * step / self.total_steps,
                 step, self.total_steps, seconds_left // 60, seconds_left % 60)
    self._writer.write_scalars(step, {'steps_per_sec': steps_per_sec})
    self._last_step, self._last_time = step, now
