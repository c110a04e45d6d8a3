"""Tests of the 'image_folder' data source: labels, split specs, the cache, bad input, no TensorFlow."""

import json
import os

import ml_collections
import numpy as np
from PIL import Image
import pytest

from conftest import LAUNCH_FLAGS, run_command
from hybridvit_jax.data import image_folder
from hybridvit_jax.data import source

# Created in this (unsorted) order, so a test sees that labels follow the sorted names.
CLASSES = ('zebra', 'ant', 'moth')
SORTED_CLASSES = ('ant', 'moth', 'zebra')
TRAIN_PER_CLASS = 4
TEST_PER_CLASS = 2
SIDE = 8


def data_config(root) -> ml_collections.ConfigDict:
  """The `data` section of a config naming the image folder `root`."""
  return ml_collections.ConfigDict({
      'name': source.IMAGE_FOLDER_NAME, 'data_dir': str(root), 'manual_dir': '',
      'synthetic_train_examples': 512, 'synthetic_test_examples': 256})


def pixel_value(split: str, class_name: str, index: int) -> int:
  """The grey level of image `index` of a class: distinct for every image of the folder."""
  return (split == 'test') * 128 + SORTED_CLASSES.index(class_name) * 32 + index * 4


def write_image(path, value: int, size=(SIDE, SIDE), mode='RGB') -> None:
  """A PNG of one colour (R=value, G=value+1, B=value+2; grey level `value` for mode 'L')."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  colour = value if mode == 'L' else (value, value + 1, value + 2)
  Image.new(mode, size, colour).save(path)


@pytest.fixture(name='root')
def fixture_root(tmp_path, monkeypatch):
  """ROOT with 3 classes x 4 train and x 2 test 8x8 PNGs; the user cache lies in tmp_path."""
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg_cache'))
  root = tmp_path / 'folder'
  for split, per_class in (('train', TRAIN_PER_CLASS), ('test', TEST_PER_CLASS)):
    for class_name in CLASSES:
      # File names sort differently from creation order: 'img3' is written first.
      for index in reversed(range(per_class)):
        write_image(root / split / class_name / f'img{index}.png',
                    pixel_value(split, class_name, index))
  return root


def forbid_decoding(monkeypatch) -> None:
  """Makes any further PIL.Image.open fail, so a load that decodes fails the test."""
  def fail(*args, **kwargs):
    raise AssertionError(f'decoded an image although the cache is current: {args}')
  monkeypatch.setattr(Image, 'open', fail)


def label_of_pixel(value: int) -> int:
  """The label pixel_value encodes: the sorted class index."""
  return (value % 128) // 32


def test_labels_follow_sorted_class_names_in_a_fixed_shuffled_order(root):
  info = source.dataset_info(data_config(root))
  assert info == source.DatasetInfo(name='image_folder', num_classes=3, image_shape=(SIDE, SIDE, 3),
                                    class_names=SORTED_CLASSES)
  train = source.load_split(data_config(root), 'train')
  assert train['image'].dtype == np.uint8 and train['image'].shape == (12, SIDE, SIDE, 3)
  assert train['label'].dtype == np.int32
  values = train['image'][:, 0, 0, 0]
  # Every image once, with the label of its class folder, and all three channels decoded.
  expected = [pixel_value('train', name, index) for name in SORTED_CLASSES for index in range(4)]
  assert sorted(values.tolist()) == sorted(expected)
  np.testing.assert_array_equal(train['label'], [label_of_pixel(value) for value in values])
  np.testing.assert_array_equal(train['image'][:, 3, 5], np.add.outer(values, [0, 1, 2]))
  # Shuffled: the first half of the split is not one or two classes, as class-folder order is.
  assert len(set(train['label'][:6].tolist())) == 3
  test = source.load_split(data_config(root), 'test')
  assert sorted(test['label'].tolist()) == [0, 0, 1, 1, 2, 2]
  np.testing.assert_array_equal(
      test['label'], [label_of_pixel(value) for value in test['image'][:, 0, 0, 0]])
  assert all(value >= 128 for value in test['image'][:, 0, 0, 0])


def test_the_order_is_the_same_when_the_cache_is_rebuilt(root, tmp_path):
  first = source.load_split(data_config(root), 'train')
  os.rename(root / image_folder.CACHE_DIR_NAME, tmp_path / 'old_cache')
  second = source.load_split(data_config(root), 'train')
  for key in ('image', 'label'):
    np.testing.assert_array_equal(first[key], second[key])


def test_grayscale_images_become_rgb(tmp_path, monkeypatch):
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg_cache'))
  for split in ('train', 'test'):
    write_image(tmp_path / 'gray' / split / 'a' / 'x.png', 77, mode='L')
    write_image(tmp_path / 'gray' / split / 'b' / 'x.jpg', 0, mode='RGB')
  train = source.load_split(data_config(tmp_path / 'gray'), 'train')
  assert train['image'].shape == (2, SIDE, SIDE, 3)
  np.testing.assert_array_equal(train['image'][train['label'] == 0][0, 0, 0], [77, 77, 77])


@pytest.mark.parametrize('spec, expected', [
    ('train[:5]', [('train', 0, 5)]),
    ('train[5:]', [('train', 5, 12)]),
    ('train[:50%]', [('train', 0, 6)]),
    ('train[-3:]', [('train', 9, 12)]),
    ('test', [('test', 0, 6)]),
    ('test[1:3]', [('test', 1, 3)]),
    ('train[:2]+test[-1:]', [('train', 0, 2), ('test', 5, 6)]),
])
def test_split_specs_slice_the_full_splits(root, spec, expected):
  full = {split: source.load_split(data_config(root), split) for split in ('train', 'test')}
  part = source.load_split(data_config(root), spec)
  assert source.split_size(data_config(root), spec) == len(part['label'])
  for key in ('image', 'label'):
    np.testing.assert_array_equal(
        part[key], np.concatenate([full[split][key][start:stop] for split, start, stop in expected]))


def test_a_bad_split_spec_is_tfds_value_error(root):
  with pytest.raises(ValueError, match='val'):
    source.load_split(data_config(root), 'val')
  with pytest.raises(ValueError):
    source.load_split(data_config(root), 'train[:100]')


def test_in_memory_names_the_sources_built_without_tensorflow():
  assert source.in_memory(ml_collections.ConfigDict({'name': 'image_folder'}))
  assert source.in_memory(ml_collections.ConfigDict({'name': 'synthetic'}))
  assert not source.in_memory(ml_collections.ConfigDict({'name': 'cifar10'}))


def test_cache_is_written_once_then_reused_without_decoding(root, monkeypatch):
  first = source.load_split(data_config(root), 'train[:7]')
  cache_dir = root / image_folder.CACHE_DIR_NAME
  assert sorted(os.listdir(cache_dir)) == ['train.npz']  # no temporary file left behind
  forbid_decoding(monkeypatch)
  second = source.load_split(data_config(root), 'train[:7]')
  for key in ('image', 'label'):
    np.testing.assert_array_equal(first[key], second[key])
  monkeypatch.undo()
  source.dataset_info(data_config(root))  # decodes test once more, and train not again
  assert sorted(os.listdir(cache_dir)) == ['test.npz', 'train.npz']
  forbid_decoding(monkeypatch)
  assert source.dataset_info(data_config(root)).image_shape == (SIDE, SIDE, 3)


def test_cache_is_rebuilt_when_the_folder_changes(root):
  assert len(source.load_split(data_config(root), 'train')['label']) == 12
  write_image(root / 'train' / 'moth' / 'img9.png', 250)
  train = source.load_split(data_config(root), 'train')
  assert sorted(train['label'].tolist()) == [0] * 4 + [1] * 5 + [2] * 4
  assert train['label'][train['image'][:, 0, 0, 0] == 250].tolist() == [1]
  # Same name and size, new contents and mtime: rebuilt too.
  path = root / 'train' / 'ant' / 'img0.png'
  write_image(path, 200)
  os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
  train = source.load_split(data_config(root), 'train')
  assert train['label'][train['image'][:, 0, 0, 0] == 200].tolist() == [0]


def test_a_corrupt_cache_file_is_rebuilt(root):
  source.load_split(data_config(root), 'train')
  cache = root / image_folder.CACHE_DIR_NAME / 'train.npz'
  cache.write_bytes(cache.read_bytes()[:100])
  assert len(source.load_split(data_config(root), 'train')['label']) == 12


def test_a_failed_write_leaves_no_cache_file(root, monkeypatch):
  def crash(file, **arrays):
    file.write(b'PK\x03\x04 partial')
    raise OSError(28, 'No space left on device')
  monkeypatch.setattr(np, 'savez', crash)
  with pytest.raises(source.DataError, match='cannot write the image_folder cache'):
    source.load_split(data_config(root), 'train')
  assert os.listdir(root / image_folder.CACHE_DIR_NAME) == []
  monkeypatch.undo()
  assert len(source.load_split(data_config(root), 'train')['label']) == 12


def test_a_read_only_root_caches_in_the_user_cache(root, tmp_path, monkeypatch):
  # Tests may run as root, which chmod cannot stop, so the write into ROOT is made to fail.
  write = image_folder._write_atomically  # pylint: disable=protected-access

  def read_only_root(path, arrays):
    if str(path).startswith(str(root)):
      raise PermissionError(13, 'Permission denied', path)
    write(path, arrays)
  monkeypatch.setattr(image_folder, '_write_atomically', read_only_root)
  first = source.load_split(data_config(root), 'test')
  user_caches = list((tmp_path / 'xdg_cache' / 'hybridvit_jax' / 'image_folder').glob('*/test.npz'))
  assert len(user_caches) == 1
  forbid_decoding(monkeypatch)
  np.testing.assert_array_equal(source.load_split(data_config(root), 'test')['image'], first['image'])


def one_line_data_error(config, split='train') -> str:
  """The message of the DataError that loading `split` raises, checked to be one line."""
  with pytest.raises(source.DataError) as raised:
    source.load_split(config, split)
  message = str(raised.value)
  assert '\n' not in message
  return message


def test_an_empty_or_unset_data_dir_is_a_data_error():
  assert 'data.data_dir is empty' in one_line_data_error(data_config(''))
  assert 'data.data_dir is empty' in one_line_data_error(ml_collections.ConfigDict({'name': 'image_folder'}))


def test_a_missing_root_is_a_data_error(tmp_path):
  message = one_line_data_error(data_config(tmp_path / 'nowhere'))
  assert f'{tmp_path / "nowhere"} does not exist' in message
  assert 'ROOT/train/<class>/' in message


@pytest.mark.parametrize('split_dir', ['train', 'test'])
def test_a_missing_split_folder_is_a_data_error(root, split_dir):
  os.rename(root / split_dir, root / 'elsewhere')
  message = one_line_data_error(data_config(root))
  assert message.startswith(f'data.data_dir: {root / split_dir} does not exist; image_folder expects')


def test_a_split_without_class_folders_is_a_data_error(tmp_path):
  (tmp_path / 'train').mkdir()
  (tmp_path / 'train' / 'stray.png').write_bytes(b'')
  (tmp_path / 'test').mkdir()
  assert f'{tmp_path / "train"} holds no class folders' in one_line_data_error(data_config(tmp_path))


def test_a_class_without_images_is_a_data_error(root):
  (root / 'train' / 'empty').mkdir()
  (root / 'train' / 'empty' / 'notes.txt').write_text('not an image')
  assert f'{root / "train" / "empty"} holds no' in one_line_data_error(data_config(root))


def test_test_classes_differing_from_train_is_a_data_error(root):
  os.rename(root / 'test' / 'moth', root / 'test' / 'wasp')
  message = one_line_data_error(data_config(root), 'test')
  assert str(root / 'test') in message and "missing ['moth']" in message and "extra ['wasp']" in message


@pytest.mark.parametrize('contents', [b'not a png at all', 'truncated'])
def test_a_corrupt_image_is_a_data_error_naming_it(root, contents):
  path = root / 'train' / 'moth' / 'img2.png'
  if contents == 'truncated':
    write_image(root / 'big.png', 0, size=(64, 64))
    contents = (root / 'big.png').read_bytes()[:60]
  path.write_bytes(contents)
  message = one_line_data_error(data_config(root))
  assert f'cannot decode {path}' in message


def test_an_image_of_another_size_is_a_data_error_naming_both_sizes(root):
  path = root / 'train' / 'zebra' / 'img1.png'
  write_image(path, 0, size=(16, SIDE))
  message = one_line_data_error(data_config(root))
  # The odd image and the first of the split's order, whichever of the two comes first.
  assert str(path) in message and '16x8' in message and '8x8' in message
  assert message.count(str(root / 'train')) == 2


def test_test_images_of_another_size_than_train_are_a_data_error(root):
  for class_name in CLASSES:
    for index in range(TEST_PER_CLASS):
      write_image(root / 'test' / class_name / f'img{index}.png', 0, size=(4, 4))
  with pytest.raises(source.DataError, match='4x4 pixels but .* is 8x8') as raised:
    source.dataset_info(data_config(root))
  assert '\n' not in str(raised.value)


def cifar_shaped_folder(root, *, train_per_class: int, test_per_class: int) -> None:
  """ROOT with 10 classes of 32x32 noise PNGs: the smoke preset's shapes, so its steps compile
  as in the other command-line tests."""
  rng = np.random.default_rng(0)
  for split, per_class in (('train', train_per_class), ('test', test_per_class)):
    for label in range(10):
      for index in range(per_class):
        path = root / split / f'class{label}' / f'{index}.png'
        os.makedirs(path.parent, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)


@pytest.mark.slow
def test_launch_evaluate_predict_and_benchmark_run_without_tensorflow(tmp_path, monkeypatch):
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg_cache'))
  root, workdir = tmp_path / 'folder', tmp_path / 'run'
  cifar_shaped_folder(root, train_per_class=8, test_per_class=2)
  data_flags = ('--config.data.name=image_folder', f'--config.data.data_dir={root}',
                '--config.data.train_split=train[:64]', '--config.data.val_split=train[64:]')
  result = run_command(
      'tests/without_tensorflow.py',
      'launch.py', *LAUNCH_FLAGS, *data_flags, '--config.num_epochs=2', f'--workdir={workdir}', ',',
      '-m', 'hybridvit_jax.evaluate', f'--workdir={workdir}', '--split=test', ',',
      '-m', 'hybridvit_jax.predict', f'--workdir={workdir}', str(root / 'test' / 'class3' / '0.png'), ',',
      '-m', 'hybridvit_jax.benchmark', '--config=configs/vit.py:smoke', *data_flags, '--steps=2',
      '--warmup=1')
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stderr.count('without_tensorflow: exit 0') == 4, result.stderr[-3000:]
  evaluation, prediction, benchmark = (json.loads(line) for line in result.stdout.splitlines()
                                       if line.startswith('{'))
  assert evaluation['examples'] == 20 and 0 <= evaluation['accuracy'] <= 1, evaluation
  [top] = prediction.values()
  assert len(top) == 3 and {entry['class'] for entry in top} <= {f'class{i}' for i in range(10)}
  assert benchmark['shape_source'] == 'image_folder' and benchmark['num_classes'] == 10, benchmark
  assert benchmark['image_shape'] == [32, 32, 3] and benchmark['step_ms'] > 0, benchmark
  history = [json.loads(line) for line in (workdir / 'history.jsonl').read_text().splitlines()]
  assert [record['epoch'] for record in history if 'val_accuracy' in record] == [1, 2], history
