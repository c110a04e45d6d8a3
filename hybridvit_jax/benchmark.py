"""Compiles and times a config's real train step on synthetic data, on whatever backend is present.

    python -m hybridvit_jax.benchmark --config=configs/vit.py[:preset] [--config.KEY=VALUE ...] \
        [--steps=20] [--warmup=3]

The step is the one `loop.build_training` makes (model, batch size, dtype and input mode as the
config says), fed a random uint8 train set of a few batches with the data set's image shape: the
data set itself is never read, downloaded or prepared. Progress goes to stderr; the last stdout
line is one JSON object:

  config, model, dtype, input_mode, backend, device_kind, devices, jax_version, batch_size
  shape_source       where num_classes and the image shape came from: 'synthetic', 'image_folder'
                     (the folder's decoded cache), 'tfds_builder' (tfds's metadata, read without
                     preparing) or 'fallback' (32x32x3, 10 classes)
  num_classes, image_shape, params (number of model parameters)
  compile_s          seconds to lower and compile the train step
  compile_cache      whether JAX's persistent compilation cache is on (then compile_s may be a hit)
  flops_per_image    XLA's cost analysis of the step as traced (before compiling, which on GPU hands
                     matrix products to libraries it does not count), all devices, / batch_size
  step_ms            median of --steps steps after --warmup untimed ones, each waited for
  images_per_s       batch_size / step time
  achieved_gflops    flops of one step / step time, all devices together (1 GFLOP = 1e9 flops)
  peak_gflops        a chain of large matrix products in model.dtype on every device at once
  peak_matrix_size   n of those n x n products
  mfu                achieved_gflops / peak_gflops
  input_images_per_s the input pipeline alone, in the config's input mode (null if not timed)
  input_source       what that pipeline read

`benchmark(config, steps=..., warmup=...)` returns the same dict (less `config`, the file argument).
Timings on a machine shared with other work are indicative only.
"""
import functools
import itertools
import json
import statistics
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags, logging
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import config_flags

from hybridvit_jax import cli, configuration, data, flops, models
from hybridvit_jax.data import source
from hybridvit_jax.training import inputs, loop
from hybridvit_jax.training import steps as training_steps
from hybridvit_jax.training.metrics import TrainMetrics

TRAIN_SET_BATCHES = 4  # the random train set holds this many global batches
FALLBACK_NUM_CLASSES = 10
FALLBACK_IMAGE_SHAPE = (32, 32, 3)
PEAK_MATRIX_SIZE = {'cpu': 1024}  # by backend; large enough to reach the matrix units' peak
PEAK_MATRIX_SIZE_ACCELERATOR = 8192
PEAK_CHAIN_LENGTH = 4  # matrix products per timed call, so dispatch overhead does not count
SIGNIFICANT_DIGITS = 5

StepInputs = tuple[jax.Array, ...]  # what train_step takes after (state, metrics)


# ---------------------------------------------------------------------------------- shapes
def dataset_shape(data_config: ml_collections.ConfigDict) -> tuple[data.DatasetInfo, str]:
  """The data set's classes and image shape, without reading, downloading or preparing it.

  Returns (info, shape_source), shape_source one of 'synthetic' (data.name='synthetic'),
  'image_folder' (the folder's images, decoded into its cache if not done before), 'tfds_builder' (tfds's builder metadata, known before the data set is prepared) or 'fallback'
  (FALLBACK_IMAGE_SHAPE and FALLBACK_NUM_CLASSES, when tfds cannot say; logged with the reason).
  """
  if source.in_memory(data_config):  # local and without tfds: synthetic or image_folder
    return data.dataset_info(data_config), data_config.name
  try:
    features = tfds.builder(data_config.name, data_dir=data_config.data_dir or None).info.features
    image_shape, num_classes = tuple(features['image'].shape), features['label'].num_classes
  except Exception as error:  # pylint: disable=broad-except  # any reason tfds cannot describe it
    return _fallback_info(data_config.name, f'tfds cannot describe it ({type(error).__name__})'), 'fallback'
  if None in image_shape:
    return _fallback_info(data_config.name, f'its images vary in shape {image_shape}'), 'fallback'
  return data.DatasetInfo(name=data_config.name, num_classes=num_classes, image_shape=image_shape,
                          class_names=tuple(features['label'].names)), 'tfds_builder'


