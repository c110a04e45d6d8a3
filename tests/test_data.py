"""Tests of hybridvit_jax.data: tfds preparation from a local archive, synthetic data, augmentation."""

import io
import logging
import socket
import tarfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from hybridvit_jax import data

CIFAR10_CLASS_NAMES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')
CIFAR10_ARCHIVE = 'cifar-10-binary.tar.gz'
RECORDS_PER_TRAIN_FILE = 3
RECORDS_IN_TEST_FILE = 4


def data_config(**overrides) -> ml_collections.ConfigDict:
  """The `data` section of a config with the keys the data module reads."""
  config = ml_collections.ConfigDict({
      'name': 'cifar10', 'data_dir': '', 'manual_dir': '',
      'synthetic_train_examples': 512, 'synthetic_test_examples': 256})
  config.update(overrides)
  return config


def random_images(rng: np.random.Generator, num_images: int) -> np.ndarray:
  """Random CIFAR-sized images, uint8 [N, 32, 32, 3]."""
  return rng.integers(0, 256, (num_images, 32, 32, 3), dtype=np.uint8)


def cifar_binary_file(images: np.ndarray, *label_columns: np.ndarray) -> bytes:
  """Records in the CIFAR binary layout: one byte per label column, then 1024 R, 1024 G, 1024 B bytes."""
  channel_major_pixels = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
  labels = np.stack(label_columns, axis=1).astype(np.uint8)
  return np.concatenate([labels, channel_major_pixels], axis=1).tobytes()


def write_tar_gz(path, folder: str, members: dict[str, bytes]) -> None:
  """Writes a .tar.gz holding each member as folder/name."""
  with tarfile.open(path, 'w:gz') as archive:
    for name, content in members.items():
      member = tarfile.TarInfo(f'{folder}/{name}')
      member.size = len(content)
      archive.addfile(member, io.BytesIO(content))


def class_names_file(names) -> bytes:
  """A CIFAR label-names file: one name a line, then blank lines as in the official archives."""
  return ('\n'.join(names) + '\n\n').encode()


