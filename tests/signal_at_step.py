"""`python tests/signal_at_step.py STEP SIGNAL LAUNCH_FLAGS...`: launch.py, which sends itself
SIGNAL (TERM, INT or KILL) right after dispatching step STEP (of each run it trains).
`... STEP SIGNAL -m MODULE FLAGS...` runs the module instead (hybridvit_jax.study).

What a scheduler, Ctrl-C or the OOM killer does from outside, at a chosen step instead of
whenever a timed signal lands: the run's own handler gets the same signal, and a test of it
cannot lose a race to a run that finishes first.
"""
import os
import pathlib
import runpy
import signal
import sys

from hybridvit_jax.training import pacing

REPO = pathlib.Path(__file__).resolve().parents[1]


def main() -> None:
  at_step, signal_number = int(sys.argv[1]), getattr(signal, f'SIG{sys.argv[2]}')
  after_step = pacing.DispatchPacer.after_step

  def after_step_then_signal(pacer, state, step):
    after_step(pacer, state, step)
    if step == at_step:
      os.kill(os.getpid(), signal_number)

  pacing.DispatchPacer.after_step = after_step_then_signal
  if sys.argv[3] == '-m':
    sys.argv = [sys.argv[4], *sys.argv[5:]]
    runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)
  else:
    sys.argv = [str(REPO / 'launch.py'), *sys.argv[3:]]
    runpy.run_path(sys.argv[0], run_name='__main__')


if __name__ == '__main__':
  main()
