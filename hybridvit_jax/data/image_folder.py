"""The 'image_folder' data source: PNG/JPEG files in class folders, read without TensorFlow.

`data.data_dir` is a folder ROOT holding ROOT/train/<class>/* and ROOT/test/<class>/*. The
class folders' names, sorted, are the labels 0..K-1 (the test split must have the same ones).
Each split is decoded once with Pillow (always to RGB) into a uint8 cache file,
ROOT/.hybridvit_cache/<split>.npz, and read from there afterwards; the cache is keyed on the
(relative path, size, mtime_ns) of every image of the split, so adding, removing or rewriting an
image rebuilds it. When ROOT is read-only the cache lives in
$XDG_CACHE_HOME/hybridvit_jax/image_folder/<hash of ROOT>/ (~/.cache by default).

Split specs use tfds's syntax ('train[:45000]', 'train[90%:]', 'test', 'train[:10]+test')
over the full splits 'train' and 'test'. Within a split, the examples are in a fixed random
order: the (class name, file name) order shuffled with a constant seed, so that any slice such as
'train[45000:]' draws from every class, and every process and run sees the same order.
"""

import dataclasses
import hashlib
import os
import tempfile
import zipfile

from absl import logging
import ml_collections
import numpy as np
from PIL import Image

from hybridvit_jax.data import source

SPLITS = ('train', 'test')
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
CACHE_DIR_NAME = '.hybridvit_cache'
# Part of every cache key: bump it when the cache file's contents change meaning.
_CACHE_FORMAT = 2
# The seed of each split's fixed example order; changing it changes every train/val split.
_ORDER_SEED = 0
_PROGRESS_EVERY = 10_000  # files between progress lines while decoding
_LAYOUT = 'image_folder expects ROOT/train/<class>/*.png|jpg and ROOT/test/<class>/*'


@dataclasses.dataclass(frozen=True)
class _Listing:
  """The image files of one full split, in example order.

  Attributes:
    root: the data set's folder, ROOT.
    split: 'train' or 'test'.
    class_names: the sorted class folder names; label i is class_names[i].
    paths: absolute path of each image, in the split's fixed shuffled order: [N].
    labels: int32 [N], the label of each path.
    key: hex digest of the split's (relative path, size, mtime_ns) list; names the cache's
      contents.
  """

  root: str
  split: str
  class_names: tuple[str, ...]
  paths: tuple[str, ...]
  labels: np.ndarray
  key: str


def dataset_info(data_config: ml_collections.ConfigDict) -> source.DatasetInfo:
  """Class names and image shape of the folder, decoding and caching both splits if needed.

  Both splits are prepared here, as tfds prepares a whole data set, so that with several
  processes the first one builds the caches before the others read them, and so that a test
  split whose images differ in size from train's fails before training starts.

  Returns:
    DatasetInfo with image_shape (H, W, 3) of every image and num_classes K.
  """
  listings = {split: _list_split(_root(data_config), split) for split in SPLITS}
  shapes = {split: _image_shape(_prepared_cache(listing)) for split, listing in listings.items()}
  if shapes['test'] != shapes['train']:
    raise source.DataError(
        f'data.data_dir: {listings["test"].paths[0]} is {_size_text(shapes["test"])} pixels but'
        f' {listings["train"].paths[0]} is {_size_text(shapes["train"])}; resize the images of'
        ' both splits to one size')
  class_names = listings['train'].class_names
  return source.DatasetInfo(name=source.IMAGE_FOLDER_NAME, num_classes=len(class_names),
                            image_shape=shapes['train'], class_names=class_names)


def load_split(data_config: ml_collections.ConfigDict, split: str) -> dict[str, np.ndarray]:
  """The examples of a split spec such as 'train[:45000]', 'train[45000:]' or 'test[:10%]'.

  Slices follow tfds's split syntax, '+' included, over the full splits 'train' and 'test'
  (source.sliced_split, as for the synthetic source). A bad spec raises tfds's ValueError.

  Returns:
    {'image': uint8 [N, H, W, 3], 'label': int32 [N]}, in each full split's fixed shuffled
    order (see the module docstring).
  """
  root = _root(data_config)
  listings = {name: _list_split(root, name) for name in SPLITS}
  return source.sliced_split(split, {name: len(listing.paths) for name, listing in listings.items()},
                             lambda name: _read_cache(_prepared_cache(listings[name])))


