"""The pure train and eval steps; the loop binds their keyword arguments and jits them.

Shapes: B is the global batch, K the number of classes, images are uint8 [B, H, W, C] until
`prepare_images` turns them into normalised float32 inside the step.
"""
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from hybridvit_jax import data
from hybridvit_jax.training.metrics import ClassificationMetrics, TrainMetrics
from hybridvit_jax.training.state import TrainState


def softmax_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-example loss [B] for logits [B, K] and targets: integer labels [B] or soft [B, K]."""
  if targets.ndim == 1:
    targets = jax.nn.one_hot(targets, logits.shape[-1])
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def apply_model(graphdef: nnx.GraphDef, params: dict, model_state: dict, images: jax.Array, *,
                train: bool, dropout_key: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """Runs the network on float images [B, H, W, C]; returns logits [B, K] and the new model state."""
  model = nnx.merge(graphdef, params, model_state, copy=True)
  rngs = nnx.Rngs(dropout=dropout_key) if dropout_key is not None else None
  logits = model(images, train=train, rngs=rngs)
  return logits, nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))


def prepare_images(images: jax.Array, data_config: ml_collections.ConfigDict) -> jax.Array:
  """uint8 [B, H, W, C] -> normalised float32 [B, H, W, C], as evaluation sees them."""
  return data.normalize(images, data_config.mean, data_config.std)


def augment_batch(key: jax.Array, images: jax.Array, labels: jax.Array, *, num_classes: int,
                  config: ml_collections.ConfigDict, flips: jax.Array | None = None,
                  ) -> tuple[jax.Array, jax.Array]:
  """The training view of a batch: uint8 images [B, H, W, C] and int labels [B] -> normalised
  float32 images and soft targets [B, K]. Each transform is on when its config value is;
  flips bool [B], when given, chooses the mirrored examples instead of a random draw."""
  d = config.data
  randaugment_key, crop_key, erase_key, mix_key = jax.random.split(key, 4)
  if d.randaugment_num_ops:
    images = data.rand_augment(randaugment_key, images, num_ops=d.randaugment_num_ops,
                               magnitude=d.randaugment_magnitude)
  images = data.augment(crop_key, images, crop_padding=d.crop_padding, flip=d.flip and flips is None,
                        padding_mode=d.crop_padding_mode)
  if flips is not None:
    images = data.flip_where(flips, images)
  images = prepare_images(images, d)
  if d.random_erasing:
    images = data.random_erasing(erase_key, images, probability=d.random_erasing)
  if d.cutout_size:
    images = data.cutout(erase_key, images, size=d.cutout_size)
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), config.label_smoothing)
  if d.mixup_alpha or d.cutmix_alpha:
    images, targets = data.mixup_cutmix(mix_key, images, targets, mixup_alpha=d.mixup_alpha,
                                        cutmix_alpha=d.cutmix_alpha)
  return images, targets


def fit_to_data(state: TrainState, images: jax.Array, *, graphdef: nnx.GraphDef,
                data_config: ml_collections.ConfigDict) -> TrainState:
  """The fresh state with the model's data-fitted parts (`fit_to_images`: the patch-whitening
  kernel) set from uint8 training images [N, H, W, C]; parameters are unchanged."""
  model = nnx.merge(graphdef, state.params, state.model_state, copy=True)
  model.fit_to_images(prepare_images(images, data_config))
  model_state = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))
  if state.slow_weights:  # lookahead's slow weights start as the fitted model too
    return state.replace(model_state=model_state,
                         slow_weights={**state.slow_weights, 'model_state': jax.tree.map(jnp.copy, model_state)})
  return state.replace(model_state=model_state)


def lookahead(state: TrainState, *, total_steps: int | jax.Array, peak_decay: float, every_steps: int) -> TrainState:
  """airbench's Lookahead after the update that brought the run to `state.step`: every
  `every_steps` steps the slow weights (state.slow_weights: {'params', 'model_state'}, parameters and
  BatchNorm statistics) become d * slow + (1 - d) * trained and the trained ones are set to them,
  d = peak_decay * (step / total_steps)**3 (no pull early on, the strongest at the end); at
  `total_steps` d = 1: the run ends on the slow weights. Integer leaves are left as trained."""
  step = state.step
  decay = jnp.where(step >= total_steps, 1.0, peak_decay * (step / total_steps) ** 3)
  pull = (step % every_steps == 0) | (step >= total_steps)
  trained = {'params': state.params, 'model_state': state.model_state}

  def pulled(slow, fast):
    if not jnp.issubdtype(fast.dtype, jnp.floating):
      return fast
    return jnp.where(pull, (decay * slow + (1.0 - decay) * fast).astype(fast.dtype), slow)
  slow = jax.tree.map(pulled, state.slow_weights, trained)
  new_trained = jax.tree.map(lambda s, fast: jnp.where(pull, s, fast), slow, trained)
  return state.replace(params=new_trained['params'], model_state=new_trained['model_state'], slow_weights=slow)


def end_lookahead(state: TrainState) -> TrainState:
  """A Lookahead run ended before its planned last step (by its time budget's deadline): the
  trained weights and BatchNorm statistics set to the slow ones, as `lookahead` sets them at the
  planned last step, so the run ends on the slow weights either way."""
  return lookahead(state, total_steps=state.step, peak_decay=1.0, every_steps=1)


def training_seed_key(seed: int) -> jax.Array:
  """The key every step's randomness is folded from (distinct from the parameter-init key)."""
  return jax.random.fold_in(jax.random.key(seed), 1)


def flip_seed_key(seed: int) -> jax.Array:
  """The key of `data.alternating_flips` (a sibling of `training_seed_key`)."""
  return jax.random.fold_in(jax.random.key(seed), 2)


def step_keys(seed_key: jax.Array, step: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(augment_key, dropout_key) of `step`: a function of (seed, step) only."""
  augment_key, dropout_key = jax.random.split(jax.random.fold_in(seed_key, step))
  return augment_key, dropout_key


def batch_of_step(train_images: jax.Array, train_labels: jax.Array, epoch_order: jax.Array,
                  step: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The `device` mode's batch of `step`: the rows of the on-device split that row
  `step % steps_per_epoch` of epoch_order int32 [steps_per_epoch, B] names."""
  indices = epoch_order[step % epoch_order.shape[0]]
  return train_images[indices], train_labels[indices]


def train_step(state: TrainState, metrics: TrainMetrics, images: jax.Array, labels: jax.Array,
               flips: jax.Array | None = None, *, total_steps: jax.Array, graphdef: nnx.GraphDef,
               make_optimizer: Callable[..., optax.GradientTransformation], seed_key: jax.Array,
               num_classes: int, config: ml_collections.ConfigDict) -> tuple[TrainState, TrainMetrics]:
  """One optimizer step on a batch: images uint8 [B, H, W, C], labels int32 [B]; flips bool [B]
  (optional) are the examples to mirror, in place of the random flip. `total_steps` (int32
  scalar) is the run's planned length, which the learning rates and lookahead follow; it is an
  argument, not a constant, so a time budget that plans again does not recompile the step.
  make_optimizer(total_steps=...) is the update rule of a schedule that long.

  The augmentation and dropout keys are `fold_in(seed_key, step)`, so a resumed run repeats
  exactly what an uninterrupted one would have done.
  """
  augment_key, dropout_key = step_keys(seed_key, state.step)
  inputs, targets = augment_batch(augment_key, images, labels, num_classes=num_classes, config=config,
                                  flips=flips)

  def loss_fn(params):
    logits, model_state = apply_model(graphdef, params, state.model_state, inputs, train=True,
                                      dropout_key=dropout_key)
    return softmax_cross_entropy(logits, targets).mean(), (logits, model_state)

  (loss, (logits, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  # A non-finite loss or gradient: optax.apply_if_finite skips the update; the BatchNorm
  # statistics are kept too, and the step is recorded for the loop to act on.
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, opt_state = make_optimizer(total_steps=total_steps).update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(
      step=state.step + 1, params=params, opt_state=opt_state,
      ema_params=(optax.incremental_update(params, state.ema_params, 1.0 - config.ema_decay)
                  if config.ema_decay else state.ema_params),
      model_state=jax.tree.map(lambda new, old: jnp.where(finite, new, old), model_state, state.model_state),
      first_nonfinite_step=jnp.where((state.first_nonfinite_step < 0) & ~finite, state.step,
                                     state.first_nonfinite_step))
  if config.lookahead_decay:
    new_state = lookahead(new_state, total_steps=total_steps, peak_decay=config.lookahead_decay,
                          every_steps=config.lookahead_every_steps)
  step_metrics = TrainMetrics.single_from_model_output(
      loss=jnp.broadcast_to(loss, labels.shape), logits=logits, labels=labels,
      grad_norm=jnp.broadcast_to(grad_norm, labels.shape), mask=jnp.broadcast_to(finite, labels.shape))
  return new_state, metrics.merge(step_metrics)


def train_step_on_device_data(state: TrainState, metrics: TrainMetrics, train_images: jax.Array,
                              train_labels: jax.Array, epoch_order: jax.Array, **step_kwargs,
                              ) -> tuple[TrainState, TrainMetrics]:
  """`train_step` on the batch the epoch order assigns to `state.step` (the `device` input mode),
  mirrored as `data.alternating_flips` says when config.data.alternate_flip is on.

  train_images: uint8 [N, H, W, C] and train_labels: int32 [N], the whole split on device.
  epoch_order: int32 [steps_per_epoch, B], row r = the example indices of the epoch's r-th step.
  """
  images, labels = batch_of_step(train_images, train_labels, epoch_order, state.step)
  flips = None
  if step_kwargs['config'].data.alternate_flip:
    steps_per_epoch = epoch_order.shape[0]
    flips = data.alternating_flips(flip_seed_key(step_kwargs['config'].seed),
                                   epoch_order[state.step % steps_per_epoch], state.step // steps_per_epoch)
  return train_step(state, metrics, images, labels, flips, **step_kwargs)


def eval_step(state: TrainState, metrics: ClassificationMetrics, images: jax.Array, labels: jax.Array,
              mask: jax.Array, *, graphdef: nnx.GraphDef, config: ml_collections.ConfigDict,
              ) -> ClassificationMetrics:
  """Adds a padded batch to `metrics`: images uint8 [B, H, W, C], labels [B], mask bool [B]
  (False on padding, which then counts in neither loss nor accuracy). With config.eval_flip and/or
  config.eval_translate the logits are the weighted mean over the test-time views
  (`data.test_time_views`, shifted before normalisation as training's crops are), run as one batch
  of V*B images."""
  views, weights = data.test_time_views(images, flip=config.eval_flip, translate_pixels=config.eval_translate,
                                        padding_mode=config.data.crop_padding_mode)
  num_views, batch = views.shape[:2]
  all_views = prepare_images(views.reshape(num_views * batch, *views.shape[2:]), config.data)
  logits, _ = apply_model(graphdef, state.params, state.model_state, all_views, train=False)
  logits = jnp.einsum('v,vbk->bk', weights, logits.reshape(num_views, batch, -1))
  losses = softmax_cross_entropy(logits, labels)
  return metrics.merge(ClassificationMetrics.single_from_model_output(
      loss=losses, logits=logits, labels=labels, mask=mask))
