"""Batches for the train and eval steps, in either input mode, placed on the mesh.

device: the whole train split lives on every device (replicated, so each device gathers its
  part of a batch locally); the step gathers the rows `epoch_order` gives it.
stream: tf.data reads this process's shard and yields local batches, which become global
  arrays with `jax.make_array_from_process_local_data`.
Evaluation reads a split the data source builds in memory (synthetic, image_folder) in numpy
batches, and a tfds data set through tf.data. TensorFlow (the `stream` module) is imported only
where tf.data is used, so those in-memory sources run without it.
Either way the order of an epoch is a function of (seed, epoch), so a resumed run continues
exactly where it stopped.
"""
from typing import Callable, Iterable, Iterator

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from hybridvit_jax import configuration, data
from hybridvit_jax.data import source

_TRAIN_SPLIT_FLAG = '--config.data.train_split'
Batches = Iterator[tuple[np.ndarray, np.ndarray]]  # (images uint8 [b, H, W, C], labels int32 [b])


def to_global(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A host array that every process holds in full, placed on the mesh with `sharding`."""
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def epoch_order(seed: int, epoch: int, num_examples: int, batch_size: int) -> np.ndarray:
  """int32 [steps_per_epoch, batch_size]: the example indices of each step of `epoch`.

  A function of (seed, epoch) only. The `num_examples % batch_size` examples left over
  differ from epoch to epoch.
  """
  permutation = np.random.default_rng([seed, epoch]).permutation(num_examples)
  steps_per_epoch = num_examples // batch_size
  return permutation[:steps_per_epoch * batch_size].reshape(steps_per_epoch, batch_size).astype(np.int32)


def array_batches(arrays: dict[str, np.ndarray], batch_size: int) -> Batches:
  """Consecutive (images, labels) slices of `batch_size` (the last may be smaller)."""
  for start in range(0, len(arrays['label']), batch_size):
    yield arrays['image'][start:start + batch_size], arrays['label'][start:start + batch_size]


def padded(batches: Iterable[tuple[np.ndarray, np.ndarray]], batch_size: int):
  """Yields (images, labels, mask) of exactly `batch_size`: a short batch is padded with zeros
  and its padding masked out (mask bool [batch_size])."""
  for images, labels in batches:
    padding = batch_size - len(labels)
    mask = np.arange(batch_size) < len(labels)
    if padding:
      images = np.concatenate([images, np.zeros((padding, *images.shape[1:]), images.dtype)])
      labels = np.concatenate([labels, np.zeros(padding, labels.dtype)])
    yield images, labels, mask


def _checked_split(data_config: ml_collections.ConfigDict, split: str, read: Callable, flag: str):
  """read(data_config, split), with a bad or empty split reported as a ConfigError naming `flag`."""
  try:
    result = read(data_config, split)
  except data.DataError:
    raise
  except ValueError as error:
    raise configuration.ConfigError(
        f'{flag}={split!r} is not a split of {data_config.name}: {str(error).strip().splitlines()[0]}') from None
  if not (result if isinstance(result, int) else len(result['label'])):
    raise configuration.ConfigError(f'{flag}={split!r} holds no examples')
  return result


def eval_batches_source(data_config: ml_collections.ConfigDict, split: str, batch_size: int, *,
                        flag: str) -> Callable[[], Batches]:
  """A function that yields every example of `split` once, in order, in batches of at most
  `batch_size`, in both input modes: from the source's arrays, read once here, or streamed by
  tf.data for a tfds data set (nothing kept in memory between evaluations). A bad or empty split
  is a ConfigError naming `flag` (the key or flag that chose it)."""
  if source.in_memory(data_config):
    arrays = _checked_split(data_config, split, data.load_split, flag)
    return lambda: array_batches(arrays, batch_size)
  _checked_split(data_config, split, source.split_size, flag)
  from hybridvit_jax.data import stream  # pylint: disable=import-outside-toplevel  # TensorFlow, only here
  return lambda: stream.eval_batches(data_config, split, batch_size)


class TrainInput:
  """The train split in the configured input mode; `epoch(e, first_step)` yields the
  arguments the train step takes after (state, metrics), one tuple per step."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    self.config = config
    self.mesh = mesh
    if config.data.input_mode == 'stream':
      self.num_examples = _checked_split(config.data, config.data.train_split, source.split_size, _TRAIN_SPLIT_FLAG)
      self.steps_per_epoch = self.num_examples // jax.process_count() // self.local_batch_size
    else:
      arrays = _checked_split(config.data, config.data.train_split, data.load_split, _TRAIN_SPLIT_FLAG)
      self.num_examples = len(arrays['label'])
      self.steps_per_epoch = self.num_examples // config.batch_size
      replicated = NamedSharding(mesh, P())
      self.images, self.labels = (to_global(arrays[k], replicated) for k in ('image', 'label'))
    if self.steps_per_epoch == 0:
      raise configuration.ConfigError(
          f'batch_size={config.batch_size} is larger than the {self.num_examples} examples of '
          f'{config.data.train_split!r}: set --config.batch_size to at most {self.num_examples}')

  @property
  def local_batch_size(self) -> int:
    return self.config.batch_size // jax.process_count()

  def first_images(self, count: int) -> jax.Array:
    """uint8 [n, H, W, C]: the first n images of epoch 0, in its order, n = min(count, images in its
    whole batches); the same on every process (what a fresh run fits data-fitted model parts to)."""
    if self.config.data.input_mode != 'stream':
      return self.images[self.epoch_order(0).reshape(-1)[:count]]
    batches = []
    for images, _ in self.epoch(0):
      batches.append(images)
      if len(batches) * self.config.batch_size >= count:
        break
    return jax.numpy.concatenate(batches)[:count]

  def epoch_order(self, epoch: int) -> np.ndarray:
    """int32 [steps_per_epoch, batch_size]: the example indices of each step of `epoch` (device mode)."""
    return epoch_order(self.config.seed, epoch, self.num_examples, self.config.batch_size)

  def epoch(self, epoch: int, first_step: int = 0) -> Iterator[tuple]:
    """The per-step inputs of `epoch`, from its step `first_step` on."""
    if self.config.data.input_mode == 'stream':
      from hybridvit_jax.data import stream  # pylint: disable=import-outside-toplevel  # TensorFlow, only here
      batch_sharding = NamedSharding(self.mesh, P('data'))
      batches = stream.train_batches(
          self.config.data, self.config.data.train_split, seed=self.config.seed, epoch=epoch,
          local_batch_size=self.local_batch_size, steps_per_epoch=self.steps_per_epoch, skip_steps=first_step,
          process_index=jax.process_index(), process_count=jax.process_count())
      for images, labels in batches:
        yield (jax.make_array_from_process_local_data(batch_sharding, images),
               jax.make_array_from_process_local_data(batch_sharding, labels))
    else:
      order = to_global(self.epoch_order(epoch), NamedSharding(self.mesh, P(None, 'data')))
      for _ in range(first_step, self.steps_per_epoch):
        yield self.images, self.labels, order
