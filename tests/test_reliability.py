"""Nothing lost under SIGTERM, SIGKILL, corrupt checkpoints, non-finite losses or bad input;
multi-process runs on JAX's own runtime. Each test does what a user (or a cluster) would do."""
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from hybridvit_jax.configs import vit
from hybridvit_jax import cli
from hybridvit_jax.evaluate import evaluate, restore_run
from hybridvit_jax.training import loop, pacing
from hybridvit_jax.training.history import read_history
from hybridvit_jax.training.checkpoint import RunCheckpoints

from conftest import LAUNCH_FLAGS as RUN_FLAGS, REPO, run_command as run

# launch.py that sends itself a signal right after a chosen step (not a timed signal from outside).
SIGNAL_AT_STEP = 'tests/signal_at_step.py'


def run_train_main(config, workdir: pathlib.Path, capsys) -> tuple[int, str]:
  """launch.py's body (cli.train_main under cli.run_and_exit) on a parsed config, in this process:
  (its exit code, its stderr). A subprocess costs seconds of importing the stack; one subprocess
  test checks the command's own exit code."""
  try:
    cli.run_and_exit(cli.train_main, config, str(workdir))
    code = 0
  except SystemExit as exit_request:
    code = exit_request.code
  return code, capsys.readouterr().err


def saved_steps(workdir: pathlib.Path) -> list[int]:
  """Completed checkpoint steps (Orbax writes into *.orbax-checkpoint-tmp-* and renames at the end)."""
  directory = workdir / 'checkpoints' / 'latest'
  return sorted(int(p.name) for p in directory.glob('*') if p.name.isdigit()) if directory.exists() else []


def final_params(workdir: pathlib.Path) -> dict:
  return jax.device_get(restore_run(workdir, 'latest')[3].params)


def assert_same_run(workdir: pathlib.Path, reference: pathlib.Path) -> None:
  """Bitwise the same parameters and the same evaluation, to the last digit."""
  jax.tree.map(np.testing.assert_array_equal, final_params(workdir), final_params(reference))
  assert evaluate(str(workdir), 'latest', 'val') == {**evaluate(str(reference), 'latest', 'val'),
                                                     'workdir': str(workdir)}


@pytest.mark.slow
def test_sigterm_then_sigkill_then_rerun_is_bitwise_the_uninterrupted_run(tmp_path, launched_run):
  """A SIGTERM (after step 5) saves, says how to resume and exits 0; the resumed run, killed with
  SIGKILL after step 13, loses at most the steps since its last complete checkpoint; the rerun ends
  bitwise where the run never interrupted does."""
  workdir = tmp_path / 'run'
  stopped = run(SIGNAL_AT_STEP, '5', 'TERM', *RUN_FLAGS, f'--workdir={workdir}')
  assert stopped.returncode == 0, stopped.stderr[-3000:]
  assert stopped.stdout.strip().splitlines()[-1] == 'stopped at step 5 (SIGTERM); run the same command to resume'
  assert saved_steps(workdir)[-1] == 5
  killed = run(SIGNAL_AT_STEP, '13', 'KILL', *RUN_FLAGS, f'--workdir={workdir}')
  assert killed.returncode == -signal.SIGKILL and 'resumed from step 5' in killed.stderr, killed.stderr[-3000:]
  last_saved = saved_steps(workdir)[-1]
  assert 8 <= last_saved <= 12  # the save of step 12 may have been cut short, that of 10 at the latest not
  resumed = run('launch.py', *RUN_FLAGS, f'--workdir={workdir}')
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'resumed from step {last_saved}' in resumed.stderr
  assert [r['epoch'] for r in read_history(workdir)] == [1, 2, 3]
  assert_same_run(workdir, launched_run)


def test_a_stop_at_an_epochs_last_step_records_its_evaluation_first(tmp_path, monkeypatch, capsys):
  """SIGTERM injected right after step 7, the first epoch's last (not timed): the epoch's
  evaluation is recorded and checkpointed before the run stops, and the rerun goes on from there."""
  real_after_step = pacing.DispatchPacer.after_step

  def after_step(pacer, state, step):
    real_after_step(pacer, state, step)
    if step == 7:
      os.kill(os.getpid(), signal.SIGTERM)
  monkeypatch.setattr(pacing.DispatchPacer, 'after_step', after_step)
  config = vit.get_config('smoke')
  config.update({'num_epochs': 2, 'eval_test_every_epoch': False})
  with pytest.raises(loop.RunStopped) as stopped:
    loop.train_and_evaluate(config, tmp_path)
  record = stopped.value.record
  assert stopped.value.step == 7 and record['step'] == 7 and [r['step'] for r in read_history(tmp_path)] == [7] and saved_steps(tmp_path) == [7]
  assert 'stopped at step 7 (SIGTERM); run the same command to resume' in capsys.readouterr().out
  monkeypatch.setattr(pacing.DispatchPacer, 'after_step', real_after_step)
  assert loop.train_and_evaluate(config, tmp_path)['step'] == 14
  assert [r['step'] for r in read_history(tmp_path)] == [7, 14]


