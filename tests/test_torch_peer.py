"""benchmarks/torch_peer.py, the PyTorch + timm peer of the benchmark: its one-line refusal without
PyTorch (in the normal suite, which has neither PyTorch nor timm), the package's parameter counts it
must match, and, where PyTorch and timm are installed, its networks' counts and one tiny run's JSON line."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPT = 'benchmarks/torch_peer.py'
MISSING_LINE = 'error: torch_peer needs PyTorch and timm: pip install torch timm'
# models.count_params of each network on 32x32x3 images and 10 classes; the peer's timm networks
# must have exactly as many parameters, or the two benchmarks do not time the same network.
PACKAGE_PARAMS = {'vit_ti4': 5_362_762, 'resnet50': 23_520_842}
JSON_KEYS = {'peer', 'model', 'batch_size', 'dtype', 'compile', 'device', 'device_kind', 'params', 'step_ms',
             'images_per_s', 'torch_version', 'timm_version', 'threads'}


def run_peer(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=120)


def test_without_pytorch_it_refuses_in_one_line(tmp_path):
  """A `torch` that fails to import stands in for a missing one, so the test means the same
  whether or not this interpreter has PyTorch."""
  (tmp_path / 'torch').mkdir()
  (tmp_path / 'torch' / '__init__.py').write_text("raise ImportError('hidden by the test')\n")
  python_path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get('PYTHONPATH')]))
  result = run_peer(env={**os.environ, 'PYTHONPATH': python_path})
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines() == [MISSING_LINE]
  assert not result.stdout


@pytest.mark.parametrize('variant', sorted(PACKAGE_PARAMS))
def test_package_parameter_counts_are_those_the_peer_matches(variant):
  pytest.importorskip('jax')
  from hybridvit_jax import models  # pylint: disable=import-outside-toplevel  # needs JAX, checked above
  model = models.abstract_model(models.variant_config(variant), num_classes=10, image_shape=(32, 32, 3))
  assert models.count_params(model) == PACKAGE_PARAMS[variant]


def load_peer_module():
  """benchmarks/torch_peer.py as a module (it is a script, outside the package)."""
  spec = importlib.util.spec_from_file_location('torch_peer', REPO / SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize('variant', sorted(PACKAGE_PARAMS))
def test_peer_networks_have_the_package_parameter_counts(variant):
  pytest.importorskip('torch')
  pytest.importorskip('timm')
  network = load_peer_module().MODELS[variant][0]()
  assert sum(param.numel() for param in network.parameters()) == PACKAGE_PARAMS[variant]


def test_a_tiny_run_prints_its_json_line():
  """One step of the smaller network (a ResNet50 step would double the test's time)."""
  pytest.importorskip('torch')
  pytest.importorskip('timm')
  result = run_peer('--models=vit_ti4', '--batch_size=2', '--steps=1', '--warmup=0', '--device=cpu')
  assert result.returncode == 0, result.stderr[-2000:]
  [line] = [json.loads(line) for line in result.stdout.strip().splitlines()]
  assert set(line) == JSON_KEYS
  expected = {'peer': 'torch', 'model': 'vit_ti4', 'batch_size': 2, 'dtype': 'float32', 'compile': False,
              'device': 'cpu', 'device_kind': 'cpu'}
  assert {key: line[key] for key in expected} == expected
  assert line['params'] == PACKAGE_PARAMS['vit_ti4']
  assert line['step_ms'] > 0 and line['images_per_s'] > 0
