"""Model registry and config schema.

    cfg = variant_config('vit_ti4')       # or default_model_config(), then override keys
    model = create_model(cfg, num_classes=10, image_shape=(32, 32, 3), rngs=nnx.Rngs(0))
    logits = model(images, train=True, rngs=nnx.Rngs(dropout=key))   # [B,H,W,C] -> float32 [B,num_classes]

'vit' and 'hybrid' build the same VisionTransformer (a hybrid is a ViT with stem_layers > 0); 'resnet50'
builds a bottleneck ResNet. Every config holds every key, so command-line overrides work for any model.
"""

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from hybridvit_jax.models import layers
from hybridvit_jax.models.resnet import STEMS as RESNET_STEMS
from hybridvit_jax.models.resnet import ResNet
from hybridvit_jax.models.vit import POOLINGS, POSEMBS, VisionTransformer

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}

_VIT_TINY = dict(hidden_size=192, num_layers=12, num_heads=3, mlp_dim=768)
_VIT_TEST = dict(hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64)

VARIANTS = {
    # ViT-Ti with 4x4 patches: 64 tokens on 32x32 images.
    'vit_ti4': dict(name='vit', patch_size=4, **_VIT_TINY),
    # ViT-Ti on a 2-layer conv stem that pools 32x32 images to 8x8, one token per position: 64 tokens.
    'hybrid_ti': dict(name='hybrid', stem_layers=2, stem_channels=(64, 128), stem_kernel_sizes=(3,),
                      stem_strides=(1,), stem_pools=(True,), patch_size=1, **_VIT_TINY),
    'resnet50': dict(name='resnet50', resnet_stage_sizes=(3, 4, 6, 3), resnet_width=64, resnet_stem='cifar'),
    'resnet50_imagenet': dict(name='resnet50', resnet_stage_sizes=(3, 4, 6, 3), resnet_width=64,
                              resnet_stem='imagenet'),
    # Tiny networks for tests and smoke runs.
    'vit_test': dict(name='vit', patch_size=4, **_VIT_TEST),
    'hybrid_test': dict(name='hybrid', stem_layers=2, stem_channels=(8, 16), stem_kernel_sizes=(3,),
                        stem_strides=(1,), stem_pools=(True,), patch_size=2, **_VIT_TEST),
    'resnet_test': dict(name='resnet50', resnet_stage_sizes=(1, 1, 1, 1), resnet_width=8, resnet_stem='cifar'),
}


def default_model_config() -> ml_collections.ConfigDict:
  """The full model config schema; the defaults are ViT-Ti/4."""
  return ml_collections.ConfigDict(dict(
      name='vit',  # one of MODELS
      dtype='float32',  # compute dtype, one of DTYPES; parameters are float32 and logits float32
      patch_size=4,
      token_grid=0,  # > 0: patch size = stem output side / token_grid (a fixed token count); 0 = patch_size
      hidden_size=192,
      num_layers=12,
      num_heads=3,
      mlp_dim=768,
      pooling='cls',  # 'cls' (class token) | 'mean' | 'max' (over tokens, no class token)
      posemb='learned',  # 'learned' | 'sincos2d' (fixed)
      dropout_rate=0.0,
      attention_dropout_rate=0.0,
      stochastic_depth_rate=0.0,  # drop-path rate of the last block, linear from 0 at the first
      stem_layers=0,  # conv layers before tokenisation; 0 = plain ViT
      stem_channels=(64, 128, 256),  # layer i uses entry min(i, len - 1), as do the three below
      stem_kernel_sizes=(3,),
      stem_strides=(1,),
      stem_pools=(True,),  # 2x2 max-pool, stride 2, after the layer
      stem_whiten_patch_size=0,  # k > 0: a first layer that whitens k x k patches, fitted to training images
      # (with stem_layers=0, stride k and patch_size=1: a ViT's whitened patch embedding, still linear)
      stem_whiten_stride=1,  # that layer's stride (= stem_whiten_patch_size: non-overlapping patches)
      stem_whiten_padding='SAME',  # 'SAME' | 'VALID' (airbench's: 2x2 patches take 32x32 to 31x31, pools to 15, 7, 3)
      stem_whiten_bias=True,  # False: no trained bias, so no gradient flows below the first conv (faster)
      stem_batch_norm_scale=True,  # False: the stem's BatchNorms train a bias only (airbench's)
      stem_dirac_init=False,  # True: each stem conv starts as a partial identity (airbench's)
      stem_activation='relu',  # 'relu' | 'gelu' (tanh form), after each stem layer
      resnet_stage_sizes=(3, 4, 6, 3),
      resnet_width=64,
      resnet_stem='cifar',  # 'cifar' (3x3 conv, stride 1) | 'imagenet' (7x7 conv, stride 2 + max-pool)
  ))


