"""Tests of hybridvit_jax.models: shapes, exact parameter counts, training behaviour and config validation."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from hybridvit_jax import models
from hybridvit_jax.models import layers
from hybridvit_jax.models import vit as vit_lib
from hybridvit_jax.models.vit import drop_path_rates

IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
TINY_VARIANTS = ('vit_test', 'hybrid_test', 'resnet_test')

# On 32x32x3 images with 10 classes; vit_ti4 and resnet50 equal timm's counts.
EXPECTED_PARAMS = {
    'vit_ti4': 5_362_762,
    'resnet50': 23_520_842,
    'vit_test': 21_162,
    'hybrid_test': 21_554,
    'resnet_test': 130_002,
}


def make_config(variant, **overrides):
  """VARIANTS[variant] with overrides by group, e.g. vit=dict(pooling='mean'), stem=dict(stages=())."""
  cfg = models.variant_config(variant)
  cfg.update(overrides)
  return cfg


def build(cfg, image_shape=IMAGE_SHAPE, seed=0):
  return models.create_model(cfg, num_classes=NUM_CLASSES, image_shape=image_shape, rngs=nnx.Rngs(seed))


def abstract_model(cfg, image_shape=IMAGE_SHAPE):
  """The model with shape-only parameters: nothing is initialised or computed."""
  return nnx.eval_shape(lambda: build(cfg, image_shape))


@functools.cache
def abstract_variant(variant):
  return abstract_model(models.variant_config(variant))


def standard_normal(shape, seed=0):
  """A float32 N(0, 1) array drawn with numpy: eager jax ops compile one by one, which is slow."""
  return np.random.default_rng(seed).standard_normal(shape, np.float32)


def random_images(batch, image_shape=IMAGE_SHAPE):
  return standard_normal((batch, *image_shape))


@nnx.jit(static_argnames='train')
def forward(model, images, train, rngs=None):
  return model(images, train=train, rngs=rngs)


def param_paths(model):
  return {'/'.join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_expected_counts_cover_every_variant():
  assert set(EXPECTED_PARAMS) == set(models.VARIANTS)
  assert set(models.MODELS) == {'vit', 'hybrid', 'resnet50'}


@pytest.mark.parametrize('variant', sorted(models.VARIANTS))
def test_param_count(variant):
  assert models.count_params(abstract_variant(variant)) == EXPECTED_PARAMS[variant]


def test_param_counts_of_the_imagenet_stem_and_a_ti_hybrid():
  imagenet_stem = make_config('resnet50', resnet=dict(stem='imagenet'))
  assert models.count_params(abstract_model(imagenet_stem)) == 23_528_522  # timm's resnet50
  hybrid_ti = make_config('vit_ti4', name='hybrid', vit=dict(patch_size=1), stem=dict(stages=((64,), (128,))))
  assert models.count_params(abstract_model(hybrid_ti)) == 5_453_962


@pytest.mark.parametrize('variant', sorted(models.VARIANTS))
def test_every_kernel_declares_its_parameter_group_and_nothing_else_does(variant):
  """Weight decay and Muon read the groups: every Linear/Conv kernel is in one (the head's apart,
  the convs BatchNorm follows apart), every bias, norm, token and position embedding in none."""
  groups = models.param_groups(abstract_variant(variant))
  by_path = {jax.tree_util.keystr(path): group for path, group in jax.tree_util.tree_leaves_with_path(groups)}
  for path, group in by_path.items():
    if path.endswith("['conv']['kernel']"):
      assert group == layers.NORMALIZED_KERNEL, path
    elif path.startswith("['head']") and path.endswith("['kernel']"):
      assert group == layers.HEAD_KERNEL, path
    elif path.endswith("['kernel']"):
      assert group == layers.KERNEL, path
    else:
      assert group == layers.UNGROUPED, path
  assert layers.NORMALIZED_KERNEL in by_path.values() or variant.startswith('vit')


@pytest.mark.parametrize('variant', sorted(models.VARIANTS))
def test_logits_shape_and_dtype(variant):
  images = random_images(2)
  if variant in TINY_VARIANTS:
    logits = forward(build(models.variant_config(variant)), images, train=False)
    assert np.isfinite(logits).all()
  else:  # too big to run on CPU in a unit test: trace it only
    logits = nnx.eval_shape(lambda model, x: model(x, train=False), abstract_variant(variant), images)
  assert logits.shape == (2, NUM_CLASSES)
  assert logits.dtype == jnp.float32


def test_non_square_images_make_a_non_square_token_grid():
  model = abstract_model(make_config('hybrid_test'), image_shape=(16, 24, 3))
  assert model.grid_shape == (2, 3)  # stem pools 16x24 to 4x6, patches of 2
  logits = nnx.eval_shape(lambda m, x: m(x, train=False), model, random_images(2, (16, 24, 3)))
  assert logits.shape == (2, NUM_CLASSES)


def test_hybrid_without_stem_is_the_plain_vit():
  hybrid = build(make_config('hybrid_test', stem=dict(stages=())))
  vit = build(make_config('hybrid_test', name='vit', stem=dict(stages=())))
  hybrid_params, vit_params = nnx.state(hybrid, nnx.Param), nnx.state(vit, nnx.Param)
  assert jax.tree.structure(hybrid_params) == jax.tree.structure(vit_params)
  jax.tree.map(np.testing.assert_array_equal, hybrid_params, vit_params)
  assert models.count_params(hybrid) == models.count_params(vit)


def test_sincos_posemb_is_not_a_param():
  hidden, tokens = 32, 64 + 1  # vit_test: 8x8 patches plus the class token
  model = build(make_config('vit_test', vit=dict(posemb='sincos2d')))
  assert not any('pos_embedding' in path for path in param_paths(model))
  assert models.count_params(model) == EXPECTED_PARAMS['vit_test'] - tokens * hidden
  table = jax.jit(model.position_embedding)()
  assert table.shape == (1, tokens, hidden)
  assert not table[0, 0].any()  # the class token has no position
  assert len(np.unique(np.asarray(table[0, 1:]), axis=0)) == tokens - 1  # every patch position is distinct


def test_mean_pooling_has_no_class_token():
  hidden = 32
  model = build(make_config('vit_test', vit=dict(pooling='mean')))
  assert not any('cls_token' in path for path in param_paths(model))
  assert model.position_embedding().shape == (1, 64, hidden)
  assert models.count_params(model) == EXPECTED_PARAMS['vit_test'] - 2 * hidden  # token and its position
  assert forward(model, random_images(2), train=False).shape == (2, NUM_CLASSES)


def train_losses(model, images, labels, num_steps):
  """Cross-entropy on (images, labels) before each of num_steps Adam steps, with one jitted step function."""
  optimizer = optax.adam(3e-3)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def step(params, rest, opt_state):
    def loss_fn(params):
      model = nnx.merge(graphdef, params, rest, copy=True)
      logits = model(images, train=True)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, nnx.split(model, nnx.Param, ...)[2]
    (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), rest, opt_state, loss

  opt_state = jax.jit(optimizer.init)(params)
  losses = []
  for _ in range(num_steps):
    params, rest, opt_state, loss = step(params, rest, opt_state)
    losses.append(float(loss))
  return losses


@pytest.mark.parametrize('variant', TINY_VARIANTS)
def test_loss_falls_on_a_fixed_batch(variant):
  images = random_images(8)
  labels = np.arange(8) % NUM_CLASSES
  losses = train_losses(build(models.variant_config(variant)), images, labels, num_steps=20)
  assert losses[-1] < 0.75 * losses[0], losses


@pytest.mark.parametrize('variant', ('resnet_test', 'hybrid_test'))
def test_batch_norm_statistics_update_in_train_mode_only(variant):
  model = build(models.variant_config(variant))
  images = random_images(4)
  before = jax.tree.map(np.array, nnx.state(model, nnx.BatchStat))
  forward(model, images, train=False)
  jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.BatchStat), before)
  forward(model, images, train=True)
  changed = jax.tree.map(lambda new, old: not np.allclose(new, old), nnx.state(model, nnx.BatchStat), before)
  assert all(jax.tree.leaves(changed))


@pytest.mark.parametrize('rate_key', ('dropout_rate', 'attention_dropout_rate', 'stochastic_depth_rate'))
def test_dropout_is_random_in_train_mode_only(rate_key):
  model = build(make_config('vit_test', vit={rate_key: 0.3}))
  model.head.kernel[...] = standard_normal(model.head.kernel.shape)  # the zero-initialised head outputs only 0
  images = random_images(4)
  train_a, train_a_again, train_b, eval_a, eval_b = (
      forward(model, images, train=train, rngs=nnx.Rngs(dropout=seed))
      for train, seed in ((True, 0), (True, 0), (True, 1), (False, 0), (False, 1)))
  np.testing.assert_array_equal(train_a, train_a_again)
  assert not np.allclose(train_a, train_b)
  np.testing.assert_array_equal(eval_a, eval_b)
  assert not np.allclose(eval_a, train_a)


def test_attention_with_weight_dropout_matches_the_fused_core_without_dropout():
  query, key, value = standard_normal((3, 2, 5, 4, 8))  # each [B,T,N,H]
  without_dropout = jax.jit(lambda q, k, v: layers.attention_with_weight_dropout(q, k, v, nnx.Dropout(0.0), None))
  np.testing.assert_allclose(without_dropout(query, key, value),
                             jax.jit(jax.nn.dot_product_attention)(query, key, value), rtol=1e-5, atol=1e-6)


def test_train_with_dropout_needs_rngs():
  model = build(make_config('vit_test', vit=dict(dropout_rate=0.1)))
  with pytest.raises(ValueError, match='rngs'):
    model(random_images(1), train=True)


def test_drop_path_rate_grows_linearly_over_blocks():
  assert drop_path_rates(0.2, 5) == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
  assert drop_path_rates(0.2, 1) == [0.0]
  model = abstract_model(make_config('vit_test', vit=dict(num_layers=3, stochastic_depth_rate=0.1)))
  assert [block.drop_path.rate for block in model.blocks] == pytest.approx([0.0, 0.05, 0.1])


@pytest.mark.parametrize('variant', sorted(models.VARIANTS))
def test_every_variant_is_valid_for_cifar(variant):
  models.validate_model_config(models.variant_config(variant), IMAGE_SHAPE)


def test_unknown_variant_is_rejected():
  with pytest.raises(ValueError, match="unknown model variant 'vit_huge'"):
    models.variant_config('vit_huge')


@pytest.mark.parametrize('overrides, message', [
    (dict(name='vgg'), "unknown model.name='vgg'"),
    (dict(dtype='float16'), 'model.dtype'),
    (dict(vit=dict(pooling='max')), 'model.vit.pooling'),
    (dict(vit=dict(posemb='rope')), 'model.vit.posemb'),
    (dict(name='resnet50', resnet=dict(stem='big')), 'model.resnet.stem'),
    (dict(vit=dict(hidden_size=100, num_heads=3)), 'model.vit.hidden_size=100 is not divisible by model.vit.num_heads=3'),
    (dict(vit=dict(hidden_size=34, num_heads=2, posemb='sincos2d')), 'model.vit.hidden_size=34 must be divisible by 4'),
    (dict(vit=dict(patch_size=5)), 'model.vit.patch_size=5 does not divide the 32x32 image; use a divisor such as 1, 2, 4, 8'),
    (dict(name='hybrid', stem=dict(stages=((64,), (128,))), vit=dict(patch_size=3)),
     'model.vit.patch_size=3 does not divide the 8x8 stem output'),
    (dict(stem=dict(stages=((8,),) * 6)), 'shrinks the 32x32 image to nothing'),
    (dict(stem=dict(stages=((8, 0),))), 'model.stem.stages'),
    (dict(stem=dict(stages=((8,), ()))), 'model.stem.stages'),
    (dict(stem=dict(stages=((8,),), pool_position='middle')), 'model.stem.pool_position'),
    (dict(vit=dict(num_layers=0)), 'model.vit.num_layers=0 must be positive'),
    (dict(name='resnet50', resnet=dict(width=0)), 'model.resnet.width'),
    (dict(name='resnet50', resnet=dict(stage_sizes=(3, 0))), 'model.resnet.stage_sizes'),
    (dict(vit=dict(dropout_rate=1.0)), 'model.vit.dropout_rate=1.0 must be in [0, 1)'),
    (dict(vit=dict(stochastic_depth_rate=-0.1)), 'model.vit.stochastic_depth_rate'),
    (dict(stem=dict(stages=((8,),), whiten_patch_size=-1)), 'model.stem.whiten_patch_size=-1 must be >= 0'),
    (dict(stem=dict(whiten_patch_size=4)), 'model.stem.whiten_patch_size=4 needs a conv stem after it'),
])
def test_invalid_config_is_rejected_naming_the_key(overrides, message):
  with pytest.raises(ValueError) as error:
    models.validate_model_config(make_config('vit_ti4', **overrides), IMAGE_SHAPE)
  assert message in str(error.value)
  assert '\n' not in str(error.value)


def compute_dtypes(model, images):
  """Output dtypes of the model's convolutions and matrix products, read off its traced eval forward pass."""
  jaxpr = str(jax.make_jaxpr(lambda x: model(x, train=False))(images))
  found = re.findall(r':(\w+)\[[\d,]*\] = (conv_general_dilated|dot_general)', jaxpr)
  return {op: {dtype for dtype, name in found if name == op} for op in ('conv_general_dilated', 'dot_general')}