def test_the_host_waits_for_the_device_once_it_is_two_seconds_of_steps_ahead():
  clock, waited_for = [0.0], []
  pacer = pacing.DispatchPacer(0, max_seconds_ahead=2.0, clock=lambda: clock[0], wait=waited_for.append)
  state = type('State', (), {'step': 'step buffer'})()  # the pacer waits for its .step only

  def run_steps(first, last, seconds_per_step):
    """Steps first..last, each taking seconds_per_step of device time (the clock moves with them)."""
    waits = []
    for step in range(first, last + 1):
      clock[0] += seconds_per_step
      before = len(waited_for)
      pacer.after_step(state, step)
      if len(waited_for) > before:
        waits.append(step)
    return waits

  # slow steps (a ResNet50 step on 2 CPU cores): a wait after every step, so a SIGTERM waits for one step
  assert run_steps(1, 3, 18.0) == [1, 2, 3] and waited_for == ['step buffer'] * 3
  # fast steps: one measured step, then a wait every 2 s of steps (16 of 0.125 s), not after each
  assert run_steps(4, 60, 0.125) == [4, 20, 36, 52] and pacer.steps_per_wait == 16


def truncate_files(directory: pathlib.Path) -> int:
  files = [p for p in directory.rglob('*') if p.is_file() and p.stat().st_size > 0]
  for path in files:
    with open(path, 'r+b') as f:
      f.truncate(path.stat().st_size // 2)
  return len(files)


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
  config = vit.get_config('smoke')
  config.update({'num_epochs': 2, 'keep_checkpoints': 3, 'eval_test_every_epoch': False})
  loop.train_and_evaluate(config, tmp_path)
  assert saved_steps(tmp_path) == [7, 14]
  assert truncate_files(tmp_path / 'checkpoints' / 'latest' / '14' / 'state') > 0
  (tmp_path / 'checkpoints' / 'latest' / '21.orbax-checkpoint-tmp-1').mkdir()  # a save cut short
  checkpoints = RunCheckpoints(tmp_path, read_only=True)
  state, _ = checkpoints.restore(jax.eval_shape(loop.build_training(
      config, vit_info(config), loop.make_mesh(), steps_per_epoch=7)[0]))
  checkpoints.close()
  assert int(state.step) == 7
  assert any('latest/14 cannot be restored' in r.getMessage() for r in caplog.records)
  record = loop.train_and_evaluate(config, tmp_path)  # resumes from 7 and redoes the second epoch
  assert record['step'] == 14 and [r['step'] for r in read_history(tmp_path)] == [7, 14]
  assert saved_steps(tmp_path) == [7, 14]


def vit_info(config):
  from hybridvit_jax import data  # pylint: disable=import-outside-toplevel
  return data.dataset_info(config.data)


@pytest.mark.slow
def test_nonfinite_loss_stops_naming_the_step_or_is_skipped(tmp_path, monkeypatch):
  monkeypatch.setattr(loop, 'DIVERGED_LOSS_FACTOR', float('inf'))  # this run's huge finite losses would stop it first
  config = vit.get_config('smoke')
  config.update({'num_epochs': 1, 'log_every_steps': 1, 'eval_test_every_epoch': False})
  config.optimizer.learning_rate = 1e12
  with pytest.raises(loop.NonFiniteLossError, match=r'non-finite loss at step \d+; no checkpoint yet'):
    loop.train_and_evaluate(config, tmp_path / 'stop')
  assert saved_steps(tmp_path / 'stop') == [] and read_history(tmp_path / 'stop') == []
  config.nan_policy = 'skip'
  record = loop.train_and_evaluate(config, tmp_path / 'skip')
  assert record['step'] == 7 and 0 < record['skipped_steps'] <= 7
  state = restore_run(tmp_path / 'skip', 'latest')[3]  # the skipped updates left no inf or nan behind
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(jax.device_get((state.params, state.model_state))))


def test_a_finite_but_diverged_loss_stops_the_run_naming_the_step(tmp_path, monkeypatch):
  monkeypatch.setattr(loop, 'DIVERGED_LOSS_FACTOR', 1e-3)  # so the smoke run's own loss counts as diverged
  config = vit.get_config('smoke')  # 7 steps an epoch: the checkpoint of step 7, then the log of step 10
  config.update({'num_epochs': 2, 'log_every_steps': 10, 'eval_test_every_epoch': False})
  with pytest.raises(loop.DivergedLossError,
                     match=r"training diverged: train loss \S+ at step 10, over 0.001 times chance's 2.30; "
                           r'the last good checkpoint is step 7'):
    loop.train_and_evaluate(config, tmp_path)
  assert saved_steps(tmp_path) == [7] and [r['step'] for r in read_history(tmp_path)] == [7]
  config.nan_policy = 'skip'  # goes on, as with non-finite losses
  assert loop.train_and_evaluate(config, tmp_path)['step'] == 14


