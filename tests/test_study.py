"""The study: networks trained in turn then reported, a rerun that trains nothing, overrides for
every run, one-line errors, and the stem-depth sweep."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from hybridvit_jax.configs import hybrid
from hybridvit_jax import configuration, study
from hybridvit_jax.training.history import read_history

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_study_command(*args: str, cwd: pathlib.Path = REPO, env: dict[str, str] | None = None,
                      ) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'hybridvit_jax.study', *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=600)


@pytest.fixture(scope='module')
def installed(tmp_path_factory) -> dict[str, str]:
  """The environment of a `pip install .` of the package (not an editable link to the
  repository): built from a copy of its sources, installed into a folder put first on PYTHONPATH."""
  root = tmp_path_factory.mktemp('installed')
  source = root / 'source'
  for name in ('hybridvit_jax', 'configs'):
    shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns('__pycache__'))
  for name in ('pyproject.toml', 'README.md'):
    shutil.copy(REPO / name, source / name)
  result = subprocess.run([sys.executable, '-m', 'pip', 'install', '--quiet', '--no-deps', '--no-build-isolation',
                           '--target', str(root / 'site'), str(source)], capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return {**os.environ, 'PYTHONPATH': str(root / 'site')}


def error_lines(stderr: str) -> list[str]:
  """The command's own error lines (libraries log other lines to stderr at start-up)."""
  return [line for line in stderr.splitlines() if line.startswith('error:')]


def run_files(workdir: pathlib.Path) -> dict[str, str]:
  """Each run's history and the step directories of its checkpoints: what training changes."""
  return {str(path.relative_to(workdir)): path.read_text() if path.is_file() else ''
          for path in sorted(workdir.glob('*/history.jsonl')) + sorted(workdir.glob('*/checkpoints/*/*'))}


@pytest.mark.slow
def test_the_installed_package_runs_the_study_from_any_directory(installed, tmp_path):
  """An installed package, run outside the repository: the presets travel with it (as
  hybridvit_jax.configs), and a rerun trains nothing. One network for time (the ViT smoke run of
  test_predict, so its compilations are cached); test_the_study_is_the_three_networks... checks
  the plan for all three."""
  where = subprocess.run([sys.executable, '-c', 'import hybridvit_jax.configs.vit as m; print(m.__file__)'],
                         cwd=tmp_path, env=installed, capture_output=True, text=True, timeout=120)
  assert where.stdout.strip() == str(pathlib.Path(installed['PYTHONPATH']) / 'hybridvit_jax' / 'configs' / 'vit.py')
  args = ['--preset=smoke', f'--workdir={tmp_path}', '--models=vit', '--config.num_epochs=1']
  first = run_study_command(*args, cwd=tmp_path, env=installed)
  assert first.returncode == 0, first.stderr[-3000:]
  assert f'[1/1] vit (preset smoke) -> {tmp_path / "vit"}' in first.stdout
  assert json.loads((tmp_path / 'vit' / 'config.json').read_text())['num_epochs'] == 1
  assert [r['epoch'] for r in read_history(tmp_path / 'vit')] == [1]
  table = (tmp_path / 'report' / 'table.md').read_text()
  assert '| vit | vit |' in table and '| CNN+ViT | 70.28% | 10 | 4 h 17 min |' in table
  assert table in first.stdout
  assert (tmp_path / 'report' / 'curves.png').stat().st_size > 10_000

  trained = run_files(tmp_path)
  assert len(trained) == 1 + 2  # the history, the latest and the best step directory
  second = run_study_command(*args, cwd=tmp_path, env=installed)
  assert second.returncode == 0, second.stderr[-3000:]
  assert run_files(tmp_path) == trained
  assert 'resumed from step 7 of 7' in second.stderr and 'epoch 1: {' not in second.stderr


