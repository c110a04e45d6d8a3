"""Vision Transformer, plain or hybrid: an optional conv stem whose output positions become the tokens."""

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from hybridvit_jax.models import checks, layers

# 'sincos2d' (fixed, big_vision's default) or 'learned' (timm's and the paper's).
POSEMBS = ('learned', 'sincos2d')
# Each pooling's [B,T,D] -> [B,D]; 'cls' takes the class token, prepended first.
POOL_TOKENS = {'cls': lambda tokens: tokens[:, 0], 'mean': lambda tokens: tokens.mean(axis=1)}
POOLINGS = tuple(POOL_TOKENS)


def drop_path_rates(max_rate: float, num_layers: int) -> list[float]:
  """Stochastic-depth rate of each block, growing linearly from 0 at the first block to max_rate at the last."""
  return [max_rate * i / max(num_layers - 1, 1) for i in range(num_layers)]


class VisionTransformer(nnx.Module):
  """ViT classifier (timm layout): [conv stem] -> patch conv -> [class token] -> position embedding ->
  pre-norm encoder blocks -> LayerNorm -> pool ('cls' token or 'mean' of tokens) -> zero-initialised Linear head.
  """

  def __init__(
      self,
      *,
      image_shape: tuple[int, int, int],
      num_classes: int,
      patch_size: int,
      hidden_size: int,
      num_layers: int,
      num_heads: int,
      mlp_dim: int,
      pooling: str,
      posemb: str,
      dropout_rate: float,
      attention_dropout_rate: float,
      stochastic_depth_rate: float,
      stem: Mapping[str, Any] = MappingProxyType({}),
      dtype: jnp.dtype,
      rngs: nnx.Rngs,
  ):
    """Args:
      image_shape: (H, W, C) of the input images.
      num_classes: number of output logits.
      patch_size: side of the square patches cut from the stem output (the image when `stem` is empty);
        must divide both of its sides.
      hidden_size: token width D; divisible by num_heads (and by 4 for 'sincos2d').
      num_layers: number of encoder blocks.
      num_heads: attention heads per block.
      mlp_dim: width of each block's MLP hidden layer.
      pooling: 'cls' (prepend a class token and classify it) or 'mean' (each feature's mean over the
        tokens, no class token).
      posemb: 'learned' (a Param, normal std 0.02, with a class-token position) or 'sincos2d' (fixed).
      dropout_rate: dropout after the position embedding, the attention projection and in the MLPs.
      attention_dropout_rate: dropout on attention weights.
      stochastic_depth_rate: drop-path rate of the last block (linear from 0 at the first).
      stem: the keyword arguments of the `layers.ConvStem` in front of the patch embedding (its
        stages, pool position, whitening, activation); empty (no stages) for a plain ViT.
      dtype: compute dtype; parameters are float32 and logits are returned as float32.
      rngs: parameter initialisation randomness.
    """
    height, width, channels = image_shape
    self.dtype = dtype
    self.hidden_size = hidden_size
    self.uses_randomness = max(dropout_rate, attention_dropout_rate, stochastic_depth_rate) > 0
    self.stem = layers.ConvStem(channels, **{'stages': (), **stem}, dtype=dtype, rngs=rngs)
    self.grid_shape = (self.stem.output_size(height) // patch_size, self.stem.output_size(width) // patch_size)
    self.patch_embedding = nnx.Conv(
        self.stem.out_channels, hidden_size, (patch_size, patch_size), strides=patch_size, padding='VALID',
        kernel_metadata=layers.group(layers.KERNEL), dtype=dtype, rngs=rngs)
    self.pooling = pooling
    self.cls_token = nnx.Param(jnp.zeros((1, 1, hidden_size))) if pooling == 'cls' else None
    num_tokens = self.grid_shape[0] * self.grid_shape[1] + (pooling == 'cls')
    self.pos_embedding = (
        nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, num_tokens, hidden_size)))
        if posemb == 'learned' else None)
    self.dropout = nnx.Dropout(dropout_rate)
    self.blocks = nnx.List([
        layers.EncoderBlock(
            hidden_size, num_heads, mlp_dim, dropout_rate=dropout_rate,
            attention_dropout_rate=attention_dropout_rate, drop_path_rate=rate, dtype=dtype, rngs=rngs)
        for rate in drop_path_rates(stochastic_depth_rate, num_layers)])
    self.norm = nnx.LayerNorm(hidden_size, epsilon=layers.LAYER_NORM_EPSILON, dtype=dtype, rngs=rngs)
    self.head = nnx.Linear(
        hidden_size, num_classes, kernel_init=nnx.initializers.zeros_init(),
        kernel_metadata=layers.group(layers.HEAD_KERNEL), dtype=dtype, rngs=rngs)

  def __call__(self, images: jax.Array, *, train: bool, rngs: nnx.Rngs | None = None) -> jax.Array:
    """Classifies normalised float images [B,H,W,C] into float32 logits [B,num_classes].

    Args:
      images: [B,H,W,C] with H, W, C as in the constructor's image_shape.
      train: apply dropout and drop-path, and normalise the stem with (and update) batch statistics.
      rngs: randomness for dropout and drop-path (its 'dropout' stream); needed when train is True and a
        rate is non-zero, e.g. nnx.Rngs(dropout=key).
    """
    if train and self.uses_randomness and rngs is None:
      raise ValueError('VisionTransformer(train=True) applies dropout/drop-path and needs randomness: '
                       'call it as model(images, train=True, rngs=nnx.Rngs(dropout=key))')
    features = self.patch_embedding(self.stem(images.astype(self.dtype), train=train))
    tokens = features.reshape(features.shape[0], -1, features.shape[-1])
    if self.cls_token is not None:
      cls_tokens = jnp.broadcast_to(self.cls_token[...], (tokens.shape[0], 1, tokens.shape[-1]))
      tokens = jnp.concatenate([cls_tokens.astype(tokens.dtype), tokens], axis=1)
    tokens = tokens + self.position_embedding().astype(tokens.dtype)
    tokens = self.dropout(tokens, deterministic=not train, rngs=rngs)
    for block in self.blocks:
      tokens = block(tokens, train=train, rngs=rngs)
    tokens = self.norm(tokens)
    pooled = POOL_TOKENS[self.pooling](tokens)
    return self.head(pooled).astype(jnp.float32)

  def fit_to_images(self, images: jax.Array) -> None:
    """Sets what is computed from data rather than trained (the patch-whitening kernel, if any)
    from normalised training images float [N,H,W,C]."""
    if self.stem.whitening is not None:
      self.stem.whitening.fit(images)

  def position_embedding(self) -> jax.Array:
    """Position embedding of all tokens [1,T,D], class token first; its sin-cos form gives the class token 0."""
    if self.pos_embedding is not None:
      return self.pos_embedding[...]
    table = layers.sincos_2d_position_embedding(*self.grid_shape, self.hidden_size)
    if self.cls_token is not None:
      table = jnp.concatenate([jnp.zeros((1, self.hidden_size)), table], axis=0)
    return table[None]