# Bad values (--config.KEY=VALUE), each with the key its one-line error must name.
BAD_VALUES = {
    'batch_size=0': 'error: batch_size=0',
    'batch_size=-4': 'error: batch_size=-4',
    'batch_size=63': 'batch_size=63 is invalid: must be divisible by the 4 devices',
    'model.vit.patch_size=5': 'model.vit.patch_size=5 does not divide',
    'model.name=vgg': "unknown model.name='vgg'",
    'data.name=no_such_dataset': 'data.name',
    'optimizer.learning_rate=-0.1': 'optimizer.learning_rate=-0.1',
    'data.val_split=valid': 'data.val_split',
    'nan_policy=ignore': 'nan_policy',
    'lookahead_decay=1.5': 'lookahead_decay=1.5',
}


@pytest.mark.parametrize('override', list(BAD_VALUES))
def test_a_bad_value_is_one_line_exit_2_and_writes_nothing(override, tmp_path, capsys):
  key, value = override.split('=')
  config = vit.get_config('smoke')
  config.update_from_flattened_dict({key: type(_lookup(config, key))(value)})
  code, stderr = run_train_main(config, tmp_path / 'run', capsys)
  assert code == 2, stderr[-3000:]
  assert stderr.startswith('error: ') and stderr.count('\n') == 1 and BAD_VALUES[override] in stderr, stderr
  assert not (tmp_path / 'run').exists()


def _lookup(config, dotted_key):
  for part in dotted_key.split('.'):
    config = config[part]
  return config


@pytest.mark.parametrize('override, message', [
    ('--config.num_epoch=1', 'error: --config.num_epoch: no such config key; did you mean num_epochs?'),
    ('--config.batch_size=0', 'error: batch_size=0'),
])
def test_bad_input_exits_2_from_the_command_with_one_error_line(override, message, tmp_path):
  """The command's own exit code: a key no config has (refused by the flag parser) and a bad value
  (by the validation the in-process test above goes through)."""
  result = run('launch.py', '--config=configs/vit.py:smoke', f'--workdir={tmp_path / "run"}', override)
  assert result.returncode == 2, result.stderr[-3000:]
  error_lines = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert len(error_lines) == 1 and error_lines[0].startswith(message), result.stderr[-3000:]
  assert not (tmp_path / 'run').exists()


@pytest.mark.slow
def test_a_diverged_run_exits_1_naming_the_step(tmp_path, capsys):
  config = vit.get_config('smoke')
  config.update({'log_every_steps': 1})
  config.optimizer.learning_rate = 1e12
  code, stderr = run_train_main(config, tmp_path, capsys)
  assert code == 1, stderr[-2000:]
  assert stderr.strip().splitlines()[-1].startswith('error: training diverged: train loss '), stderr[-2000:]


def test_workdir_with_an_incompatible_run_is_left_untouched(tmp_path, vit_smoke_run, capsys):
  workdir = tmp_path / 'run'
  shutil.copytree(vit_smoke_run[0], workdir)
  before = {p: p.read_bytes() for p in workdir.rglob('*') if p.is_file()}
  from hybridvit_jax.configs import hybrid  # pylint: disable=import-outside-toplevel
  code, stderr = run_train_main(hybrid.get_config('smoke'), workdir, capsys)
  assert code == 2
  assert stderr.startswith('error: ') and 'model.' in stderr and stderr.count('\n') == 1, stderr
  assert {p: p.read_bytes() for p in workdir.rglob('*') if p.is_file()} == before