@pytest.mark.slow
def test_a_stop_signal_stops_the_study_after_saving_and_a_rerun_goes_on(tmp_path):
  """SIGTERM in the first run (as the scheduler or Ctrl-C sends it): that run saves and the study
  stops there, with the run's resume line last and exit 0; the next run and the report wait for
  the rerun, which resumes the first and trains the second."""
  flags = ('--preset=smoke', f'--workdir={tmp_path}', '--models=vit,hybrid', '--config.num_epochs=1',
           '--config.eval_test_every_epoch=False')
  stopped = subprocess.run([sys.executable, 'tests/signal_at_step.py', '3', 'TERM', '-m', 'hybridvit_jax.study', *flags],
                           cwd=REPO, capture_output=True, text=True, timeout=600)
  assert stopped.returncode == 0, stopped.stderr[-3000:]
  assert stopped.stdout.strip().splitlines()[-1] == 'stopped at step 3 (SIGTERM); run the same command to resume'
  assert (tmp_path / 'vit' / 'checkpoints').is_dir()
  assert not (tmp_path / 'hybrid').exists() and not (tmp_path / 'report').exists()
  resumed = run_study_command(*flags)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'resumed from step 3' in resumed.stderr
  assert [r['step'] for r in read_history(tmp_path / 'vit')] == [7]
  assert read_history(tmp_path / 'hybrid') and (tmp_path / 'report' / 'table.md').is_file()


@pytest.mark.slow
def test_a_run_that_stops_on_a_non_finite_loss_is_named_and_the_study_goes_on(tmp_path):
  """A sweep value that blows the loss up stops its own run only: the next value trains, the
  report is written, and the study ends with exit 1 naming the failed run."""
  result = run_study_command('--preset=smoke', f'--workdir={tmp_path}', '--models=vit', '--sweep=learning_rate',
                             '--values=1e38,0.001', '--config.num_epochs=1', '--config.eval_test_every_epoch=False')
  assert result.returncode == 1, result.stderr[-3000:]
  failed_run = next(path.name for path in tmp_path.iterdir() if path.name.startswith('learning_rate_1e'))
  first, last = error_lines(result.stderr)
  assert first.startswith(f'error: {failed_run}: ') and 'loss' in first
  assert last.startswith(f'error: 1 of 2 runs stopped on a non-finite loss ({failed_run}); ')
  assert [r['step'] for r in read_history(tmp_path / 'learning_rate_0.001')] == [7]
  assert '| learning_rate_0.001 |' in (tmp_path / 'report' / 'table.md').read_text()


@pytest.mark.parametrize('override, message', [
    ('--config.num_epoch=1', 'error: --config.num_epoch: no such config key; did you mean num_epochs?'),
    ('--config.model.vit.num_layers=two', "error: flag --config.model.vit.num_layers=two: invalid literal for "
                                          "int() with base 10: 'two'"),
])
def test_a_bad_override_is_one_line_and_exit_code_2_before_anything_is_written(override, message, tmp_path):
  result = run_study_command('--preset=smoke', f'--workdir={tmp_path / "study"}', override)
  assert result.returncode == 2
  assert error_lines(result.stderr) == [message]
  assert not (tmp_path / 'study').exists()


