"""The optax optimizer a config asks for: schedule, clipping, weight decay off norms and biases."""
import jax
import jax.numpy as jnp
import ml_collections
import optax
from optax import contrib

from hybridvit_jax.models import layers

# Newton-Schulz iterations that orthogonalise a Muon update: airbench's 3 (its network trains as
# well as with 5, for 40% less of the iteration's cost).
MUON_NEWTON_SCHULZ_STEPS = 3
# Conv kernels are [kh, kw, in, out]: Muon orthogonalises them as [kh*kw*in, out] matrices.
CONV_KERNEL_DIMENSIONS = contrib.MuonDimensionNumbers(reduction_axis=(0, 1, 2), output_axis=(3,))
LINEAR_KERNEL_DIMENSIONS = contrib.MuonDimensionNumbers(reduction_axis=(0,), output_axis=(1,))
KERNEL_GROUPS = (layers.KERNEL, layers.NORMALIZED_KERNEL, layers.HEAD_KERNEL)


def learning_rate_schedule(opt_config: ml_collections.ConfigDict, *, steps_per_epoch: int,
                           total_steps: int | jax.Array) -> optax.Schedule:
  """Linear warmup from 0 to the peak over `warmup_epochs`, then to `end_learning_rate_factor` x peak at
  `total_steps` along a cosine ('cosine') or a straight line ('linear'), or the peak throughout ('constant').

  `total_steps` may be a traced int32 scalar: the train step takes the run's planned length as an
  argument, so a time budget's new plan changes the schedule without a recompile (optax's own
  schedules need their lengths as Python numbers).
  """
  peak = opt_config.learning_rate
  end = peak * opt_config.end_learning_rate_factor
  warmup_steps = jnp.minimum(int(opt_config.warmup_epochs * steps_per_epoch), jnp.maximum(total_steps - 1, 0))
  decay_steps = jnp.maximum(total_steps - warmup_steps, 1)

  def schedule(count):
    warmup = peak * count / jnp.maximum(warmup_steps, 1)
    progress = jnp.clip((count - warmup_steps) / decay_steps, 0.0, 1.0)
    if opt_config.schedule == 'constant':
      after_warmup = jnp.full_like(progress, peak)
    elif opt_config.schedule == 'linear':
      after_warmup = peak + (end - peak) * progress
    else:
      after_warmup = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(count < warmup_steps, warmup, after_warmup)
  return schedule


def weight_decay_mask(param_groups):
  """True for the parameters weight decay applies to: the kernels (matrices, conv filters) of
  every group, not biases, norms, class tokens or position embeddings. `param_groups` is
  `models.param_groups` of the model: each parameter's group name, shaped as the parameters."""
  return jax.tree.map(lambda group: group in KERNEL_GROUPS, param_groups)


def renormalize_kernels() -> optax.GradientTransformation:
  """Adds to each update what first rescales its kernel [kh, kw, in, out] to Frobenius norm
  sqrt(out): with it, parameter + update = rescaled parameter + the incoming update (airbench's
  Muon). For kernels BatchNorm follows this changes nothing the network computes, and keeps the
  step size relative to the kernel fixed."""
  def update_fn(updates, state, params):
    def add_rescaling(update, kernel):
      return update + kernel * (jnp.sqrt(kernel.shape[-1]) / jnp.linalg.norm(kernel) - 1.0)
    return jax.tree.map(add_rescaling, updates, params), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def muon_labels(param_groups, *, all_matrices: bool):
  """The Muon group of each parameter: 'renormalized' for the kernels BatchNorm follows
  (layers.NORMALIZED_KERNEL); with all_matrices, 'plain' for every other kernel but the
  classifier head's (layers.KERNEL: Linear [in, out], conv [kh, kw, in, out]); 'rest' for everything else."""
  def label(group):
    if group == layers.NORMALIZED_KERNEL:
      return 'renormalized'
    return 'plain' if all_matrices and group == layers.KERNEL else 'rest'
  return jax.tree.map(label, param_groups)


def _muon_dimensions(kernels):
  """Muon's view of each kernel as a matrix: [in, out] as it is, [kh, kw, in, out] as [kh*kw*in, out]."""
  return jax.tree.map(lambda kernel: CONV_KERNEL_DIMENSIONS if kernel.ndim == 4 else LINEAR_KERNEL_DIMENSIONS,
                      kernels)


def muon_for_matrices(opt_config: ml_collections.ConfigDict, schedule: optax.Schedule,
                      rest: optax.GradientTransformation, param_groups) -> optax.GradientTransformation:
  """Muon (orthogonalised Nesterov momentum, `muon_momentum`, peak `muon_learning_rate` on the
  shape of `schedule`) on the kernels BatchNorm follows, each renormalised every step, and with
  `muon_all_matrices` on the network's other matrices too (not renormalised); `rest` on every
  other parameter."""
  def muon(*then):
    return optax.chain(
        contrib.scale_by_muon(ns_steps=MUON_NEWTON_SCHULZ_STEPS, beta=opt_config.muon_momentum, nesterov=True,
                              weight_dimension_numbers=_muon_dimensions),
        optax.scale_by_learning_rate(
            lambda step: schedule(step) * (opt_config.muon_learning_rate / opt_config.learning_rate)), *then)
  return optax.partition({'renormalized': muon(renormalize_kernels()), 'plain': muon(), 'rest': rest},
                         muon_labels(param_groups, all_matrices=opt_config.muon_all_matrices))


def make_optimizer(opt_config: ml_collections.ConfigDict, *, steps_per_epoch: int, total_steps: int | jax.Array,
                   param_groups) -> optax.GradientTransformation:
  """The full update rule: optional global-norm clipping, then adam / adamw / lamb / sgd / muon (sgd
  with Muon on the kernels BatchNorm follows); an update whose gradients are not finite is skipped
  (and counted) by optax.apply_if_finite. `param_groups` (`models.param_groups`) says which
  parameters are which kernels."""
  schedule = learning_rate_schedule(opt_config, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  if opt_config.name in ('adamw', 'lamb'):
    update = (optax.adamw if opt_config.name == 'adamw' else optax.lamb)(
        schedule, b1=opt_config.b1, b2=opt_config.b2, weight_decay=opt_config.weight_decay,
        mask=weight_decay_mask(param_groups))
  else:  # adam and sgd take weight decay as an L2 term added to the gradient
    if opt_config.name == 'adam':
      rule = optax.adam(schedule, b1=opt_config.b1, b2=opt_config.b2)
    else:
      rule = optax.sgd(schedule, momentum=opt_config.momentum or None, nesterov=opt_config.nesterov)
    update = optax.chain(optax.add_decayed_weights(opt_config.weight_decay, mask=weight_decay_mask(param_groups)),
                         rule)
    if opt_config.name == 'muon':
      update = muon_for_matrices(opt_config, schedule, update, param_groups)
  if opt_config.grad_clip_norm:
    update = optax.chain(optax.clip_by_global_norm(opt_config.grad_clip_norm), update)
  return optax.apply_if_finite(update, max_consecutive_errors=2**30)


def skipped_updates(opt_state) -> jax.Array:
  """How many updates optax.apply_if_finite skipped so far (int32 scalar)."""
  return opt_state.total_notfinite