def full_split_sizes(data_config: ml_collections.ConfigDict) -> dict[str, int]:
  """The number of images of each full split, from the folder's listing (nothing decoded)."""
  root = _root(data_config)
  return {name: len(_list_split(root, name).paths) for name in SPLITS}


# --- listing the folder ------------------------------------------------------


def _root(data_config: ml_collections.ConfigDict) -> str:
  """The absolute path of data.data_dir; DataError if it is unset or not a folder."""
  data_dir = data_config.get('data_dir') or ''
  if not data_dir:
    raise source.DataError(
        f'data.data_dir is empty; set --config.data.data_dir=ROOT, as {_LAYOUT}')
  root = os.path.abspath(os.path.expanduser(data_dir))
  if not os.path.isdir(root):
    raise source.DataError(f'data.data_dir: {root} does not exist; {_LAYOUT}')
  return root


def _class_names(root: str, split: str) -> tuple[str, ...]:
  """The sorted class folder names of ROOT/<split>; hidden folders are skipped."""
  split_dir = os.path.join(root, split)
  if not os.path.isdir(split_dir):
    raise source.DataError(f'data.data_dir: {split_dir} does not exist; {_LAYOUT}')
  with os.scandir(split_dir) as entries:
    names = sorted(entry.name for entry in entries
                   if entry.is_dir() and not entry.name.startswith('.'))
  if not names:
    raise source.DataError(
        f'data.data_dir: {split_dir} holds no class folders; {_LAYOUT}')
  return tuple(names)


def _checked_class_names(root: str, split: str) -> tuple[str, ...]:
  """ROOT/<split>'s class names, which for 'test' must be train's (labels are train's indices)."""
  names = _class_names(root, split)
  if split == 'train':
    return names
  train_names = _class_names(root, 'train')
  if names != train_names:
    missing = sorted(set(train_names) - set(names))
    extra = sorted(set(names) - set(train_names))
    raise source.DataError(
        f'data.data_dir: {os.path.join(root, split)} has classes different from'
        f' {os.path.join(root, "train")} (missing {missing}, extra {extra}); give both splits'
        ' the same class folders')
  return names


def _image_entries(class_dir: str) -> list[os.DirEntry]:
  """The image files of one class folder, sorted by file name; DataError if there are none."""
  with os.scandir(class_dir) as entries:
    images = [entry for entry in entries
              if not entry.name.startswith('.') and entry.is_file()
              and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS]
  if not images:
    raise source.DataError(
        f'data.data_dir: {class_dir} holds no {"/".join(IMAGE_EXTENSIONS)} images; put the'
        " class's images there or remove the folder")
  return sorted(images, key=lambda entry: entry.name)


def _list_split(root: str, split: str) -> _Listing:
  """Lists and fingerprints the images of the full split ROOT/<split> in its fixed shuffled
  order (no decoding)."""
  class_names = _checked_class_names(root, split)
  paths, labels = [], []
  digest = hashlib.sha256(f'format {_CACHE_FORMAT}\n'.encode())
  for label, class_name in enumerate(class_names):
    for entry in _image_entries(os.path.join(root, split, class_name)):
      stat = entry.stat()
      # Size and mtime stand in for the contents: hashing 60,000 files' bytes on every load
      # would cost as much as decoding them.
      digest.update(
          f'{split}/{class_name}/{entry.name}\t{stat.st_size}\t{stat.st_mtime_ns}\n'.encode())
      paths.append(entry.path)
      labels.append(label)
  # Class folders list one class after another; a slice of that order would hold few classes.
  order = np.random.default_rng(_ORDER_SEED).permutation(len(paths))
  return _Listing(root=root, split=split, class_names=class_names,
                  paths=tuple(paths[i] for i in order),
                  labels=np.asarray(labels, np.int32)[order], key=digest.hexdigest())


# --- the cache ---------------------------------------------------------------


def _cache_dirs(root: str) -> list[str]:
  """Where a split's cache may be, in order of preference: beside the images, then per user."""
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  root_hash = hashlib.sha256(root.encode()).hexdigest()[:16]
  return [os.path.join(root, CACHE_DIR_NAME),
          os.path.join(base, 'hybridvit_jax', 'image_folder', root_hash)]


def _cache_key(path: str) -> str | None:
  """The key stored in the cache file at `path`, or None if there is no readable one."""
  try:
    with np.load(path, allow_pickle=False) as cache:
      return str(cache['key'])
  # Missing, cut short, unreadable or not ours: the caller rebuilds it.
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
    return None


