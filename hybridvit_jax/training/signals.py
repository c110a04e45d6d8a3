"""Stop signals: SIGTERM / SIGINT become a flag the training loop checks after each step, so a
stopped run saves a checkpoint and can be resumed; with several processes, they agree on the
step to stop at."""
import signal

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P


class StopRequest:
  """Turns SIGTERM / SIGINT into a flag, true once one came, and the step to stop at, agreed by
  every process (`agreed`).

  The handlers stay until `restore_handlers`, which the loop calls only once its last checkpoint
  is on disk: a signal during that save (a second one, or a preemption at the run's end) is noted
  in the log and the save finishes.
  """

  def __init__(self, mesh: jax.sharding.Mesh):
    self.signal_name = None
    self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    self._pending: jax.Array | None = None
    if jax.process_count() > 1:
      self._flag_sharding = NamedSharding(mesh, P('data'))
      self._any = jax.jit(jnp.any, out_shardings=NamedSharding(mesh, P()))

  def _handle(self, signum, _frame):
    name = signal.Signals(signum).name
    if self.signal_name is not None:
      logging.warning('%s received while stopping after %s: ignored, the checkpoint is being saved',
                      name, self.signal_name)
      return
    self.signal_name = name

  def __bool__(self):
    return self.signal_name is not None

  def agreed(self) -> bool:
    """Whether every process stops after this step: called once after every step by every process,
    it answers the same on all of them. With one process, its own flag; with several, whether any
    process's flag was set one call earlier.

    A signal reaches the hosts of a TPU pod or a SLURM job at different moments, or one host only;
    a process that left the loop alone would leave the others waiting in the next step's
    collectives forever. The flags are reduced on the devices (one tiny collective queued behind
    the step) and read a call later, so the host does not wait for the step it just dispatched.
    """
    if jax.process_count() == 1:
      return bool(self)
    agreed = self._pending is not None and bool(self._pending.addressable_data(0))
    local_flags = np.full((jax.local_device_count(),), bool(self))
    self._pending = self._any(jax.make_array_from_process_local_data(self._flag_sharding, local_flags))
    return agreed

  def restore_handlers(self):
    """Puts back the handlers that were installed before this request's."""
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
