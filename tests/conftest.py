"""Tests run on CPU with 4 forced host devices, so every test exercises the sharded code.

HYBRIDVIT_TEST_PLATFORM=gpu (or tpu) runs them on that backend's own devices instead: what
tools/gpu_check.sh does with the model and recipe tests, which assume no device count.
"""
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import pytest

# The CPU unless asked otherwise: a JAX_PLATFORMS=cuda left in the environment would break the
# 4-device tests.
TEST_PLATFORM = os.environ.get('HYBRIDVIT_TEST_PLATFORM', 'cpu')
os.environ['JAX_PLATFORMS'] = 'cuda' if TEST_PLATFORM == 'gpu' else TEST_PLATFORM
if TEST_PLATFORM == 'cpu':
  os.environ['XLA_FLAGS'] = ' '.join(
      [os.environ.get('XLA_FLAGS', ''), '--xla_force_host_platform_device_count=4']).strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# One XLA compilation cache per test session, shared with the subprocesses the tests start (the
# same tiny networks are compiled by many tests), removed at the end unless the caller chose it.
_OWN_CACHE_DIR = None if 'JAX_COMPILATION_CACHE_DIR' in os.environ else tempfile.mkdtemp(
    prefix='hybridvit_jax_xla_cache_')
if _OWN_CACHE_DIR:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _OWN_CACHE_DIR
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')


def pytest_xdist_auto_num_workers(config):
  """`-n auto` (pyproject's addopts): one worker per core, at most 4, since each holds a JAX
  runtime of about a GiB and the tests' subprocesses want cores too."""
  del config
  return min(os.cpu_count() or 1, 4)


def pytest_addoption(parser):
  parser.addoption('--slow', action='store_true',
                   help='also run the tests marked slow: the end-to-end runs (CI runs them)')


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: an end-to-end run of ten seconds or more; run with --slow')


# Fixtures that train or time a run, shared by several tests: the tests using one go to one worker
# (pyproject's `--dist loadgroup`), which makes it once.
SHARED_RUNS = ('vit_smoke_run', 'launched_run', 'smoke_result')


def pytest_collection_modifyitems(config, items):
  """Groups the tests of each shared run on one worker, and skips the slow tests unless --slow:
  `pytest` stays a few minutes, `.ci/run` runs them all."""
  for item in items:
    for fixture in SHARED_RUNS:
      if fixture in item.fixturenames:
        item.add_marker(pytest.mark.xdist_group(fixture))
        break
  if config.getoption('--slow'):
    return
  skip = pytest.mark.skip(reason='slow: run with --slow, as CI does')
  for item in items:
    if 'slow' in item.keywords:
      item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  if _OWN_CACHE_DIR:
    shutil.rmtree(_OWN_CACHE_DIR, ignore_errors=True)


@pytest.fixture(scope='session')
def vit_smoke_run(tmp_path_factory):
  """(workdir, config, last history record) of one finished one-epoch ViT smoke run, shared by
  the tests that only read a finished run (a test that changes it works on a copy)."""
  from hybridvit_jax.configs import vit  # pylint: disable=import-outside-toplevel  # after the environment above
  from hybridvit_jax.training import loop  # pylint: disable=import-outside-toplevel
  workdir = tmp_path_factory.mktemp('vit_smoke_run')
  config = vit.get_config('smoke')
  config.num_epochs = 1
  return workdir, config, loop.train_and_evaluate(config, workdir)


REPO = pathlib.Path(__file__).resolve().parents[1]
# The launched run: long enough to be stopped mid-way, short enough for CI: 3 epochs of 7 steps,
# a checkpoint every 2.
LAUNCH_FLAGS = ('--config=configs/vit.py:smoke', '--config.num_epochs=3', '--config.checkpoint_every_steps=2',
                '--config.model.vit.dropout_rate=0.1', '--config.eval_test_every_epoch=False')


def run_command(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
  """`python ARGS...` in the repository with this process's environment (its 4 devices, so the
  command finds the steps compiled before in the shared compilation cache)."""
  return subprocess.run([sys.executable, *args], cwd=REPO, env=os.environ if env is None else env,
                        capture_output=True, text=True, timeout=600)


@pytest.fixture(scope='session')
def launched_run(tmp_path_factory) -> pathlib.Path:
  """The workdir of `python launch.py LAUNCH_FLAGS`, run to its end without interruption: what the
  interrupted and multi-process runs must end as, and what the command-line evaluate reads (a test
  that changes it works on a copy)."""
  workdir = tmp_path_factory.mktemp('launched_run')
  result = run_command('launch.py', *LAUNCH_FLAGS, f'--workdir={workdir}')
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir
