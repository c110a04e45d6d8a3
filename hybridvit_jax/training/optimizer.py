"""The optax optimizer a config asks for: schedule, clipping, weight decay off norms and biases."""
import jax
import ml_collections
import optax


def learning_rate_schedule(opt_config: ml_collections.ConfigDict, *, steps_per_epoch: int,
                           total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to the peak over `warmup_epochs`, then cosine decay or constant."""
  peak = opt_config.learning_rate
  warmup_steps = min(int(opt_config.warmup_epochs * steps_per_epoch), max(total_steps - 1, 0))
  if opt_config.schedule == 'constant':
    after_warmup = optax.constant_schedule(peak)
  else:
    after_warmup = optax.cosine_decay_schedule(
        peak, decay_steps=max(total_steps - warmup_steps, 1), alpha=opt_config.end_learning_rate_factor)
  if warmup_steps == 0:
    return after_warmup
  warmup = optax.linear_schedule(0.0, peak, warmup_steps)
  return optax.join_schedules([warmup, after_warmup], boundaries=[warmup_steps])


def weight_decay_mask(params):
  """True for the leaves weight decay applies to: kernels (matrices, conv filters), not norms,
  biases, class tokens or position embeddings. `params` is a nested dict of arrays."""
  def is_kernel(path, _):
    return getattr(path[-1], 'key', None) == 'kernel'
  return jax.tree_util.tree_map_with_path(is_kernel, params)


def make_optimizer(opt_config: ml_collections.ConfigDict, *, steps_per_epoch: int,
                   total_steps: int) -> optax.GradientTransformation:
  """The full update rule: optional global-norm clipping, then adam / adamw / lamb / sgd; an update
  whose gradients are not finite is skipped (and counted) by optax.apply_if_finite."""
  schedule = learning_rate_schedule(opt_config, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  if opt_config.name in ('adamw', 'lamb'):
    update = (optax.adamw if opt_config.name == 'adamw' else optax.lamb)(
        schedule, b1=opt_config.b1, b2=opt_config.b2, weight_decay=opt_config.weight_decay,
        mask=weight_decay_mask)
  else:  # adam and sgd take weight decay as an L2 term added to the gradient
    if opt_config.name == 'adam':
      rule = optax.adam(schedule, b1=opt_config.b1, b2=opt_config.b2)
    else:
      rule = optax.sgd(schedule, momentum=opt_config.momentum or None, nesterov=opt_config.nesterov)
    update = optax.chain(optax.add_decayed_weights(opt_config.weight_decay, mask=weight_decay_mask), rule)
  if opt_config.grad_clip_norm:
    update = optax.chain(optax.clip_by_global_norm(opt_config.grad_clip_norm), update)
  return optax.apply_if_finite(update, max_consecutive_errors=2**30)


def skipped_updates(opt_state) -> jax.Array:
  """How many updates optax.apply_if_finite skipped so far (int32 scalar)."""
  return opt_state.total_notfinite
