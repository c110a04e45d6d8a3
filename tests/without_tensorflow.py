"""`python tests/without_tensorflow.py COMMAND [ARGS...] [, COMMAND [ARGS...]]...`: runs each
command (`launch.py ...` or `-m MODULE ...`) in turn in one process in which TensorFlow cannot be
imported, as on an accelerator image without it.

Import of `tensorflow` fails as if it were not installed: a faithful stand-in, since tfds decides
whether to use TensorFlow by trying to import it. Stops at the first command that exits non-zero
and exits with its code; exits 3 if TensorFlow was imported nonetheless. One process for all the
commands, so JAX starts once; each command's absl flags are removed before the next defines its own.
"""
import importlib
import importlib.machinery
import pathlib
import runpy
import sys

from absl import flags

# absl's app and logging define flags of their own when first imported: imported here, before any
# command, they are not taken for a command's flags and removed after it.
importlib.import_module('absl.app')
importlib.import_module('absl.logging')

REPO = pathlib.Path(__file__).resolve().parents[1]
SEPARATOR = ','
_find_spec = importlib.machinery.PathFinder.find_spec


def _find_spec_without_tensorflow(name, path=None, target=None):
  if name == 'tensorflow' or name.startswith('tensorflow.'):
    return None  # as when it is not installed
  return _find_spec(name, path, target)


def run(command: list[str]) -> int:
  """Runs `launch.py ARGS` or `-m MODULE ARGS` as its own __main__; returns its exit code."""
  flags_before = set(flags.FLAGS)
  program, *args = command
  try:
    if program == '-m':
      sys.argv = [args[0], *args[1:]]
      runpy.run_module(args[0], run_name='__main__', alter_sys=True)
    else:
      sys.argv = [str(REPO / program), *args]
      runpy.run_path(sys.argv[0], run_name='__main__')
  except SystemExit as exit_:
    code = exit_.code
    return code if isinstance(code, int) else (0 if code is None else 1)
  finally:
    for name in set(flags.FLAGS) - flags_before:
      delattr(flags.FLAGS, name)
  return 0


def main() -> None:
  importlib.machinery.PathFinder.find_spec = _find_spec_without_tensorflow
  commands, command = [], []
  for arg in sys.argv[1:] + [SEPARATOR]:
    if arg == SEPARATOR:
      commands.append(command)
      command = []
    else:
      command.append(arg)
  for command in commands:
    code = run(command)
    print(f'without_tensorflow: exit {code}: {" ".join(command)}', file=sys.stderr, flush=True)
    if code:
      sys.exit(code)
  if 'tensorflow' in sys.modules:
    print('without_tensorflow: TensorFlow was imported', file=sys.stderr)
    sys.exit(3)


if __name__ == '__main__':
  main()
