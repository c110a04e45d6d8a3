"""Vision Transformer, plain or hybrid: an optional conv stem whose output positions become the tokens."""

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from hybridvit_jax.models import layers

POSEMBS = ('learned', 'sincos2d')
# Each pooling's [B,T,D] -> [B,D]; 'cls' takes the class token, prepended first.
POOL_TOKENS = {'cls': lambda tokens: tokens[:, 0], 'mean': lambda tokens: tokens.mean(axis=1),
               'max': lambda tokens: tokens.max(axis=1)}
POOLINGS = tuple(POOL_TOKENS)


def drop_path_rates(max_rate: float, num_layers: int) -> list[float]:
  """Stochastic-depth rate of each block, growing linearly from 0 at the first block to max_rate at the last."""
  return [max_rate * i / max(num_layers - 1, 1) for i in range(num_layers)]


class VisionTransformer(nnx.Module):
  """ViT classifier (timm layout): [conv stem] -> patch conv -> [class token] -> position embedding ->
  pre-norm encoder blocks -> LayerNorm -> pool ('cls' token, 'mean' or 'max' of tokens) -> zero-initialised Linear head.
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
      stem: tuple[layers.StemLayerSpec, ...],
      stem_options: Mapping[str, Any] = MappingProxyType({}),
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
      pooling: 'cls' (prepend a class token and classify it), 'mean' or 'max' (each feature's mean or
        maximum over the tokens, no class token; 'max' is airbench's global max-pool).
      posemb: 'learned' (a Param, normal std 0.02, with a class-token position) or 'sincos2d' (fixed).
      dropout_rate: dropout after the position embedding, the attention projection and in the MLPs.
      attention_dropout_rate: dropout on attention weights.
      stochastic_depth_rate: drop-path rate of the last block (linear from 0 at the first).
      stem: conv stem layers in front of the patch embedding; empty for a plain ViT.
      stem_options: the keyword arguments of `layers.ConvStem` beyond its layers (the whitening
        layer, BatchNorm scale, dirac initialisation, activation); empty = its defaults.
      dtype: compute dtype; parameters are float32 and logits are returned as float32.
      rngs: parameter initialisation randomness.
    """
    height, width, channels = image_shape
    self.dtype = dtype
    self.hidden_size = hidden_size
    self.uses_randomness = max(dropout_rate, attention_dropout_rate, stochastic_depth_rate) > 0
    self.stem = layers.ConvStem(channels, stem, **stem_options, dtype=dtype, rngs=rngs)
    self.grid_shape = (self.stem.output_size(height) // patch_size, self.stem.output_size(width) // patch_size)
    self.patch_embedding = nnx.Conv(
        self.stem.out_channels, hidden_size, (patch_size, patch_size), strides=patch_size, padding='VALID',
        dtype=dtype, rngs=rngs)
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
        hidden_size, num_classes, kernel_init=nnx.initializers.zeros_init(), dtype=dtype, rngs=rngs)

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
