"""Tests of hybridvit_jax.data.recipes: RandAugment and its operations, Mixup/CutMix, random
erasing, cutout. Each transform runs under jax.jit on hand-made images whose expected output is known."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageOps

from hybridvit_jax.data import recipes


def random_uint8_images(seed: int, shape: tuple[int, ...]) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def flat_histogram_image(seed: int) -> np.ndarray:
  """uint8 [32, 32, 3]: every channel holds each value 0..255 exactly 4 times, shuffled, so
  auto_contrast and equalize leave it unchanged."""
  rng = np.random.default_rng(seed)
  channels = [rng.permutation(np.arange(1024) % 256) for _ in range(3)]
  return np.stack(channels, axis=-1).reshape(32, 32, 3).astype(np.uint8)


def box_of(mask: np.ndarray) -> tuple[int, int, int, int]:
  """(top, left, height, width) of a bool [H, W] mask that must be one filled rectangle."""
  rows, cols = np.nonzero(mask)
  top, left = rows.min(), cols.min()
  height, width = rows.max() - top + 1, cols.max() - left + 1
  assert mask.sum() == height * width, 'the mask is not a filled rectangle'
  return top, left, height, width


# RandAugment operations, one by one.

def test_identity_returns_the_image():
  image = random_uint8_images(0, (8, 8, 3))
  np.testing.assert_array_equal(recipes.identity(jnp.asarray(image)), image)


def test_rotate_by_90_turns_the_content_counter_clockwise():
  image = random_uint8_images(1, (6, 6, 3))
  image[0, 5] = (255, 0, 0)  # top-right corner: a quarter turn counter-clockwise takes it top-left.
  rotated = np.asarray(recipes.rotate(jnp.asarray(image), 90.0))
  np.testing.assert_array_equal(rotated, np.rot90(image))
  np.testing.assert_array_equal(rotated[0, 0], (255, 0, 0))


def test_rotate_by_45_fills_the_corners_with_gray():
  rotated = np.asarray(recipes.rotate(jnp.zeros((16, 16, 3), jnp.uint8), 45.0))
  assert (rotated[0, 0] == recipes.FILL_VALUE).all() and (rotated[8, 8] == 0).all()


@pytest.mark.parametrize('pixels', [3, -3])
def test_translate_x_shifts_columns_and_fills_with_gray(pixels):
  image = random_uint8_images(2, (5, 8, 3))
  shifted = np.asarray(recipes.translate_x(jnp.asarray(image), pixels))
  expected = np.full_like(image, recipes.FILL_VALUE)
  if pixels > 0:
    expected[:, pixels:] = image[:, :-pixels]
  else:
    expected[:, :pixels] = image[:, -pixels:]
  np.testing.assert_array_equal(shifted, expected)


def test_translate_y_shifts_rows_down_and_fills_with_gray():
  image = random_uint8_images(3, (8, 5, 3))
  shifted = np.asarray(recipes.translate_y(jnp.asarray(image), 2))
  np.testing.assert_array_equal(shifted[2:], image[:-2])
  assert (shifted[:2] == recipes.FILL_VALUE).all()


@pytest.mark.parametrize('op_name', ['shear_x', 'shear_y'])
def test_shear_takes_the_nearest_source_pixel_as_pil(op_name):
  image = random_uint8_images(4, (10, 12, 3))
  factor = -0.27  # no source coordinate lands within float error of a half pixel
  sheared = np.asarray(getattr(recipes, op_name)(jnp.asarray(image), factor))
  expected = np.full_like(image, recipes.FILL_VALUE)
  for y in range(10):
    for x in range(12):
      source_x, source_y = (x + factor * y, y) if op_name == 'shear_x' else (x, y + factor * x)
      col, row = int(np.floor(source_x + 0.5)), int(np.floor(source_y + 0.5))
      if 0 <= row < 10 and 0 <= col < 12:
        expected[y, x] = image[row, col]
  np.testing.assert_array_equal(sheared, expected)


def test_solarize_inverts_only_values_at_or_above_the_threshold():
  image = np.array([0, 100, 127, 128, 200, 255], np.uint8).reshape(1, 6, 1)
  solarized = np.asarray(recipes.solarize(jnp.asarray(image), 128))
  np.testing.assert_array_equal(solarized.ravel(), [0, 100, 127, 127, 55, 0])
  np.testing.assert_array_equal(recipes.solarize(jnp.asarray(image), 256), image)


def test_posterize_keeps_the_top_bits():
  image = np.array([0b10110111, 255, 15, 16], np.uint8).reshape(1, 4, 1)
  np.testing.assert_array_equal(
      np.asarray(recipes.posterize(jnp.asarray(image), 4)).ravel(), [0b10110000, 240, 0, 16])
  np.testing.assert_array_equal(recipes.posterize(jnp.asarray(image), 8), image)
  assert not np.asarray(recipes.posterize(jnp.asarray(image), 0)).any()


def test_solarize_posterize_and_equalize_match_pil():
  rng = np.random.default_rng(5)
  image = np.clip(rng.normal(90, 25, (32, 32, 3)), 0, 255).astype(np.uint8)  # a skewed histogram
  pil_image = Image.fromarray(image)
  for ours, theirs in [(recipes.equalize(jnp.asarray(image)), ImageOps.equalize(pil_image)),
                       (recipes.solarize(jnp.asarray(image), 100), ImageOps.solarize(pil_image, 100)),
                       (recipes.posterize(jnp.asarray(image), 3), ImageOps.posterize(pil_image, 3))]:
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_equalize_and_auto_contrast_leave_a_flat_full_range_histogram_alone():
  image = jnp.asarray(flat_histogram_image(6))
  np.testing.assert_array_equal(recipes.equalize(image), image)
  np.testing.assert_array_equal(recipes.auto_contrast(image), image)


def test_auto_contrast_stretches_each_channel_to_full_range():
  image = np.zeros((2, 2, 2), np.uint8)
  image[..., 0] = [[50, 100], [100, 150]]
  image[..., 1] = 77  # a single value: left as it is
  stretched = np.asarray(recipes.auto_contrast(jnp.asarray(image)))
  np.testing.assert_array_equal(stretched[..., 0], [[0, 128], [128, 255]])
  np.testing.assert_array_equal(stretched[..., 1], image[..., 1])


def test_brightness_zero_is_black_one_is_identity_two_doubles_and_clips():
  image = np.array([0, 100, 200], np.uint8).reshape(1, 3, 1)
  assert not np.asarray(recipes.brightness(jnp.asarray(image), 0.0)).any()
  np.testing.assert_array_equal(recipes.brightness(jnp.asarray(image), 1.0), image)
  np.testing.assert_array_equal(np.asarray(recipes.brightness(jnp.asarray(image), 2.0)).ravel(), [0, 200, 255])


def test_color_zero_gives_the_luma_gray():
  red = np.array([255, 0, 0], np.uint8).reshape(1, 1, 3)
  np.testing.assert_array_equal(np.asarray(recipes.color(jnp.asarray(red), 0.0)).ravel(), [76, 76, 76])
  np.testing.assert_array_equal(recipes.color(jnp.asarray(red), 1.0), red)


def test_contrast_zero_gives_the_mean_gray_everywhere():
  image = np.zeros((4, 4, 3), np.uint8)
  image[:2] = 255
  flat = np.asarray(recipes.contrast(jnp.asarray(image), 0.0))
  assert (flat == 128).all()  # mean luma 127.5, rounded half to even
  np.testing.assert_array_equal(recipes.contrast(jnp.asarray(image), 1.0), image)


def test_sharpness_zero_gives_the_smoothed_interior_and_keeps_the_border():
  image = np.zeros((5, 5, 1), np.uint8)
  image[2, 2] = 130
  image[0, 0] = 90  # a border pixel: kept
  smoothed = np.asarray(recipes.sharpness(jnp.asarray(image), 0.0))[..., 0]
  expected = np.zeros((5, 5), np.uint8)
  expected[1:4, 1:4] = 10  # 130 / 13
  expected[2, 2] = 50  # 5 * 130 / 13
  expected[0, 0] = 90
  expected[1, 1] = 10 + 7  # (130 + 90) / 13 rounded
  np.testing.assert_array_equal(smoothed, expected)
  np.testing.assert_array_equal(recipes.sharpness(jnp.asarray(image), 1.0), image)


# RandAugment on batches.

def jitted_rand_augment(**options):
  return jax.jit(functools.partial(recipes.rand_augment, **options))


def test_rand_augment_is_deterministic_for_a_key_and_keeps_uint8_and_shape():
  images = jnp.asarray(random_uint8_images(7, (8, 32, 32, 3)))
  augment = jitted_rand_augment(num_ops=2, magnitude=9.0)
  first = augment(jax.random.key(0), images)
  assert first.dtype == jnp.uint8 and first.shape == images.shape
  np.testing.assert_array_equal(first, augment(jax.random.key(0), images))
  assert not np.array_equal(first, augment(jax.random.key(1), images))


def test_rand_augment_at_magnitude_zero_leaves_a_flat_histogram_image_unchanged():
  images = jnp.asarray(np.stack([flat_histogram_image(seed) for seed in range(16)]))
  augmented = jitted_rand_augment(num_ops=3, magnitude=0.0)(jax.random.key(2), images)
  np.testing.assert_array_equal(augmented, images)


def test_rand_augment_applies_one_listed_op_per_example_and_varies_it_across_the_batch():
  image = random_uint8_images(8, (16, 16, 3))
  batch = jnp.asarray(np.repeat(image[None], 48, axis=0))
  augmented = np.asarray(jitted_rand_augment(num_ops=1, magnitude=9.0)(jax.random.key(3), batch))
  candidates = {name: [np.asarray(op(jnp.asarray(image), jnp.float32(sign * 0.9))) for sign in (1, -1)]
                for name, op in recipes.RAND_AUGMENT_OPS.items()}
  ops_seen = set()
  for example in augmented:
    matches = {name for name, outputs in candidates.items() if any(np.array_equal(example, o) for o in outputs)}
    assert matches, 'an example is not the result of any single operation at magnitude 9'
    ops_seen.add(min(matches))
  assert len(ops_seen) >= 8


def test_rand_augment_draws_only_from_op_names():
  images = jnp.asarray(random_uint8_images(9, (8, 8, 8, 3)))
  solarized = jitted_rand_augment(num_ops=1, magnitude=10.0, op_names=('solarize',))(jax.random.key(4), images)
  np.testing.assert_array_equal(solarized, 255 - np.asarray(images))


def test_rand_augment_rejects_unknown_op_names_and_out_of_range_magnitude():
  images = jnp.zeros((2, 8, 8, 3), jnp.uint8)
  with pytest.raises(ValueError, match='op_names'):
    recipes.rand_augment(jax.random.key(0), images, num_ops=1, magnitude=5.0, op_names=('blur',))
  with pytest.raises(ValueError, match='magnitude'):
    recipes.rand_augment(jax.random.key(0), images, num_ops=1, magnitude=11.0)


# Mixup and CutMix.

BATCH = 8


def constant_images_and_one_hot_targets() -> tuple[jax.Array, jax.Array]:
  """Example b: every pixel b + 1, target one-hot class b, of BATCH classes."""
  values = jnp.arange(1, BATCH + 1, dtype=jnp.float32)
  images = jnp.broadcast_to(values[:, None, None, None], (BATCH, 16, 16, 3))
  return images, jax.nn.one_hot(jnp.arange(BATCH), BATCH)


def jitted_mixup_cutmix(**options):
  return jax.jit(functools.partial(recipes.mixup_cutmix, **options))


def test_mixup_mixes_images_and_targets_with_the_same_lambda_and_the_reversed_batch():
  images, targets = constant_images_and_one_hot_targets()
  mixed_images, mixed_targets = jitted_mixup_cutmix(mixup_alpha=0.8, cutmix_alpha=0.0)(
      jax.random.key(5), images, targets)
  lam = float(mixed_targets[0, 0])
  assert 0.0 < lam < 1.0
  np.testing.assert_allclose(mixed_targets.sum(axis=1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(mixed_targets, lam * targets + (1 - lam) * targets[::-1], rtol=1e-6)
  np.testing.assert_allclose(mixed_images, lam * images + (1 - lam) * images[::-1], rtol=1e-6)


@pytest.mark.parametrize('seed', range(6))
def test_cutmix_pastes_one_box_from_the_partner_and_weights_targets_by_its_area(seed):
  images, targets = constant_images_and_one_hot_targets()
  mixed_images, mixed_targets = jitted_mixup_cutmix(mixup_alpha=0.0, cutmix_alpha=1.0)(
      jax.random.key(seed), images, targets)
  np.testing.assert_allclose(mixed_targets.sum(axis=1), 1.0, rtol=1e-6)
  partner_masks = []
  for b in range(BATCH):
    partner = BATCH - 1 - b
    own_pixels = np.asarray(mixed_images[b]) == b + 1
    partner_pixels = np.asarray(mixed_images[b]) == partner + 1
    assert (own_pixels | partner_pixels).all()
    partner_masks.append(partner_pixels[..., 0])
    np.testing.assert_allclose(mixed_targets[b, partner], partner_pixels.mean(), atol=1e-6)
    np.testing.assert_allclose(mixed_targets[b, b], own_pixels.mean(), atol=1e-6)
  first = BATCH // 2 - 1  # an example whose partner differs from itself
  np.testing.assert_array_equal(partner_masks[first], partner_masks[0])
  if partner_masks[0].any():
    box_of(partner_masks[0])


def test_mixup_cutmix_with_both_enabled_applies_either_method_to_the_whole_batch():
  images, targets = constant_images_and_one_hot_targets()
  both = jitted_mixup_cutmix(mixup_alpha=0.8, cutmix_alpha=1.0)
  alone = {'mixup': jitted_mixup_cutmix(mixup_alpha=0.8, cutmix_alpha=0.0),
           'cutmix': jitted_mixup_cutmix(mixup_alpha=0.0, cutmix_alpha=1.0)}
  methods_used = []
  for seed in range(8):
    key = jax.random.key(seed)
    mixed = both(key, images, targets)
    matches = [name for name, method in alone.items()
               if all(np.allclose(x, y, atol=1e-6) for x, y in zip(mixed, method(key, images, targets)))]
    assert len(matches) == 1
    methods_used.append(matches[0])
  assert set(methods_used) == {'mixup', 'cutmix'}


def test_mixup_cutmix_with_both_alphas_zero_returns_the_inputs():
  images, targets = constant_images_and_one_hot_targets()
  out_images, out_targets = jitted_mixup_cutmix(mixup_alpha=0.0, cutmix_alpha=0.0)(
      jax.random.key(7), images, targets)
  np.testing.assert_array_equal(out_images, images)
  np.testing.assert_array_equal(out_targets, targets)


# Random erasing and cutout.

ERASING_VALUE = 7.0  # the images' constant value; the erasing noise never equals it exactly


def constant_float_images(batch_size: int) -> jax.Array:
  return jnp.full((batch_size, 32, 32, 3), ERASING_VALUE, jnp.float32)


# probability is traced: one compilation serves every probability.
jitted_random_erasing = jax.jit(recipes.random_erasing, static_argnames=('min_area', 'max_area', 'min_aspect'))


def test_random_erasing_with_probability_zero_is_identity():
  images = constant_float_images(32)
  np.testing.assert_array_equal(jitted_random_erasing(jax.random.key(8), images, probability=0.0), images)


@pytest.mark.parametrize('min_area,max_area', [(0.02, 1 / 3), (0.1, 0.2)])
def test_random_erasing_with_probability_one_puts_noise_in_one_box_per_image(min_area, max_area):
  images = constant_float_images(32)
  erased = np.asarray(jitted_random_erasing(
      jax.random.key(9), images, probability=1.0, min_area=min_area, max_area=max_area))
  changed = erased != ERASING_VALUE
  noise = erased[changed]
  for example_changed in changed:
    assert (example_changed == example_changed[..., :1]).all(), 'every channel of a pixel is erased'
    _, _, height, width = box_of(example_changed[..., 0])
    assert min_area <= height * width / (32 * 32) <= max_area
  assert abs(noise.mean()) < 0.1 and 0.9 < noise.std() < 1.1


def test_cutout_zeroes_one_square_of_at_most_size_and_leaves_the_rest():
  images = constant_float_images(32)
  cut = np.asarray(jax.jit(functools.partial(recipes.cutout, size=8))(jax.random.key(10), images))
  zeroed = cut == 0.0
  assert (cut[~zeroed] == ERASING_VALUE).all()
  sides = []
  for example_zeroed in zeroed:
    assert (example_zeroed == example_zeroed[..., :1]).all()
    _, _, height, width = box_of(example_zeroed[..., 0])
    assert height <= 8 and width <= 8
    sides.append((height, width))
  assert (8, 8) in sides and any(side < (8, 8) for side in sides)  # whole squares, and some clipped

