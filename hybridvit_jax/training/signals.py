"""Stop signals: SIGTERM / SIGINT become a flag the training loop checks after each step, so a
stopped run saves a checkpoint and can be resumed."""
import signal


class StopRequest:
  """Turns SIGTERM / SIGINT into a flag the loop checks after each step; true once one came."""

  def __init__(self):
    self.signal_name = None
    self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

  def _handle(self, signum, _frame):
    self.signal_name = signal.Signals(signum).name

  def __bool__(self):
    return self.signal_name is not None

  def restore_handlers(self):
    """Puts back the handlers that were installed before this request's."""
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