# ------------------------------------------------------------------------------ config
def config_groups() -> dict[str, ml_collections.ConfigDict]:
  """The config groups a VisionTransformer reads, with their defaults (ViT-Ti/4, no stem):
  `vit`, the Transformer and its tokens, and `stem`, the conv stem that makes it a hybrid."""
  vit = ml_collections.ConfigDict(dict(
      patch_size=4,
      token_grid=0,  # > 0: patch size = stem output side / token_grid (a fixed token count); 0 = patch_size
      hidden_size=192,
      num_layers=12,
      num_heads=3,
      mlp_dim=768,
      pooling='cls',  # 'cls' (class token) | 'mean' (over tokens, no class token)
      posemb='learned',  # 'learned' | 'sincos2d' (fixed)
      dropout_rate=0.0,
      attention_dropout_rate=0.0,
      stochastic_depth_rate=0.0,  # drop-path rate of the last block, linear from 0 at the first
  ))
  stem = ml_collections.ConfigDict(dict(
      # Conv stages before tokenisation, each its 3x3 conv widths: ((64, 64), (256, 256)); () = plain ViT.
      stages=(),
      pool_position='last',  # each stage's 2x2 max-pool follows its 'first' conv (airbench's) or its 'last'
      activation='relu',  # 'relu' | 'gelu' (tanh form), after each stem layer
      # k > 0: a fixed first layer that whitens the k x k patches inside the image (airbench's),
      # fitted to training images before the first step; needs stages.
      whiten_patch_size=0,
  ))
  return {'vit': vit, 'stem': stem}


def stem_kwargs(stem_config: ml_collections.ConfigDict) -> dict[str, Any]:
  """`layers.ConvStem`'s keyword arguments from the `stem` config group."""
  return dict(stages=tuple(tuple(stage) for stage in stem_config.stages), pool_position=stem_config.pool_position,
              whiten_patch_size=stem_config.whiten_patch_size, activation=stem_config.activation)


def stem_output_size(model_config: ml_collections.ConfigDict, size: int) -> int:
  """Side of the stem's output (the image's when there is no stem) for an input side of `size`."""
  stem = model_config.stem
  if stem.stages and stem.whiten_patch_size:
    size = size - stem.whiten_patch_size + 1
  return size // 2 ** sum(pool for _, pool in layers.stem_layer_pools(stem.stages, stem.pool_position))


