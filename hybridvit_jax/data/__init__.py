"""Data: tfds, image-folder and synthetic sources read into numpy, JAX augmentation."""

from hybridvit_jax.data.augment import alternating_flips
from hybridvit_jax.data.augment import augment
from hybridvit_jax.data.augment import flip_where
from hybridvit_jax.data.augment import normalize
from hybridvit_jax.data.augment import PADDING_MODES
from hybridvit_jax.data.augment import test_time_views
from hybridvit_jax.data.augment import translate
from hybridvit_jax.data.recipes import cutout
from hybridvit_jax.data.recipes import mixup_cutmix
from hybridvit_jax.data.recipes import rand_augment
from hybridvit_jax.data.recipes import random_erasing
from hybridvit_jax.data.source import DataError
from hybridvit_jax.data.source import dataset_info
from hybridvit_jax.data.source import DatasetInfo
from hybridvit_jax.data.source import load_split
from hybridvit_jax.data.source import split_size

__all__ = [
    'DataError',
    'DatasetInfo',
    'PADDING_MODES',
    'alternating_flips',
    'augment',
    'cutout',
    'dataset_info',
    'flip_where',
    'load_split',
    'mixup_cutmix',
    'normalize',
    'rand_augment',
    'random_erasing',
    'split_size',
    'test_time_views',
    'translate',
]
