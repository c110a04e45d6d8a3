"""Batch augmentation and normalisation in pure JAX, for use inside a jitted step.

Every function is deterministic for a given key and works on whole batches of
images laid out [batch, height, width, channels].
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

# What the padding of random crops and test-time shifts holds: zeros, or the image mirrored at its
# edges (airbench's).
PADDING_MODES = ('constant', 'reflect')


def normalize(
    images: jax.Array, mean: Sequence[float], std: Sequence[float]
) -> jax.Array:
  """Scales pixel values to [0, 1], then standardises each channel.

  Args:
    images: uint8 [B, H, W, C], pixel values 0..255.
    mean: C per-channel means, in [0, 1] units.
    std: C per-channel standard deviations, in [0, 1] units.

  Returns:
    float32 [B, H, W, C]: (images / 255 - mean) / std.
  """
  scaled = images.astype(jnp.float32) / 255.0
  return (scaled - jnp.asarray(mean, jnp.float32)) / jnp.asarray(
      std, jnp.float32
  )


def augment(
    key: jax.Array, images: jax.Array, *, crop_padding: int, flip: bool,
    padding_mode: str = 'constant',
) -> jax.Array:
  """Random crop after padding, then random horizontal flip, per example.

  Args:
    key: PRNG key; the same key gives the same output.
    images: [B, H, W, C], any dtype.
    crop_padding: pixels added on each side before cropping back to H x W at
      a uniformly random offset; 0 disables cropping. Static.
    flip: whether to mirror each example's width axis with probability 0.5.
      Static.
    padding_mode: what the padding holds (`PADDING_MODES`). Static.

  Returns:
    [B, H, W, C], same dtype as `images`.
  """
  crop_key, flip_key = jax.random.split(key)
  if crop_padding > 0:
    images = random_crop(crop_key, images, crop_padding, padding_mode)
  if flip:
    images = random_flip(flip_key, images)
  return images


def random_crop(key: jax.Array, images: jax.Array, padding: int,
                padding_mode: str = 'constant') -> jax.Array:
  """Crops each example at its own random offset from its padded copy.

  Args:
    key: PRNG key.
    images: [B, H, W, C].
    padding: pixels added on each side of height and width.
    padding_mode: 'constant' pads with zeros, 'reflect' mirrors the image at
      its edges (the edge pixel not repeated). Static.

  Returns:
    [B, H, W, C], same dtype; example b equals
    padded[b, dy:dy + H, dx:dx + W] for random dy, dx in [0, 2 * padding].
  """
  batch_size, height, width, channels = images.shape
  padded = jnp.pad(
      images, ((0, 0), (padding, padding), (padding, padding), (0, 0)),
      mode=padding_mode,
  )
  offsets = jax.random.randint(key, (batch_size, 2), 0, 2 * padding + 1)

  def crop_one(image: jax.Array, offset: jax.Array) -> jax.Array:
    return jax.lax.dynamic_slice(
        image, (offset[0], offset[1], 0), (height, width, channels)
    )

  return jax.vmap(crop_one)(padded, offsets)


def random_flip(key: jax.Array, images: jax.Array) -> jax.Array:
  """Mirrors the width axis of each example with probability 0.5.

  Args:
    key: PRNG key.
    images: [B, H, W, C].

  Returns:
    [B, H, W, C], same dtype.
  """
  return flip_where(jax.random.bernoulli(key, 0.5, (images.shape[0],)), images)


def flip_where(flips: jax.Array, images: jax.Array) -> jax.Array:
  """Mirrors the width axis of the examples where flips bool [B] is True: [B, H, W, C] -> same."""
  return jnp.where(flips[:, None, None, None], images[:, :, ::-1, :], images)


def alternating_flips(key: jax.Array, example_indices: jax.Array, epoch: jax.Array) -> jax.Array:
  """Which examples to mirror in `epoch` so that each is mirrored in every other epoch.

  In epoch 0 each example is mirrored with probability 1/2, drawn from `key` and its index
  alone; in every odd epoch the others are, in every even epoch the same ones again
  (airbench's alternating flip: over any two epochs each example is seen both ways).

  Args:
    key: PRNG key shared by all steps of the run.
    example_indices: int [B], the examples' rows in the training split.
    epoch: int scalar, the epoch the batch belongs to.

  Returns:
    bool [B].
  """
  first_epoch = jax.vmap(lambda index: jax.random.bernoulli(jax.random.fold_in(key, index)))(example_indices)
  return first_epoch ^ (epoch % 2 == 1)


def translate(images: jax.Array, dy: int, dx: int, padding_mode: str = 'constant') -> jax.Array:
  """Shifts every image down by dy and right by dx pixels (negative: up, left), filling the
  uncovered rows and columns as `random_crop` pads, so a shifted view is one of its crops.

  Args:
    images: [B, H, W, C].
    dy, dx: static shifts, |dy| < H and |dx| < W.
    padding_mode: 'constant' fills with zeros, 'reflect' with the image mirrored at its edge.

  Returns:
    [B, H, W, C], same dtype; out[b, y, x] = images[b, y - dy, x - dx] where that is inside the
    image, else the fill.
  """
  _, height, width, _ = images.shape
  padded = jnp.pad(images, ((0, 0), (abs(dy), abs(dy)), (abs(dx), abs(dx)), (0, 0)), mode=padding_mode)
  top, left = abs(dy) - dy, abs(dx) - dx
  return padded[:, top:top + height, left:left + width]


def test_time_views(
    images: jax.Array, *, flip: bool, translate_pixels: int,
    padding_mode: str = 'constant',
) -> tuple[jax.Array, jax.Array]:
  """The views whose logits test-time augmentation averages, stacked on a new leading axis.

  Args:
    images: [B, H, W, C].
    flip: add the mirror image of every view.
    translate_pixels: n > 0 adds the image shifted n pixels up-left and n pixels down-right
      (filled as `padding_mode` says), weighted 1/4 each against 1/2 for the unshifted image;
      0 = no shifts.
    padding_mode: the shifts' fill (`translate`).

  Returns:
    views [V, B, H, W, C] and their weights float32 [V], which sum to 1.
  """
  views, weights = [images], [1.0]
  if translate_pixels:
    n = translate_pixels
    views += [translate(images, -n, -n, padding_mode), translate(images, n, n, padding_mode)]
    weights = [0.5, 0.25, 0.25]
  if flip:
    views += [view[:, :, ::-1] for view in views]
    weights = [w / 2 for w in weights] * 2
  return jnp.stack(views), jnp.asarray(weights, jnp.float32)