def write_tiny_cifar10_archive(folder, rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Writes cifar-10-binary.tar.gz in the official layout; returns {split: (images, labels)}."""
  train_files = {f'data_batch_{i}.bin': RECORDS_PER_TRAIN_FILE for i in range(1, 6)}
  examples = {name: (random_images(rng, size), rng.integers(0, 10, size))
              for name, size in {**train_files, 'test_batch.bin': RECORDS_IN_TEST_FILE}.items()}
  members = {name: cifar_binary_file(*example) for name, example in examples.items()}
  members['batches.meta.txt'] = class_names_file(CIFAR10_CLASS_NAMES)
  write_tar_gz(folder / CIFAR10_ARCHIVE, 'cifar-10-batches-bin', members)
  train_images, train_labels = (np.concatenate(column) for column in zip(*(examples[name] for name in train_files)))
  return {'train': (train_images, train_labels), 'test': examples['test_batch.bin']}


def sorted_examples(images: np.ndarray, labels: np.ndarray) -> list[tuple[int, bytes]]:
  """The examples as a sorted list of (label, image bytes): compares splits as multisets."""
  return sorted((int(label), image.tobytes()) for image, label in zip(images, labels))


@pytest.fixture(scope='module')
def prepared_cifar10(tmp_path_factory):
  """A tiny cifar10 prepared once from a local archive: (config, expected examples, absl log)."""
  manual_dir = tmp_path_factory.mktemp('manual')
  expected = write_tiny_cifar10_archive(manual_dir, np.random.default_rng(0))
  config = data_config(data_dir=str(tmp_path_factory.mktemp('tfds')), manual_dir=str(manual_dir))
  log = io.StringIO()
  handler = logging.StreamHandler(log)
  absl_logger = logging.getLogger('absl')
  previous_level = absl_logger.level
  absl_logger.setLevel(logging.INFO)
  absl_logger.addHandler(handler)
  try:
    data.load_split(config, 'test')
  finally:
    absl_logger.removeHandler(handler)
    absl_logger.setLevel(previous_level)
  return config, expected, log.getvalue()


# --- tfds path -------------------------------------------------------------


def test_load_split_returns_the_archive_examples(prepared_cifar10):
  config, expected, _ = prepared_cifar10
  for split in ('train', 'test'):
    arrays = data.load_split(config, split)
    assert arrays['image'].dtype == np.uint8 and arrays['image'].shape[1:] == (32, 32, 3)
    assert arrays['label'].dtype == np.int32
    assert sorted_examples(arrays['image'], arrays['label']) == sorted_examples(*expected[split])


def test_load_split_slices_and_keeps_its_order(prepared_cifar10):
  config, _, _ = prepared_cifar10
  full = data.load_split(config, 'train')
  head = data.load_split(config, 'train[:5]')
  tail = data.load_split(config, 'train[5:]')
  assert len(head['label']) == 5 and len(tail['label']) == 5 * RECORDS_PER_TRAIN_FILE - 5
  for key in ('image', 'label'):
    np.testing.assert_array_equal(np.concatenate([head[key], tail[key]]), full[key])
    np.testing.assert_array_equal(data.load_split(config, 'train')[key], full[key])


def test_dataset_info_reads_the_archive_class_names(prepared_cifar10):
  config, _, _ = prepared_cifar10
  assert data.dataset_info(config) == data.DatasetInfo(
      name='cifar10', num_classes=10, image_shape=(32, 32, 3), class_names=CIFAR10_CLASS_NAMES)


def test_preparation_logs_the_locally_rebuilt_archive_once(prepared_cifar10):
  config, _, log = prepared_cifar10
  assert log.count('locally rebuilt') == 1
  assert config.data_dir in log


def test_prepared_data_set_is_not_prepared_again(prepared_cifar10, tmp_path):
  config, expected, _ = prepared_cifar10
  without_archive = data_config(data_dir=config.data_dir, manual_dir=str(tmp_path))
  arrays = data.load_split(without_archive, 'test')
  assert sorted_examples(arrays['image'], arrays['label']) == sorted_examples(*expected['test'])


ARCHIVE_OF_DATA_SET = [('cifar10', CIFAR10_ARCHIVE), ('cifar100', 'cifar-100-binary.tar.gz')]


@pytest.mark.parametrize('name, archive', ARCHIVE_OF_DATA_SET)
def test_missing_archive_names_manual_dir_and_file(tmp_path, name, archive):
  config = data_config(name=name, data_dir=str(tmp_path / 'tfds'), manual_dir=str(tmp_path))
  with pytest.raises(data.DataError, match=rf'data\.manual_dir.*{archive}'):
    data.load_split(config, 'train')


@pytest.mark.parametrize('name, archive', ARCHIVE_OF_DATA_SET)
def test_no_network_fails_at_once_naming_manual_dir(tmp_path, monkeypatch, name, archive):
  def no_name_resolution(*args, **kwargs):
    raise socket.gaierror(socket.EAI_NONAME, 'Name or service not known')

  monkeypatch.setattr(socket, 'getaddrinfo', no_name_resolution)
  with pytest.raises(data.DataError, match=rf'--config\.data\.manual_dir=DIR.*{archive}') as error:
    data.load_split(data_config(name=name, data_dir=str(tmp_path)), 'train')
  assert '\n' not in str(error.value)


def test_unknown_data_set_name(tmp_path):
  with pytest.raises(data.DataError, match=r'data\.name.*cifar10'):
    data.dataset_info(data_config(name='no_such_data_set', data_dir=str(tmp_path)))


def test_cifar100_reads_fine_labels_from_its_archive(tmp_path):
  rng = np.random.default_rng(1)
  images, fine_labels, coarse_labels = random_images(rng, 6), rng.integers(0, 100, 6), rng.integers(0, 20, 6)
  fine_names = [f'fine_{i}' for i in range(100)]
  write_tar_gz(tmp_path / 'cifar-100-binary.tar.gz', 'cifar-100-binary', {
      'train.bin': cifar_binary_file(images, coarse_labels, fine_labels),
      'test.bin': cifar_binary_file(images[:2], coarse_labels[:2], fine_labels[:2]),
      'coarse_label_names.txt': class_names_file(f'coarse_{i}' for i in range(20)),
      'fine_label_names.txt': class_names_file(fine_names)})
  config = data_config(name='cifar100', data_dir=str(tmp_path / 'tfds'), manual_dir=str(tmp_path))
  arrays = data.load_split(config, 'train')
  assert sorted_examples(arrays['image'], arrays['label']) == sorted_examples(images, fine_labels)
  info = data.dataset_info(config)
  assert info.num_classes == 100 and info.class_names == tuple(fine_names)


# --- synthetic data set ----------------------------------------------------


def test_synthetic_split_shapes_and_classes():
  config = data_config(name='synthetic')
  arrays = data.load_split(config, 'train')
  assert arrays['image'].shape == (512, 32, 32, 3) and arrays['image'].dtype == np.uint8
  assert arrays['label'].shape == (512,) and arrays['label'].dtype == np.int32
  assert set(arrays['label'].tolist()) == set(range(10))
  assert data.dataset_info(config) == data.DatasetInfo(
      name='synthetic', num_classes=10, image_shape=(32, 32, 3),
      class_names=tuple(f'class_{i}' for i in range(10)))


def test_synthetic_split_is_deterministic():
  config = data_config(name='synthetic')
  first, second = data.load_split(config, 'test'), data.load_split(config, 'test')
  for key in ('image', 'label'):
    np.testing.assert_array_equal(first[key], second[key])


@pytest.mark.parametrize('split, size', [
    ('train[:90%]', 461), ('train[400:]', 112), ('train[:10]', 10), ('test', 256), ('train[:4]+test[-3:]', 7)])
def test_synthetic_split_slicing(split, size):
  assert len(data.load_split(data_config(name='synthetic'), split)['label']) == size
  assert data.split_size(data_config(name='synthetic'), split) == size  # counted without reading


def test_synthetic_slices_are_parts_of_the_split():
  config = data_config(name='synthetic')
  full = data.load_split(config, 'train')
  tail = data.load_split(config, 'train[400:]')
  np.testing.assert_array_equal(tail['image'], full['image'][400:])
  np.testing.assert_array_equal(tail['label'], full['label'][400:])


# --- augmentation and normalisation ----------------------------------------

BATCH, HEIGHT, WIDTH, CHANNELS = 64, 6, 7, 2


def distinct_images() -> np.ndarray:
  """float32 [B, H, W, C] with every pixel value distinct and non-zero, so windows are identifiable."""
  return np.arange(1, BATCH * HEIGHT * WIDTH * CHANNELS + 1, dtype=np.float32).reshape(BATCH, HEIGHT, WIDTH, CHANNELS)


def crop_offset(output: np.ndarray, image: np.ndarray, padding: int) -> tuple[int, int] | None:
  """The (dy, dx) whose window of the zero-padded image equals output, or None."""
  padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  for dy in range(2 * padding + 1):
    for dx in range(2 * padding + 1):
      if np.array_equal(padded[dy:dy + HEIGHT, dx:dx + WIDTH], output):
        return dy, dx
  return None


def test_crop_outputs_are_windows_of_the_padded_input_at_varied_offsets():
  images = distinct_images()
  outputs = np.asarray(data.augment(jax.random.key(0), jnp.asarray(images), crop_padding=2, flip=False))
  offsets = [crop_offset(output, image, 2) for output, image in zip(outputs, images)]
  assert None not in offsets
  assert len(set(offsets)) > 10


def test_flip_mirrors_the_width_axis_of_some_examples_only():
  images = distinct_images()
  outputs = np.asarray(data.augment(jax.random.key(0), jnp.asarray(images), crop_padding=0, flip=True))
  flipped = np.array([np.array_equal(output, image[:, ::-1]) for output, image in zip(outputs, images)])
  unchanged = np.array([np.array_equal(output, image) for output, image in zip(outputs, images)])
  assert np.all(flipped ^ unchanged)
  assert 0 < flipped.sum() < BATCH


def test_alternating_flips_mirror_each_example_in_every_other_epoch():
  key, indices = jax.random.key(0), jnp.arange(400)
  by_epoch = [np.asarray(data.alternating_flips(key, indices, jnp.int32(epoch))) for epoch in range(4)]
  assert 0.35 < by_epoch[0].mean() < 0.65  # a random half in epoch 0
  np.testing.assert_array_equal(by_epoch[1], ~by_epoch[0])  # the other half in epoch 1
  np.testing.assert_array_equal(by_epoch[2], by_epoch[0])
  np.testing.assert_array_equal(by_epoch[3], by_epoch[1])
  # an example's flip depends on its index, not on its place in the batch
  shuffled = np.random.default_rng(0).permutation(400)
  np.testing.assert_array_equal(data.alternating_flips(key, jnp.asarray(shuffled), jnp.int32(3)), by_epoch[3][shuffled])


def test_flip_where_mirrors_exactly_the_chosen_examples():
  images = distinct_images()
  flips = np.arange(BATCH) % 3 == 0
  outputs = np.asarray(data.flip_where(jnp.asarray(flips), jnp.asarray(images)))
  for output, image, flip in zip(outputs, images, flips):
    np.testing.assert_array_equal(output, image[:, ::-1] if flip else image)


def test_crop_and_flip_together_give_mirrored_windows():
  images = distinct_images()
  outputs = np.asarray(data.augment(jax.random.key(1), jnp.asarray(images), crop_padding=1, flip=True))
  as_cropped = [crop_offset(output, image, 1) is not None for output, image in zip(outputs, images)]
  as_mirrored = [crop_offset(output[:, ::-1], image, 1) is not None for output, image in zip(outputs, images)]
  assert all(np.logical_or(as_cropped, as_mirrored))
  assert any(as_mirrored) and not all(as_mirrored)


def test_augment_keeps_uint8_and_is_deterministic_under_jit():
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
  augment = jax.jit(lambda key, batch: data.augment(key, batch, crop_padding=4, flip=True))
  first = augment(jax.random.key(3), images)
  assert first.dtype == jnp.uint8 and first.shape == images.shape
  np.testing.assert_array_equal(first, augment(jax.random.key(3), images))
  np.testing.assert_array_equal(first, data.augment(jax.random.key(3), images, crop_padding=4, flip=True))


def test_augment_without_crop_or_flip_is_identity():
  images = jnp.asarray(distinct_images())
  np.testing.assert_array_equal(data.augment(jax.random.key(0), images, crop_padding=0, flip=False), images)


def test_normalize_exact_values():
  pixel = jnp.asarray([[[[255, 0, 51]]]], dtype=jnp.uint8)
  normalized = data.normalize(pixel, mean=(0.5, 0.25, 0.2), std=(0.5, 0.25, 0.1))
  assert normalized.dtype == jnp.float32 and normalized.shape == (1, 1, 1, 3)
  np.testing.assert_allclose(np.asarray(normalized)[0, 0, 0], [1.0, -1.0, 0.0], atol=1e-6)


def test_translate_shifts_content_and_fills_zeros():
  image = np.arange(1, 17, dtype=np.uint8).reshape(1, 4, 4, 1)
  down_right = np.asarray(data.translate(jnp.asarray(image), 1, 2))[0, ..., 0]
  np.testing.assert_array_equal(down_right[1:, 2:], image[0, :3, :2, 0])
  assert not down_right[0].any() and not down_right[:, :2].any()
  up_left = np.asarray(data.translate(jnp.asarray(image), -1, -1))[0, ..., 0]
  np.testing.assert_array_equal(up_left[:3, :3], image[0, 1:, 1:, 0])
  assert not up_left[3].any() and not up_left[:, 3].any()


def test_translate_with_reflect_padding_fills_with_the_mirrored_image():
  image = np.arange(1, 17, dtype=np.uint8).reshape(1, 4, 4, 1)
  down_right = np.asarray(data.translate(jnp.asarray(image), 1, 2, 'reflect'))[0, ..., 0]
  np.testing.assert_array_equal(down_right[1:, 2:], image[0, :3, :2, 0])
  np.testing.assert_array_equal(down_right[0, 2:], image[0, 1, :2, 0])  # row 0 mirrors row 1
  np.testing.assert_array_equal(down_right[1:, :2], image[0, :3, 2:0:-1, 0])  # columns 2, 1 mirrored
  np.testing.assert_array_equal(data.translate(jnp.asarray(image), 0, 0, 'reflect'), image)


def test_reflect_padded_crops_are_windows_of_the_mirrored_image():
  images = distinct_images()
  outputs = np.asarray(data.augment(jax.random.key(0), jnp.asarray(images), crop_padding=2, flip=False,
                                    padding_mode='reflect'))
  def reflect_offset(output, image):
    padded = np.pad(image, ((2, 2), (2, 2), (0, 0)), mode='reflect')
    return next(((dy, dx) for dy in range(5) for dx in range(5)
                 if np.array_equal(padded[dy:dy + HEIGHT, dx:dx + WIDTH], output)), None)
  offsets = [reflect_offset(output, image) for output, image in zip(outputs, images)]
  assert None not in offsets and len(set(offsets)) > 10
  assert sum(crop_offset(output, image, 2) is None for output, image in zip(outputs, images)) > BATCH // 2


@pytest.mark.parametrize('flip, translate_pixels, num_views',
                         [(False, 0, 1), (True, 0, 2), (False, 1, 3), (True, 2, 6)])
def test_test_time_views_hold_the_image_its_shifts_and_mirrors_with_weights_summing_to_one(
    flip, translate_pixels, num_views):
  images = jnp.asarray(distinct_images()[:2])
  views, weights = data.test_time_views(images, flip=flip, translate_pixels=translate_pixels)
  assert views.shape == (num_views, *images.shape) and weights.shape == (num_views,)
  assert float(weights.sum()) == pytest.approx(1.0)
  np.testing.assert_array_equal(views[0], images)
  if translate_pixels:
    n = translate_pixels
    np.testing.assert_array_equal(views[1], data.translate(images, -n, -n))
    np.testing.assert_array_equal(views[2], data.translate(images, n, n))
    assert float(weights[0]) == pytest.approx(2 * float(weights[1]))
  if flip:
    np.testing.assert_array_equal(views[num_views // 2], images[:, :, ::-1])
