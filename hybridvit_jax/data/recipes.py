"""Training-recipe augmentations in pure JAX: RandAugment, Mixup/CutMix, erasing.

Every function is jit-able, deterministic for a given key, and works on whole
batches laid out [batch, height, width, channels] without a Python loop over
the batch. RandAugment works on uint8 pixels (before `normalize`); Mixup/CutMix,
random erasing and cutout work on float images (after `normalize`).

The single-image RandAugment operations (`rotate`, `solarize`, ...) are public
so that each can be used and tested on its own; they take uint8 [H, W, C] and
return uint8 [H, W, C], following the PIL / torchvision conventions.
"""

from collections.abc import Sequence
import math

import jax
import jax.numpy as jnp

FILL_VALUE = 128
"""Pixel value that geometric operations put where no source pixel lands."""

MAX_ROTATE_DEGREES = 30.0
MAX_SHEAR = 0.3
MAX_TRANSLATE_FRACTION = 0.45
"""Largest translation as a fraction of the image side (timm, torchvision)."""
MAX_ENHANCE_DELTA = 0.9
"""Enhancement factors (color, contrast, brightness, sharpness) are 1 +- this."""
MAX_POSTERIZE_BITS_REMOVED = 4
MAX_MAGNITUDE = 10.0

ERASE_ATTEMPTS = 10
"""Candidate rectangles drawn per example by `random_erasing` (as timm)."""


# Single-image operations: uint8 [H, W, C] -> uint8 [H, W, C].


def identity(image: jax.Array) -> jax.Array:
  """Returns the image unchanged."""
  return image


def auto_contrast(image: jax.Array) -> jax.Array:
  """Stretches each channel linearly so its darkest pixel is 0, brightest 255.

  Channels with a single value are left unchanged. Values are rounded.
  """
  pixels = image.astype(jnp.float32)
  low = pixels.min(axis=(0, 1))
  high = pixels.max(axis=(0, 1))
  spread = high - low
  scale = 255.0 / jnp.where(spread > 0, spread, 1.0)
  stretched = jnp.where(spread > 0, (pixels - low) * scale, pixels)
  return _to_uint8(stretched)