def _fallback_info(name: str, reason: str) -> data.DatasetInfo:
  """FALLBACK_NUM_CLASSES classes of FALLBACK_IMAGE_SHAPE images, with a warning giving `reason`."""
  logging.warning('benchmark: %s: %s; using %d classes of %s images', name, reason, FALLBACK_NUM_CLASSES,
                  'x'.join(map(str, FALLBACK_IMAGE_SHAPE)))
  return data.DatasetInfo(name=name, num_classes=FALLBACK_NUM_CLASSES, image_shape=FALLBACK_IMAGE_SHAPE,
                          class_names=tuple(f'class_{i}' for i in range(FALLBACK_NUM_CLASSES)))


def random_train_set(info: data.DatasetInfo, num_examples: int, seed: int) -> dict[str, np.ndarray]:
  """{'image': uint8 [num_examples, H, W, C] uniform in 0..255, 'label': int32 [num_examples]}."""
  rng = np.random.default_rng(seed)
  return {'image': rng.integers(0, 256, (num_examples, *info.image_shape), dtype=np.uint8),
          'label': rng.integers(0, info.num_classes, num_examples, dtype=np.int32)}


# ---------------------------------------------------------------- step inputs, by input mode
def device_step_inputs(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                       train_set: dict[str, np.ndarray]) -> StepInputs:
  """(train_images, train_labels, epoch_order) placed as inputs.TrainInput places them in the
  `device` mode: the set replicated, epoch 0's order [steps_per_epoch, B] split along 'data'."""
  replicated = NamedSharding(mesh, P())
  order = inputs.epoch_order(config.seed, 0, len(train_set['label']), config.batch_size)
  return (inputs.to_global(train_set['image'], replicated), inputs.to_global(train_set['label'], replicated),
          inputs.to_global(order, NamedSharding(mesh, P(None, 'data'))))


def stream_step_inputs(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                       train_set: dict[str, np.ndarray]) -> StepInputs:
  """(images, labels) of one global batch split along 'data', as the `stream` mode yields them."""
  batch_sharding = NamedSharding(mesh, P('data'))
  return tuple(inputs.to_global(train_set[key][:config.batch_size], batch_sharding) for key in ('image', 'label'))


STEP_INPUTS: dict[str, Callable[..., StepInputs]] = {'device': device_step_inputs, 'stream': stream_step_inputs}


# -------------------------------------------------------------------------------- timing
def median_seconds(call: Callable[[], Any], *, steps: int, warmup: int) -> float:
  """Median wall-clock seconds of `steps` calls of `call` after `warmup` untimed ones; each call
  is timed until jax.block_until_ready returns on its result."""
  durations = []
  for _ in range(warmup + steps):
    start = time.perf_counter()
    jax.block_until_ready(call())
    durations.append(time.perf_counter() - start)
  return statistics.median(durations[warmup:])


def train_step_seconds(compiled_step, state, metrics: TrainMetrics, step_inputs: StepInputs, *,
                       steps: int, warmup: int) -> float:
  """Median seconds of one train step, each waited for on its new state. `state` and `metrics`
  are donated to the first step: neither can be used afterwards."""
  carry = [state, metrics]

  def one_step():
    carry[:] = compiled_step(*carry, *step_inputs)
    return carry[0]

  return median_seconds(one_step, steps=steps, warmup=warmup)


def peak_flops_per_s(dtype: str, mesh: jax.sharding.Mesh, *, steps: int, warmup: int) -> tuple[float, int]:
  """(flops/s, n): a chain of PEAK_CHAIN_LENGTH n x n matrix products in `dtype` (models.DTYPES)
  on every device of `mesh` at once, median time, 2 n^3 flops each; the whole mesh's peak."""
  n = PEAK_MATRIX_SIZE.get(jax.default_backend(), PEAK_MATRIX_SIZE_ACCELERATOR)
  num_devices = mesh.devices.size
  per_device = NamedSharding(mesh, P('data'))
  random_matrices = jax.jit(
      lambda key: jax.random.normal(key, (num_devices, n, n), models.DTYPES[dtype]) / np.sqrt(n),
      out_shardings=per_device)
  a, b = random_matrices(jax.random.key(0)), random_matrices(jax.random.key(1))

  @functools.partial(jax.jit, out_shardings=per_device)
  def matmul_chain(a, b):
    for _ in range(PEAK_CHAIN_LENGTH):
      a = a @ b
    return a

  compiled_chain = matmul_chain.lower(a, b).compile()
  seconds = median_seconds(lambda: compiled_chain(a, b), steps=steps, warmup=warmup)
  return num_devices * PEAK_CHAIN_LENGTH * 2 * n**3 / seconds, n


