"""The training state: plain pytrees of arrays, created already sharded on the mesh."""
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from hybridvit_jax import models


@flax.struct.dataclass
class TrainState:
  """Everything the step updates.

  step: int32 scalar, the number of optimizer steps taken.
  params: nested dict of float32 arrays (the model's nnx.Param values).
  model_state: nested dict of the model's other variables (BatchNorm statistics).
  opt_state: the optax state for `params` (optax.apply_if_finite counts skipped updates).
  first_nonfinite_step: int32 scalar, the first step whose loss or gradients were not
    finite (its update was skipped), or -1.
  ema_params: the exponential moving average of `params` (config.ema_decay), else {}.
  slow_weights: Lookahead's slow weights {'params': ..., 'model_state': ...} (config.lookahead_decay),
    else {}.
  """
  step: jax.Array
  params: dict
  model_state: dict
  opt_state: optax.OptState
  first_nonfinite_step: jax.Array
  ema_params: dict
  slow_weights: dict


def model_graphdef(model_config: ml_collections.ConfigDict, *, num_classes: int,
                   image_shape: tuple[int, int, int]) -> nnx.GraphDef:
  """The model's static structure, built without allocating parameters."""
  abstract_model = models.abstract_model(model_config, num_classes=num_classes, image_shape=image_shape)
  graphdef, _, _ = nnx.split(abstract_model, nnx.Param, ...)
  return graphdef


def init_train_state(model_config: ml_collections.ConfigDict, optimizer: optax.GradientTransformation,
                     *, num_classes: int, image_shape: tuple[int, int, int], seed: int,
                     keep_ema: bool = False, keep_slow_weights: bool = False) -> TrainState:
  """A fresh state; pure, so it can run under jax.jit with replicated out_shardings."""
  model = models.create_model(model_config, num_classes=num_classes, image_shape=image_shape,
                              rngs=nnx.Rngs(seed))
  _, params, model_state = nnx.split(model, nnx.Param, ...)
  params, model_state = nnx.to_pure_dict(params), nnx.to_pure_dict(model_state)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                    opt_state=optimizer.init(params), first_nonfinite_step=jnp.full((), -1, jnp.int32),
                    ema_params=jax.tree.map(jnp.copy, params) if keep_ema else {},
                    slow_weights=(jax.tree.map(jnp.copy, {'params': params, 'model_state': model_state})
                                  if keep_slow_weights else {}))
