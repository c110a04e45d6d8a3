"""Property-based tests: config validation, and the input order over any batch size and
device count (every example seen once per epoch)."""
import jax
import numpy as np
from hypothesis import given, settings, strategies as st
from jax.sharding import NamedSharding, PartitionSpec as P

from hybridvit_jax import configuration
from hybridvit_jax.training import inputs


@settings(max_examples=200, deadline=None)
@given(batch_size=st.integers(-8, 1024), device_count=st.sampled_from([1, 2, 4, 8]),
       learning_rate=st.floats(-1.0, 1.0, allow_nan=False), label_smoothing=st.floats(-0.5, 1.5))
def test_validation_accepts_exactly_the_valid_values(batch_size, device_count, learning_rate, label_smoothing):
  config = configuration.base_config()
  config.batch_size = batch_size
  config.optimizer.learning_rate = learning_rate
  config.label_smoothing = label_smoothing
  valid = (batch_size > 0 and batch_size % device_count == 0 and learning_rate > 0
           and 0 <= label_smoothing < 1 and config.eval_batch_size % device_count == 0)
  try:
    configuration.validate(config, device_count=device_count, image_shape=(32, 32, 3))
  except configuration.ConfigError as error:
    assert not valid, error
    message = str(error)
    assert '\n' not in message and '--config.' in message
  else:
    assert valid


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_every_example_is_seen_once_per_epoch_on_any_device_count(data):
  device_count = data.draw(st.sampled_from([1, 2, 4]), label='devices')
  batch_size = device_count * data.draw(st.integers(1, 8), label='per-device batch')
  num_examples = batch_size * data.draw(st.integers(1, 6), label='steps per epoch')
  epoch = data.draw(st.integers(0, 1000), label='epoch')
  mesh = jax.make_mesh((device_count,), ('data',), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:device_count])
  order = inputs.to_global(inputs.epoch_order(7, epoch, num_examples, batch_size), NamedSharding(mesh, P(None, 'data')))
  per_device = [np.asarray(shard.data) for shard in order.addressable_shards]
  assert all(part.shape == (num_examples // batch_size, batch_size // device_count) for part in per_device)
  seen = np.sort(np.concatenate([part.ravel() for part in per_device]))
  np.testing.assert_array_equal(seen, np.arange(num_examples))