# ------------------------------------------------------------- input pipeline, by input mode
def device_input_images_per_s(config: ml_collections.ConfigDict, info: data.DatasetInfo, mesh: jax.sharding.Mesh,
                              step_inputs: StepInputs, *, steps: int, warmup: int) -> tuple[float, str]:
  """(images/s, input_source) of what the `device` mode's step does to produce its batch, alone:
  steps.batch_of_step, then steps.augment_batch with the step's augmentation key, exactly as
  steps.train_step_on_device_data and steps.train_step do it."""
  seed_key = training_steps.training_seed_key(config.seed)

  @functools.partial(jax.jit, out_shardings=NamedSharding(mesh, P('data')))
  def batch_of_step(step, train_images, train_labels, epoch_order):
    images, labels = training_steps.batch_of_step(train_images, train_labels, epoch_order, step)
    augment_key, _ = training_steps.step_keys(seed_key, step)
    return training_steps.augment_batch(augment_key, images, labels, num_classes=info.num_classes, config=config)

  compiled_batch_of_step = batch_of_step.lower(np.int32(0), *step_inputs).compile()
  step_counter = itertools.count()
  seconds = median_seconds(lambda: compiled_batch_of_step(np.int32(next(step_counter)), *step_inputs),
                           steps=steps, warmup=warmup)
  return config.batch_size / seconds, f'random uint8 train set of {len(step_inputs[1])} examples on device'


def stream_input_images_per_s(config: ml_collections.ConfigDict, info: data.DatasetInfo, mesh: jax.sharding.Mesh,
                              step_inputs: StepInputs, *, steps: int, warmup: int) -> tuple[float | None, str]:
  """(images/s, input_source) of the `stream` mode's iterator, inputs.TrainInput.epoch (tf.data
  read, shuffle, batch, placement on the mesh), on the configured train split; (None, why) when
  that split cannot be read without downloading or preparing the data set."""
  del info, step_inputs  # the stream reads the data set itself
  if not source.in_memory(config.data) and not tfds.builder(
      config.data.name, data_dir=config.data.data_dir or None).is_prepared():
    return None, f'not timed: {config.data.name} is not prepared in data.data_dir'
  train_input = inputs.TrainInput(config, mesh)
  batches = itertools.chain.from_iterable(train_input.epoch(epoch) for epoch in itertools.count())
  seconds = median_seconds(lambda: next(batches), steps=steps, warmup=warmup)
  return config.batch_size / seconds, f'tf.data stream of {config.data.name} {config.data.train_split}'


INPUT_IMAGES_PER_S: dict[str, Callable[..., tuple[float | None, str]]] = {
    'device': device_input_images_per_s, 'stream': stream_input_images_per_s}


# ----------------------------------------------------------------------------- benchmark
def _significant(value: float | None) -> float | None:
  """`value` rounded to SIGNIFICANT_DIGITS significant digits (None stays None)."""
  return None if value is None else float(f'{value:.{SIGNIFICANT_DIGITS}g}')