def record_accuracy_by_stem_depth(config, workdir):
  """Stands in for loop.train_and_evaluate: writes config.json and one epoch whose accuracies
  are 10% per stem layer, as a finished run would."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  configuration.save_run_config(config, workdir)
  depth = sum(map(len, config.model.stem.stages))
  accuracy = 0.1 * depth
  record = {'epoch': 1, 'step': 7, 'train_loss': 2.0, 'train_accuracy': accuracy, 'val_loss': 2.0,
            'val_accuracy': accuracy, 'test_loss': 2.0, 'test_accuracy': accuracy + 0.05, 'elapsed_s': 10.0,
            'images_per_s': 1000.0 / (1 + depth)}
  (workdir / 'history.jsonl').write_text(json.dumps(record) + '\n')


def test_stem_depth_sweep_trains_one_run_per_depth_and_reports_against_depth(tmp_path, monkeypatch):
  monkeypatch.setattr(study.loop, 'train_and_evaluate', record_accuracy_by_stem_depth)
  sweep = study.parse_sweep('stem_depth', ['1', '3'])
  stages = {1: ((8,),), 3: ((8, 8), (16,))}
  overrides = {'num_epochs': 1, 'model.stem.stages': ((8, 8), (16, 16))}  # the stem whose first convs are kept
  experiments = study.sweep_experiments('hybrid', 'smoke', overrides, sweep, tmp_path)
  result, failed = study.run_study(experiments, tmp_path, preset='smoke', sweep=sweep)
  assert failed == []
  for depth in (1, 3):
    saved = configuration.load_run_config(tmp_path / f'stem_depth_{depth}')
    assert (saved.model.name, saved.model.stem.stages, saved.num_epochs) == ('hybrid', stages[depth], 1)
  report_dir = tmp_path / 'report'
  assert {report_dir / 'stem_depth.md', report_dir / 'stem_depth.png', report_dir / 'curves.png'} <= set(result['files'])
  assert (report_dir / 'stem_depth.png').stat().st_size > 10_000
  rows = [line.strip('| ').split(' | ') for line in (report_dir / 'stem_depth.md').read_text().splitlines()
          if line.startswith('| ')]
  header = rows[0]
  assert header[:2] == ['stem_depth', 'Run']
  by_depth = {row[0]: dict(zip(header, row)) for row in rows[1:]}
  assert list(by_depth) == ['1', '3']
  assert by_depth['1']['Best val accuracy'] == '10.00% (epoch 1)' and by_depth['3']['Max test accuracy'] == '35.00% (epoch 1)'
  assert by_depth['1']['Images/s'] == '500' and by_depth['3']['Images/s'] == '250'
  gflops = [float(by_depth[d]['GFLOPs/image']) for d in ('1', '3')]
  assert gflops[0] != gflops[1]  # each depth's own network


def test_stem_depth_keeps_the_first_convs_in_their_stages_and_depth_0_is_the_plain_vit():
  stem = hybrid.get_config('cpu').model.stem  # ((64, 64), (256, 256), (256, 256)) behind a 2x2 whitening
  assert study.stem_of_depth(stem, 6) == {'model.stem.stages': ((64, 64), (256, 256), (256, 256)),
                                          'model.stem.whiten_patch_size': 2}
  assert study.stem_of_depth(stem, 3) == {'model.stem.stages': ((64, 64), (256,)), 'model.stem.whiten_patch_size': 2}
  assert study.stem_of_depth(stem, 0) == {'model.stem.stages': (), 'model.stem.whiten_patch_size': 0}
  with pytest.raises(configuration.ConfigError, match='stem depth 7 is deeper than the preset\'s stem of 6'):
    study.stem_of_depth(stem, 7)


def test_sweep_keys_resolve_from_their_last_part_and_values_take_the_keys_type():
  assert study.resolve_key('learning_rate') == 'optimizer.learning_rate'
  assert study.resolve_key('stem_depth') == 'stem_depth'
  assert study.resolve_key('optimizer.name') == 'optimizer.name'
  with pytest.raises(configuration.ConfigError, match='optimizer.name'):
    study.resolve_key('name')  # data.name, model.name, optimizer.name
  assert study.parse_sweep('learning_rate', ['1e-3', '3e-4']).values == (1e-3, 3e-4)
  assert study.parse_sweep('flip', ['true', '0']).values == (True, False)
  assert study.parse_sweep('stem_depth', ['0', '4']).report_name == 'stem_depth'
  assert study.parse_sweep('seed', ['0', '1']).report_name == 'sweep_seed'
  for key, values in [('stem_depth', ['1.5']), ('stem_depth', ['1', '1']), ('stages', ['8'])]:
    with pytest.raises(configuration.ConfigError):
      study.parse_sweep(key, values)


def test_the_study_is_the_three_networks_with_the_overrides_in_their_own_directories(tmp_path):
  experiments = study.study_experiments(list(study.STUDY_MODELS), 'paper', {'batch_size': 64}, tmp_path)
  assert [(e.name, e.config.model.name, e.workdir) for e in experiments] == [
      ('vit', 'vit', tmp_path / 'vit'), ('resnet50', 'resnet50', tmp_path / 'resnet50'),
      ('hybrid', 'hybrid', tmp_path / 'hybrid')]
  assert all(e.config.batch_size == 64 and e.config.optimizer.name == 'adam' for e in experiments)
  with pytest.raises(configuration.ConfigError, match='--models'):
    study.parse_models('vit,convnext')
  with pytest.raises(configuration.ConfigError, match='both set it'):
    study.sweep_experiments('hybrid', 'smoke', {'optimizer.learning_rate': 0.1},
                            study.parse_sweep('learning_rate', ['0.2']), tmp_path)

