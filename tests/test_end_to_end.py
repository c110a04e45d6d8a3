"""What a user does: train the smoke preset, resume, evaluate, and mistype things."""
import json
import os
import pathlib
import shutil

import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from hybridvit_jax.configs import hybrid, resnet50, vit
from hybridvit_jax import configuration
from hybridvit_jax import evaluate as evaluate_lib
from hybridvit_jax.evaluate import evaluate
from hybridvit_jax.training import loop
from hybridvit_jax.training.history import read_history

from conftest import run_command

HISTORY_FIELDS = {'epoch', 'step', 'train_loss', 'train_accuracy', 'val_loss', 'val_accuracy', 'test_loss',
                  'test_accuracy', 'elapsed_s', 'images_per_s'}


def event_scalars(workdir: pathlib.Path) -> dict[str, dict[int, float]]:
  """The run's TensorBoard scalars: {tag: {step: value}}."""
  accumulator = event_accumulator.EventAccumulator(str(workdir), size_guidance={event_accumulator.TENSORS: 0})
  accumulator.Reload()
  values = {tag: {event.step: tensor_util.make_ndarray(event.tensor_proto) for event in accumulator.Tensors(tag)}
            for tag in accumulator.Tags()['tensors']}
  return {tag: {step: float(value) for step, value in by_step.items()} for tag, by_step in values.items()
          if all(value.ndim == 0 for value in by_step.values())}  # not the hyperparameters' summary


@pytest.mark.parametrize('experiment', [vit, resnet50, hybrid], ids=['vit', 'resnet50', 'hybrid'])
@pytest.mark.slow
def test_smoke_preset_trains_every_network(experiment, tmp_path):
  config = experiment.get_config('smoke')
  config.num_epochs = 2
  config.profile_steps = 2
  record = loop.train_and_evaluate(config, tmp_path)
  history = read_history(tmp_path)
  assert [r['epoch'] for r in history] == [1, 2] and history[-1] == record
  assert HISTORY_FIELDS <= set(record)
  assert history[1]['train_loss'] < history[0]['train_loss']
  assert (tmp_path / 'config.json').exists()
  assert list((tmp_path / 'checkpoints' / 'latest').iterdir()) and list((tmp_path / 'checkpoints' / 'best').iterdir())
  scalars = event_scalars(tmp_path)
  assert {'train_loss', 'train_accuracy', 'train_grad_norm', 'learning_rate', 'val_accuracy'} <= set(scalars)
  assert set(scalars['learning_rate']) == set(scalars['train_grad_norm']) == {5, 10}  # every log_every_steps
  assert all(0 < value < float('inf') for value in scalars['train_grad_norm'].values())
  assert 0 < scalars['learning_rate'][10] < scalars['learning_rate'][5] <= config.optimizer.learning_rate  # cosine
  assert len(list(tmp_path.glob('plugins/profile/*/*.xplane.pb'))) == 1  # profile_steps: one trace