def benchmark(config: ml_collections.ConfigDict, *, steps: int, warmup: int) -> dict[str, Any]:
  """Compiles and times `config`'s train step and input pipeline; see the module docstring for
  the fields. Raises configuration.ConfigError for an invalid config, before compiling."""
  info, shape_source = dataset_shape(config.data)
  configuration.validate(config, device_count=jax.device_count(), image_shape=info.image_shape)
  mode = config.data.input_mode
  logging.info('benchmark: %s, batch %d, %s, %s input, %d %s device(s), %s images', config.model.name,
               config.batch_size, config.model.dtype, mode, jax.device_count(), jax.default_backend(),
               'x'.join(map(str, info.image_shape)))

  mesh = loop.make_mesh()
  train_set = random_train_set(info, TRAIN_SET_BATCHES * config.batch_size, config.seed)
  init_state, train_step, _ = loop.build_training(config, info, mesh, steps_per_epoch=TRAIN_SET_BATCHES)
  total_steps = config.num_epochs * TRAIN_SET_BATCHES
  state = init_state()
  metrics = jax.device_put(TrainMetrics.empty(), NamedSharding(mesh, P()))
  step_inputs = STEP_INPUTS[mode](config, mesh, train_set)
  params = sum(leaf.size for leaf in jax.tree.leaves(state.params))

  start = time.perf_counter()
  lowered_step = train_step.lower(state, metrics, *step_inputs, total_steps=total_steps)
  compiled_step = functools.partial(lowered_step.compile(), total_steps=total_steps)
  compile_s = time.perf_counter() - start
  flops_per_step = flops.traced_flops(lowered_step)
  logging.info('benchmark: compiled in %.1f s; %.4g GFLOP per step; timing %d steps after %d',
               compile_s, flops_per_step / 1e9, steps, warmup)
  step_s = train_step_seconds(compiled_step, state, metrics, step_inputs, steps=steps, warmup=warmup)

  logging.info('benchmark: step %.2f ms; measuring the %s matrix-product peak', step_s * 1e3, config.model.dtype)
  peak, peak_matrix_size = peak_flops_per_s(config.model.dtype, mesh, steps=steps, warmup=warmup)
  logging.info('benchmark: peak %.4g GFLOP/s; timing the %s input pipeline', peak / 1e9, mode)
  input_images_per_s, input_source = INPUT_IMAGES_PER_S[mode](config, info, mesh, step_inputs,
                                                              steps=steps, warmup=warmup)
  achieved = flops_per_step / step_s
  return {
      'model': config.model.name, 'dtype': config.model.dtype, 'input_mode': mode,
      'backend': jax.default_backend(), 'device_kind': jax.devices()[0].device_kind,
      'devices': jax.device_count(), 'jax_version': jax.__version__, 'batch_size': config.batch_size,
      'shape_source': shape_source, 'num_classes': info.num_classes, 'image_shape': list(info.image_shape),
      'params': params,
      'compile_s': _significant(compile_s),
      'compile_cache': bool(jax.config.jax_compilation_cache_dir),
      'flops_per_image': _significant(flops_per_step / config.batch_size),
      'step_ms': _significant(step_s * 1e3),
      'images_per_s': _significant(config.batch_size / step_s),
      'achieved_gflops': _significant(achieved / 1e9),
      'peak_gflops': _significant(peak / 1e9),
      'peak_matrix_size': peak_matrix_size,
      'mfu': _significant(achieved / peak),
      'input_images_per_s': _significant(input_images_per_s),
      'input_source': input_source,
  }


# ---------------------------------------------------------------------------------- command
def define_flags() -> None:
  """The command's flags, defined only when it runs (importing this module adds none)."""
  config_flags.DEFINE_config_file('config', None, 'Experiment config file, e.g. configs/vit.py:paper.',
                                  lock_config=True)
  flags.DEFINE_integer('steps', 20, 'Timed train steps; their median is reported.', lower_bound=1)
  flags.DEFINE_integer('warmup', 3, 'Untimed steps before the timed ones.', lower_bound=0)
  flags.mark_flags_as_required(['config'])


def config_argument(config_flag: flags.Flag) -> str:
  """The --config flag's value as given on the command line, e.g. 'configs/vit.py:smoke'."""
  return config_flag.serialize().split('=', 1)[1]


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments: {" ".join(argv[1:])}')
  options = flags.FLAGS
  cli.quiet_library_logs()
  cli.use_compilation_cache(options.config.compilation_cache)
  result = cli.run_and_exit(benchmark, options.config, steps=options.steps, warmup=options.warmup)
  print(json.dumps({'config': config_argument(options['config']), **result}), flush=True)


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=cli.parse_training_flags_or_exit)
