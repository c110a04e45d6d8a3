"""The training pieces: optimizer, input order, padded evaluation, and the sharded step."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from hybridvit_jax.configs import vit
from hybridvit_jax import configuration, data
from hybridvit_jax import evaluate as evaluate_lib
from hybridvit_jax.models import layers
from hybridvit_jax.training import inputs, loop, steps, optimizer as optimizer_lib
from hybridvit_jax.training.metrics import ClassificationMetrics, TrainMetrics
from hybridvit_jax.training.history import read_history
from hybridvit_jax.training.state import TrainState


def test_weight_decay_mask_takes_every_kernel_group_and_spares_norms_biases_and_embeddings():
  groups = {'block': {'dense': {'kernel': layers.KERNEL, 'bias': layers.UNGROUPED},
                      'conv': {'kernel': layers.NORMALIZED_KERNEL},
                      'norm': {'scale': layers.UNGROUPED, 'bias': layers.UNGROUPED}},
            'cls_token': layers.UNGROUPED, 'head': {'kernel': layers.HEAD_KERNEL}}
  mask = optimizer_lib.weight_decay_mask(groups)
  assert mask == {'block': {'dense': {'kernel': True, 'bias': False}, 'conv': {'kernel': True},
                            'norm': {'scale': False, 'bias': False}},
                  'cls_token': False, 'head': {'kernel': True}}


def test_schedule_warms_up_then_decays_to_the_end_factor():
  opt = configuration.base_config().optimizer
  with opt.unlocked():
    opt.update({'learning_rate': 1.0, 'warmup_epochs': 2.0, 'end_learning_rate_factor': 0.1})
  schedule = optimizer_lib.learning_rate_schedule(opt, steps_per_epoch=10, total_steps=100)
  assert float(schedule(0)) == 0.0
  assert float(schedule(10)) == pytest.approx(0.5)
  assert float(schedule(20)) == pytest.approx(1.0)
  assert float(schedule(100)) == pytest.approx(0.1)
  assert float(schedule(60)) < float(schedule(40))


def test_linear_schedule_decays_along_a_straight_line_to_the_end_factor():
  opt = configuration.base_config().optimizer
  with opt.unlocked():
    opt.update({'learning_rate': 1.0, 'warmup_epochs': 2.0, 'end_learning_rate_factor': 0.1, 'schedule': 'linear'})
  schedule = optimizer_lib.learning_rate_schedule(opt, steps_per_epoch=10, total_steps=100)
  assert float(schedule(10)) == pytest.approx(0.5)
  assert float(schedule(20)) == pytest.approx(1.0)
  assert float(schedule(40)) == pytest.approx(0.775)  # a quarter of the way from 1.0 at step 20 to 0.1 at step 100
  assert float(schedule(90)) == pytest.approx(0.2125)  # the cosine would be at 0.134 here
  assert float(schedule(100)) == pytest.approx(0.1)


def optax_schedule(schedule_name: str, *, warmup_steps: int, total_steps: int) -> optax.Schedule:
  """optax's own schedule of peak 1.0, end 0.1 (lengths as Python numbers): the reference."""
  decay_steps = total_steps - warmup_steps
  after_warmup = {'cosine': optax.cosine_decay_schedule(1.0, decay_steps, alpha=0.1),
                  'linear': optax.linear_schedule(1.0, 0.1, decay_steps),
                  'constant': optax.constant_schedule(1.0)}[schedule_name]
  return optax.join_schedules([optax.linear_schedule(0.0, 1.0, warmup_steps), after_warmup], [warmup_steps])


