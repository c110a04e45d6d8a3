"""What every command-line entry point shares: flag parsing, multi-process start-up, and
turning bad input into one line on stderr with exit code 2."""
import ctypes
import difflib
import importlib.metadata
import importlib.util
import logging as python_logging
import os
import pkgutil
import platform
import re
import sys

import jax
from absl import flags, logging

from hybridvit_jax import configuration, data
from hybridvit_jax.training.checkpoint import UnrestorableCheckpointError

# Bad input a user can fix: reported in one line, exit code 2, nothing written.
USAGE_EXIT_CODE = 2
USAGE_ERRORS = (configuration.ConfigError, data.DataError, UnrestorableCheckpointError)


class _QuietLibraryInfo(python_logging.Filter):
  """Drops the INFO lines Orbax writes for every save (dozens per checkpoint); keeps warnings."""

  def filter(self, record):
    return record.levelno >= python_logging.WARNING or '/orbax/' not in record.pathname


def quiet_library_logs() -> None:
  logging.get_absl_handler().addFilter(_QuietLibraryInfo())
  # JAX logs each accelerator backend it probes and does not find ("Unable to initialize backend
  # 'tpu'") at INFO on every start-up; a missing backend that was asked for is still an error.
  python_logging.getLogger('jax._src.xla_bridge').setLevel(python_logging.WARNING)


def use_compilation_cache(enabled: bool) -> None:
  """JAX's persistent compilation cache (config.compilation_cache), in $JAX_COMPILATION_CACHE_DIR
  or else $XDG_CACHE_HOME/hybridvit_jax/jax (~/.cache/...): a command that compiles a step some
  earlier command compiled (a resumed run, evaluate, report, benchmark) loads it instead. Call it
  before the first compile."""
  if not enabled:
    jax.config.update('jax_enable_compilation_cache', False)
    return
  if not jax.config.jax_compilation_cache_dir:
    cache_home = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    jax.config.update('jax_compilation_cache_dir', os.path.join(cache_home, 'hybridvit_jax', 'jax'))


# glibc mallopt parameters (malloc.h): arenas, large allocations by mmap, returning the heap's top.
_M_ARENA_MAX, _M_MMAP_MAX, _M_TRIM_THRESHOLD = -8, -4, -1


def keep_freed_host_memory() -> bool:
  """Makes glibc keep freed memory for reuse when the computation runs on the CPU; returns whether
  it did. Call it before JAX's backend starts (its threads take their malloc arenas then).

  XLA:CPU allocates each step's temporaries (gigabytes for a Transformer's backward pass) with
  malloc and frees them after the step; glibc serves such sizes with mmap and hands them back to
  the kernel at free, so every step page-faults and zeroes all of them again, which cost the ViT
  step more time than its matrix products. One arena, no mmap and no trimming keep them mapped (the
  process then stays at its peak memory, up to about twice the steps' own). Not where an
  accelerator runs the steps: there the host's threads (the input pipeline) would share one malloc
  arena for nothing. HYBRIDVIT_KEEP_HOST_MEMORY=0 turns it off (a machine short of memory).
  """
  if (os.environ.get('HYBRIDVIT_KEEP_HOST_MEMORY') == '0' or platform.libc_ver()[0] != 'glibc'
      or not _computes_on_cpu()):
    return False
  libc = ctypes.CDLL(None)
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))  # -1: never trim (as size_t)
  return all(libc.mallopt(parameter, value) == 1 for parameter, value in settings)


def _computes_on_cpu() -> bool:
  """Whether JAX will run on the CPU: JAX_PLATFORMS says cpu, or no accelerator plugin (CUDA,
  ROCm, TPU) is installed."""
  platforms = os.environ.get('JAX_PLATFORMS') or jax.config.jax_platforms
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  if importlib.util.find_spec('libtpu') is not None or importlib.metadata.entry_points(group='jax_plugins'):
    return False
  try:
    import jax_plugins  # pylint: disable=import-outside-toplevel  # the namespace accelerator plugins live in
  except ImportError:
    return True
  return not any(pkgutil.iter_modules(jax_plugins.__path__))