@pytest.mark.parametrize('variant', TINY_VARIANTS)
def test_bfloat16_computes_in_bfloat16_with_float32_params_and_logits(variant, monkeypatch):
  # XLA's convolution, as on GPUs and TPUs (where bf16 is used), so the conv layers show as convolutions.
  monkeypatch.setattr(layers, 'backend_conv', jax.lax.conv_general_dilated)
  model = build(make_config(variant, dtype='bfloat16'))
  images = random_images(2)
  assert {param.dtype for param in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.float32)}
  assert jax.eval_shape(lambda x: model(x, train=False), images).dtype == jnp.float32
  dtypes = compute_dtypes(model, images)
  assert dtypes['conv_general_dilated'] == {'bf16'}
  assert 'bf16' in dtypes['dot_general']  # the head, and the transformer's Linear layers


def test_bfloat16_matmul_convolutions_compute_in_bfloat16(monkeypatch):
  monkeypatch.setattr(layers, 'backend_conv', layers.matmul_conv)  # CPU's choice, on any backend
  model = build(make_config('resnet_test', dtype='bfloat16'))
  dtypes = compute_dtypes(model, random_images(2))
  assert dtypes == {'conv_general_dilated': set(), 'dot_general': {'bf16'}}


def test_bfloat16_training_forward_is_finite():
  model = build(make_config('hybrid_test', dtype='bfloat16'))
  logits = forward(model, random_images(2), train=True)
  assert logits.dtype == jnp.float32 and np.isfinite(logits).all()