@pytest.mark.parametrize('schedule_name', ['cosine', 'linear', 'constant'])
def test_schedule_of_a_traced_length_is_optaxs_schedule_of_that_length(schedule_name):
  opt = configuration.base_config().optimizer
  with opt.unlocked():
    opt.update({'learning_rate': 1.0, 'warmup_epochs': 2.0, 'end_learning_rate_factor': 0.1,
                'schedule': schedule_name})
  traced = jax.jit(lambda total_steps, count: optimizer_lib.learning_rate_schedule(
      opt, steps_per_epoch=10, total_steps=total_steps)(count))
  for total_steps in (45, 100, 400):
    reference = optax_schedule(schedule_name, warmup_steps=20, total_steps=total_steps)
    for count in (0, 7, 20, 33, 60, 99, 100, 500):
      assert float(traced(total_steps, count)) == pytest.approx(float(reference(count)), abs=1e-6)


@pytest.mark.parametrize('name', ['adam', 'adamw', 'sgd', 'muon'])
def test_every_optimizer_decreases_a_quadratic(name):
  opt = configuration.base_config().optimizer
  with opt.unlocked():
    opt.update({'name': name, 'learning_rate': 0.1, 'warmup_epochs': 0.0, 'weight_decay': 0.0})
  tx = optimizer_lib.make_optimizer(opt, steps_per_epoch=1, total_steps=50,
                                    param_groups={'w': {'kernel': layers.KERNEL}})
  params = {'w': {'kernel': jnp.array([3.0, -2.0])}}
  state = tx.init(params)
  loss = lambda p: jnp.sum(p['w']['kernel'] ** 2)
  for _ in range(20):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, updates)
  assert float(loss(params)) < 0.5 * 13.0


def _muon_config(**overrides):
  opt = configuration.base_config().optimizer
  with opt.unlocked():
    opt.update({'name': 'muon', 'learning_rate': 0.1, 'muon_learning_rate': 0.2, 'warmup_epochs': 0.0,
                'weight_decay': 0.0, 'grad_clip_norm': 0.0, 'nesterov': True, **overrides})
  return opt


def _conv_net_params():
  keys = jax.random.split(jax.random.key(0), 2)
  return {'stem': {'conv': {'kernel': jax.random.normal(keys[0], (3, 3, 4, 8))},
                   'norm': {'scale': jnp.ones(8), 'bias': jnp.zeros(8)}},
          'head': {'kernel': jax.random.normal(keys[1], (8, 3)), 'bias': jnp.zeros(3)}}


def _conv_net_groups(**more):
  """The parameter groups of _conv_net_params (and of `more`), as its layers would declare them."""
  return {'stem': {'conv': {'kernel': layers.NORMALIZED_KERNEL},
                   'norm': {'scale': layers.UNGROUPED, 'bias': layers.UNGROUPED}},
          'head': {'kernel': layers.HEAD_KERNEL, 'bias': layers.UNGROUPED}, **more}


def test_muon_takes_the_kernels_batch_norm_follows_and_optionally_the_other_matrices_but_the_head():
  from hybridvit_jax import models  # pylint: disable=import-outside-toplevel
  from hybridvit_jax.configs import hybrid  # pylint: disable=import-outside-toplevel
  config = hybrid.get_config('cpu')
  model = nnx.eval_shape(lambda: models.create_model(config.model, 10, (32, 32, 3), nnx.Rngs(0)))
  param_groups = models.param_groups(model)
  def group(label, all_matrices):
    labels = optimizer_lib.muon_labels(param_groups, all_matrices=all_matrices)
    return {jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_leaves_with_path(labels) if leaf == label}
  stem_convs = {f"['stem']['layers'][{i}]['conv']['kernel']" for i in range(6)}
  assert group('renormalized', False) == group('renormalized', True) == stem_convs
  assert group('plain', False) == set()
  block = "['blocks'][0]"
  assert group('plain', True) == {"['patch_embedding']['kernel']", f"{block}['attention']['qkv']['kernel']",
                                  f"{block}['attention']['proj']['kernel']", f"{block}['mlp']['fc1']['kernel']",
                                  f"{block}['mlp']['fc2']['kernel']"}