def variant_config(variant: str) -> ml_collections.ConfigDict:
  """The default config updated with the overrides of VARIANTS[variant]."""
  if variant not in VARIANTS:
    raise ValueError(f'unknown model variant {variant!r}; choose one of {", ".join(VARIANTS)}')
  cfg = default_model_config()
  cfg.update(VARIANTS[variant])
  return cfg


def effective_patch_size(cfg: ml_collections.ConfigDict, image_shape: tuple[int, int, int]) -> int:
  """model.patch_size, or with model.token_grid > 0 the patch size that cuts the stem output
  (the image when there is no stem) into token_grid x token_grid tokens."""
  if not cfg.token_grid:
    return cfg.patch_size
  return _stem_output_size(cfg, image_shape[0]) // cfg.token_grid


def build_vision_transformer(
    cfg: ml_collections.ConfigDict, *, num_classes: int, image_shape: tuple[int, int, int], rngs: nnx.Rngs
) -> VisionTransformer:
  """A VisionTransformer from a model config ('vit' or 'hybrid'), for [B,*image_shape] inputs."""
  return VisionTransformer(
      image_shape=image_shape,
      num_classes=num_classes,
      patch_size=effective_patch_size(cfg, image_shape),
      hidden_size=cfg.hidden_size,
      num_layers=cfg.num_layers,
      num_heads=cfg.num_heads,
      mlp_dim=cfg.mlp_dim,
      pooling=cfg.pooling,
      posemb=cfg.posemb,
      dropout_rate=cfg.dropout_rate,
      attention_dropout_rate=cfg.attention_dropout_rate,
      stochastic_depth_rate=cfg.stochastic_depth_rate,
      stem=_stem_specs(cfg),
      stem_options=dict(whiten_patch_size=cfg.stem_whiten_patch_size, whiten_stride=cfg.stem_whiten_stride,
                        whiten_padding=cfg.stem_whiten_padding,
                        whiten_bias=cfg.stem_whiten_bias, batch_norm_scale=cfg.stem_batch_norm_scale,
                        dirac_init=cfg.stem_dirac_init, activation=cfg.stem_activation),
      dtype=DTYPES[cfg.dtype],
      rngs=rngs)


def build_resnet(
    cfg: ml_collections.ConfigDict, *, num_classes: int, image_shape: tuple[int, int, int], rngs: nnx.Rngs
) -> ResNet:
  """A bottleneck ResNet from a model config ('resnet50'), for [B,*image_shape] inputs."""
  return ResNet(
      image_shape=image_shape,
      num_classes=num_classes,
      stage_sizes=tuple(cfg.resnet_stage_sizes),
      width=cfg.resnet_width,
      stem=cfg.resnet_stem,
      dtype=DTYPES[cfg.dtype],
      rngs=rngs)


MODELS: dict[str, Callable[..., nnx.Module]] = {
    'vit': build_vision_transformer,
    'hybrid': build_vision_transformer,
    'resnet50': build_resnet,
}


def create_model(
    cfg: ml_collections.ConfigDict, num_classes: int, image_shape: tuple[int, int, int], rngs: nnx.Rngs
) -> nnx.Module:
  """Validates `cfg` and builds its model for images of image_shape (H, W, C) and num_classes logits.

  The model maps float32 images [B,H,W,C] to float32 logits [B,num_classes]; parameters come from `rngs`.
  """
  validate_model_config(cfg, image_shape)
  return MODELS[cfg.name](cfg, num_classes=num_classes, image_shape=image_shape, rngs=rngs)


def fits_to_data(cfg: ml_collections.ConfigDict) -> bool:
  """Whether the model has parts set from training images before training (`fit_to_images`)."""
  return cfg.name != 'resnet50' and cfg.stem_whiten_patch_size > 0


def count_params(model: nnx.Module) -> int:
  """Number of scalars in the model's nnx.Param variables (works on nnx.eval_shape models too)."""
  return sum(math.prod(param.shape) for param in jax.tree.leaves(nnx.state(model, nnx.Param)))


def validate_model_config(cfg: ml_collections.ConfigDict, image_shape: tuple[int, int, int]) -> None:
  """Raises ValueError with a one-line message naming the offending key if cfg cannot build a model for
  images of image_shape (H, W, C). Only the keys the chosen model uses are checked."""
  _check_choice(cfg, 'name', MODELS)
  _check_choice(cfg, 'dtype', DTYPES)
  if cfg.name == 'resnet50':
    _validate_resnet(cfg)
  else:
    _validate_vision_transformer(cfg, image_shape)


def _stem_specs(cfg: ml_collections.ConfigDict) -> tuple[layers.StemLayerSpec, ...]:
  return layers.stem_layer_specs(
      cfg.stem_layers, cfg.stem_channels, cfg.stem_kernel_sizes, cfg.stem_strides, cfg.stem_pools)