def test_token_grid_keeps_the_token_count_whatever_the_stem_depth():
  """With model.vit.token_grid the patch size follows the stem, so no stem is the plain ViT-Ti/4."""
  cfg = make_config('vit_ti4', name='hybrid', vit=dict(token_grid=8), stem=dict(pool_position='last'))
  stages_of_depth = {0: (), 1: ((64,),), 2: ((64, 128),), 3: ((64, 128), (256,)), 4: ((64, 128), (256, 256))}
  expected_patch = {0: 4, 1: 2, 2: 2, 3: 1, 4: 1}  # each stage's pool after its last conv: 32 -> 16 -> 8
  for depth, patch in expected_patch.items():
    cfg.stem.stages = stages_of_depth[depth]
    assert vit_lib.effective_patch_size(cfg, (32, 32, 3)) == patch
  cfg.stem.stages = ()
  plain = nnx.eval_shape(lambda: models.create_model(models.variant_config('vit_ti4'), num_classes=10,
                                                     image_shape=(32, 32, 3), rngs=nnx.Rngs(0)))
  gridded = nnx.eval_shape(lambda: models.create_model(cfg, num_classes=10, image_shape=(32, 32, 3),
                                                       rngs=nnx.Rngs(0)))
  assert models.count_params(gridded) == models.count_params(plain) == 5_362_762
  cfg.vit.token_grid = 5
  with pytest.raises(ValueError, match='model.vit.token_grid=5'):
    models.validate_model_config(cfg, (32, 32, 3))