def test_muon_step_is_orthogonalised_and_scale_free_and_renormalises_the_kernel():
  tx = optimizer_lib.make_optimizer(_muon_config(), steps_per_epoch=1, total_steps=10,
                                    param_groups=_conv_net_groups())
  params = _conv_net_params()
  state = tx.init(params)
  grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(1), x.shape), params)
  update, _ = tx.update(grads, state, params)
  update_of_10x, _ = tx.update(jax.tree.map(lambda g: 10 * g, grads), state, params)
  no_step, _ = tx.update(jax.tree.map(jnp.zeros_like, grads), state, params)
  # zero gradients: only the renormalisation, to Frobenius norm sqrt(out channels) = sqrt(8)
  kernel = optax.apply_updates(params, no_step)['stem']['conv']['kernel']
  assert float(jnp.linalg.norm(kernel)) == pytest.approx(np.sqrt(8), rel=1e-5)
  np.testing.assert_allclose(kernel, params['stem']['conv']['kernel'] * np.sqrt(8) / jnp.linalg.norm(
      params['stem']['conv']['kernel']), rtol=1e-5)
  # the Muon step does not grow with the gradient, and its singular values are near the learning rate
  muon_step = update['stem']['conv']['kernel'] - no_step['stem']['conv']['kernel']
  np.testing.assert_allclose(muon_step, update_of_10x['stem']['conv']['kernel'] - no_step['stem']['conv']['kernel'],
                             atol=1e-5)
  singular_values = np.linalg.svd(np.asarray(muon_step).reshape(36, 8), compute_uv=False)
  assert np.all((singular_values > 0.2 * 0.5) & (singular_values < 0.2 * 1.5)), singular_values
  # everything else takes plain Nesterov SGD: -lr * (1 + momentum) * gradient on the first step
  for path in (('head', 'kernel'), ('head', 'bias'), ('stem', 'norm', 'bias')):
    leaf = lambda tree: functools.reduce(lambda node, key: node[key], path, tree)
    np.testing.assert_allclose(leaf(update), -0.1 * 1.9 * leaf(grads), rtol=1e-5)
    np.testing.assert_allclose(leaf(update_of_10x), 10 * leaf(update), rtol=1e-5)


def test_muon_on_all_matrices_orthogonalises_a_linear_kernel_without_rescaling_it():
  tx = optimizer_lib.make_optimizer(_muon_config(muon_all_matrices=True), steps_per_epoch=1, total_steps=10,
                                    param_groups=_conv_net_groups(fc={'kernel': layers.KERNEL}))
  params = {**_conv_net_params(), 'fc': {'kernel': jax.random.normal(jax.random.key(2), (8, 6))}}
  state = tx.init(params)
  grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(3), x.shape), params)
  update, _ = tx.update(grads, state, params)
  update_of_10x, _ = tx.update(jax.tree.map(lambda g: 10 * g, grads), state, params)
  no_step, _ = tx.update(jax.tree.map(jnp.zeros_like, grads), state, params)
  np.testing.assert_array_equal(no_step['fc']['kernel'], 0.0)  # no rescaling
  np.testing.assert_allclose(update['fc']['kernel'], update_of_10x['fc']['kernel'], atol=1e-5)
  singular_values = np.linalg.svd(np.asarray(update['fc']['kernel']), compute_uv=False)
  assert np.all((singular_values > 0.2 * 0.5) & (singular_values < 0.2 * 1.5)), singular_values
  np.testing.assert_allclose(update['head']['kernel'], -0.1 * 1.9 * grads['head']['kernel'], rtol=1e-5)


