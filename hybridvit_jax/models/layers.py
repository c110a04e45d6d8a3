"""Layers shared by the models: conv + BatchNorm, the conv stem, and the pre-norm transformer encoder block.

Shape conventions: images and feature maps are channels-last [B, H, W, C]; token sequences are [B, T, D].
Every layer takes its compute `dtype` (parameters stay float32) and draws its initial parameters from the
`rngs` given to its constructor. Dropout and drop-path hold no random state: they draw from the 'dropout'
stream of the `rngs` passed to `__call__`, which may be None when `train` is False or their rates are 0.
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

# He (Kaiming) normal over fan-out, as torchvision/timm initialise ReLU convolutions.
CONV_INIT = nnx.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# Transformer Linear layers, as in the original ViT.
DENSE_INIT = nnx.initializers.xavier_uniform()
# PyTorch's BatchNorm defaults: running average keeps 90% of the old value, epsilon 1e-5.
BATCH_NORM_MOMENTUM = 0.9
BATCH_NORM_EPSILON = 1e-5
LAYER_NORM_EPSILON = 1e-6
# The conv stem's activations by name; GELU (airbench's activation) in its tanh approximation.
STEM_ACTIVATIONS = {'relu': nnx.relu, 'gelu': lambda x: nnx.gelu(x, approximate=True)}

# Parameter groups, declared as `group` metadata on the nnx.Param where a layer makes it, so the
# optimizer reads them off the model (`models.param_groups`) instead of guessing from names:
# KERNEL, a matrix or conv filter (weight decay applies; Muon may take it); NORMALIZED_KERNEL, a
# conv filter whose output BatchNorm normalises (its scale does not matter: Muon renormalises it);
# HEAD_KERNEL, the classifier's matrix (weight decay, never Muon). A parameter without a group
# (biases, norms, class token, position embedding) takes neither weight decay nor Muon.
KERNEL = 'kernel'
NORMALIZED_KERNEL = 'normalized_kernel'
HEAD_KERNEL = 'head_kernel'
UNGROUPED = 'other'


def group(name: str) -> dict[str, str]:
  """The `kernel_metadata` of an nnx.Linear or nnx.Conv whose kernel is in parameter group `name`."""
  return {'group': name}


_NHWC_HWIO = ('NHWC', 'HWIO', 'NHWC')


def matmul_conv(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: str | Sequence[tuple[int, int]],
                lhs_dilation=None, rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
                **kwargs) -> jax.Array:
  """`lax.conv_general_dilated` for 2-D channels-last convolutions as one matrix product (im2col).

  lhs [B,H,W,C] and rhs [kh,kw,C,O] -> [B,H',W',O]. The kh*kw shifted (strided) views of the padded
  input are concatenated on the channel axis, [B,H',W',kh*kw*C], and multiplied by the kernel
  reshaped to [kh*kw*C, O]. XLA's CPU backend runs this with its gradients up to 2.5 times faster
  than its native convolution for the 3x3 layers of the models here (BENCHMARKS.md). Anything else (dilation,
  groups, other layouts) goes to `lax.conv_general_dilated` unchanged.
  """
  plain = (feature_group_count == 1 and lhs.ndim == 4 and all(d == 1 for d in (lhs_dilation or ()))
           and all(d == 1 for d in (rhs_dilation or ()))
           and dimension_numbers == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC_HWIO))
  if not plain:
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, **kwargs)
  kernel_h, kernel_w, in_channels, out_channels = rhs.shape
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], (kernel_h, kernel_w), window_strides, padding)
  (pad_top, pad_bottom), (pad_left, pad_right) = padding
  stride_h, stride_w = window_strides
  padded = jnp.pad(lhs, ((0, 0), (pad_top, pad_bottom), (pad_left, pad_right), (0, 0)))
  out_h = (padded.shape[1] - kernel_h) // stride_h + 1
  out_w = (padded.shape[2] - kernel_w) // stride_w + 1
  views = [padded[:, i:i + (out_h - 1) * stride_h + 1:stride_h, j:j + (out_w - 1) * stride_w + 1:stride_w, :]
           for i in range(kernel_h) for j in range(kernel_w)]
  columns = views[0] if len(views) == 1 else jnp.concatenate(views, axis=-1)
  kernel = rhs.reshape(kernel_h * kernel_w * in_channels, out_channels)
  if kwargs.get('out_sharding') is not None:  # a sharded product: XLA's own gradients keep the sharding
    return lax.dot_general(columns, kernel, (((3,), (0,)), ((), ())), precision=kwargs.get('precision'),
                           preferred_element_type=kwargs.get('preferred_element_type'),
                           out_sharding=kwargs['out_sharding'])
  return columns_times_kernel(columns, kernel, kwargs.get('precision'), kwargs.get('preferred_element_type'))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def columns_times_kernel(columns: jax.Array, kernel: jax.Array, precision=None,
                         preferred_element_type=None) -> jax.Array:
  """Rows of features [..., K] (im2col columns [B,H,W,K], or tokens [B,T,K]) times a kernel [K,O] ->
  [..., O], with gradients written as plain 2-D products: the kernel's is rows^T [K, N] x output
  gradient [N, O], contracting the N = B*H*W (or B*T) rows of both. Left to its own transpose rule,
  XLA:CPU writes one operand of that product out transposed ([O, N] or [K, N], fused into the
  producer: BatchNorm's backward, a copy of the tokens), a slow strided write that this form avoids
  (BENCHMARKS.md), with the same values."""
  return lax.dot_general(columns, kernel, (((columns.ndim - 1,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=preferred_element_type)


def _columns_times_kernel_forward(columns, kernel, precision, preferred_element_type):
  """With symbolic zeros: `columns` and `kernel` are CustomVJPPrimal. Each gradient's other operand is
  kept only when that gradient is wanted (None otherwise), so an operand nothing differentiates
  through (the first conv's columns behind the fixed whitening) costs no product in the backward."""
  output = columns_times_kernel(columns.value, kernel.value, precision, preferred_element_type)
  return output, (columns.value if kernel.perturbed else None, kernel.value if columns.perturbed else None)


def _columns_times_kernel_backward(precision, preferred_element_type, residuals, output_grad):
  columns, kernel = residuals
  if isinstance(output_grad, jax.custom_derivatives.SymbolicZero):
    return None, None
  columns_grad = kernel_grad = None
  if kernel is not None:  # [..., O] x [K,O]^T -> [..., K]
    columns_grad = lax.dot_general(output_grad.astype(kernel.dtype), kernel,
                                   (((output_grad.ndim - 1,), (1,)), ((), ())), precision=precision)
  if columns is not None:  # [K, N] x [N, O] -> [K, O]
    rows = columns.size // columns.shape[-1]
    kernel_grad = lax.dot_general(columns.reshape(rows, -1), output_grad.astype(columns.dtype).reshape(rows, -1),
                                  (((0,), (0,)), ((), ())), precision=precision)
  return columns_grad, kernel_grad


columns_times_kernel.defvjp(_columns_times_kernel_forward, _columns_times_kernel_backward, symbolic_zeros=True)


def backend_dot_general(inputs: jax.Array, kernel: jax.Array, dimension_numbers, precision=None,
                        preferred_element_type=None, out_sharding=None) -> jax.Array:
  """An nnx.Linear's product (its `dot_general`): on CPU `columns_times_kernel` (the gradients as
  plain 2-D products), elsewhere, or for any other product or a sharded one, `lax.dot_general`."""
  plain = dimension_numbers == (((inputs.ndim - 1,), (0,)), ((), ())) and kernel.ndim == 2
  if jax.default_backend() == 'cpu' and plain and out_sharding is None:
    return columns_times_kernel(inputs, kernel, precision, preferred_element_type)
  return lax.dot_general(inputs, kernel, dimension_numbers, precision=precision,
                         preferred_element_type=preferred_element_type, out_sharding=out_sharding)


def backend_conv(*args, **kwargs) -> jax.Array:
  """The faster of the two equivalent convolutions for the backend in use: `matmul_conv` on CPU,
  XLA's own (cuDNN, TPU convolution units) elsewhere. Same arguments as `lax.conv_general_dilated`."""
  conv = matmul_conv if jax.default_backend() == 'cpu' else lax.conv_general_dilated
  return conv(*args, **kwargs)


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max-pooling with stride 2 (an odd last row or column is dropped): [B,H,W,C] -> [B,H//2,W//2,C].

  The same values as `nnx.max_pool(x, (2, 2), strides=(2, 2))`, written as a reshape and a max so
  that its gradient is not XLA's select-and-scatter, which is several times slower on CPU.
  """
  batch, height, width, channels = x.shape
  x = x[:, :height // 2 * 2, :width // 2 * 2]
  return x.reshape(batch, height // 2, 2, width // 2, 2, channels).max(axis=(2, 4))


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
        use_bias=False, kernel_init=CONV_INIT, conv_general_dilated=backend_conv,
        kernel_metadata=group(NORMALIZED_KERNEL), dtype=dtype, rngs=rngs)
    self.norm = nnx.BatchNorm(
        out_channels, momentum=BATCH_NORM_MOMENTUM, epsilon=BATCH_NORM_EPSILON, dtype=dtype,
        scale_init=nnx.initializers.zeros_init() if zero_init_scale else nnx.initializers.ones_init(),
        rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """[B,H,W,in_channels] -> [B,H',W',out_channels]; train=True normalises with (and updates) batch statistics."""
    return self.norm(self.conv(x), use_running_average=not train)


class FittedKernel(nnx.Variable):
  """A kernel computed from data (`PatchWhitening.fit`), never trained: it is model state, like
  the BatchNorm statistics, so neither the optimizer nor weight decay touches it."""


def patch_whitening_kernel(images: jax.Array, patch_size: int, epsilon: float = 5e-4) -> jax.Array:
  """The filters that whiten the patch_size x patch_size patches of `images`, and their negatives.

  Args:
    images: float [N,H,W,C], normalised as the network sees them.
    patch_size: side k of the square patches.
    epsilon: added to each eigenvalue, so near-constant directions are not blown up.

  Returns:
    float32 [k,k,C,2*k*k*C]: filter j < k*k*C is the j-th eigenvector of the (uncentred) patch
    covariance, largest eigenvalue first, divided by sqrt(eigenvalue + epsilon); filter
    k*k*C + j is its negative, so a ReLU after the layer loses nothing.
  """
  images = images.astype(jnp.float32)
  channels = images.shape[-1]
  patches = lax.conv_general_dilated_patches(
      images, (patch_size, patch_size), (1, 1), 'VALID', dimension_numbers=_NHWC_HWIO)
  # conv_general_dilated_patches orders each patch's features channel-major: [C, k, k].
  patches = patches.reshape(-1, channels, patch_size, patch_size).transpose(0, 2, 3, 1).reshape(
      -1, patch_size * patch_size * channels)
  covariance = patches.T @ patches / patches.shape[0]
  eigenvalues, eigenvectors = jnp.linalg.eigh(covariance)  # ascending
  filters = eigenvectors[:, ::-1] / jnp.sqrt(eigenvalues[::-1] + epsilon)  # [k*k*C, k*k*C], column = filter
  kernel = filters.reshape(patch_size, patch_size, channels, -1)
  return jnp.concatenate([kernel, -kernel], axis=-1)


class PatchWhitening(nnx.Module):
  """The first layer of a whitened conv stem (airbench's patch whitening): an unpadded k x k
  convolution whose fixed filters whiten the training images' k x k patches (H -> H - k + 1), with
  no trained bias, so nothing below the next layer is trained and the backward pass stops at
  that layer's kernel.

  Its kernel is random until `fit` sets it from training images; the loop fits it once, before
  the first step of a fresh run, and checkpoints keep it.
  """

  def __init__(self, in_channels: int, patch_size: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
    """Args:
      in_channels: channels C of the input images.
      patch_size: side k of the whitened patches; the layer outputs 2*k*k*C channels.
      dtype: compute dtype.
      rngs: parameter initialisation randomness (the placeholder kernel).
    """
    self.patch_size = patch_size
    self.out_channels = 2 * patch_size * patch_size * in_channels
    self.kernel = FittedKernel(CONV_INIT(rngs.params(), (patch_size, patch_size, in_channels, self.out_channels)))
    self.dtype = dtype

  def fit(self, images: jax.Array) -> None:
    """Sets the kernel to `patch_whitening_kernel` of float images [N,H,W,C] (a few thousand suffice)."""
    self.kernel[...] = patch_whitening_kernel(images, self.patch_size)

  def output_size(self, size: int) -> int:
    """Side of the output for an input side of `size` (only patches inside the image)."""
    return size - self.patch_size + 1

  def __call__(self, x: jax.Array) -> jax.Array:
    """[B,H,W,C] -> [B,H-k+1,W-k+1,2*k*k*C]."""
    kernel = self.kernel[...].astype(self.dtype)
    x = x.astype(self.dtype)
    return backend_conv(x, kernel, (1, 1), 'VALID',
                        dimension_numbers=lax.conv_dimension_numbers(x.shape, kernel.shape, _NHWC_HWIO))


# Where each stem stage's 2x2 max-pool goes: after its first conv (airbench's conv groups: the
# stage's other convs run at the pooled size) or after its last (VGG's blocks).
POOL_POSITIONS = ('first', 'last')


def stem_layer_pools(stages: Sequence[Sequence[int]], pool_position: str) -> tuple[tuple[int, bool], ...]:
  """The stem's conv layers in order as (channels, followed by a 2x2 max-pool) pairs."""
  return tuple((channels, index == (0 if pool_position == 'first' else len(stage) - 1))
               for stage in stages for index, channels in enumerate(stage))


class ConvStem(nnx.Module):
  """Conv stages in front of tokenisation, optionally behind a `PatchWhitening` layer: each conv
  is 3x3, stride 1, 'SAME' -> BatchNorm -> activation (ReLU or GELU), and each stage has one 2x2
  max-pool, after its first or its last conv. With no stages it is the identity, so a hybrid
  without a stem is exactly a plain ViT.
  """

  def __init__(self, in_channels: int, stages: Sequence[Sequence[int]], *, pool_position: str = 'last',
               whiten_patch_size: int = 0, activation: str = 'relu', dtype: jnp.dtype, rngs: nnx.Rngs):
    """Args:
      in_channels: channels C of the input images.
      stages: each stage's conv widths in order, e.g. ((64, 64), (256, 256)); () = no stem.
      pool_position: 'first' or 'last': the conv of each stage that the stage's max-pool follows.
      whiten_patch_size: k > 0 puts a PatchWhitening layer of k x k patches first (with stages only).
      activation: the name, in STEM_ACTIVATIONS, of the function after each layer.
      dtype: compute dtype.
      rngs: parameter initialisation randomness.
    """
    self.activation = STEM_ACTIVATIONS[activation]
    self.whitening = (PatchWhitening(in_channels, whiten_patch_size, dtype=dtype, rngs=rngs)
                      if whiten_patch_size else None)
    self.pools = tuple(pool for _, pool in stem_layer_pools(stages, pool_position))
    widths = [channels for channels, _ in stem_layer_pools(stages, pool_position)]
    first_in_channels = self.whitening.out_channels if self.whitening else in_channels
    self.layers = nnx.List([ConvBatchNorm(c_in, c_out, 3, dtype=dtype, rngs=rngs)
                            for c_in, c_out in zip([first_in_channels] + widths[:-1], widths)])
    self.out_channels = widths[-1] if widths else first_in_channels

  def output_size(self, size: int) -> int:
    """Side of the output for an input side of `size` (pools floor-divide)."""
    if self.whitening is not None:
      size = self.whitening.output_size(size)
    return size // 2 ** sum(self.pools)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """[B,H,W,C] -> [B,H',W',out_channels], H' and W' as given by `output_size`."""
    if self.whitening is not None:
      x = self.activation(self.whitening(x))
    for layer, pool in zip(self.layers, self.pools):
      x = self.activation(layer(x, train=train))
      if pool:
        x = max_pool_2x2(x)
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
    self.fc1 = nnx.Linear(hidden_size, mlp_dim, kernel_init=DENSE_INIT, kernel_metadata=group(KERNEL),
                          dot_general=backend_dot_general, dtype=dtype, rngs=rngs)
    self.fc2 = nnx.Linear(mlp_dim, hidden_size, kernel_init=DENSE_INIT, kernel_metadata=group(KERNEL),
                          dot_general=backend_dot_general, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout_rate)

  def __call__(self, x: jax.Array, *, train: bool, rngs: nnx.Rngs | None) -> jax.Array:
    """[B,T,D] -> [B,T,D]."""
    x = nnx.gelu(self.fc1(x), approximate=False)
    x = self.dropout(x, deterministic=not train, rngs=rngs)
    return self.dropout(self.fc2(x), deterministic=not train, rngs=rngs)


def written_out(x: jax.Array) -> jax.Array:
  """`x` as an array of its own. XLA folds a transpose into the product that reads it, as a strided
  operand; XLA:CPU hands a product to YNNPACK only when both operands are row-major with the batch
  dimensions first, and runs any other on Eigen, one small product at a time. Behind an optimization
  barrier the transpose is written out first and the product stays row-major."""
  return lax.optimization_barrier(x)


def _transposed(x: jax.Array) -> jax.Array:
  """[..., M, K] -> [..., K, M], written out."""
  return written_out(jnp.swapaxes(x, -1, -2))


def _heads_product(lhs: jax.Array, rhs: jax.Array, preferred_element_type=None) -> jax.Array:
  """[B,N,M,K] x [B,N,K,O] -> [B,N,M,O]: both operands row-major, batch dimensions first."""
  return lax.dot_general(lhs, rhs, (((3,), (2,)), ((0, 1), (0, 1))), preferred_element_type=preferred_element_type)


@jax.custom_vjp
def heads_first_attention(query: jax.Array, key: jax.Array, value: jax.Array) -> jax.Array:
  """softmax(Q K^T / sqrt(H)) V on heads-first operands: [B,N,T,H] x3 -> [B,N,T,H].

  The same math as `jax.nn.dot_product_attention` (logits and softmax in float32), with a gradient
  written out so that all five products of the forward and backward read row-major operands: left to
  autodiff, Q K^T and three of the backward products read a transposed operand (see `written_out`).
  """
  return _heads_first_attention_forward(query, key, value)[0]


def _heads_first_attention_forward(query, key, value):
  logits = _heads_product(query, _transposed(key), jnp.float32) * query.shape[-1] ** -0.5
  weights = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
  return _heads_product(weights, value), (query, key, value, weights)


def _heads_first_attention_backward(residuals, output_grad):
  query, key, value, weights = residuals
  weights_grad = _heads_product(output_grad, _transposed(value), jnp.float32)
  weights32 = weights.astype(jnp.float32)
  softmax_grad = weights32 * (weights_grad - jnp.sum(weights_grad * weights32, axis=-1, keepdims=True))
  logits_grad = (softmax_grad * query.shape[-1] ** -0.5).astype(query.dtype)
  return (_heads_product(logits_grad, key), _heads_product(_transposed(logits_grad), query),
          _heads_product(_transposed(weights), output_grad))


heads_first_attention.defvjp(_heads_first_attention_forward, _heads_first_attention_backward)


def backend_attention(query: jax.Array, key: jax.Array, value: jax.Array) -> jax.Array:
  """Attention without dropout, [B,T,N,H] x3 -> [B,T,N,H]: on CPU `heads_first_attention` on
  heads-first copies of the operands; elsewhere `jax.nn.dot_product_attention` (cuDNN on GPU)."""
  if jax.default_backend() != 'cpu':
    return jax.nn.dot_product_attention(query, key, value)
  heads_first = lambda x: written_out(x.transpose(0, 2, 1, 3))  # pylint: disable=unnecessary-lambda-assignment
  return heads_first_attention(heads_first(query), heads_first(key), heads_first(value)).transpose(0, 2, 1, 3)


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
    self.qkv = nnx.Linear(hidden_size, 3 * hidden_size, kernel_init=DENSE_INIT, kernel_metadata=group(KERNEL),
                          dot_general=backend_dot_general, dtype=dtype, rngs=rngs)
    self.proj = nnx.Linear(hidden_size, hidden_size, kernel_init=DENSE_INIT, kernel_metadata=group(KERNEL),
                           dot_general=backend_dot_general, dtype=dtype, rngs=rngs)
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
      heads = backend_attention(query, key, value)
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