@pytest.mark.parametrize('kernel_size, stride, padding, height', [
    (3, 1, 'SAME', 9), (3, 2, ((1, 1), (1, 1)), 8), (1, 2, ((0, 0), (0, 0)), 8), (1, 1, 'VALID', 5),
    (7, 2, ((3, 3), (3, 3)), 16), (2, 2, 'VALID', 7)])
def test_matmul_conv_equals_xla_convolution_and_its_gradients(kernel_size, stride, padding, height):
  images = jax.random.normal(jax.random.key(0), (2, height, height + 1, 4))
  kernel = jax.random.normal(jax.random.key(1), (kernel_size, kernel_size, 4, 6))
  numbers = jax.lax.conv_dimension_numbers(images.shape, kernel.shape, ('NHWC', 'HWIO', 'NHWC'))

  def loss(conv, images, kernel):
    out = conv(images, kernel, (stride, stride), padding, dimension_numbers=numbers, precision='highest')
    return jnp.sum(jnp.sin(out)), out

  (_, expected), expected_grads = jax.value_and_grad(
      functools.partial(loss, jax.lax.conv_general_dilated), argnums=(0, 1), has_aux=True)(images, kernel)
  (_, got), got_grads = jax.value_and_grad(
      functools.partial(loss, layers.matmul_conv), argnums=(0, 1), has_aux=True)(images, kernel)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
  for got_grad, expected_grad in zip(got_grads, expected_grads):
    np.testing.assert_allclose(got_grad, expected_grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('shape', [(5, 7, 6), (3, 6), (2, 3, 4, 6)])
def test_linear_layers_product_equals_xla_dot_general_and_its_gradients(shape):
  inputs = jax.random.normal(jax.random.key(0), shape)
  kernel = jax.random.normal(jax.random.key(1), (6, 4))
  numbers = (((len(shape) - 1,), (0,)), ((), ()))

  def loss(dot_general, inputs, kernel):
    out = dot_general(inputs, kernel, numbers, precision='highest')
    return jnp.sum(jnp.sin(out)), out

  (_, expected), expected_grads = jax.value_and_grad(
      functools.partial(loss, jax.lax.dot_general), argnums=(0, 1), has_aux=True)(inputs, kernel)
  (_, got), got_grads = jax.value_and_grad(
      functools.partial(loss, layers.backend_dot_general), argnums=(0, 1), has_aux=True)(inputs, kernel)
  assert 'custom_vjp' in str(jax.make_jaxpr(functools.partial(loss, layers.backend_dot_general))(inputs, kernel))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  for got_grad, expected_grad in zip(got_grads, expected_grads):
    np.testing.assert_allclose(got_grad, expected_grad, rtol=1e-5, atol=1e-5)


def test_linear_layers_take_xla_dot_general_off_the_cpu(monkeypatch):
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  inputs, kernel = jnp.ones((2, 3, 6)), jnp.ones((6, 4))
  jaxpr = str(jax.make_jaxpr(lambda x, k: layers.backend_dot_general(x, k, (((2,), (0,)), ((), ()))))(inputs, kernel))
  assert 'custom_vjp' not in jaxpr and 'dot_general' in jaxpr


@pytest.mark.parametrize('shape', [(2, 65, 3, 64), (3, 5, 2, 8), (1, 1, 1, 4)])
def test_cpu_attention_equals_jax_dot_product_attention_and_its_gradients(shape):
  """[B,T,N,H]: the ViT-Ti/4 shape, a small one, and a single token."""
  query, key, value = (jax.random.normal(jax.random.key(i), shape) for i in range(3))
  weights = jax.random.normal(jax.random.key(3), shape)  # a loss that weighs every output differently

  def loss(attention, query, key, value):
    out = attention(query, key, value)
    return jnp.sum(weights * jnp.tanh(out)), out

  def value_and_grads(attention):
    return jax.jit(jax.value_and_grad(functools.partial(loss, attention), argnums=(0, 1, 2), has_aux=True))(
        query, key, value)

  (_, expected), expected_grads = value_and_grads(jax.nn.dot_product_attention)
  (_, got), got_grads = value_and_grads(layers.backend_attention)
  assert 'custom_vjp' in str(jax.make_jaxpr(functools.partial(loss, layers.backend_attention))(query, key, value))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=2e-5)
  for got_grad, expected_grad in zip(got_grads, expected_grads):
    np.testing.assert_allclose(got_grad, expected_grad, rtol=1e-5, atol=2e-5)