def start_processes(workdir: pathlib.Path, logs: pathlib.Path, *flags: str,
                    signal_process_1: tuple[str, str] | None = None) -> list[subprocess.Popen]:
  """The RUN_FLAGS run as two processes of two devices each on 127.0.0.1; `signal_process_1=(STEP,
  SIGNAL)`: process 1 sends itself SIGNAL after STEP. Output goes to files in `logs` (a pipe nobody
  reads blocks a chatty child). The coordinator's port stays reserved while they run: bound here
  with SO_REUSEPORT, which gRPC's server also sets, so process 0 can bind it and nobody else can."""
  logs.mkdir(parents=True, exist_ok=True)
  reserved = socket.socket()
  reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
  reserved.bind(('127.0.0.1', 0))
  address = f'127.0.0.1:{reserved.getsockname()[1]}'
  processes = []
  for i in range(2):
    command = [SIGNAL_AT_STEP, *signal_process_1] if i == 1 and signal_process_1 else ['launch.py']
    with open(logs / f'{i}.out', 'w') as stdout, open(logs / f'{i}.err', 'w') as stderr:
      processes.append(subprocess.Popen(
          [sys.executable, *command, *RUN_FLAGS, *flags, f'--workdir={workdir}', f'--coordinator_address={address}',
           '--num_processes=2', f'--process_id={i}'],
          cwd=REPO, env={**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=2'},
          stdout=stdout, stderr=stderr, text=True))
  processes[0].reserved_port = reserved  # closed by wait_all
  return processes


def wait_all(processes: list[subprocess.Popen], logs: pathlib.Path, timeout: float = 300) -> list[str]:
  """Waits for every process (killing all of them past `timeout`), asserts each exited 0 and
  returns their stdouts."""
  try:
    for process in processes:
      process.wait(timeout=timeout)
  finally:
    for process in processes:
      process.kill()
    processes[0].reserved_port.close()
  for i, process in enumerate(processes):
    assert process.returncode == 0, f'process {i}:\n{(logs / f"{i}.err").read_text()[-3000:]}'
  return [(logs / f'{i}.out').read_text() for i in range(len(processes))]


@pytest.mark.slow
def test_a_signal_to_one_of_two_processes_stops_both_and_the_run_matches_one_process(tmp_path, launched_run):
  """Two processes of two devices, one of which gets a SIGTERM after step 5: both stop at the
  same step and save it together; rerun, they end where one process with the same four devices
  does. Process 0 writes the history, once; with a time budget both follow its plan."""
  workdir, budget = tmp_path / 'run', '--config.budget_minutes=60'
  stdouts = wait_all(start_processes(workdir, tmp_path / 'logs', budget, signal_process_1=('5', 'TERM')),
                     tmp_path / 'logs')
  stopped_at = {int(out.split('stopped at step ')[1].split()[0]) for out in stdouts}
  assert len(stopped_at) == 1, stdouts  # both at the same step
  assert all('run the same command to resume' in out for out in stdouts)
  assert stopped_at.pop() in saved_steps(workdir) and not list((workdir / 'checkpoints' / 'latest').glob('*tmp*'))
  wait_all(start_processes(workdir, tmp_path / 'logs_resumed', budget), tmp_path / 'logs_resumed')
  history = read_history(workdir)
  assert [r['step'] for r in history] == [7, 14, 21] and {r['planned_steps'] for r in history} == {21}
  reference = evaluate(str(launched_run), 'latest', 'val')
  result = evaluate(str(workdir), 'latest', 'val')
  assert result['examples'] == reference['examples'] == 64
  assert result['accuracy'] == pytest.approx(reference['accuracy'], abs=1 / 64 + 1e-9)
  assert result['loss'] == pytest.approx(reference['loss'], rel=1e-3)
  # Each parameter within 1% of the reference's (its norm): the all-reduces sum in another order,
  # and Adam turns the rounding of a gradient near zero into a step of either sign.
  jax.tree.map(lambda a, b: np.testing.assert_array_less(np.linalg.norm(a - b), 1e-2 * np.linalg.norm(b) + 1e-12),
               final_params(workdir), final_params(launched_run))


def test_a_signal_during_the_last_save_is_noted_and_the_save_finishes(tmp_path, monkeypatch, capsys):
  """A SIGTERM that comes while the run's last checkpoint is being written (injected there, not
  timed) neither kills the process nor cuts the save short."""
  config = vit.get_config('smoke')
  config.update({'num_epochs': 1, 'eval_test_every_epoch': False})
  real_wait, signalled = RunCheckpoints.wait, []

  def wait_after_a_signal(checkpoints):
    if not signalled:
      signalled.append(True)
      os.kill(os.getpid(), signal.SIGTERM)
    real_wait(checkpoints)
  monkeypatch.setattr(RunCheckpoints, 'wait', wait_after_a_signal)
  outer = []  # what the process would do with a SIGTERM outside the run: here, count it
  previous = signal.signal(signal.SIGTERM, lambda *_: outer.append('SIGTERM'))
  try:
    with pytest.raises(loop.RunStopped) as stopped:
      loop.train_and_evaluate(config, tmp_path)
  finally:
    signal.signal(signal.SIGTERM, previous)
  record = stopped.value.record
  assert signalled and outer == []  # the run's handler took it
  assert record['step'] == 7 and saved_steps(tmp_path) == [7]
  assert not list((tmp_path / 'checkpoints' / 'latest').glob('*tmp*'))
  assert 'stopped at step 7 (SIGTERM); run the same command to resume' in capsys.readouterr().out