def test_the_best_checkpoint_is_the_highest_val_accuracy_or_the_lowest_val_loss():
  meta = {'best_val_accuracy': -1.0, 'epochs_without_improvement': 0}
  records = [{'val_accuracy': 0.80, 'val_loss': 0.70}, {'val_accuracy': 0.885, 'val_loss': 0.508},
             {'val_accuracy': 0.883, 'val_loss': 0.477}, {'val_accuracy': 0.883, 'val_loss': 0.477}]

  def improvements(metric, meta=meta):
    flags = []
    for record in records:
      improved, meta = loop.rank_evaluation(meta, record, metric)
      flags.append(improved)
    return flags, meta
  by_accuracy, accuracy_meta = improvements('val_accuracy')
  by_loss, loss_meta = improvements('val_loss')
  assert by_accuracy == [True, True, False, False]  # the last two: 2 images fewer of 1,000
  assert by_loss == [True, True, True, False]  # a tie is not better
  assert accuracy_meta['best_score'] == 0.885 and accuracy_meta['epochs_without_improvement'] == 2
  assert loss_meta['best_score'] == -0.477 and loss_meta['epochs_without_improvement'] == 1
  assert loss_meta['best_val_accuracy'] == accuracy_meta['best_val_accuracy'] == 0.885
  # the meta of a run saved before best_score: val accuracy ranked it; the loss starts afresh
  old_meta = {'best_val_accuracy': 0.9, 'epochs_without_improvement': 3}
  assert not loop.rank_evaluation(old_meta, records[1], 'val_accuracy')[0]
  assert loop.rank_evaluation(old_meta, records[1], 'val_loss')[0]
  # a run resumed under another metric ranks afresh: a loss is never compared with an accuracy
  _, loss_ranked = loop.rank_evaluation(meta, records[0], 'val_loss')
  improved, accuracy_ranked = loop.rank_evaluation(loss_ranked, records[0], 'val_accuracy')
  assert improved and accuracy_ranked['best_score'] == 0.80 and accuracy_ranked['best_metric'] == 'val_accuracy'


def test_an_unknown_best_checkpoint_metric_is_a_config_error():
  config = smoke_config(best_checkpoint_metric='val_top5')
  with pytest.raises(configuration.ConfigError, match='best_checkpoint_metric'):
    configuration.validate(config, device_count=1)


def test_epoch_order_is_a_function_of_seed_and_epoch():
  order = inputs.epoch_order(seed=3, epoch=1, num_examples=103, batch_size=10)
  assert order.shape == (10, 10) and order.dtype == np.int32
  assert len(np.unique(order)) == 100 and order.max() < 103
  np.testing.assert_array_equal(order, inputs.epoch_order(3, 1, 103, 10))
  assert not np.array_equal(order, inputs.epoch_order(3, 2, 103, 10))
  assert not np.array_equal(order, inputs.epoch_order(4, 1, 103, 10))


def test_padded_batches_cover_every_example_once():
  arrays = {'image': np.arange(7 * 2 * 2 * 1, dtype=np.uint8).reshape(7, 2, 2, 1),
            'label': np.arange(7, dtype=np.int32)}
  batches = list(inputs.padded(inputs.array_batches(arrays, 4), 4))
  assert [b[0].shape for b in batches] == [(4, 2, 2, 1), (4, 2, 2, 1)]
  labels = np.concatenate([labels[mask] for _, labels, mask in batches])
  np.testing.assert_array_equal(labels, arrays['label'])
  assert batches[1][2].tolist() == [True, True, True, False]


def smoke_config(**overrides) -> ml_collections.ConfigDict:
  config = vit.get_config('smoke')
  config.update(overrides)
  return config


def _train_one_step(config, mesh):
  info = data.dataset_info(config.data)
  arrays = data.load_split(config.data, config.data.train_split)
  init_state, train_step, _ = loop.build_training(config, info, mesh, steps_per_epoch=7)
  replicated = NamedSharding(mesh, P())
  order = inputs.epoch_order(config.seed, 0, len(arrays['label']), config.batch_size)
  state, metrics = train_step(init_state(), TrainMetrics.empty(),
                              inputs.to_global(arrays['image'], replicated),
                              inputs.to_global(arrays['label'], replicated),
                              inputs.to_global(order, NamedSharding(mesh, P(None, 'data'))), total_steps=21)
  return jax.device_get(state.params), metrics.compute()


