"""tools/gpu_check.sh: its CPU dry run passes every stage, and bad arguments are one line."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


def gpu_check(*args: str) -> subprocess.CompletedProcess:
  """tools/gpu_check.sh ARGS with this test process's Python and environment."""
  return subprocess.run(['bash', str(REPO / 'tools' / 'gpu_check.sh'), *args], cwd=REPO,
                        env={**os.environ, 'PYTHON': sys.executable}, capture_output=True, text=True,
                        timeout=600)


@pytest.mark.slow
def test_the_dry_run_passes_every_stage_on_the_cpu(tmp_path):
  out = tmp_path / 'check'
  # One quick model test and one benchmark: the stages, not the whole suite, are under test.
  result = gpu_check('--dry-run', f'--out={out}', '--tests=test_logits_shape_and_dtype and vit_test',
                     '--benchmarks=vit:bfloat16')
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  lines = [json.loads(line) for line in result.stdout.splitlines()]
  assert lines == [json.loads(line) for line in (out / 'gpu_check.jsonl').read_text().splitlines()]
  by_check = {line['check']: line for line in lines}
  assert list(by_check) == ['environment', 'tests', 'train', 'evaluate', 'benchmark', 'torch']
  assert all(line['ok'] for line in lines), lines
  assert by_check['environment']['backend'] == 'cpu'
  assert by_check['tests']['summary'].startswith('1 passed'), by_check['tests']
  train = by_check['train']
  assert train['steps'] == train['planned_steps'] == 3 and 0 < train['elapsed_s'], train
  assert by_check['evaluate']['examples'] == 20 and by_check['evaluate']['split'] == 'test'
  benchmark = by_check['benchmark']
  assert (benchmark['model'], benchmark['dtype'], benchmark['shape_source']) == ('vit', 'bfloat16', 'image_folder')
  assert benchmark['step_ms'] > 0
  # PyTorch is not a dependency: without it the torch stage says so and passes; with it, it ran.
  assert 'skipped' in by_check['torch'] or by_check['torch']['peer'] == 'torch'


def test_bad_arguments_are_one_line_and_exit_2(tmp_path):
  result = gpu_check('--only=train,fly', f'--out={tmp_path}')
  assert result.returncode == 2 and result.stderr.strip().count('\n') == 0, result.stderr
  assert "unknown stages ['fly']" in result.stderr
  result = gpu_check('--only=train', f'--out={tmp_path / "x"}')
  assert result.returncode == 2 and '--archive' in result.stderr and '\n' not in result.stderr.strip()
  assert not (tmp_path / 'x').exists()