def fail(message: str) -> None:
  """Prints `error: message` on stderr and exits with the usage exit code."""
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(USAGE_EXIT_CODE)


def fail_on_unknown_config_keys(argv: list[str]) -> None:
  """Exits with one line naming the first --config.KEY on the command line (or in a --flagfile)
  that is no key of the schema, and the keys closest to it. ml_collections would report it as a
  bare KeyError, or while defining the flag."""
  keys = configuration.flatten(configuration.base_config().to_dict())
  for arg in flags.FLAGS.read_flags_from_files(list(argv), force_gnu=False):
    match = re.match(r'-{1,2}(?:no)?config\.([^=]+)', arg)
    if match and match.group(1) not in keys:
      close = difflib.get_close_matches(match.group(1), list(keys), n=3)
      hint = f'; did you mean {" or ".join(close)}?' if close else ' (see hybridvit_jax/configuration.py)'
      fail(f'--config.{match.group(1)}: no such config key{hint}')


def parse_flags_or_exit(argv: list[str]) -> list[str]:
  """Every entry point's start (before JAX's backend): absl's flag parsing, with a bad flag or
  config override reported as one line (exit 2)."""
  fail_on_unknown_config_keys(argv)
  try:
    return flags.FLAGS(argv)
  except Exception as error:  # pylint: disable=broad-except  # a bad flag, or an error from a config file
    cause = error.__cause__ if isinstance(error.__cause__, USAGE_ERRORS) else error
    fail(str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__)


def parse_training_flags_or_exit(argv: list[str]) -> list[str]:
  """`parse_flags_or_exit` for the commands that repeat a train step (launch, study, benchmark),
  which keep freed host memory first. Not the others: without mmap the one heap fragments, and a
  test-set `evaluate` peaked at several times the memory of glibc's defaults (once killed for it;
  docs/experiments/vit-cpu-step.md), for no speed a single pass needs."""
  keep_freed_host_memory()
  return parse_flags_or_exit(argv)


def run_and_exit(main_fn, *args, **kwargs):
  """Calls main_fn; a usage error becomes one line on stderr and exit code 2."""
  try:
    return main_fn(*args, **kwargs)
  except USAGE_ERRORS as error:
    fail(str(error))


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None) -> None:
  """Starts JAX's multi-process runtime when asked for, or when a multi-worker cluster
  (Cloud TPU pod, SLURM job) is detected; on one plain machine it does nothing."""
  if coordinator_address or num_processes:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # CPU-only runs; harmless elsewhere
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
  elif _in_multi_worker_cluster():
    jax.distributed.initialize()


def _in_multi_worker_cluster() -> bool:
  """A SLURM job of several tasks, or a Cloud TPU VM (libtpu installed), where
  jax.distributed.initialize() finds its peers from the environment."""
  slurm_tasks = int(os.environ.get('SLURM_NTASKS', '1')) if 'SLURM_JOB_ID' in os.environ else 1
  return slurm_tasks > 1 or importlib.util.find_spec('libtpu') is not None


def train_main(config, workdir: str, *, coordinator_address=None, num_processes=None, process_id=None):
  """launch.py's body: multi-process start-up (if any), then the training loop."""
  quiet_library_logs()
  initialize_distributed(coordinator_address, num_processes, process_id)
  use_compilation_cache(config.compilation_cache)
  from hybridvit_jax.training import loop  # pylint: disable=import-outside-toplevel  # after jax.distributed
  try:
    return loop.train_and_evaluate(config, workdir)
  except loop.RunStopped as stopped:  # not a failure: exit 0, the loop's last line says how to resume
    return stopped.record
  except loop.NonFiniteLossError as error:
    print(f'error: {error}', file=sys.stderr, flush=True)
    sys.exit(1)