def test_cpu_attention_in_bfloat16_stays_near_float32():
  query, key, value = (jax.random.normal(jax.random.key(i), (2, 17, 2, 16)) for i in range(3))
  expected = jax.nn.dot_product_attention(query, key, value)
  got = layers.backend_attention(*(x.astype(jnp.bfloat16) for x in (query, key, value)))
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(got.astype(jnp.float32), expected, atol=3e-2)


def test_attention_is_xlas_own_off_the_cpu(monkeypatch):
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  query = jnp.ones((2, 5, 2, 8))
  jaxpr = str(jax.make_jaxpr(layers.backend_attention)(query, query, query))
  assert 'custom_vjp' not in jaxpr and 'optimization_barrier' not in jaxpr and 'dot_general' in jaxpr


def test_matmul_conv_passes_grouped_convolutions_to_xla():
  images = jax.random.normal(jax.random.key(0), (1, 6, 6, 4))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 2, 4))
  numbers = jax.lax.conv_dimension_numbers(images.shape, kernel.shape, ('NHWC', 'HWIO', 'NHWC'))
  args = (images, kernel, (1, 1), 'SAME')
  np.testing.assert_array_equal(
      layers.matmul_conv(*args, dimension_numbers=numbers, feature_group_count=2),
      jax.lax.conv_general_dilated(*args, dimension_numbers=numbers, feature_group_count=2))