def equalize(image: jax.Array) -> jax.Array:
  """Histogram-equalises each channel, as PIL's ImageOps.equalize.

  One 256-bin histogram per channel, by a scatter-add over the flattened
  (channel, value) bins: the costliest RandAugment operation on CPU.
  """
  height, width, channels = image.shape
  values = image.reshape(height * width, channels).astype(jnp.int32)
  channel_ids = jnp.arange(channels)
  bins = (channel_ids * 256 + values).reshape(-1)
  histograms = (
      jnp.zeros(channels * 256, jnp.int32).at[bins].add(1).reshape(channels, 256)
  )
  count_of_brightest = histograms[channel_ids, values.max(axis=0)]
  step = (height * width - count_of_brightest) // 255
  count_below = jnp.cumsum(histograms, axis=1) - histograms
  lookup = jnp.minimum(
      (step[:, None] // 2 + count_below) // jnp.maximum(step, 1)[:, None], 255
  )
  equalized = jnp.where(step > 0, lookup[channel_ids, values], values)
  return equalized.reshape(image.shape).astype(jnp.uint8)


def solarize(image: jax.Array, threshold: jax.Array | float) -> jax.Array:
  """Inverts (255 - v) every pixel value v >= threshold; 256 changes nothing."""
  values = image.astype(jnp.int32)
  return jnp.where(values >= threshold, 255 - values, values).astype(jnp.uint8)


def posterize(image: jax.Array, bits: jax.Array | int) -> jax.Array:
  """Keeps the `bits` most significant bits (0..8) of each value, zeroes the rest."""
  mask = (255 << (8 - jnp.asarray(bits, jnp.int32))) & 255
  return image & mask.astype(jnp.uint8)


def color(image: jax.Array, factor: jax.Array | float) -> jax.Array:
  """Saturation: 0 gives the grayscale image, 1 the image, >1 more saturated."""
  gray = _grayscale(image.astype(jnp.float32))
  return _blend(jnp.broadcast_to(gray[..., None], image.shape), image, factor)


def contrast(image: jax.Array, factor: jax.Array | float) -> jax.Array:
  """0 gives the mean gray level everywhere, 1 the image, >1 more contrast."""
  mean_gray = _grayscale(image.astype(jnp.float32)).mean()
  return _blend(jnp.full(image.shape, mean_gray), image, factor)


def brightness(image: jax.Array, factor: jax.Array | float) -> jax.Array:
  """0 gives a black image, 1 the image, >1 brighter (clipped at 255)."""
  return _blend(jnp.zeros(image.shape), image, factor)


def sharpness(image: jax.Array, factor: jax.Array | float) -> jax.Array:
  """0 gives PIL's SMOOTH-filtered image, 1 the image, >1 sharper.

  The smoothing kernel is [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 inside the
  image; the one-pixel border is kept from the image, as PIL and torchvision.
  """
  pixels = image.astype(jnp.float32)
  height, width, _ = image.shape
  padded = jnp.pad(pixels, ((1, 1), (1, 1), (0, 0)))
  neighbourhood_sum = sum(
      padded[1 + dy:1 + dy + height, 1 + dx:1 + dx + width]
      for dy in (-1, 0, 1)
      for dx in (-1, 0, 1)
  )
  smoothed = jnp.round((neighbourhood_sum + 4.0 * pixels) / 13.0)
  rows = jnp.arange(height)[:, None, None]
  cols = jnp.arange(width)[None, :, None]
  interior = (rows > 0) & (rows < height - 1) & (cols > 0) & (cols < width - 1)
  return _blend(jnp.where(interior, smoothed, pixels), image, factor)


def rotate(image: jax.Array, degrees: jax.Array | float) -> jax.Array:
  """Rotates the content counter-clockwise about the image centre (as PIL).

  Nearest-neighbour sampling; corners with no source pixel get FILL_VALUE.
  """
  height, width, _ = image.shape
  centre_x, centre_y = (width - 1) / 2.0, (height - 1) / 2.0
  radians = jnp.deg2rad(degrees)
  cos, sin = jnp.cos(radians), jnp.sin(radians)
  source_from_output = jnp.array([
      [cos, -sin, centre_x - cos * centre_x + sin * centre_y],
      [sin, cos, centre_y - sin * centre_x - cos * centre_y],
  ])
  return affine(image, source_from_output)


def shear_x(image: jax.Array, factor: jax.Array | float) -> jax.Array:
  """Output pixel (x, y) takes source pixel (x + factor * y, y), as PIL."""
  return affine(image, jnp.array([[1.0, factor, 0.0], [0.0, 1.0, 0.0]]))


def shear_y(image: jax.Array, factor: jax.Array | float) -> jax.Array:
  """Output pixel (x, y) takes source pixel (x, y + factor * x), as PIL."""
  return affine(image, jnp.array([[1.0, 0.0, 0.0], [factor, 1.0, 0.0]]))


def translate_x(image: jax.Array, pixels: jax.Array | float) -> jax.Array:
  """Moves the content right by `pixels` (left if negative), filling behind."""
  return affine(image, jnp.array([[1.0, 0.0, -pixels], [0.0, 1.0, 0.0]]))


def translate_y(image: jax.Array, pixels: jax.Array | float) -> jax.Array:
  """Moves the content down by `pixels` (up if negative), filling behind."""
  return affine(image, jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, -pixels]]))


