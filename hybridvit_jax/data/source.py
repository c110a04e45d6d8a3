"""Image-classification data sources: tfds data sets and an in-process synthetic one.

A tfds data set is read from `data.data_dir` once prepared there. If it is not
prepared yet it is prepared once, either from the archive(s) in
`data.manual_dir` (offline, with tfds's own builder for that name) or by tfds's
normal download. The data set named 'synthetic' is made in-process from a
fixed seed and needs neither. The one named 'image_folder' is read from image
files in `data.data_dir`/{train,test}/<class>/ by the `image_folder` module.

Every split is returned whole as numpy arrays: images uint8 [N, H, W, C] and
labels int32 [N], in a deterministic order.
"""

import dataclasses
import os
from typing import Callable

from absl import logging
import ml_collections
import numpy as np
import requests
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import checksums

SYNTHETIC_NAME = 'synthetic'
IMAGE_FOLDER_NAME = 'image_folder'
SYNTHETIC_NUM_CLASSES = 10
SYNTHETIC_IMAGE_SHAPE = (32, 32, 3)
_SYNTHETIC_SEED = 0
_SYNTHETIC_SPLIT_SEEDS = {'train': 1, 'test': 2}
_SYNTHETIC_GRID_SIZE = 4  # Templates are a 4x4 grid of random colours.
_SYNTHETIC_NOISE_STD = 48.0  # Pixel-value units (0..255).

_PROBE_TIMEOUT_S = 10.0


class DataError(ValueError):
  """A data setting cannot work; the one-line message names the key and the fix."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a model needs to know about a data set.

  Attributes:
    name: the data set's name, as in `data.name`.
    num_classes: number of label values; labels lie in [0, num_classes).
    image_shape: (height, width, channels) of every image, in pixels.
    class_names: the name of each label value, indexed by label.
  """

  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  class_names: tuple[str, ...]


def dataset_info(data_config: ml_collections.ConfigDict) -> DatasetInfo:
  """Describes the data set named by `data_config.name`, preparing it if needed."""
  if data_config.name == SYNTHETIC_NAME:
    return _synthetic_info()
  if data_config.name == IMAGE_FOLDER_NAME:
    return _image_folder().dataset_info(data_config)
  return _info_from_builder(prepared_builder(data_config))


def load_split(
    data_config: ml_collections.ConfigDict, split: str
) -> dict[str, np.ndarray]:
  """Reads a whole split into memory, preparing the data set first if needed.

  Args:
    data_config: the `data` section of the config.
    split: a tfds split spec such as 'train', 'train[:45000]', 'test[:10%]'.

  Returns:
    {'image': uint8 [N, H, W, C], 'label': int32 [N]}, in the same order for the
    same call.
  """
  if data_config.name == SYNTHETIC_NAME:
    return _synthetic_split(data_config, split)
  if data_config.name == IMAGE_FOLDER_NAME:
    return _image_folder().load_split(data_config, split)
  return _read_split(prepared_builder(data_config), split)


def in_memory(data_config: ml_collections.ConfigDict) -> bool:
  """Whether the source builds its splits as numpy arrays in-process, without TensorFlow."""
  return data_config.name in (SYNTHETIC_NAME, IMAGE_FOLDER_NAME)


def split_size(data_config: ml_collections.ConfigDict, split: str) -> int:
  """The number of examples of a split spec, without reading them (a tfds data set's from its
  metadata, an in-memory source's from its full splits' sizes). A bad spec raises ValueError."""
  if data_config.name == SYNTHETIC_NAME:
    sizes = _synthetic_split_sizes(data_config)
  elif data_config.name == IMAGE_FOLDER_NAME:
    sizes = _image_folder().full_split_sizes(data_config)
  else:
    return prepared_builder(data_config).info.splits[split].num_examples
  # from_ / to may be None (an open end), so each slice is measured as the slicing does it.
  return sum(len(range(sizes[instruction.splitname])[instruction.from_:instruction.to])
             for instruction in _absolute_instructions(split, sizes))