def _prepared_cache(listing: _Listing) -> str:
  """The path of a cache file for the listed split, decoding the images and writing it if no
  current one exists."""
  for cache_dir in _cache_dirs(listing.root):
    path = os.path.join(cache_dir, f'{listing.split}.npz')
    if _cache_key(path) == listing.key:
      logging.info('data: image_folder: reusing the cache %s (%d images)', path,
                   len(listing.paths))
      return path
  images = _decode(listing)
  arrays = {'image': images, 'label': listing.labels, 'key': np.asarray(listing.key),
            'image_shape': np.asarray(images.shape[1:], np.int64)}
  errors = []
  for cache_dir in _cache_dirs(listing.root):
    path = os.path.join(cache_dir, f'{listing.split}.npz')
    try:
      _write_atomically(path, arrays)
    except OSError as error:  # e.g. a read-only ROOT: try the next place
      errors.append(f'{cache_dir} ({error.strerror or error})')
      continue
    logging.info('data: image_folder: wrote the cache %s (%d images)', path, len(listing.paths))
    return path
  raise source.DataError(
      f'data.data_dir: cannot write the image_folder cache to {" nor ".join(errors)}; make'
      ' one of them writable or set XDG_CACHE_HOME to a writable folder')


def _write_atomically(path: str, arrays: dict[str, np.ndarray]) -> None:
  """Writes `arrays` as an .npz at `path` under a temporary name, then renames it into place,
  so a crash never leaves a partial cache and concurrent writers never see one."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  descriptor, temporary = tempfile.mkstemp(
      dir=os.path.dirname(path), prefix=f'.{os.path.basename(path)}.', suffix='.tmp')
  try:
    with os.fdopen(descriptor, 'wb') as file:
      np.savez(file, **arrays)
      file.flush()
      os.fsync(file.fileno())
    # mkstemp makes the file private (0600); the images beside it are usually world-readable,
    # and other users of a shared ROOT should reuse the cache rather than fail to read it.
    os.chmod(temporary, 0o644)
    os.replace(temporary, path)
  except BaseException:
    os.unlink(temporary)
    raise


def _read_cache(path: str) -> dict[str, np.ndarray]:
  """{'image': uint8 [N, H, W, 3], 'label': int32 [N]} of a cache file."""
  with np.load(path, allow_pickle=False) as cache:
    return {'image': cache['image'], 'label': cache['label']}


def _image_shape(path: str) -> tuple[int, int, int]:
  """(H, W, 3) of a cache file's images, from its small 'image_shape' member (an .npz member
  is read whole on access, so the images themselves are not touched)."""
  with np.load(path, allow_pickle=False) as cache:
    return tuple(int(size) for size in cache['image_shape'])


# --- decoding ----------------------------------------------------------------


def _size_text(shape: tuple[int, ...]) -> str:
  """'WxH' (Pillow's and most tools' order) of an (H, W, ...) shape."""
  return f'{shape[1]}x{shape[0]}'


def _decode_file(path: str) -> np.ndarray:
  """uint8 [H, W, 3] of one image file, converted to RGB; DataError naming it if unreadable."""
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert('RGB'))
  # Pillow reports broken files as OSError mostly, but some plugins raise SyntaxError or
  # ValueError, and oversized images DecompressionBombError.
  except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as error:
    raise source.DataError(
        f'data.data_dir: cannot decode {path} ({type(error).__name__}: '
        f'{" ".join(str(error).split())}); replace or remove the file') from None


def _decode(listing: _Listing) -> np.ndarray:
  """uint8 [N, H, W, 3]: every image of the listed split, in order, all of the first's size."""
  first = _decode_file(listing.paths[0])
  images = np.empty((len(listing.paths), *first.shape), np.uint8)
  images[0] = first
  logging.info('data: image_folder: decoding %d %s images of %s', len(listing.paths),
               listing.split, listing.root)
  for index, path in enumerate(listing.paths[1:], start=1):
    image = _decode_file(path)
    if image.shape != first.shape:
      raise source.DataError(
          f'data.data_dir: {path} is {_size_text(image.shape)} pixels but the first image,'
          f' {listing.paths[0]}, is {_size_text(first.shape)}; resize the images to one size')
    images[index] = image
    if (index + 1) % _PROGRESS_EVERY == 0:
      logging.info('data: image_folder: decoded %d/%d %s images', index + 1,
                   len(listing.paths), listing.split)
  return images