def affine(image: jax.Array, source_from_output: jax.Array) -> jax.Array:
  """Resamples an image through an affine map, nearest neighbour.

  Args:
    image: [H, W, C].
    source_from_output: float [2, 3]; output pixel (x, y) (column, row) takes
      the source pixel nearest to source_from_output @ (x, y, 1).

  Returns:
    [H, W, C], same dtype; FILL_VALUE where the source lies outside the image.
  """
  height, width, _ = image.shape
  rows, cols = jnp.meshgrid(
      jnp.arange(height, dtype=jnp.float32),
      jnp.arange(width, dtype=jnp.float32),
      indexing='ij',
  )
  output_coords = jnp.stack([cols, rows, jnp.ones_like(rows)])
  source_x, source_y = jnp.einsum('ij,jhw->ihw', source_from_output, output_coords)
  source_cols = jnp.floor(source_x + 0.5).astype(jnp.int32)
  source_rows = jnp.floor(source_y + 0.5).astype(jnp.int32)
  inside = (
      (source_rows >= 0) & (source_rows < height)
      & (source_cols >= 0) & (source_cols < width)
  )
  sampled = image[
      jnp.clip(source_rows, 0, height - 1), jnp.clip(source_cols, 0, width - 1)
  ]
  return jnp.where(inside[..., None], sampled, jnp.asarray(FILL_VALUE, image.dtype))


def _grayscale(pixels: jax.Array) -> jax.Array:
  """float [H, W, C] -> float [H, W]: ITU-R 601 luma for RGB, else channel mean."""
  if pixels.shape[-1] == 3:
    return pixels @ jnp.array([0.299, 0.587, 0.114], jnp.float32)
  return pixels.mean(axis=-1)


def _blend(
    degenerate: jax.Array, image: jax.Array, factor: jax.Array | float
) -> jax.Array:
  """PIL ImageEnhance: degenerate + factor * (image - degenerate), as uint8."""
  return _to_uint8(degenerate + factor * (image.astype(jnp.float32) - degenerate))


def _to_uint8(pixels: jax.Array) -> jax.Array:
  return jnp.clip(jnp.round(pixels), 0, 255).astype(jnp.uint8)


# RandAugment: each operation as a function of (image, level), where level is
# magnitude / MAX_MAGNITUDE with a random sign, in [-1, 1]. Operations without
# a direction use |level|; those without a strength ignore it.


def _enhance_factor(level: jax.Array) -> jax.Array:
  return 1.0 + MAX_ENHANCE_DELTA * level


RAND_AUGMENT_OPS = {
    'identity': lambda image, level: image,
    'auto_contrast': lambda image, level: auto_contrast(image),
    'equalize': lambda image, level: equalize(image),
    'rotate': lambda image, level: rotate(image, MAX_ROTATE_DEGREES * level),
    'solarize': lambda image, level: solarize(
        image, 256.0 * (1.0 - jnp.abs(level))
    ),
    'color': lambda image, level: color(image, _enhance_factor(level)),
    'posterize': lambda image, level: posterize(
        image, 8 - jnp.round(MAX_POSTERIZE_BITS_REMOVED * jnp.abs(level))
    ),
    'contrast': lambda image, level: contrast(image, _enhance_factor(level)),
    'brightness': lambda image, level: brightness(image, _enhance_factor(level)),
    'sharpness': lambda image, level: sharpness(image, _enhance_factor(level)),
    'shear_x': lambda image, level: shear_x(image, MAX_SHEAR * level),
    'shear_y': lambda image, level: shear_y(image, MAX_SHEAR * level),
    'translate_x': lambda image, level: translate_x(
        image, jnp.round(MAX_TRANSLATE_FRACTION * image.shape[1] * level)
    ),
    'translate_y': lambda image, level: translate_y(
        image, jnp.round(MAX_TRANSLATE_FRACTION * image.shape[0] * level)
    ),
}
"""Operation name -> fn(image uint8 [H, W, C], level float) -> uint8 [H, W, C]."""

