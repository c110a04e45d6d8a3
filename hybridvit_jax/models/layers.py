"""Layers shared by the models: conv + BatchNorm, the conv stem, and the pre-norm transformer encoder block.

Shape conventions: images and feature maps are channels-last [B, H, W, C]; token sequences are [B, T, D].
Every layer takes its compute `dtype` (parameters stay float32) and draws its initial parameters from the
`rngs` given to its constructor. Dropout and drop-path hold no random state: they draw from the 'dropout'
stream of the `rngs` passed to `__call__`, which may be None when `train` is False or their rates are 0.
"""

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

# He (Kaiming) normal over fan-out, as torchvision/timm initialise ReLU convolutions.
CONV_INIT = nnx.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# Transformer Linear layers, as in the original ViT.
DENSE_INIT = nnx.initializers.xavier_uniform()
# PyTorch's BatchNorm defaults: running average keeps 90% of the old value, epsilon 1e-5.
BATCH_NORM_MOMENTUM = 0.9
BATCH_NORM_EPSILON = 1e-5
LAYER_NORM_EPSILON = 1e-6


class ConvBatchNorm(nnx.Module):
  """A bias-free convolution followed by BatchNorm (no activation)."""

  def __init__(
      self,
      in_channels: int,
      out_channels: int,
      kernel_size: int,
      *,
      stride: int = 1,
      padding: str | int = 'SAME',
      zero_init_scale: bool = False,
      dtype: jnp.dtype,
      rngs: nnx.Rngs,
  ):
    """Args:
      in_channels, out_channels: channels of the input and output feature maps.
      kernel_size: side of the square convolution window.
      stride: step of the convolution in both spatial dimensions.
      padding: 'SAME', or an int p padding every spatial side by p (PyTorch style).
      zero_init_scale: start the BatchNorm scale at 0, so the layer first outputs only its bias (0).
      dtype: compute dtype.
      rngs: parameter initialisation randomness.
    """
    self.conv = nnx.Conv(
        in_channels, out_channels, (kernel_size, kernel_size), strides=stride, padding=padding,
        use_bias=False, kernel_init=CONV_INIT, dtype=dtype, rngs=rngs)
    self.norm = nnx.BatchNorm(
        out_channels, momentum=BATCH_NORM_MOMENTUM, epsilon=BATCH_NORM_EPSILON, dtype=dtype,
        scale_init=nnx.initializers.zeros_init() if zero_init_scale else nnx.initializers.ones_init(),
        rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """[B,H,W,in_channels] -> [B,H',W',out_channels]; train=True normalises with (and updates) batch statistics."""
    return self.norm(self.conv(x), use_running_average=not train)


class StemLayerSpec(NamedTuple):
  """One conv stem layer: conv(kernel_size, stride) to `channels`, then an optional 2x2 max-pool."""
  channels: int
  kernel_size: int
  stride: int
  pool: bool


def stem_layer_specs(
    num_layers: int, channels: Sequence[int], kernel_sizes: Sequence[int], strides: Sequence[int],
    pools: Sequence[bool]) -> tuple[StemLayerSpec, ...]:
  """Per-layer specs of a `num_layers` conv stem; layer i takes entry min(i, len - 1) of each sequence."""
  def entry(values, i):
    return values[min(i, len(values) - 1)]
  return tuple(
      StemLayerSpec(entry(channels, i), entry(kernel_sizes, i), entry(strides, i), bool(entry(pools, i)))
      for i in range(num_layers))


def stem_output_size(size: int, specs: tuple[StemLayerSpec, ...]) -> int:
  """Side length of the stem's output for an input side of `size` ('SAME' convs, floor-dividing pools)."""
  for spec in specs:
    size = -(-size // spec.stride)
    if spec.pool:
      size //= 2
  return size


class ConvStem(nnx.Module):
  """Conv layers (conv -> BatchNorm -> ReLU -> optional 2x2 max-pool) in front of tokenisation.

  With no specs it is the identity, so a hybrid with zero stem layers is exactly a plain ViT.
  """

  def __init__(self, in_channels: int, specs: tuple[StemLayerSpec, ...], *, dtype: jnp.dtype, rngs: nnx.Rngs):
    """Args:
      in_channels: channels C of the input images.
      specs: one StemLayerSpec per layer, in order.
      dtype: compute dtype.
      rngs: parameter initialisation randomness.
    """
    layer_in_channels = (in_channels,) + tuple(spec.channels for spec in specs[:-1])
    self.layers = nnx.List([
        ConvBatchNorm(c_in, spec.channels, spec.kernel_size, stride=spec.stride, dtype=dtype, rngs=rngs)
        for c_in, spec in zip(layer_in_channels, specs)])
    self.pools = tuple(spec.pool for spec in specs)
    self.out_channels = specs[-1].channels if specs else in_channels

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """[B,H,W,C] -> [B,H',W',out_channels], H' and W' as given by `stem_output_size`."""
    for layer, pool in zip(self.layers, self.pools):
      x = nnx.relu(layer(x, train=train))
      if pool:
        x = nnx.max_pool(x, (2, 2), strides=(2, 2))
    return x


class DropPath(nnx.Dropout):
  """Stochastic depth on [B,T,D] residual branches: zeroes a whole sample's branch with probability `rate`.

  The kept samples are scaled by 1 / (1 - rate). Call as `drop_path(x, deterministic=not train, rngs=rngs)`.
  """

  def __init__(self, rate: float):
    super().__init__(rate, broadcast_dims=(1, 2))


class MLP(nnx.Module):
  """Transformer feed-forward: Linear -> GELU -> dropout -> Linear -> dropout."""

  def __init__(self, hidden_size: int, mlp_dim: int, *, dropout_rate: float, dtype: jnp.dtype, rngs: nnx.Rngs):
    """Args:
      hidden_size: token width D (input and output).
      mlp_dim: width of the hidden layer.
      dropout_rate: dropout after the activation and after the output layer.
      dtype: compute dtype.
      rngs: parameter initialisation randomness.
    """
    self.fc1 = nnx.Linear(hidden_size, mlp_dim, kernel_init=DENSE_INIT, dtype=dtype, rngs=rngs)
    self.fc2 = nnx.Linear(mlp_dim, hidden_size, kernel_init=DENSE_INIT, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout_rate)

  def __call__(self, x: jax.Array, *, train: bool, rngs: nnx.Rngs | None) -> jax.Array:
    """[B,T,D] -> [B,T,D]."""
    x = nnx.gelu(self.fc1(x), approximate=False)
    x = self.dropout(x, deterministic=not train, rngs=rngs)
    return self.dropout(self.fc2(x), deterministic=not train, rngs=rngs)


class MultiHeadSelfAttention(nnx.Module):
  """Self-attention with one fused qkv projection (with bias) and an output projection, as in timm."""

  def __init__(
      self, hidden_size: int, num_heads: int, *, attention_dropout_rate: float, dropout_rate: float,
      dtype: jnp.dtype, rngs: nnx.Rngs):
    """Args:
      hidden_size: token width D; must be divisible by num_heads.
      num_heads: number of attention heads.
      attention_dropout_rate: dropout on the attention weights.
      dropout_rate: dropout on the output projection.
      dtype: compute dtype.
      rngs: parameter initialisation randomness.
    """
    self.num_heads = num_heads
    self.qkv = nnx.Linear(hidden_size, 3 * hidden_size, kernel_init=DENSE_INIT, dtype=dtype, rngs=rngs)
    self.proj = nnx.Linear(hidden_size, hidden_size, kernel_init=DENSE_INIT, dtype=dtype, rngs=rngs)
    self.attention_dropout = nnx.Dropout(attention_dropout_rate)
    self.dropout = nnx.Dropout(dropout_rate)

  def __call__(self, x: jax.Array, *, train: bool, rngs: nnx.Rngs | None) -> jax.Array:
    """[B,T,D] -> [B,T,D]."""
    batch, tokens, width = x.shape
    qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, width // self.num_heads)
    query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if train and self.attention_dropout.rate > 0:
      heads = attention_with_weight_dropout(query, key, value, self.attention_dropout, rngs)
    else:
      heads = jax.nn.dot_product_attention(query, key, value)
    out = self.proj(heads.reshape(batch, tokens, width))
    return self.dropout(out, deterministic=not train, rngs=rngs)


def attention_with_weight_dropout(
    query: jax.Array, key: jax.Array, value: jax.Array, dropout: nnx.Dropout, rngs: nnx.Rngs | None
) -> jax.Array:
  """`jax.nn.dot_product_attention` with `dropout` applied to the attention weights: [B,T,N,H] x3 -> [B,T,N,H].

  The fused `jax.nn.dot_product_attention` has no dropout, so training with attention dropout spells it out.
  """
  logits = jnp.einsum('bqnh,bknh->bnqk', query * query.shape[-1] ** -0.5, key)
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(value.dtype)
  weights = dropout(weights, deterministic=False, rngs=rngs)
  return jnp.einsum('bnqk,bknh->bqnh', weights, value)


class EncoderBlock(nnx.Module):
  """Pre-norm transformer block: x + DropPath(Attention(LN(x))), then x + DropPath(MLP(LN(x)))."""

  def __init__(
      self, hidden_size: int, num_heads: int, mlp_dim: int, *, dropout_rate: float,
      attention_dropout_rate: float, drop_path_rate: float, dtype: jnp.dtype, rngs: nnx.Rngs):
    """Args:
      hidden_size: token width D.
      num_heads: attention heads; must divide hidden_size.
      mlp_dim: width of the MLP's hidden layer.
      dropout_rate: dropout after the attention projection and inside the MLP.
      attention_dropout_rate: dropout on the attention weights.
      drop_path_rate: probability of dropping each residual branch of a sample (stochastic depth).
      dtype: compute dtype.
      rngs: parameter initialisation randomness.
    """
    self.attention_norm = nnx.LayerNorm(hidden_size, epsilon=LAYER_NORM_EPSILON, dtype=dtype, rngs=rngs)
    self.attention = MultiHeadSelfAttention(
        hidden_size, num_heads, attention_dropout_rate=attention_dropout_rate, dropout_rate=dropout_rate,
        dtype=dtype, rngs=rngs)
    self.mlp_norm = nnx.LayerNorm(hidden_size, epsilon=LAYER_NORM_EPSILON, dtype=dtype, rngs=rngs)
    self.mlp = MLP(hidden_size, mlp_dim, dropout_rate=dropout_rate, dtype=dtype, rngs=rngs)
    self.drop_path = DropPath(drop_path_rate)

  def __call__(self, x: jax.Array, *, train: bool, rngs: nnx.Rngs | None) -> jax.Array:
    """[B,T,D] -> [B,T,D]."""
    branch = self.attention(self.attention_norm(x), train=train, rngs=rngs)
    x = x + self.drop_path(branch, deterministic=not train, rngs=rngs)
    branch = self.mlp(self.mlp_norm(x), train=train, rngs=rngs)
    return x + self.drop_path(branch, deterministic=not train, rngs=rngs)


def sincos_2d_position_embedding(height: int, width: int, hidden_size: int) -> jax.Array:
  """Fixed 2-D sin-cos position embedding of an height x width token grid, row-major: [height*width, hidden_size].

  A quarter of the features each holds sin(x), cos(x), sin(y), cos(y) at geometric frequencies 1 .. 1/10000;
  hidden_size must be divisible by 4.
  """
  quarter = hidden_size // 4
  frequencies = 1.0 / 10000.0 ** (jnp.arange(quarter, dtype=jnp.float32) / quarter)
  rows, cols = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32),
                            indexing='ij')
  x_angles = cols.reshape(-1, 1) * frequencies
  y_angles = rows.reshape(-1, 1) * frequencies
  return jnp.concatenate(
      [jnp.sin(x_angles), jnp.cos(x_angles), jnp.sin(y_angles), jnp.cos(y_angles)], axis=1)