def sliced_split(split: str, sizes: dict[str, int],
                 read_full: Callable[[str], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """The examples of tfds split spec `split` ('train[:90%]', 'train[:10]+test', ...) over full
  splits of `sizes` examples, read_full(name) giving a full split's arrays; each full split is
  read at most once, however many slices of it the spec names. A bad spec raises ValueError.

  Returns:
    {'image': [N, ...], 'label': [N]}: the slices, concatenated in the spec's order.
  """
  instructions = _absolute_instructions(split, sizes)
  full = {name: read_full(name) for name in {instruction.splitname for instruction in instructions}}
  return {key: np.concatenate([full[instruction.splitname][key][instruction.from_:instruction.to]
                               for instruction in instructions])
          for key in ('image', 'label')}


def _absolute_instructions(split: str, sizes: dict[str, int]) -> list:
  """tfds's absolute read instructions (splitname, from_, to) of `split` over splits of `sizes`."""
  split_infos = {name: tfds.core.SplitInfo(name=name, shard_lengths=[size], num_bytes=0)
                 for name, size in sizes.items()}
  return tfds.core.ReadInstruction.from_spec(split).to_absolute(split_infos)


def _image_folder():
  """The image_folder module, imported here: it imports this module for DataError."""
  from hybridvit_jax.data import image_folder  # pylint: disable=import-outside-toplevel
  return image_folder


# --- tfds data sets --------------------------------------------------------


def prepared_builder(
    data_config: ml_collections.ConfigDict,
) -> tfds.core.DatasetBuilder:
  """Returns the tfds builder of `data_config.name`, prepared in its data_dir."""
  data_dir = data_config.data_dir or None
  builder = _tfds_builder(data_config.name, data_dir)
  _check_image_classification(builder)
  if builder.is_prepared():
    return builder
  if data_config.manual_dir:
    _prepare_from_local_archives(builder, data_dir, data_config.manual_dir)
  else:
    _download_and_prepare(builder)
  return _tfds_builder(data_config.name, data_dir)


def _tfds_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  """Returns tfds's builder for `name`, or raises DataError if tfds lacks it."""
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError:
    raise DataError(
        f'data.name: {name!r} is neither a tfds data set nor'
        f' {SYNTHETIC_NAME!r}; use e.g. cifar10, cifar100 or {SYNTHETIC_NAME}'
    ) from None


def _check_image_classification(builder: tfds.core.DatasetBuilder) -> None:
  """Raises DataError unless the data set has fixed-shape 'image' and a 'label'."""
  features = builder.info.features
  if 'image' not in features or 'label' not in features:
    raise DataError(
        f'data.name: {builder.name} has features {sorted(features)}, not'
        " 'image' and 'label'; choose an image-classification data set such as"
        ' cifar10'
    )
  if None in features['image'].shape:
    raise DataError(
        f'data.name: {builder.name} has images of varying shape'
        f' {features["image"].shape}; choose a data set with fixed-size images'
        ' such as cifar10'
    )


def _info_from_builder(builder: tfds.core.DatasetBuilder) -> DatasetInfo:
  """Reads name, classes and image shape from a prepared builder's metadata."""
  features = builder.info.features
  return DatasetInfo(
      name=builder.name,
      num_classes=features['label'].num_classes,
      image_shape=tuple(features['image'].shape),
      class_names=tuple(features['label'].names),
  )


def _read_split(
    builder: tfds.core.DatasetBuilder, split: str
) -> dict[str, np.ndarray]:
  """Reads `split` of a prepared builder whole, in file order, as numpy arrays."""
  dataset = builder.as_dataset(split=split, shuffle_files=False, batch_size=-1)
  examples = tfds.as_numpy(dataset)
  return {
      'image': examples['image'].astype(np.uint8),
      'label': examples['label'].astype(np.int32),
  }


def _registered_url_infos(
    builder: tfds.core.DatasetBuilder,
) -> dict[str, checksums.UrlInfo]:
  """{url: size, checksum and file name} of each archive tfds downloads."""
  return type(builder).url_infos or {}


def _expected_archive_names(builder: tfds.core.DatasetBuilder) -> str:
  """File names of the archives tfds downloads for this data set, comma-separated."""
  return ', '.join(
      info.filename for info in _registered_url_infos(builder).values()
  )


def _prepare_from_local_archives(
    builder: tfds.core.DatasetBuilder, data_dir: str | None, manual_dir: str
) -> None:
  """Prepares the data set into data_dir from the archive(s) in manual_dir.

  tfds checks a manually supplied archive against the checksum it registered
  for the official download, which a locally rebuilt archive does not match.
  So this runs tfds's own builder with the checksums of the local files put in
  place of the registered ones; the prepared data set is the same as after a
  download.
  """
  registered_infos = _registered_url_infos(builder)
  local_infos = {
      url: _local_url_info(builder.name, manual_dir, info)
      for url, info in registered_infos.items()
      if os.path.exists(os.path.join(manual_dir, info.filename))
  }
  if registered_infos and not local_infos:
    raise DataError(
        f'data.manual_dir: {manual_dir} holds none of'
        f' {_expected_archive_names(builder)} that tfds expects for'
        f' {builder.name}; put the archive there in its official layout'
    )
  local_builder_cls = type(
      type(builder).__name__,
      (type(builder),),
      {'name': builder.name, 'url_infos': {**registered_infos, **local_infos}},
      skip_registration=True,
  )
  local_builder = local_builder_cls(
      data_dir=data_dir, config=builder.builder_config, version=builder.version
  )
  logging.info(
      'data: preparing %s from %s into %s',
      builder.name,
      manual_dir,
      local_builder.data_dir,
  )
  local_builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          manual_dir=manual_dir, try_download_gcs=False
      )
  )
  logging.info('data: prepared %s in %s', builder.name, local_builder.data_dir)


