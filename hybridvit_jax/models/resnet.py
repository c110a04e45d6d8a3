"""ResNet v1.5 with bottleneck blocks (ResNet50 with stage sizes (3, 4, 6, 3)), laid out as in timm."""

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from hybridvit_jax.models import checks, layers

# 'cifar' for small images; 'imagenet' (7x7 stride 2 + max-pool) for ImageNet-sized ones.
STEMS = ('cifar', 'imagenet')
EXPANSION = 4  # a bottleneck block outputs EXPANSION times its inner width


class BottleneckBlock(nnx.Module):
  """relu(x' + shortcut(x)) with x' = BN(1x1 conv) -> ReLU -> BN(3x3 conv, stride) -> ReLU -> BN(1x1 conv, x4).

  The last BatchNorm's scale starts at zero, so every block starts as its shortcut. The shortcut is the identity,
  or a strided 1x1 conv + BatchNorm where the stride or the channel count changes.
  """

  def __init__(self, in_channels: int, width: int, *, stride: int, dtype: jnp.dtype, rngs: nnx.Rngs):
    """Args:
      in_channels: channels of the input feature map.
      width: inner width; the block outputs EXPANSION * width channels.
      stride: spatial stride of the 3x3 conv (and of the projection shortcut).
      dtype: compute dtype.
      rngs: parameter initialisation randomness.
    """
    out_channels = EXPANSION * width
    self.reduce = layers.ConvBatchNorm(in_channels, width, 1, padding=0, dtype=dtype, rngs=rngs)
    self.spatial = layers.ConvBatchNorm(width, width, 3, stride=stride, padding=1, dtype=dtype, rngs=rngs)
    self.expand = layers.ConvBatchNorm(
        width, out_channels, 1, padding=0, zero_init_scale=True, dtype=dtype, rngs=rngs)
    self.projection = (
        layers.ConvBatchNorm(in_channels, out_channels, 1, stride=stride, padding=0, dtype=dtype, rngs=rngs)
        if stride != 1 or in_channels != out_channels else None)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """[B,H,W,in_channels] -> [B,H/stride,W/stride,EXPANSION*width] (sizes rounded up)."""
    residual = nnx.relu(self.reduce(x, train=train))
    residual = nnx.relu(self.spatial(residual, train=train))
    residual = self.expand(residual, train=train)
    shortcut = self.projection(x, train=train) if self.projection is not None else x
    return nnx.relu(residual + shortcut)


class ResNet(nnx.Module):
  """Bottleneck ResNet classifier: stem -> stages of blocks -> global average pool -> Linear head.

  Stage i has inner width `width * 2**i`; every stage but the first halves the resolution in its first block.
  """

  def __init__(
      self,
      *,
      image_shape: tuple[int, int, int],
      num_classes: int,
      stage_sizes: tuple[int, ...],
      width: int,
      stem: str,
      dtype: jnp.dtype,
      rngs: nnx.Rngs,
  ):
    """Args:
      image_shape: (H, W, C) of the input images.
      num_classes: number of output logits.
      stage_sizes: number of bottleneck blocks in each stage; (3, 4, 6, 3) is ResNet50.
      width: inner width of the first stage's blocks (64 for ResNet50).
      stem: 'cifar' (3x3 conv, stride 1) or 'imagenet' (7x7 conv, stride 2, then a 3x3 stride-2 max-pool).
      dtype: compute dtype; parameters are float32 and logits are returned as float32.
      rngs: parameter initialisation randomness.
    """
    self.dtype = dtype
    self.stem_max_pool = stem == 'imagenet'
    stem_kernel, stem_stride = (7, 2) if stem == 'imagenet' else (3, 1)
    self.stem = layers.ConvBatchNorm(
        image_shape[-1], width, stem_kernel, stride=stem_stride, padding=stem_kernel // 2, dtype=dtype, rngs=rngs)
    blocks = []
    in_channels = width
    for stage, num_blocks in enumerate(stage_sizes):
      for index in range(num_blocks):
        stride = 2 if stage > 0 and index == 0 else 1
        blocks.append(BottleneckBlock(in_channels, width * 2**stage, stride=stride, dtype=dtype, rngs=rngs))
        in_channels = EXPANSION * width * 2**stage
    self.blocks = nnx.List(blocks)
    self.head = nnx.Linear(in_channels, num_classes, kernel_metadata=layers.group(layers.HEAD_KERNEL), dtype=dtype,
                           rngs=rngs)

  def __call__(self, images: jax.Array, *, train: bool, rngs: nnx.Rngs | None = None) -> jax.Array:
    """Classifies normalised float images [B,H,W,C] into float32 logits [B,num_classes].

    Args:
      images: [B,H,W,C] with H, W, C as in the constructor's image_shape.
      train: normalise with (and update) batch statistics instead of the running averages.
      rngs: unused (the ResNet has no dropout); accepted so that every model is called the same way.
    """
    x = nnx.relu(self.stem(images.astype(self.dtype), train=train))
    if self.stem_max_pool:
      x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for block in self.blocks:
      x = block(x, train=train)
    return self.head(x.mean(axis=(1, 2))).astype(jnp.float32)


# ------------------------------------------------------------------------------ config
def config_groups() -> dict[str, ml_collections.ConfigDict]:
  """The config group a ResNet reads, `resnet`, with its defaults (ResNet50, CIFAR stem)."""
  return {'resnet': ml_collections.ConfigDict(dict(
      stage_sizes=(3, 4, 6, 3),  # bottleneck blocks per stage
      width=64,  # the first stage's inner width
      stem='cifar',  # 'cifar' (3x3 conv, stride 1) | 'imagenet' (7x7 conv, stride 2 + max-pool)
  ))}


def build(model_config: ml_collections.ConfigDict, *, num_classes: int, image_shape: tuple[int, int, int],
          dtype: jnp.dtype, rngs: nnx.Rngs) -> ResNet:
  """A bottleneck ResNet from the `resnet` group of a model config."""
  resnet = model_config.resnet
  return ResNet(image_shape=image_shape, num_classes=num_classes, stage_sizes=tuple(resnet.stage_sizes),
                width=resnet.width, stem=resnet.stem, dtype=dtype, rngs=rngs)


def validate(model_config: ml_collections.ConfigDict, image_shape: tuple[int, int, int]) -> None:
  """Raises ValueError naming the first `model.resnet.*` key that cannot build a ResNet."""
  del image_shape  # any size: the network ends in a global average pool
  resnet = model_config.resnet
  checks.choice(resnet.stem, 'model.resnet.stem', STEMS)
  checks.positive(resnet.width, 'model.resnet.width')
  checks.positive_sequence(resnet.stage_sizes, 'model.resnet.stage_sizes')
