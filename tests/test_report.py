"""The report on hand-made runs: exact table values, the paper's rows, figures, missing values."""
import csv
import json
import pathlib
import subprocess
import sys

import pytest
from flax import nnx
from PIL import Image

from hybridvit_jax.configs import hybrid, resnet50, vit
from hybridvit_jax import configuration, evaluate, models, report
from hybridvit_jax.data import DataError

REPO = pathlib.Path(__file__).resolve().parents[1]


def record(epoch, val, test=None, *, images_per_s=100.0, elapsed_s=None):
  """A history record as the loop writes it; test=None leaves out the test numbers."""
  result = {'epoch': epoch, 'step': 7 * epoch, 'train_loss': 2.0 / epoch, 'train_accuracy': 0.3 + 0.1 * epoch,
            'val_loss': 1.5 / epoch, 'val_accuracy': val, 'elapsed_s': elapsed_s or 60.0 * epoch,
            'images_per_s': images_per_s, 'skipped_steps': 0}
  if test is not None:
    result.update(test_loss=1.4 / epoch, test_accuracy=test)
  return result


def error_lines(stderr: str) -> list[str]:
  """The command's own error lines (libraries log other lines to stderr at start-up)."""
  return [line for line in stderr.splitlines() if line.startswith('error:')]


def make_run(directory: pathlib.Path, config, history, evaluations=()) -> pathlib.Path:
  directory.mkdir(parents=True)
  configuration.save_run_config(config, directory)
  (directory / 'history.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in history))
  for result in evaluations:
    evaluate.record_evaluation(directory, result)
  return directory


def evaluation(step, accuracy, *, split='test', weights='trained'):
  """A result as `evaluate` records it."""
  return {'workdir': 'w', 'checkpoint': 'best', 'step': step, 'split': split, 'weights': weights,
          'accuracy': accuracy, 'loss': 1.0, 'examples': 256}


def smoke(experiment, **overrides):
  config = experiment.get_config('smoke')
  for key, value in overrides.items():
    config[key] = value
  return config


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp('runs')
  return [
      make_run(root / 'vit_long', smoke(vit, num_epochs=3), [
          record(1, 0.50, 0.55, images_per_s=100.0), record(2, 0.70, 0.65, images_per_s=300.0),
          record(3, 0.70, 0.72, images_per_s=200.0, elapsed_s=3725.0)]),
      make_run(root / 'resnet_one', smoke(resnet50, num_epochs=1), [record(1, 0.40, 0.42, images_per_s=50.0)]),
      make_run(root / 'hybrid_running', smoke(hybrid, num_epochs=5), [record(1, 0.3, 0.31), record(2, 0.35, 0.33)]),
      make_run(root / 'vit_no_test', smoke(vit, eval_test_every_epoch=False), [record(1, 0.6), record(2, 0.55)]),
      make_run(root / 'vit_empty', smoke(vit), []),
      # Tested only by `evaluate` after training, and stopped by max_steps (24 steps of 7 per epoch).
      make_run(root / 'vit_evaluated', smoke(vit, eval_test_every_epoch=False, num_epochs=5, max_steps=24),
               [record(1, 0.6), record(2, 0.65), record(3, 0.62)],
               [evaluation(7, 0.58), evaluation(14, 0.61), evaluation(14, 0.9, weights='ema'),
                evaluation(14, 0.7, split='train[:100]'), evaluation(14, 0.63)]),
      make_run(root / 'vit_evaluated_before_its_best', smoke(vit, eval_test_every_epoch=False),
               [record(1, 0.6), record(2, 0.65)], [evaluation(7, 0.58)]),
  ]


@pytest.fixture(scope='module')
def written(runs, tmp_path_factory):
  out = tmp_path_factory.mktemp('report')
  return out, report.write_report(runs, out)


@pytest.fixture(scope='module')
def table(written):
  out, _ = written
  with open(out / 'table.csv', newline='') as f:
    return {row['run']: row for row in csv.DictReader(f)}


def test_table_holds_best_val_epochs_test_accuracy_and_the_maximum_test_accuracy(table):
  long = table['vit_long']
  assert (long['model'], float(long['epochs']), int(long['planned_epochs'])) == ('vit', 3, 3)
  assert float(long['best_val_accuracy']) == 0.70 and float(long['best_val_epoch']) == 2  # the first of equals
  assert float(long['test_accuracy_at_best_val']) == 0.65
  assert float(long['max_test_accuracy']) == 0.72 and float(long['max_test_epoch']) == 3
  assert float(long['images_per_s']) == 200.0 and float(long['wall_time_s']) == 3725.0

  one = table['resnet_one']
  assert (one['model'], float(one['epochs'])) == ('resnet50', 1)
  assert float(one['test_accuracy_at_best_val']) == float(one['max_test_accuracy']) == 0.42

  running = table['hybrid_running']
  assert (float(running['epochs']), int(running['planned_epochs'])) == (2, 5)
  assert float(running['max_test_accuracy']) == 0.33 and float(running['best_val_epoch']) == 2


def test_test_accuracy_of_a_run_tested_after_training_is_what_evaluate_recorded_for_its_best_step(table):
  evaluated = table['vit_evaluated']
  assert float(evaluated['test_accuracy_at_best_val']) == 0.63  # the newest, trained weights, test split
  assert evaluated['max_test_accuracy'] == ''  # no test number per epoch
  assert float(evaluated['planned_epochs']) == pytest.approx(24 / 7, abs=1e-3)
  # An evaluation of an earlier checkpoint is not the best checkpoint's accuracy.
  assert table['vit_evaluated_before_its_best']['test_accuracy_at_best_val'] == ''


def test_missing_values_are_empty_in_the_csv_and_a_dash_in_the_markdown(table, written):
  no_test = table['vit_no_test']
  assert float(no_test['best_val_accuracy']) == 0.6
  assert no_test['test_accuracy_at_best_val'] == no_test['max_test_accuracy'] == no_test['max_test_epoch'] == ''
  empty = table['vit_empty']
  assert all(empty[key] == '' for key in ('epochs', 'wall_time_s', 'images_per_s', 'best_val_accuracy',
                                          'max_test_accuracy'))
  assert int(empty['parameters']) > 0  # known from the config alone
  markdown = written[1]['markdown']
  empty_line = next(line for line in markdown.splitlines() if line.startswith('| vit_empty |'))
  assert empty_line.count(report.MISSING) == 6  # epochs, wall time, images/s, 3 accuracies
  long_line = next(line for line in markdown.splitlines() if line.startswith('| vit_long |'))
  assert '70.00% (epoch 2)' in long_line and '72.00% (epoch 3)' in long_line and '1 h 2 min 5 s' in long_line


def test_parameters_are_counted_without_allocation(table):
  config = vit.get_config('smoke')
  model = models.create_model(config.model, num_classes=10, image_shape=(32, 32, 3), rngs=nnx.Rngs(0))
  assert int(table['vit_long']['parameters']) == models.count_params(model)
  assert float(table['vit_long']['gflops_per_image']) > 0 and float(table['resnet_one']['gflops_per_image']) > 0


def test_flops_are_one_forward_pass_on_one_image():
  """ViT-Ti/4: 2 FLOPs per encoder weight per token, plus attention's two token-by-token products
  and the patch embedding; layer norms, softmax and GELU add a few percent."""
  config = models.variant_config('vit_ti4')
  m = config.vit
  parameters, gflops = report.model_cost(config, num_classes=10, image_shape=(32, 32, 3))
  assert parameters == 5_362_762
  tokens = (32 // m.patch_size) ** 2 + 1
  encoder_weights = m.num_layers * (4 * m.hidden_size ** 2 + 2 * m.hidden_size * m.mlp_dim)
  attention = m.num_layers * 2 * 2 * tokens ** 2 * m.hidden_size
  patch_embedding = 2 * (tokens - 1) * m.patch_size ** 2 * 3 * m.hidden_size
  matmul_gflops = (2 * tokens * encoder_weights + attention + patch_embedding) / 1e9
  assert matmul_gflops < gflops < 1.1 * matmul_gflops


def test_markdown_ends_with_the_papers_rows(written):
  out, result = written
  markdown = (out / 'table.md').read_text()
  assert markdown == result['markdown']
  paper = markdown[markdown.index('Published'):]
  for network, accuracy, epochs, wall_time in [('ViT', '60.97%', '16', '7 h'), ('ResNet50', '78.35%', '19', '6 h 40 min'),
                                               ('CNN+ViT', '70.28%', '10', '4 h 17 min')]:
    assert f'| {network} | {accuracy} | {epochs} | {wall_time} |' in paper


def test_figures_exist_for_all_runs_and_each_run(written):
  out, result = written
  expected = {'curves.png': (1200, 750), 'loss.png': (1200, 750), 'time.png': (1200, 750),
              **{f'{name}.png': (1800, 675) for name in ('vit_long', 'resnet_one', 'hybrid_running', 'vit_no_test',
                                                         'vit_empty', 'vit_evaluated',
                                                         'vit_evaluated_before_its_best')}}
  assert {p.name for p in result['files']} == {'table.md', 'table.csv', *expected}
  for name, size in expected.items():
    assert (out / name).stat().st_size > 10_000, name
    with Image.open(out / name) as image:
      assert image.size == size, name


def test_time_axis_is_each_evaluations_elapsed_minutes_on_a_real_smoke_run(vit_smoke_run, tmp_path, monkeypatch):
  workdir, _, _ = vit_smoke_run
  result = report.write_report([workdir], tmp_path)
  assert tmp_path / 'time.png' in result['files'] and (tmp_path / 'time.png').stat().st_size > 10_000
  saved = []
  monkeypatch.setattr(report, 'save_figure', lambda figure, path: saved.append(figure))
  report.plot_time_to_accuracy(report.read_runs([workdir]), tmp_path / 'again.png')
  (line,) = saved[0].axes[0].get_lines()
  records = [json.loads(line) for line in (workdir / 'history.jsonl').read_text().splitlines()]
  assert line.get_label() == workdir.name
  assert list(line.get_xdata()) == [r['elapsed_s'] / 60 for r in records] and all(r['elapsed_s'] > 0 for r in records)
  assert list(line.get_ydata()) == [100 * r['val_accuracy'] for r in records]


def test_runs_without_test_numbers_are_drawn_with_validation_numbers(runs):
  run = report.read_runs([runs[3]])[0]
  assert report.eval_split(run.history) == 'val'
  assert report.series(run.history, 'val_accuracy') == ([1, 2], [0.6, 0.55])


def test_duplicate_run_names_are_told_apart(tmp_path):
  assert report.run_names([tmp_path / 'a' / 'vit', tmp_path / 'b' / 'vit', tmp_path / 'c']) == ['a_vit', 'b_vit', 'c']


def test_durations_read_like_the_paper():
  assert [report.format_duration(s) for s in (12.4, 252, 24_000, 25_200)] == [
      '12 s', '4 min 12 s', '6 h 40 min 0 s', '7 h 0 min 0 s']


def test_a_data_set_that_cannot_be_found_leaves_parameters_and_flops_missing(runs, monkeypatch):
  def no_data(_):
    raise DataError('data.name: not here')
  monkeypatch.setattr(report.data, 'dataset_info', no_data)
  row = report.run_row(report.read_runs([runs[1]])[0])
  assert row['parameters'] is None and row['gflops_per_image'] is None and row['max_test_accuracy'] == 0.42


def test_a_directory_that_is_not_a_run_is_one_line_and_exit_code_2(runs, tmp_path):
  result = subprocess.run([sys.executable, '-m', 'hybridvit_jax.report', str(runs[0]), str(tmp_path / 'nothing'),
                           f'--out={tmp_path / "out"}'], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  assert error_lines(result.stderr) == [
      f'error: {tmp_path / "nothing"} holds no config.json: is it the --workdir of a training run?']
  assert not (tmp_path / 'out').exists()