def _local_url_info(
    dataset_name: str, manual_dir: str, registered: checksums.UrlInfo
) -> checksums.UrlInfo:
  """Size, checksum and file name of the local copy of a registered archive."""
  path = os.path.join(manual_dir, registered.filename)
  local = checksums.compute_url_info(path)
  if local.checksum != registered.checksum:
    logging.info(
        'data: checksum of %s differs from the one tfds registered for %s;'
        ' accepted as a locally rebuilt archive',
        path,
        dataset_name,
    )
  return local


def _download_and_prepare(builder: tfds.core.DatasetBuilder) -> None:
  """Prepares the data set by tfds's download; DataError at once if offline.

  tfds retries an unreachable URL for minutes, so the archives' URLs are
  probed first with a single short request each.
  """
  if not all(_is_reachable(url) for url in _registered_url_infos(builder)):
    raise DataError(
        f'data.manual_dir: cannot download {builder.name} (no network?); set'
        ' --config.data.manual_dir=DIR to a folder holding'
        f' {_expected_archive_names(builder)}'
    )
  logging.info('data: downloading %s into %s', builder.name, builder.data_dir)
  builder.download_and_prepare()
  logging.info('data: prepared %s in %s', builder.name, builder.data_dir)


def _is_reachable(url: str) -> bool:
  """Whether one HEAD request to `url` gets any HTTP answer (proxy-aware)."""
  try:
    requests.head(url, timeout=_PROBE_TIMEOUT_S)
  except requests.RequestException:
    return False
  return True


# --- the synthetic data set ------------------------------------------------


def _synthetic_info() -> DatasetInfo:
  """Metadata of the synthetic data set."""
  return DatasetInfo(
      name=SYNTHETIC_NAME,
      num_classes=SYNTHETIC_NUM_CLASSES,
      image_shape=SYNTHETIC_IMAGE_SHAPE,
      class_names=tuple(f'class_{i}' for i in range(SYNTHETIC_NUM_CLASSES)),
  )


def _synthetic_split_sizes(data_config: ml_collections.ConfigDict) -> dict[str, int]:
  """The full synthetic splits' sizes: data.synthetic_train_examples and synthetic_test_examples."""
  return {'train': data_config.synthetic_train_examples, 'test': data_config.synthetic_test_examples}


def _synthetic_split(
    data_config: ml_collections.ConfigDict, split: str
) -> dict[str, np.ndarray]:
  """The examples of a synthetic split spec, e.g. 'train[:90%]' or 'test', sliced from the full
  splits 'train' (data.synthetic_train_examples) and 'test' (data.synthetic_test_examples)."""
  sizes = _synthetic_split_sizes(data_config)
  return sliced_split(split, sizes, lambda name: _synthetic_examples(name, sizes[name]))


def _synthetic_templates() -> np.ndarray:
  """One fixed colour template per class: float32 [classes, 32, 32, 3], 0..255.

  Each template is a coarse grid of random colours, upscaled to the image size,
  so classes differ in low-frequency colour layout.
  """
  rng = np.random.default_rng(_SYNTHETIC_SEED)
  height, width, channels = SYNTHETIC_IMAGE_SHAPE
  grid = rng.uniform(
      0.0,
      255.0,
      (SYNTHETIC_NUM_CLASSES, _SYNTHETIC_GRID_SIZE, _SYNTHETIC_GRID_SIZE, channels),
  ).astype(np.float32)
  cell_height = height // _SYNTHETIC_GRID_SIZE
  cell_width = width // _SYNTHETIC_GRID_SIZE
  return grid.repeat(cell_height, axis=1).repeat(cell_width, axis=2)


def _synthetic_examples(split_name: str, num_examples: int) -> dict[str, np.ndarray]:
  """A whole synthetic split: template of a balanced random label plus noise.

  Returns:
    {'image': uint8 [num_examples, 32, 32, 3], 'label': int32 [num_examples]}.
  """
  rng = np.random.default_rng(
      [_SYNTHETIC_SEED, _SYNTHETIC_SPLIT_SEEDS[split_name]]
  )
  labels = rng.permutation(np.arange(num_examples) % SYNTHETIC_NUM_CLASSES)
  noise = rng.normal(
      0.0, _SYNTHETIC_NOISE_STD, (num_examples, *SYNTHETIC_IMAGE_SHAPE)
  )
  images = np.clip(_synthetic_templates()[labels] + noise, 0.0, 255.0)
  return {
      'image': np.round(images).astype(np.uint8),
      'label': labels.astype(np.int32),
  }