@pytest.mark.parametrize('height, width', [(8, 8), (7, 9)])
def test_max_pool_2x2_equals_flax_max_pool(height, width):
  x = jax.random.normal(jax.random.key(0), (2, height, width, 3))
  np.testing.assert_array_equal(layers.max_pool_2x2(x), nnx.max_pool(x, (2, 2), strides=(2, 2)))
  hand_made = jnp.array([[1., 5.], [3., 2.]]).reshape(1, 2, 2, 1)
  assert float(layers.max_pool_2x2(hand_made)[0, 0, 0, 0]) == 5.


def correlated_images(seed=0, num_images=64, size=12):
  """float32 [N,size,size,3] whose neighbouring pixels and channels are strongly correlated."""
  noise = np.random.default_rng(seed).normal(size=(num_images, size, size, 3)).astype(np.float32)
  return noise + np.roll(noise, 1, axis=1) + np.roll(noise, 1, axis=2) + noise[..., :1]


def test_patch_whitening_kernel_makes_the_patch_covariance_the_identity():
  images = correlated_images()
  kernel = layers.patch_whitening_kernel(jnp.asarray(images), 2, epsilon=0.0)
  assert kernel.shape == (2, 2, 3, 24)
  np.testing.assert_array_equal(kernel[..., 12:], -kernel[..., :12])
  features = lax_conv(images, kernel[..., :12], 'VALID').reshape(-1, 12)
  np.testing.assert_allclose(features.T @ features / len(features), np.eye(12), atol=1e-4)
  # largest-variance direction first: its filter has the smallest norm
  norms = np.linalg.norm(np.asarray(kernel[..., :12]).reshape(12, 12), axis=0)
  assert np.all(np.diff(norms) >= 0)


def lax_conv(images, kernel, padding, strides=(1, 1)):
  return np.asarray(jax.lax.conv_general_dilated(jnp.asarray(images), kernel, strides, padding,
                                                 dimension_numbers=('NHWC', 'HWIO', 'NHWC')))


def test_stem_stages_pool_after_their_first_or_last_conv():
  assert layers.stem_layer_pools(((64, 64), (256,)), 'first') == ((64, True), (64, False), (256, True))
  assert layers.stem_layer_pools(((64, 128), (192,)), 'last') == ((64, False), (128, True), (192, True))
  model = abstract_model(make_config('hybrid_test', stem=dict(stages=((8, 8), (16, 16)), pool_position='first')))
  assert model.stem.pools == (True, False, True, False) and model.grid_shape == (4, 4)  # 32 -> 8, patches of 2
  assert [layer.conv.kernel.shape for layer in model.stem.layers] == [(3, 3, 3, 8), (3, 3, 8, 8), (3, 3, 8, 16),
                                                                     (3, 3, 16, 16)]