def test_a_new_plan_changes_the_steps_learning_rate_without_a_recompile():
  """The run's planned length is an argument of the compiled step, as the time budget's plans need."""
  config = smoke_config()
  config.optimizer.warmup_epochs = 0.0
  mesh = loop.make_mesh()
  info = data.dataset_info(config.data)
  arrays = data.load_split(config.data, config.data.train_split)
  init_state, train_step, _ = loop.build_training(config, info, mesh, steps_per_epoch=7)
  replicated = NamedSharding(mesh, P())
  order = inputs.epoch_order(config.seed, 0, len(arrays['label']), config.batch_size)
  step_inputs = (inputs.to_global(arrays['image'], replicated), inputs.to_global(arrays['label'], replicated),
                 inputs.to_global(order, NamedSharding(mesh, P(None, 'data'))))
  moved = {}
  for total_steps in (3, 100, 3):  # three steps of a 3-step cosine (1, 0.75, 0.25 x peak) or near the peak
    state = init_state()
    before = jax.device_get(state.params)
    for _ in range(3):
      state, _ = train_step(state, TrainMetrics.empty(), *step_inputs, total_steps=total_steps)
    moved.setdefault(total_steps, []).append(
        float(optax.tree.norm(jax.tree.map(jnp.subtract, jax.device_get(state.params), before))))
  assert train_step._cache_size() == 1  # pylint: disable=protected-access
  assert moved[100][0] > 1.2 * moved[3][0] > 0
  assert moved[3][0] == moved[3][1]


def test_step_on_one_device_agrees_with_four_devices():
  assert jax.device_count() == 4, 'conftest forces 4 host devices'
  config = smoke_config()
  one = jax.make_mesh((1,), ('data',), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])
  params_one, metrics_one = _train_one_step(config, one)
  params_four, metrics_four = _train_one_step(config, loop.make_mesh())
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6), params_one, params_four)
  assert float(metrics_one['loss']) == pytest.approx(float(metrics_four['loss']), rel=1e-5)


@pytest.mark.slow
def test_alternate_flip_trains_on_the_batch_mirrored_as_alternating_flips_says():
  """An odd-epoch step with alternate_flip equals the flip-free step on the batch mirrored by hand."""
  mesh = loop.make_mesh()
  alternate, plain = smoke_config(), smoke_config()
  alternate.data.update({'crop_padding': 0, 'alternate_flip': True})
  plain.data.update({'crop_padding': 0, 'flip': False})
  arrays = data.load_split(alternate.data, alternate.data.train_split)
  order = inputs.epoch_order(alternate.seed, 1, len(arrays['label']), alternate.batch_size)
  flips = np.asarray(data.alternating_flips(steps.flip_seed_key(alternate.seed), jnp.asarray(order[0]), 1))
  assert 0 < flips.sum() < len(flips)
  mirrored = arrays['image'].copy()
  mirrored[order[0][flips]] = mirrored[order[0][flips]][:, :, ::-1]
  replicated, by_step = NamedSharding(mesh, P()), NamedSharding(mesh, P(None, 'data'))
  results = []
  for config, images in ((alternate, arrays['image']), (plain, mirrored)):
    info = data.dataset_info(config.data)
    init_state, train_step, _ = loop.build_training(config, info, mesh, steps_per_epoch=7)
    state = init_state()
    state = state.replace(step=jnp.asarray(7, state.step.dtype))  # epoch 1's first step: the other half is mirrored
    state, _ = train_step(state, TrainMetrics.empty(), inputs.to_global(images, replicated),
                          inputs.to_global(arrays['label'], replicated), inputs.to_global(order, by_step),
                          total_steps=21)
    results.append(jax.device_get(state.params))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), *results)


def test_alternate_flip_needs_the_device_input_mode():
  config = smoke_config()
  config.data.update({'alternate_flip': True, 'input_mode': 'stream'})
  with pytest.raises(configuration.ConfigError, match='data.alternate_flip'):
    configuration.validate(config, device_count=1)


