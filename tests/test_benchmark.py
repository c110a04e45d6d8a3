"""The benchmark: its fields, that its flop count is a train step's, and the command."""
import json
import pathlib
import subprocess
import sys

import pytest

from hybridvit_jax.configs import vit
from hybridvit_jax import benchmark, report

REPO = pathlib.Path(__file__).resolve().parents[1]
FIELD_TYPES = {
    'model': str, 'dtype': str, 'input_mode': str, 'backend': str, 'device_kind': str, 'devices': int,
    'jax_version': str, 'batch_size': int, 'shape_source': str, 'num_classes': int, 'image_shape': list,
    'params': int, 'compile_s': float, 'compile_cache': bool, 'flops_per_image': float, 'step_ms': float,
    'images_per_s': float, 'achieved_gflops': float, 'peak_gflops': float, 'peak_matrix_size': int,
    'mfu': float, 'input_images_per_s': float, 'input_source': str,
}


@pytest.fixture(scope='module')
def smoke_result():
  return benchmark.benchmark(vit.get_config('smoke'), steps=3, warmup=1)


def test_benchmark_reports_every_field_with_its_type(smoke_result):
  assert {field: type(smoke_result.get(field)) for field in FIELD_TYPES} == FIELD_TYPES
  assert smoke_result['devices'] == 4
  assert (smoke_result['model'], smoke_result['input_mode'], smoke_result['shape_source']) == ('vit', 'device',
                                                                                               'synthetic')


def test_benchmark_timings_are_consistent(smoke_result):
  assert smoke_result['step_ms'] > 0 and smoke_result['input_images_per_s'] > 0
  assert smoke_result['images_per_s'] == pytest.approx(smoke_result['batch_size'] / smoke_result['step_ms'] * 1000,
                                                       rel=1e-3)
  assert smoke_result['mfu'] == pytest.approx(smoke_result['achieved_gflops'] / smoke_result['peak_gflops'], rel=1e-3)
  assert 0 < smoke_result['mfu']


def test_benchmark_counts_a_train_step_of_the_whole_batch_as_the_report_counts_a_forward_pass(smoke_result):
  """Forward plus backward is about 3 forwards (the report's count, from the same flops
  function); counting one device's share would give ~3/4."""
  assert smoke_result['flops_per_image'] > 0
  info, _ = benchmark.dataset_shape(vit.get_config('smoke').data)
  _, forward_gflops = report.model_cost(vit.get_config('smoke').model, num_classes=info.num_classes,
                                        image_shape=info.image_shape)
  ratio = smoke_result['flops_per_image'] / (forward_gflops * 1e9)
  assert 2 < ratio < 5, ratio


def run_benchmark_command(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'hybridvit_jax.benchmark', '--config=configs/vit.py:smoke', *args],
                        cwd=REPO, capture_output=True, text=True, timeout=300)


def test_command_prints_the_result_as_its_last_stdout_line():
  result = run_benchmark_command('--steps=1', '--warmup=0')
  assert result.returncode == 0, result.stderr[-2000:]
  printed = json.loads(result.stdout.strip().splitlines()[-1])
  assert set(FIELD_TYPES) | {'config'} <= set(printed)
  assert printed['config'] == 'configs/vit.py:smoke'


def test_command_refuses_a_bad_override_in_one_line():
  result = run_benchmark_command('--config.batch_size=0')
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1].startswith('error: batch_size=0'), result.stderr[-2000:]
  assert not result.stdout.strip()