def rand_augment(
    key: jax.Array,
    images: jax.Array,
    *,
    num_ops: int,
    magnitude: float,
    op_names: Sequence[str] = tuple(RAND_AUGMENT_OPS),
) -> jax.Array:
  """RandAugment (Cubuk et al. 2019): random operations per example.

  Each example gets `num_ops` operations drawn uniformly, with replacement,
  from `op_names`, applied one after the other, all at `magnitude`, with an
  independent random sign for the operations that have a direction or an
  enhancement factor. Every drawn operation is applied (as the paper and
  torchvision; timm applies each with probability 0.5). At magnitude 10:
  rotate up to 30 degrees, shear 0.3, translate 0.45 of the side, solarize
  everything, posterize to 4 bits, color/contrast/brightness/sharpness factor
  1 +- 0.9. At magnitude 0 every operation but auto_contrast and equalize is
  the identity.

  Cost: under vmap, lax.switch on a per-example index evaluates every listed
  operation for every example and selects, so each of the `num_ops` rounds
  costs all of them; equalize (a scatter-add histogram) costs about as much
  as all the others together on CPU, and can be left out of `op_names`.

  Args:
    key: PRNG key; the same key gives the same output.
    images: uint8 [B, H, W, C].
    num_ops: operations per example (timm / torchvision default 2). Static.
    magnitude: strength on the 0..10 scale (9 is common). Static.
    op_names: keys of RAND_AUGMENT_OPS to draw from; all 14 by default.
      Static.

  Returns:
    uint8 [B, H, W, C].
  """
  if num_ops < 0:
    raise ValueError(f'num_ops must be >= 0, got {num_ops}')
  if not 0.0 <= magnitude <= MAX_MAGNITUDE:
    raise ValueError(
        f'magnitude must be in [0, {MAX_MAGNITUDE}], got {magnitude}'
    )
  unknown = sorted(set(op_names) - set(RAND_AUGMENT_OPS))
  if unknown or not op_names:
    raise ValueError(
        f'op_names must be a non-empty subset of {list(RAND_AUGMENT_OPS)},'
        f' got {list(op_names)}'
    )
  op_fns = [RAND_AUGMENT_OPS[name] for name in op_names]
  batch_size = images.shape[0]
  op_key, sign_key = jax.random.split(key)
  op_indices = jax.random.randint(
      op_key, (batch_size, num_ops), 0, len(op_fns)
  )
  signs = jnp.where(
      jax.random.bernoulli(sign_key, 0.5, (batch_size, num_ops)), 1.0, -1.0
  )
  levels = signs * (magnitude / MAX_MAGNITUDE)

  def augment_one(image, image_op_indices, image_levels):
    def apply_op(current, op):
      op_index, level = op
      return jax.lax.switch(op_index, op_fns, current, level), None

    return jax.lax.scan(apply_op, image, (image_op_indices, image_levels))[0]

  return jax.vmap(augment_one)(images, op_indices, levels)


