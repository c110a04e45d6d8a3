"""The pure train and eval steps; the loop binds their keyword arguments and jits them.

Shapes: B is the global batch, K the number of classes, images are uint8 [B, H, W, C] until
`prepare_images` turns them into normalised float32 inside the step.
"""
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from hybridvit_jax import data
from hybridvit_jax.training.metrics import ClassificationMetrics
from hybridvit_jax.training.state import TrainState


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
  """Per-example loss [B] for logits [B, K] and integer labels [B]."""
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def apply_model(graphdef: nnx.GraphDef, params: dict, model_state: dict, images: jax.Array, *,
                train: bool, dropout_key: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """Runs the network on float images [B, H, W, C]; returns logits [B, K] and the new model state."""
  model = nnx.merge(graphdef, params, model_state, copy=True)
  rngs = nnx.Rngs(dropout=dropout_key) if dropout_key is not None else None
  logits = model(images, train=train, rngs=rngs)
  return logits, nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))


def prepare_images(images: jax.Array, data_config: ml_collections.ConfigDict,
                   augment_key: jax.Array | None = None) -> jax.Array:
  """uint8 [B, H, W, C] -> float32, augmented (when a key is given) then normalised."""
  if augment_key is not None:
    images = data.augment(augment_key, images, crop_padding=data_config.crop_padding, flip=data_config.flip)
  return data.normalize(images, data_config.mean, data_config.std)


def train_step(state: TrainState, metrics: ClassificationMetrics, images: jax.Array, labels: jax.Array, *,
               graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, seed_key: jax.Array,
               config: ml_collections.ConfigDict) -> tuple[TrainState, ClassificationMetrics]:
  """One optimizer step on a batch: images uint8 [B, H, W, C], labels int32 [B].

  The augmentation and dropout keys are `fold_in(seed_key, step)`, so a resumed run repeats
  exactly what an uninterrupted one would have done.
  """
  step_key = jax.random.fold_in(seed_key, state.step)
  augment_key, dropout_key = jax.random.split(step_key)
  images = prepare_images(images, config.data, augment_key)

  def loss_fn(params):
    logits, model_state = apply_model(graphdef, params, state.model_state, images, train=True,
                                      dropout_key=dropout_key)
    losses = softmax_cross_entropy(logits, labels, config.label_smoothing)
    return losses.mean(), (logits, model_state)

  (loss, (logits, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  # A non-finite loss or gradient: optax.apply_if_finite skips the update; the BatchNorm
  # statistics are kept too, and the step is recorded for the loop to act on.
  finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  new_state = state.replace(
      step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state,
      model_state=jax.tree.map(lambda new, old: jnp.where(finite, new, old), model_state, state.model_state),
      first_nonfinite_step=jnp.where((state.first_nonfinite_step < 0) & ~finite, state.step,
                                     state.first_nonfinite_step))
  step_metrics = ClassificationMetrics.single_from_model_output(
      loss=jnp.broadcast_to(loss, labels.shape), logits=logits, labels=labels,
      mask=jnp.broadcast_to(finite, labels.shape))
  return new_state, metrics.merge(step_metrics)


def train_step_on_device_data(state: TrainState, metrics: ClassificationMetrics, train_images: jax.Array,
                              train_labels: jax.Array, epoch_order: jax.Array, **step_kwargs,
                              ) -> tuple[TrainState, ClassificationMetrics]:
  """`train_step` on the batch the epoch order assigns to `state.step` (the `device` input mode).

  train_images: uint8 [N, H, W, C] and train_labels: int32 [N], the whole split on device.
  epoch_order: int32 [steps_per_epoch, B], row r = the example indices of the epoch's r-th step.
  """
  indices = epoch_order[state.step % epoch_order.shape[0]]
  return train_step(state, metrics, train_images[indices], train_labels[indices], **step_kwargs)


def eval_step(state: TrainState, metrics: ClassificationMetrics, images: jax.Array, labels: jax.Array,
              mask: jax.Array, *, graphdef: nnx.GraphDef, config: ml_collections.ConfigDict,
              ) -> ClassificationMetrics:
  """Adds a padded batch to `metrics`: images uint8 [B, H, W, C], labels [B], mask bool [B]
  (False on padding, which then counts in neither loss nor accuracy)."""
  logits, _ = apply_model(graphdef, state.params, state.model_state, prepare_images(images, config.data),
                          train=False)
  losses = softmax_cross_entropy(logits, labels)
  return metrics.merge(ClassificationMetrics.single_from_model_output(
      loss=losses, logits=logits, labels=labels, mask=mask))