def _epoch_batches(config, epoch, first_step=0):
  """(images, labels) numpy batches of a training epoch, as the train step would see them."""
  train_input = inputs.TrainInput(config, loop.make_mesh())
  batches = []
  for step_inputs in train_input.epoch(epoch, first_step):
    if config.data.input_mode == 'device':
      images, labels, order = (np.asarray(x) for x in step_inputs)
      row = order[len(batches) + first_step]
      batches.append((images[row], labels[row]))
    else:
      batches.append(tuple(np.asarray(x) for x in step_inputs))
  return batches


def test_device_and_stream_modes_yield_the_same_shapes_and_labels():
  device_config, stream_config = smoke_config(), smoke_config()
  stream_config.data.input_mode = 'stream'
  device_batches, stream_batches = _epoch_batches(device_config, 0), _epoch_batches(stream_config, 0)
  assert len(device_batches) == len(stream_batches) == 7  # 448 examples, batch 64
  assert all(d[0].shape == s[0].shape == (64, 32, 32, 3) and d[0].dtype == s[0].dtype == np.uint8
             for d, s in zip(device_batches, stream_batches))
  all_labels = lambda batches: np.sort(np.concatenate([labels for _, labels in batches]))
  np.testing.assert_array_equal(all_labels(device_batches), all_labels(stream_batches))
  # each epoch has its own order, and a resumed epoch continues with the same batches
  assert not np.array_equal(stream_batches[0][1], _epoch_batches(stream_config, 1)[0][1])
  resumed = _epoch_batches(stream_config, 0, first_step=4)
  assert len(resumed) == 3
  for (images, labels), (expected_images, expected_labels) in zip(resumed, stream_batches[4:]):
    np.testing.assert_array_equal(images, expected_images)
    np.testing.assert_array_equal(labels, expected_labels)


@pytest.mark.parametrize('padding_mode', ['constant', 'reflect'])
def test_eval_step_averages_the_logits_of_views_shifted_before_normalisation(padding_mode):
  config = smoke_config(eval_flip=True, eval_translate=1)
  config.data.crop_padding_mode = padding_mode
  mesh = loop.make_mesh()
  info = data.dataset_info(config.data)
  init_state, _, eval_step = loop.build_training(config, info, mesh, steps_per_epoch=7)
  state = init_state()
  noise = lambda leaf, key: leaf + 0.3 * jax.random.normal(key, leaf.shape)  # off the zero-initialised head
  keys = jax.random.split(jax.random.key(0), len(jax.tree.leaves(state.params)))
  state = state.replace(params=jax.tree.unflatten(jax.tree.structure(state.params),
                                                  map(noise, jax.tree.leaves(state.params), keys)))
  images = jnp.asarray(data.load_split(config.data, config.data.val_split)['image'][:8])
  labels = jnp.arange(8) % info.num_classes
  metrics = eval_step(state, ClassificationMetrics.empty(), images, labels, jnp.ones(8, bool)).compute()
  # the views by hand: uint8 images shifted (zeros are black pixels, as training's crops pad them), then normalised
  shifted = [images, data.translate(images, -1, -1, padding_mode), data.translate(images, 1, 1, padding_mode)]
  views = shifted + [view[:, :, ::-1] for view in shifted]
  graphdef = loop.model_graphdef(config.model, num_classes=info.num_classes, image_shape=info.image_shape)
  def loss_of(views):
    logits = [steps.apply_model(graphdef, state.params, state.model_state, view, train=False)[0] for view in views]
    mean_logits = sum(w * l for w, l in zip([0.25, 0.125, 0.125] * 2, logits))
    return float(jnp.mean(steps.softmax_cross_entropy(mean_logits, labels)))
  assert metrics['loss'] == pytest.approx(loss_of([steps.prepare_images(v, config.data) for v in views]), rel=1e-5)
  if padding_mode == 'constant':  # shifting normalised images would fill with the mean colour instead
    normalised = steps.prepare_images(images, config.data)
    shifted_after = [normalised, data.translate(normalised, -1, -1), data.translate(normalised, 1, 1)]
    assert metrics['loss'] != pytest.approx(loss_of(shifted_after + [v[:, :, ::-1] for v in shifted_after]),
                                            rel=1e-5)