def mixup_cutmix(
    key: jax.Array,
    images: jax.Array,
    targets: jax.Array,
    *,
    mixup_alpha: float,
    cutmix_alpha: float,
    switch_prob: float = 0.5,
) -> tuple[jax.Array, jax.Array]:
  """Mixup or CutMix of each example with the batch reversed (timm 'batch' mode).

  One lambda per batch, drawn from Beta(alpha, alpha) of the chosen method.
  Mixup: images and targets become lam * own + (1 - lam) * partner. CutMix: a
  box of area ratio about 1 - lam, centred uniformly and clipped at the
  borders, is pasted from the partner; lam is recomputed from the clipped box.
  The partner of example b is example B - 1 - b.

  Args:
    key: PRNG key; the same key gives the same output.
    images: float [B, H, W, C].
    targets: float [B, K], one-hot or soft labels.
    mixup_alpha: Beta parameter for Mixup; 0 disables Mixup. Static.
    cutmix_alpha: Beta parameter for CutMix; 0 disables CutMix. Static.
    switch_prob: probability of CutMix when both are enabled. Static.

  Returns:
    (images float [B, H, W, C], targets float [B, K]); the inputs themselves
    when both alphas are 0.
  """
  use_mixup, use_cutmix = mixup_alpha > 0, cutmix_alpha > 0
  if not (use_mixup or use_cutmix):
    return images, targets
  choice_key, lam_key, box_key = jax.random.split(key, 3)
  if use_mixup and use_cutmix:
    chose_cutmix = jax.random.bernoulli(choice_key, switch_prob)
    alpha = jnp.where(chose_cutmix, cutmix_alpha, mixup_alpha)
    lam = jax.random.beta(lam_key, alpha, alpha)
    return jax.lax.cond(
        chose_cutmix,
        lambda: _cutmix(box_key, images, targets, lam),
        lambda: _mixup(images, targets, lam),
    )
  if use_cutmix:
    lam = jax.random.beta(lam_key, cutmix_alpha, cutmix_alpha)
    return _cutmix(box_key, images, targets, lam)
  lam = jax.random.beta(lam_key, mixup_alpha, mixup_alpha)
  return _mixup(images, targets, lam)


