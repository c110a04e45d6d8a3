"""predict on image files against a smoke run trained once for the module."""
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from hybridvit_jax.configs import vit
from hybridvit_jax import configuration, data, predict

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def trained_run(vit_smoke_run):
  """(workdir, config, last history record) of a one-epoch ViT smoke run (predict only reads it)."""
  return vit_smoke_run


def test_image_files_are_classified_as_the_run_evaluated_them(trained_run, tmp_path):
  """PNGs of the test split, predicted one file each, score the test accuracy the run recorded."""
  workdir, config, record = trained_run
  test = data.load_split(config.data, config.data.test_split)
  paths = []
  for i, image in enumerate(test['image']):
    paths.append(str(tmp_path / f'{i}.png'))
    Image.fromarray(image).save(paths[-1])
  predictions = predict.predict(str(workdir), paths, top=1)
  predicted = [int(predictions[path][0]['class'].removeprefix('class_')) for path in paths]
  accuracy = np.mean(np.array(predicted) == test['label'])
  assert accuracy == pytest.approx(record['test_accuracy'], abs=1e-6)


def test_any_size_and_mode_gives_a_distribution_over_the_class_names(trained_run, tmp_path):
  workdir, _, _ = trained_run
  rng = np.random.default_rng(0)
  rgba = tmp_path / 'wide.png'
  Image.fromarray(rng.integers(0, 256, (48, 80, 4), dtype=np.uint8), 'RGBA').save(rgba)
  grey = tmp_path / 'grey.jpg'
  Image.fromarray(rng.integers(0, 256, (300, 200), dtype=np.uint8), 'L').save(grey)
  info = data.dataset_info(vit.get_config('smoke').data)
  predictions = predict.predict(str(workdir), [str(rgba), str(grey)], checkpoint='latest', top=info.num_classes)
  for classes in predictions.values():
    assert sorted(c['class'] for c in classes) == sorted(info.class_names)
    probabilities = [c['probability'] for c in classes]
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)
    assert probabilities == sorted(probabilities, reverse=True)
  top3 = predict.predict(str(workdir), [str(rgba)], top=3)[str(rgba)]
  assert len(top3) == 3 and all(c['class'] in info.class_names for c in top3)


def test_a_missing_file_is_reported_before_the_model_is_restored(trained_run, tmp_path, monkeypatch):
  def no_restore(*_):
    raise AssertionError('restored the model before checking the files')
  monkeypatch.setattr(predict.evaluate, 'restore_run', no_restore)
  with pytest.raises(configuration.ConfigError, match='missing.png: no such file'):
    predict.predict(str(trained_run[0]), [str(tmp_path / 'missing.png')])


def test_a_text_file_is_one_line_naming_it_and_exit_code_2(trained_run, tmp_path):
  notes = tmp_path / 'notes.txt'
  notes.write_text('not an image\n')
  result = subprocess.run([sys.executable, '-m', 'hybridvit_jax.predict', f'--workdir={trained_run[0]}', str(notes)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and errors[0].startswith(f'error: {notes} is not an image')
