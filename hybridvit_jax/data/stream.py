"""The `stream` input mode: tf.data reads this process's shard of a split, shuffles it with a
seed that is a function of (seed, epoch), batches and prefetches; nothing holds the whole split.

Augmentation is not done here: the train step applies the same on-device augmentation in both
input modes, so both see the same label distribution and the same transforms.
"""
from typing import Iterator

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from hybridvit_jax.data import source


def _examples(data_config: ml_collections.ConfigDict, split: str, process_index: int,
              process_count: int) -> tf.data.Dataset:
  """This process's equal share of `split` as a dataset of (image uint8 [H,W,C], label int32),
  in a fixed order."""
  if source.in_memory(data_config):
    arrays = source.load_split(data_config, split)
    dataset = tf.data.Dataset.from_tensor_slices((arrays['image'], arrays['label']))
    return dataset.shard(process_count, process_index).take(len(arrays['label']) // process_count)
  builder = source.prepared_builder(data_config)
  process_split = tfds.even_splits(split, n=process_count, drop_remainder=True)[process_index]
  dataset = builder.as_dataset(split=process_split, shuffle_files=False)
  return dataset.map(lambda example: (example['image'], tf.cast(example['label'], tf.int32)))


def _deterministic(dataset: tf.data.Dataset) -> tf.data.Dataset:
  options = tf.data.Options()
  options.deterministic = True
  return dataset.with_options(options)


def train_batches(data_config: ml_collections.ConfigDict, split: str, *, seed: int, epoch: int,
                  local_batch_size: int, steps_per_epoch: int, skip_steps: int = 0,
                  process_index: int = 0, process_count: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields this process's (images uint8 [b, H, W, C], labels int32 [b]) for the steps of `epoch`
  from `skip_steps` on (a run resumed mid-epoch); the order is a function of (seed, epoch)."""
  dataset = _examples(data_config, split, process_index, process_count)
  dataset = dataset.shuffle(data_config.shuffle_buffer, seed=seed * 1_000_003 + epoch,
                            reshuffle_each_iteration=False)
  dataset = dataset.batch(local_batch_size, drop_remainder=True).take(steps_per_epoch).skip(skip_steps)
  return iter(tfds.as_numpy(_deterministic(dataset).prefetch(tf.data.AUTOTUNE)))


def eval_batches(data_config: ml_collections.ConfigDict, split: str,
                 batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields every example of `split` once as (images, labels) batches of `batch_size` (the last
  may be smaller), the whole split on every process, in a fixed order."""
  dataset = _examples(data_config, split, 0, 1).batch(batch_size)
  return iter(tfds.as_numpy(_deterministic(dataset).prefetch(tf.data.AUTOTUNE)))