@pytest.mark.slow
def test_stream_mode_trains_and_evaluates(tmp_path):
  config = smoke_config(num_epochs=1)
  config.data.input_mode = 'stream'
  record = loop.train_and_evaluate(config, tmp_path)
  assert record['step'] == 7 and read_history(tmp_path) == [record]
  # the record's evaluation is the checkpoint's, over every val example (the device mode's evaluate)
  assert evaluate_lib.evaluate(str(tmp_path), 'latest', 'val') == {
      'workdir': str(tmp_path), 'checkpoint': 'latest', 'step': 7, 'split': config.data.val_split,
      'weights': 'trained', 'loss': pytest.approx(record['val_loss'], rel=1e-5),
      'accuracy': pytest.approx(record['val_accuracy'], abs=1e-6), 'examples': 64}
  assert record['train_loss'] < 100 and 0.0 <= record['train_accuracy'] <= 1.0


@pytest.mark.slow
def test_full_recipe_trains_and_evaluates_the_ema_weights(tmp_path):
  config = smoke_config(num_epochs=2, ema_decay=0.9, eval_flip=True, eval_translate=1, label_smoothing=0.1)
  config.data.update({'randaugment_num_ops': 2, 'mixup_alpha': 0.8, 'cutmix_alpha': 1.0,
                      'random_erasing': 0.25})
  config.optimizer.name = 'lamb'
  record = loop.train_and_evaluate(config, tmp_path)
  for field in ('ema_val_accuracy', 'ema_val_loss', 'ema_test_accuracy', 'val_accuracy'):
    assert 0.0 <= record[field] <= (1.0 if 'accuracy' in field else 100.0), field
  from hybridvit_jax.evaluate import evaluate  # pylint: disable=import-outside-toplevel
  ema = evaluate(str(tmp_path), 'latest', 'test', ema=True)
  trained = evaluate(str(tmp_path), 'latest', 'test')
  assert ema['accuracy'] == pytest.approx(record['ema_test_accuracy'], abs=1e-6)
  assert trained['accuracy'] == pytest.approx(record['test_accuracy'], abs=1e-6)
  assert ema['loss'] != trained['loss']  # two different sets of weights


@pytest.mark.slow
def test_fresh_run_fits_the_whitening_kernel_to_training_images_and_training_keeps_it(tmp_path):
  config = smoke_config(num_epochs=1)
  config.model.update({'name': 'hybrid', 'vit': {'patch_size': 1},  # 32 -> whitening 31 -> pools 15, 7
                       'stem': {'stages': ((8,), (16,)), 'whiten_patch_size': 2}})
  loop.train_and_evaluate(config, tmp_path)
  _, _, _, state, _ = evaluate_lib.restore_run(tmp_path, 'latest')
  assert int(state.step) == 7
  first_images = inputs.TrainInput(config, loop.make_mesh()).first_images(loop.FIT_EXAMPLES)
  assert first_images.shape == (448, 32, 32, 3)  # the whole smoke split: fewer than FIT_EXAMPLES
  expected = layers.patch_whitening_kernel(steps.prepare_images(first_images, config.data), 2)
  np.testing.assert_allclose(state.model_state['stem']['whitening']['kernel'], expected, atol=1e-3)


def lookahead_state(step: int, *, trained: float, slow: float) -> TrainState:
  return TrainState(step=jnp.int32(step), params={'w': jnp.float32(trained)},
                    model_state={'mean': jnp.float32(trained), 'count': jnp.int32(7)}, opt_state=(),
                    first_nonfinite_step=jnp.int32(-1),
                    ema_params={}, slow_weights={'params': {'w': jnp.float32(slow)},
                                                 'model_state': {'mean': jnp.float32(slow), 'count': jnp.int32(3)}})