def effective_patch_size(model_config: ml_collections.ConfigDict, image_shape: tuple[int, int, int]) -> int:
  """vit.patch_size, or with vit.token_grid > 0 the patch size that cuts the stem output (the
  image when there is no stem) into token_grid x token_grid tokens."""
  vit = model_config.vit
  if not vit.token_grid:
    return vit.patch_size
  return stem_output_size(model_config, image_shape[0]) // vit.token_grid


def build(model_config: ml_collections.ConfigDict, *, num_classes: int, image_shape: tuple[int, int, int],
          dtype: jnp.dtype, rngs: nnx.Rngs) -> VisionTransformer:
  """A VisionTransformer from the `vit` and `stem` groups of a model config."""
  vit = model_config.vit
  return VisionTransformer(
      image_shape=image_shape, num_classes=num_classes, patch_size=effective_patch_size(model_config, image_shape),
      hidden_size=vit.hidden_size, num_layers=vit.num_layers, num_heads=vit.num_heads, mlp_dim=vit.mlp_dim,
      pooling=vit.pooling, posemb=vit.posemb, dropout_rate=vit.dropout_rate,
      attention_dropout_rate=vit.attention_dropout_rate, stochastic_depth_rate=vit.stochastic_depth_rate,
      stem=stem_kwargs(model_config.stem), dtype=dtype, rngs=rngs)


def validate(model_config: ml_collections.ConfigDict, image_shape: tuple[int, int, int]) -> None:
  """Raises ValueError naming the first `model.vit.*` or `model.stem.*` key that cannot build a
  VisionTransformer for images of image_shape (H, W, C)."""
  vit = model_config.vit
  checks.choice(vit.pooling, 'model.vit.pooling', POOLINGS)
  checks.choice(vit.posemb, 'model.vit.posemb', POSEMBS)
  for key in ('patch_size', 'hidden_size', 'num_layers', 'num_heads', 'mlp_dim'):
    checks.positive(vit[key], f'model.vit.{key}')
  for key in ('dropout_rate', 'attention_dropout_rate', 'stochastic_depth_rate'):
    checks.fraction(vit[key], f'model.vit.{key}')
  if vit.hidden_size % vit.num_heads:
    raise ValueError(f'model.vit.hidden_size={vit.hidden_size} is not divisible by model.vit.num_heads={vit.num_heads}')
  if vit.posemb == 'sincos2d' and vit.hidden_size % 4:
    raise ValueError(f"model.vit.hidden_size={vit.hidden_size} must be divisible by 4 for model.vit.posemb='sincos2d'")
  if vit.token_grid < 0:
    raise ValueError(f'model.vit.token_grid={vit.token_grid} must be >= 0 (0 = use model.vit.patch_size)')
  _validate_stem(model_config.stem)
  _validate_patch_size(model_config, image_shape)


def _validate_stem(stem: ml_collections.ConfigDict) -> None:
  for stage in stem.stages:
    if isinstance(stage, int) or not stage or min(stage) <= 0:
      raise ValueError(f'model.stem.stages={stem.stages!r} must be a tuple of stages, each a non-empty tuple of '
                       'positive conv widths, e.g. ((64, 64), (256, 256))')
  checks.choice(stem.pool_position, 'model.stem.pool_position', layers.POOL_POSITIONS)
  checks.choice(stem.activation, 'model.stem.activation', tuple(layers.STEM_ACTIVATIONS))
  if stem.whiten_patch_size < 0:
    raise ValueError(f'model.stem.whiten_patch_size={stem.whiten_patch_size} must be >= 0 (0 = no whitening)')
  if stem.whiten_patch_size and not stem.stages:
    raise ValueError(f'model.stem.whiten_patch_size={stem.whiten_patch_size} needs a conv stem after it: '
                     'set model.stem.stages, or 0 for no whitening')


def _validate_patch_size(model_config: ml_collections.ConfigDict, image_shape: tuple[int, int, int]) -> None:
  vit = model_config.vit
  height, width = (stem_output_size(model_config, size) for size in image_shape[:2])
  grid = 'stem output' if model_config.stem.stages else 'image'
  if min(height, width) < 1:
    raise ValueError(f'model.stem.stages={model_config.stem.stages!r} shrinks the {image_shape[0]}x{image_shape[1]} '
                     'image to nothing; use fewer stages')
  if vit.token_grid and (height % vit.token_grid or width % vit.token_grid or height != width):
    raise ValueError(f'model.vit.token_grid={vit.token_grid} does not divide the {height}x{width} {grid} into '
                     f'square patches; use a divisor of {height}, or 0 to use model.vit.patch_size')
  patch_size = effective_patch_size(model_config, image_shape)
  if height % patch_size or width % patch_size:
    divisors = [d for d in range(1, max(min(height, width) // 4, 1) + 1) if height % d == 0 and width % d == 0]
    raise ValueError(f'model.vit.patch_size={patch_size} does not divide the {height}x{width} {grid}; '
                     f'use a divisor such as {", ".join(map(str, divisors))}')