def _stem_output_size(cfg: ml_collections.ConfigDict, size: int) -> int:
  return layers.stem_output_size(size, _stem_specs(cfg), cfg.stem_whiten_patch_size, cfg.stem_whiten_stride,
                                 cfg.stem_whiten_padding)


def _validate_resnet(cfg: ml_collections.ConfigDict) -> None:
  _check_choice(cfg, 'resnet_stem', RESNET_STEMS)
  _check_positive(cfg, 'resnet_width')
  _check_positive_sequence(cfg, 'resnet_stage_sizes')


def _validate_vision_transformer(cfg: ml_collections.ConfigDict, image_shape: tuple[int, int, int]) -> None:
  _check_choice(cfg, 'pooling', POOLINGS)
  _check_choice(cfg, 'posemb', POSEMBS)
  for key in ('patch_size', 'hidden_size', 'num_layers', 'num_heads', 'mlp_dim'):
    _check_positive(cfg, key)
  for key in ('dropout_rate', 'attention_dropout_rate', 'stochastic_depth_rate'):
    if not 0 <= cfg[key] < 1:
      raise ValueError(f'model.{key}={cfg[key]} must be in [0, 1)')
  if cfg.hidden_size % cfg.num_heads:
    raise ValueError(f'model.hidden_size={cfg.hidden_size} is not divisible by model.num_heads={cfg.num_heads}')
  if cfg.posemb == 'sincos2d' and cfg.hidden_size % 4:
    raise ValueError(f"model.hidden_size={cfg.hidden_size} must be divisible by 4 for model.posemb='sincos2d'")
  if cfg.token_grid < 0:
    raise ValueError(f'model.token_grid={cfg.token_grid} must be >= 0 (0 = use model.patch_size)')
  _validate_stem(cfg)
  _validate_patch_size(cfg, image_shape)


def _validate_stem(cfg: ml_collections.ConfigDict) -> None:
  if cfg.stem_layers < 0:
    raise ValueError(f'model.stem_layers={cfg.stem_layers} must be >= 0')
  if cfg.stem_whiten_patch_size < 0:
    raise ValueError(f'model.stem_whiten_patch_size={cfg.stem_whiten_patch_size} must be >= 0 (0 = no whitening)')
  if cfg.stem_whiten_stride < 1:
    raise ValueError(f'model.stem_whiten_stride={cfg.stem_whiten_stride} must be >= 1')
  _check_choice(cfg, 'stem_whiten_padding', layers.WHITEN_PADDINGS)
  if cfg.stem_layers == 0:
    return
  for key in ('stem_channels', 'stem_kernel_sizes', 'stem_strides'):
    _check_positive_sequence(cfg, key)
  _check_choice(cfg, 'stem_activation', tuple(layers.STEM_ACTIVATIONS))
  if not cfg.stem_pools:
    raise ValueError('model.stem_pools=() must have at least one entry when model.stem_layers > 0')


def _validate_patch_size(cfg: ml_collections.ConfigDict, image_shape: tuple[int, int, int]) -> None:
  specs = _stem_specs(cfg)
  height, width = (_stem_output_size(cfg, size) for size in image_shape[:2])
  grid = 'stem output' if specs else 'image'
  if min(height, width) < 1:
    raise ValueError(f'model.stem_layers={cfg.stem_layers} shrinks the {image_shape[0]}x{image_shape[1]} image '
                     f'to nothing; use fewer stem layers, strides or pools')
  if cfg.token_grid and (height % cfg.token_grid or width % cfg.token_grid or height != width):
    raise ValueError(f'model.token_grid={cfg.token_grid} does not divide the {height}x{width} {grid} into square '
                     f'patches; use a divisor of {height}, or 0 to use model.patch_size')
  patch_size = effective_patch_size(cfg, image_shape)
  if height % patch_size or width % patch_size:
    divisors = [d for d in range(1, max(min(height, width) // 4, 1) + 1) if height % d == 0 and width % d == 0]
    raise ValueError(f'model.patch_size={patch_size} does not divide the {height}x{width} {grid}; '
                     f'use a divisor such as {", ".join(map(str, divisors))}')


def _check_choice(cfg: ml_collections.ConfigDict, key: str, choices) -> None:
  if cfg[key] not in choices:
    raise ValueError(f'unknown model.{key}={cfg[key]!r}; choose one of {", ".join(map(repr, choices))}')


def _check_positive(cfg: ml_collections.ConfigDict, key: str) -> None:
  if cfg[key] <= 0:
    raise ValueError(f'model.{key}={cfg[key]} must be positive')


def _check_positive_sequence(cfg: ml_collections.ConfigDict, key: str) -> None:
  if not cfg[key] or min(cfg[key]) <= 0:
    raise ValueError(f'model.{key}={tuple(cfg[key])} must be a non-empty sequence of positive integers')
