"""cli.keep_freed_host_memory: XLA:CPU's per-step temporaries stay mapped instead of being
page-faulted in again at every step."""
import json
import os
import platform
import subprocess
import sys

import pytest

from hybridvit_jax import cli

# Calls of a jitted gradient whose temporaries are tens of MiB; prints the temporaries' pages and
# the fewest minor page faults of calls 3-5, with the setting applied or not (argv[1]).
PROGRAM = '''
import json, resource, sys
from hybridvit_jax import cli
kept = cli.keep_freed_host_memory() if sys.argv[1] == 'keep' else False
import jax, jax.numpy as jnp
def loss(w, x):
  return jnp.sum(jnp.tanh(jnp.tanh(x @ w) @ w) ** 2)
w, x = jnp.full((256, 256), 0.01), jnp.ones((32768, 256))
grad = jax.jit(jax.grad(loss)).lower(w, x).compile()
grad(w, x).block_until_ready(); grad(w, x).block_until_ready()
faults = []
for _ in range(3):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  grad(w, x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
faults = min(faults)  # the heap may still grow once (a freed block too small for the next)
print(json.dumps({'kept': kept, 'faults': faults, 'temp_pages': grad.memory_analysis().temp_size_in_bytes // 4096}))
'''


def later_calls(mode: str) -> dict:
  env = {**{k: v for k, v in os.environ.items() if k != 'HYBRIDVIT_KEEP_HOST_MEMORY'}, 'JAX_PLATFORMS': 'cpu'}
  result = subprocess.run([sys.executable, '-c', PROGRAM, mode], env=env, capture_output=True, text=True, check=True)
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='a glibc malloc setting')
def test_temporaries_are_reused_rather_than_faulted_in_at_every_call():
  default, kept = later_calls('default'), later_calls('keep')
  assert kept['kept'] and not default['kept']
  assert default['temp_pages'] > 10_000  # large enough for glibc to mmap them
  assert default['faults'] > default['temp_pages'] // 2  # glibc's default: all faulted in again
  assert kept['faults'] < kept['temp_pages'] // 20


def test_not_applied_where_an_accelerator_runs_the_steps_or_when_turned_off(monkeypatch):
  monkeypatch.setenv('JAX_PLATFORMS', 'cuda')
  assert not cli.keep_freed_host_memory()
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.setenv('HYBRIDVIT_KEEP_HOST_MEMORY', '0')
  assert not cli.keep_freed_host_memory()


@pytest.mark.parametrize('module, keeps', [('launch', True), ('hybridvit_jax.study', True),
                                           ('hybridvit_jax.benchmark', True), ('hybridvit_jax.evaluate', False),
                                           ('hybridvit_jax.predict', False), ('hybridvit_jax.report', False)])
def test_only_the_commands_that_repeat_a_train_step_keep_freed_memory(module, keeps):
  # evaluate keeping it peaked at several times the memory of glibc's defaults (a fragmented heap).
  import ast, importlib.util, pathlib  # pylint: disable=import-outside-toplevel,multiple-imports
  path = pathlib.Path(cli.__file__).parents[1] / 'launch.py' if module == 'launch' else pathlib.Path(
      importlib.util.find_spec(module).origin)
  parsers = {node.attr for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Attribute)
             and node.attr in ('parse_flags_or_exit', 'parse_training_flags_or_exit')}
  assert parsers == {'parse_training_flags_or_exit' if keeps else 'parse_flags_or_exit'}


def test_the_training_parser_keeps_freed_memory_and_the_plain_one_does_not(monkeypatch):
  calls = []
  monkeypatch.setattr(cli, 'keep_freed_host_memory', lambda: calls.append(True) or True)
  monkeypatch.setattr(cli, 'fail_on_unknown_config_keys', lambda argv: None)
  monkeypatch.setattr(cli.flags, 'FLAGS', lambda argv: argv)
  cli.parse_flags_or_exit(['evaluate'])
  assert calls == []
  cli.parse_training_flags_or_exit(['launch'])
  assert calls == [True]