def _mixup(
    images: jax.Array, targets: jax.Array, lam: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Mixup of images and targets with the batch reversed, weight lam on own."""
  return _mix(images, lam), _mix(targets, lam)


def _mix(values: jax.Array, lam: jax.Array) -> jax.Array:
  """lam * values + (1 - lam) * values reversed along the batch axis."""
  lam = lam.astype(values.dtype)
  return lam * values + (1 - lam) * values[::-1]


def _cutmix(
    key: jax.Array, images: jax.Array, targets: jax.Array, lam: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """CutMix with one box for the whole batch, of area ratio about 1 - lam.

  The box is centred on a uniformly random pixel and clipped at the borders;
  the targets are mixed with lam recomputed from the clipped box.
  """
  _, height, width, _ = images.shape
  cut_ratio = jnp.sqrt(1.0 - lam)
  half_height = (cut_ratio * height).astype(jnp.int32) // 2
  half_width = (cut_ratio * width).astype(jnp.int32) // 2
  centre_row, centre_col = jax.random.randint(
      key, (2,), 0, jnp.array([height, width])
  )
  top = jnp.clip(centre_row - half_height, 0, height)
  bottom = jnp.clip(centre_row + half_height, 0, height)
  left = jnp.clip(centre_col - half_width, 0, width)
  right = jnp.clip(centre_col + half_width, 0, width)
  box = _box_mask(top, left, bottom - top, right - left, height, width)
  mixed_images = jnp.where(box[None, :, :, None], images[::-1], images)
  box_lam = 1.0 - (bottom - top) * (right - left) / (height * width)
  return mixed_images, _mix(targets, box_lam)


def random_erasing(
    key: jax.Array,
    images: jax.Array,
    *,
    probability: float,
    min_area: float = 0.02,
    max_area: float = 1 / 3,
    min_aspect: float = 0.3,
) -> jax.Array:
  """Random erasing (Zhong et al. 2017), timm's 'pixel' mode, one box.

  With `probability`, per example, one rectangle is replaced by independent
  standard-normal noise per pixel and channel (the images are normalised, so
  this is noise on the data's scale). As timm, ERASE_ATTEMPTS candidates are
  drawn: area uniform in [min_area, max_area] of the image, log aspect ratio
  (height / width) uniform in [log(min_aspect), log(1 / min_aspect)], sides
  rounded to pixels; the first that fits inside the image with its rounded
  area still within [min_area, max_area] is erased at a uniformly random
  position; if none qualifies, the example is left unchanged.

  Cost: the noise is drawn for the whole batch, B * H * W * C normals, which
  is nearly all of this function's time on CPU; `cutout` is the cheap
  alternative.

  Args:
    key: PRNG key; the same key gives the same output.
    images: float [B, H, W, C], normalised.
    probability: chance that an example is erased. Static or traced.
    min_area, max_area: bounds of the erased fraction of the image area.
    min_aspect: smallest height / width ratio; the largest is its inverse.

  Returns:
    float [B, H, W, C], same dtype.
  """
  batch_size, height, width, _ = images.shape
  shape_key, place_key, noise_key = jax.random.split(key, 3)
  image_area = height * width
  area_draws, aspect_draws = jax.random.uniform(
      shape_key, (2, batch_size, ERASE_ATTEMPTS)
  )
  areas = image_area * (min_area + (max_area - min_area) * area_draws)
  aspects = jnp.exp(-math.log(min_aspect) * (2.0 * aspect_draws - 1.0))
  heights = jnp.round(jnp.sqrt(areas * aspects)).astype(jnp.int32)
  widths = jnp.round(jnp.sqrt(areas / aspects)).astype(jnp.int32)
  rounded_areas = heights * widths
  fits = (
      (heights >= 1) & (heights <= height) & (widths >= 1) & (widths <= width)
      & (rounded_areas >= min_area * image_area)
      & (rounded_areas <= max_area * image_area)
  )
  first_fit = jnp.argmax(fits, axis=1)[:, None]
  box_height = jnp.take_along_axis(heights, first_fit, axis=1)[:, 0]
  box_width = jnp.take_along_axis(widths, first_fit, axis=1)[:, 0]
  apply_draws, top_draws, left_draws = jax.random.uniform(
      place_key, (3, batch_size)
  )
  erased = (apply_draws < probability) & fits.any(axis=1)
  top = jnp.floor(top_draws * (height - box_height + 1)).astype(jnp.int32)
  left = jnp.floor(left_draws * (width - box_width + 1)).astype(jnp.int32)
  box = _box_mask(top, left, box_height, box_width, height, width)
  box &= erased[:, None, None]
  noise = jax.random.normal(noise_key, images.shape, images.dtype)
  return jnp.where(box[..., None], noise, images)


def cutout(key: jax.Array, images: jax.Array, *, size: int) -> jax.Array:
  """Cutout (DeVries & Taylor 2017): zeroes a square per example.

  The size x size square is centred on a uniformly random pixel (its top-left
  corner at centre - size // 2) and clipped at the borders, so near an edge
  it is smaller. On normalised images zero is the data set's mean.

  Args:
    key: PRNG key; the same key gives the same output.
    images: float [B, H, W, C], normalised.
    size: side of the square in pixels. Static.

  Returns:
    [B, H, W, C], same dtype.
  """
  batch_size, height, width, _ = images.shape
  row_key, col_key = jax.random.split(key)
  top = jax.random.randint(row_key, (batch_size,), 0, height) - size // 2
  left = jax.random.randint(col_key, (batch_size,), 0, width) - size // 2
  box = _box_mask(top, left, size, size, height, width)
  return jnp.where(box[..., None], jnp.zeros((), images.dtype), images)


def _box_mask(
    top: jax.Array,
    left: jax.Array,
    box_height: jax.Array | int,
    box_width: jax.Array | int,
    height: int,
    width: int,
) -> jax.Array:
  """bool [..., H, W]: rows [top, top + box_height) x cols [left, left + box_width).

  top, left, box_height and box_width broadcast to one shape [...]; parts of
  the box outside the image are simply not in the mask.
  """
  top, left = jnp.asarray(top), jnp.asarray(left)
  rows = jnp.arange(height)
  cols = jnp.arange(width)
  bottom = top + box_height
  right = left + box_width
  in_rows = (rows >= top[..., None]) & (rows < jnp.asarray(bottom)[..., None])
  in_cols = (cols >= left[..., None]) & (cols < jnp.asarray(right)[..., None])
  return in_rows[..., :, None] & in_cols[..., None, :]