def test_lookahead_pulls_weights_and_batch_norm_statistics_to_the_slow_ones_every_n_steps():
  pull = functools.partial(steps.lookahead, total_steps=10, peak_decay=0.8, every_steps=5)
  values = lambda state: (float(state.params['w']), float(state.model_state['mean']),
                          float(state.slow_weights['params']['w']), float(state.slow_weights['model_state']['mean']))
  assert values(pull(lookahead_state(7, trained=2.0, slow=1.0))) == (2.0, 2.0, 1.0, 1.0)  # not a pull step
  # Step 5 of 10: d = 0.8 * 0.5**3 = 0.1, slow = 0.1 * 1 + 0.9 * 2 = 1.9, and the trained weights become it.
  assert values(pull(lookahead_state(5, trained=2.0, slow=1.0))) == pytest.approx((1.9,) * 4)
  # The last step: d = 1, the run ends on the slow weights; integer state is left as trained.
  state = pull(lookahead_state(10, trained=2.0, slow=1.0))
  assert values(state) == (1.0,) * 4 and int(state.model_state['count']) == 7


@pytest.mark.slow
def test_lookahead_run_starts_its_slow_weights_fitted_and_ends_on_them_beside_an_ema(tmp_path):
  config = smoke_config(num_epochs=1, lookahead_decay=0.8, lookahead_every_steps=2, ema_decay=0.9)
  config.model.update({'name': 'hybrid', 'vit': {'patch_size': 1},  # 32 -> whitening 31 -> pools 15, 7
                       'stem': {'stages': ((8,), (16,)), 'whiten_patch_size': 2}})
  loop.train_and_evaluate(config, tmp_path)
  _, _, _, state, _ = evaluate_lib.restore_run(tmp_path, 'latest')
  slow = state.slow_weights
  jax.tree.map(np.testing.assert_array_equal, (state.params, state.model_state), (slow['params'], slow['model_state']))
  assert float(jnp.abs(state.model_state['stem']['whitening']['kernel']).max()) > 0  # fitted, not the zeros
  # the EMA is its own slot: an average of the trained weights, not the slow weights
  assert jax.tree.structure(state.ema_params) == jax.tree.structure(state.params)
  assert any(not np.array_equal(ema, trained) for ema, trained in
             zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(state.params)))


def test_a_padded_last_batch_counts_only_the_real_examples():
  """evaluate_split over 64 val examples in batches of 40 (the last padded from 24 to 40) gives the
  loss and accuracy of the 64 examples computed by hand in one batch."""
  config = smoke_config(eval_batch_size=40)  # a multiple of the 4 devices, not a divisor of 64
  mesh = loop.make_mesh()
  info = data.dataset_info(config.data)
  init_state, _, eval_step = loop.build_training(config, info, mesh, steps_per_epoch=7)
  state = init_state()
  keys = jax.random.split(jax.random.key(1), len(jax.tree.leaves(state.params)))
  state = state.replace(params=jax.tree.unflatten(jax.tree.structure(state.params), [  # off the zero head
      leaf + 0.3 * jax.random.normal(key, leaf.shape) for leaf, key in zip(jax.tree.leaves(state.params), keys)]))
  arrays = data.load_split(config.data, config.data.val_split)
  assert len(arrays['label']) == 64
  result = loop.evaluate_split(eval_step, state, inputs.array_batches(arrays, 40), batch_size=40, mesh=mesh)
  graphdef = loop.model_graphdef(config.model, num_classes=info.num_classes, image_shape=info.image_shape)
  logits, _ = steps.apply_model(graphdef, jax.device_get(state.params), jax.device_get(state.model_state),
                                steps.prepare_images(jnp.asarray(arrays['image']), config.data), train=False)
  losses = steps.softmax_cross_entropy(logits, jnp.asarray(arrays['label']))
  assert result['examples'] == 64
  assert result['loss'] == pytest.approx(float(jnp.mean(losses)), rel=1e-5)
  assert result['accuracy'] == pytest.approx(float(np.mean(np.argmax(logits, -1) == arrays['label'])), abs=1e-6)