@pytest.mark.slow
def test_evaluate_command_prints_one_json_line_and_keeps_it_for_report(tmp_path, launched_run):
  """On a run that launch.py trained (the launch and resume commands are the reliability tests'):
  one JSON line, appended to evaluations.jsonl; the compilation cache in the user's cache folder."""
  workdir = tmp_path / 'run'
  shutil.copytree(launched_run, workdir)
  without_cache_dir = {k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'}
  result = run_command('-m', 'hybridvit_jax.evaluate', f'--workdir={workdir}', '--checkpoint=latest',
                       '--split=val', env={**without_cache_dir, 'XDG_CACHE_HOME': str(tmp_path / 'cache')})
  assert result.returncode == 0, result.stderr[-3000:]
  assert list((tmp_path / 'cache' / 'hybridvit_jax' / 'jax').iterdir())
  evaluation = json.loads(result.stdout.strip().splitlines()[-1])
  last = read_history(workdir)[-1]
  assert evaluation['examples'] == 64 and evaluation['step'] == last['step'] == 21
  assert evaluation['accuracy'] == pytest.approx(last['val_accuracy'], abs=1e-6)
  assert evaluate_lib.read_evaluations(workdir) == [evaluation]  # where report finds it


def test_a_run_of_an_older_config_schema_is_refused_in_one_line(tmp_path):
  saved = vit.get_config('smoke').to_dict()
  saved['model']['stem_layers'] = 2  # a flat model key of the schema before the config groups
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  with pytest.raises(configuration.ConfigError, match=r'older version .*model\.stem_layers is no longer a config key'):
    configuration.load_run_config(tmp_path)


@pytest.mark.slow
def test_early_stopping_stops_and_a_rerun_trains_nothing(tmp_path):
  config = vit.get_config('smoke')
  config.update({'num_epochs': 8, 'early_stopping_patience': 1, 'eval_test_every_epoch': False})
  config.optimizer.learning_rate = 1e-12  # val_accuracy soon stops improving
  loop.train_and_evaluate(config, tmp_path)
  accuracies = [r['val_accuracy'] for r in read_history(tmp_path)]
  assert 2 <= len(accuracies) < 8  # stopped early, at the first epoch that did not improve:
  assert accuracies[-1] <= max(accuracies[:-1])  # the last did not,
  for i in range(1, len(accuracies) - 1):  # and every one between the first and the last did
    assert accuracies[i] > max(accuracies[:i])
  assert loop.train_and_evaluate(config, tmp_path) == {}
  assert len(read_history(tmp_path)) == len(accuracies)


@pytest.mark.slow
def test_eval_every_epochs_records_every_nth_epoch_and_the_last_but_checkpoints_every_epoch(tmp_path):
  config = vit.get_config('smoke')
  config.update({'num_epochs': 3, 'eval_every_epochs': 2, 'eval_test_every_epoch': False, 'keep_checkpoints': 3})
  record = loop.train_and_evaluate(config, tmp_path)
  history = read_history(tmp_path)
  assert [(r['epoch'], r['step']) for r in history] == [(2, 14), (3, 21)] and history[-1] == record
  assert sorted(int(p.name) for p in (tmp_path / 'checkpoints' / 'latest').iterdir() if p.name.isdigit()) == [7, 14, 21]


def test_evaluate_needs_no_optimizer_state_so_it_survives_a_changed_optimizer(tmp_path, vit_smoke_run):
  workdir = tmp_path / 'run'
  shutil.copytree(vit_smoke_run[0], workdir)
  before = evaluate(str(workdir), 'latest')
  saved = json.loads((workdir / configuration.RUN_CONFIG_FILE).read_text())
  saved['optimizer']['name'] = 'sgd' if saved['optimizer']['name'] != 'sgd' else 'adam'  # another optimizer state
  (workdir / configuration.RUN_CONFIG_FILE).write_text(json.dumps(saved))
  after = evaluate(str(workdir), 'latest')
  assert (after['step'], after['loss'], after['accuracy']) == (before['step'], before['loss'], before['accuracy'])


def test_the_gpu_preset_is_the_cpu_hybrid_in_bfloat16_on_an_image_folder():
  gpu, cpu = hybrid.get_config('gpu'), hybrid.get_config('cpu')
  assert gpu.model.dtype == 'bfloat16' and gpu.data.name == 'image_folder' and not gpu.budget_minutes
  assert {**gpu.model.to_dict(), 'dtype': cpu.model.dtype} == cpu.model.to_dict()
  assert (gpu.optimizer.to_dict(), gpu.batch_size) == (cpu.optimizer.to_dict(), cpu.batch_size)
  configuration.validate(gpu, device_count=1, image_shape=(32, 32, 3))
  for other in (vit, resnet50):
    with pytest.raises(configuration.ConfigError, match="preset 'gpu' exists for configs/hybrid.py only"):
      other.get_config('gpu')