def whitened_config(**stem):
  """hybrid_test behind a 2x2 whitening: 32 -> 31 -> 15 -> 7, one token per position."""
  return make_config('hybrid_test', vit=dict(patch_size=1), stem=dict(whiten_patch_size=2, **stem))


def test_whitened_stem_kernel_is_model_state_set_by_fit_to_images():
  model = build(whitened_config())
  plain = build(make_config('hybrid_test', vit=dict(patch_size=1)))
  # the kernel is not a parameter (the optimizer never sees it) and there is no bias; the first conv is wider
  params, state = nnx.state(model, nnx.Param), nnx.state(model, nnx.Not(nnx.Param))
  assert 'kernel' in state['stem']['whitening'] and 'whitening' not in params['stem']
  # the first conv takes 24 channels, not 3; 7x7 tokens, not 8x8, have fewer position embeddings (width 32)
  assert models.count_params(model) == models.count_params(plain) + (24 - 3) * 9 * 8 - (64 - 49) * 32
  assert models.fits_to_data(model) and not models.fits_to_data(plain)
  images = correlated_images(size=32)
  model.fit_to_images(jnp.asarray(images))
  np.testing.assert_allclose(model.stem.whitening.kernel[...],
                             layers.patch_whitening_kernel(jnp.asarray(images), 2), rtol=1e-5)
  # only the patches inside the image (airbench's): 32x32 -> 31x31, then the pools 15, 7
  whitened = np.asarray(model.stem.whitening(jnp.asarray(images)))
  assert whitened.shape == (64, 31, 31, 24)
  np.testing.assert_allclose(whitened, lax_conv(images, model.stem.whitening.kernel[...], 'VALID'),
                             rtol=1e-4, atol=1e-4)
  assert model.stem(jnp.asarray(images[:2]), train=False).shape == (2, 7, 7, 16) and model.grid_shape == (7, 7)
  assert model(jnp.asarray(images[:2]), train=False).shape == (2, NUM_CLASSES)
  # a token grid that divides an unwhitened stem's 8x8 output does not divide the whitened one's 7x7
  with pytest.raises(ValueError, match='model.vit.token_grid=4 does not divide the 7x7 stem output'):
    models.validate_model_config(make_config('hybrid_test', stem=dict(whiten_patch_size=2), vit=dict(token_grid=4)),
                                 IMAGE_SHAPE)


def test_backprop_stops_at_the_first_conv_behind_the_whitening():
  images = jnp.asarray(correlated_images(size=32)[:4])
  whitened, plain = build(whitened_config()), build(make_config('hybrid_test', vit=dict(patch_size=1)))
  whitened.fit_to_images(images)

  def parameter_gradient_products(model):
    """Matrix products and convolutions in the jaxpr of the loss's gradient with respect to the parameters."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss = lambda p: nnx.merge(graphdef, p, rest)(images, train=False).sum()
    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params))
    return jaxpr.count('dot_general') + jaxpr.count('conv_general_dilated')

  # the whitening's forward product only: no gradient is computed through it or into the first conv's input
  assert parameter_gradient_products(whitened) - parameter_gradient_products(plain) == 1


def test_stem_activation_gelu_replaces_every_relu_of_the_stem_and_is_validated():
  images = jnp.asarray(correlated_images(size=32)[:2])
  relu, gelu = (build(whitened_config(activation=name)) for name in ('relu', 'gelu'))
  nnx.update(gelu, nnx.state(relu))  # same parameters and state: only the activation differs
  assert not np.allclose(relu.stem(images, train=False), gelu.stem(images, train=False))
  x = gelu.stem.whitening(images)
  x = jax.nn.gelu(x, approximate=True)
  for layer, pool in zip(gelu.stem.layers, gelu.stem.pools):
    x = jax.nn.gelu(layer(x, train=False), approximate=True)
    x = layers.max_pool_2x2(x) if pool else x
  np.testing.assert_allclose(gelu.stem(images, train=False), x, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="model.stem.activation='swish'"):
    models.validate_model_config(make_config('hybrid_test', stem=dict(activation='swish')), IMAGE_SHAPE)
