"""The run configuration: its schema with defaults, its validation, and its copy in a workdir.

Every experiment file under `configs/` starts from `base_config()` and overrides what changes.
`validate(config)` runs before anything compiles or writes and raises `ConfigError` with one
line that names the key and what would be valid.
"""
import json
import pathlib

import ml_collections

from hybridvit_jax import data
from hybridvit_jax import models

RUN_CONFIG_FILE = 'config.json'

OPTIMIZERS = ('adam', 'adamw', 'lamb', 'sgd', 'muon')
SCHEDULES = ('cosine', 'linear', 'constant')
# What makes a checkpoint the run's best, each with the sign that makes higher better: the highest
# val accuracy, or the lowest val loss.
BEST_CHECKPOINT_METRICS = {'val_accuracy': 1.0, 'val_loss': -1.0}
INPUT_MODES = ('device', 'stream')
NAN_POLICIES = ('stop', 'skip')
# Keys whose change makes an existing run's checkpoints meaningless for the new config.
RUN_IDENTITY_KEYS = ('model.', 'data.name')


class ConfigError(ValueError):
  """A config value is invalid; the message is one line naming the key and the fix."""


def base_config() -> ml_collections.ConfigDict:
  """The full schema with defaults (a strong ViT-Ti/4 recipe on CIFAR-10); locked."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.num_epochs = 100
  config.max_steps = 0  # 0 = no limit; otherwise training stops after this many steps.
  # 0 = off; otherwise as many steps (at most num_epochs / max_steps) as fit in this many minutes
  # of elapsed_s (compile and evaluations included), planned from the speed of the first steps.
  config.budget_minutes = 0.0
  config.batch_size = 256  # global, over all devices and processes
  config.eval_batch_size = 500
  config.label_smoothing = 0.0
  config.log_every_steps = 100
  config.checkpoint_every_steps = 0  # 0 = at the end of every epoch only
  config.keep_checkpoints = 2
  config.best_checkpoint_metric = 'val_accuracy'  # the best checkpoint's: 'val_accuracy' (highest) | 'val_loss' (lowest)
  config.early_stopping_patience = 0  # evaluations without a better best_checkpoint_metric; 0 = off
  config.eval_test_every_epoch = True
  config.eval_every_epochs = 1  # evaluate (and record in history.jsonl) every n-th epoch and at the end
  config.nan_policy = 'stop'
  config.ema_decay = 0.0  # exponential moving average of the weights, evaluated too; 0 = off
  # Lookahead (airbench's): every lookahead_every_steps steps the slow weights (parameters and
  # BatchNorm statistics) move to the trained ones by 1 - d and the trained ones are set to them,
  # d = lookahead_decay * (step / total steps)**3; the last step leaves the trained weights at the
  # slow ones. 0 = off.
  config.lookahead_decay = 0.0
  config.lookahead_every_steps = 5
  config.eval_flip = False  # test-time augmentation: average the logits of the image and its mirror
  config.eval_translate = 0  # test-time augmentation: n > 0 adds views shifted n pixels (weights 1/2, 1/4, 1/4)
  # n > 0: a jax.profiler trace of n steps, a few steps into the session, in WORKDIR/plugins/profile
  config.profile_steps = 0
  # JAX's persistent compilation cache (in $JAX_COMPILATION_CACHE_DIR, else the user's cache
  # directory), so a resumed run, evaluate, report and benchmark do not compile the same step again
  config.compilation_cache = True

  config.data = ml_collections.ConfigDict()
  config.data.name = 'cifar10'
  config.data.data_dir = ''
  config.data.manual_dir = ''
  config.data.train_split = 'train[:45000]'
  config.data.val_split = 'train[45000:]'
  config.data.test_split = 'test'
  config.data.input_mode = 'device'  # 'device': the split lives on device; 'stream': tf.data
  config.data.shuffle_buffer = 50_000  # examples, for the stream mode's shuffle
  config.data.mean = (0.4914, 0.4822, 0.4465)  # per channel, of pixels scaled to [0, 1]
  config.data.std = (0.2470, 0.2435, 0.2616)
  config.data.crop_padding = 4  # random crop after padding; 0 = off
  config.data.crop_padding_mode = 'constant'  # the padding of crops and test-time shifts: 'constant' (zeros) | 'reflect'
  config.data.flip = True  # random horizontal flip
  config.data.alternate_flip = False  # with flip: mirror each image in every other epoch, not at random
  config.data.randaugment_num_ops = 0  # RandAugment ops per image; 0 = off
  config.data.randaugment_magnitude = 9.0  # 0..10
  config.data.mixup_alpha = 0.0  # Beta(alpha, alpha) mixing; 0 = off
  config.data.cutmix_alpha = 0.0  # 0 = off; with mixup too, one of them per batch
  config.data.random_erasing = 0.0  # probability per image; 0 = off
  config.data.cutout_size = 0  # side of a zeroed square, pixels; 0 = off
  config.data.synthetic_train_examples = 512
  config.data.synthetic_test_examples = 256

  config.model = models.default_model_config()

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = 'adamw'
  config.optimizer.learning_rate = 1e-3  # peak, for the global batch size
  config.optimizer.schedule = 'cosine'  # after warmup: 'cosine' | 'linear' (decay to the end factor) | 'constant'
  config.optimizer.warmup_epochs = 5.0
  config.optimizer.end_learning_rate_factor = 0.0  # cosine or linear decay ends at this fraction of the peak
  config.optimizer.weight_decay = 0.05  # decoupled for adamw, L2 for sgd; never on norms/biases
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.999
  config.optimizer.momentum = 0.9  # sgd
  config.optimizer.nesterov = False  # sgd
  # muon: Muon on the conv kernels BatchNorm follows (models.param_groups), sgd (above) on everything else
  config.optimizer.muon_learning_rate = 0.24  # peak; the schedule's shape is learning_rate's
  config.optimizer.muon_momentum = 0.6  # Nesterov
  config.optimizer.muon_all_matrices = False  # Muon on the other matrices too (not the head's)
  config.optimizer.grad_clip_norm = 1.0  # global norm; 0 = off

  config.lock()
  return config


def _fail(key: str, value, expected: str):
  raise ConfigError(f'{key}={value!r} is invalid: {expected} (set --config.{key}=...)')


def _require_choice(config, key: str, choices):
  value = config[key]
  if value not in choices:
    _fail(key, value, f'expected one of {", ".join(map(str, choices))}')


def _require_positive(config, key: str, *, allow_zero: bool = False):
  value = config[key]
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    _fail(key, value, 'expected a number')
  if value < 0 or (value == 0 and not allow_zero):
    _fail(key, value, 'expected a number ' + ('>= 0' if allow_zero else '> 0'))


def _lookup(config, dotted_key: str):
  node = config
  for part in dotted_key.split('.'):
    node = node[part]
  return node


def validate(config: ml_collections.ConfigDict, *, device_count: int,
             image_shape: tuple[int, int, int] | None = None) -> None:
  """Raises ConfigError naming the first invalid key; `image_shape` enables the model checks."""
  for key in ('num_epochs', 'batch_size', 'eval_batch_size', 'log_every_steps', 'keep_checkpoints',
              'eval_every_epochs', 'lookahead_every_steps'):
    _require_positive(config, key)
  for key in ('max_steps', 'budget_minutes', 'checkpoint_every_steps', 'early_stopping_patience', 'data.crop_padding',
              'eval_translate', 'profile_steps'):
    _require_positive(config, key, allow_zero=True)
  for key in ('batch_size', 'eval_batch_size'):
    if config[key] % device_count:
      _fail(key, config[key], f'must be divisible by the {device_count} devices')
  for key in ('label_smoothing', 'ema_decay', 'lookahead_decay', 'data.random_erasing'):
    if not 0.0 <= _lookup(config, key) < 1.0 + (key == 'data.random_erasing'):
      _fail(key, _lookup(config, key), 'expected a value in [0, 1)' if key != 'data.random_erasing' else '[0, 1]')
  for key in ('data.randaugment_num_ops', 'data.randaugment_magnitude', 'data.mixup_alpha',
              'data.cutmix_alpha', 'data.cutout_size'):
    _require_positive(config, key, allow_zero=True)
  _require_choice(config, 'nan_policy', NAN_POLICIES)
  _require_choice(config, 'data.input_mode', INPUT_MODES)
  _require_choice(config, 'data.crop_padding_mode', data.PADDING_MODES)
  if config.data.alternate_flip and not (config.data.flip and config.data.input_mode == 'device'):
    _fail('data.alternate_flip', True, 'it needs data.flip=True and data.input_mode=device (the step '
          'must know each example\'s index); set it to False')
  for key in ('data.mean', 'data.std'):
    if len(_lookup(config, key)) not in (1, 3) or (key == 'data.std' and min(config.data.std) <= 0):
      _fail(key, _lookup(config, key), 'expected 1 or 3 per-channel values (std > 0)')
  opt = config.optimizer
  _require_choice(config, 'best_checkpoint_metric', BEST_CHECKPOINT_METRICS)
  _require_choice(config, 'optimizer.name', OPTIMIZERS)
  _require_choice(config, 'optimizer.schedule', SCHEDULES)
  _require_positive(config, 'optimizer.learning_rate')
  for key in ('optimizer.warmup_epochs', 'optimizer.weight_decay', 'optimizer.grad_clip_norm',
              'optimizer.end_learning_rate_factor'):
    _require_positive(config, key, allow_zero=True)
  _require_positive(config, 'optimizer.muon_learning_rate')
  for key in ('b1', 'b2', 'momentum', 'muon_momentum'):
    if not 0.0 <= opt[key] < 1.0:
      _fail(f'optimizer.{key}', opt[key], 'expected a value in [0, 1)')
  if image_shape is not None:
    try:
      models.validate_model_config(config.model, image_shape)
    except ValueError as error:
      raise ConfigError(str(error)) from None


def save_run_config(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  """Writes the run's config as JSON (what evaluate, predict and report rebuild the run from)."""
  path = workdir / RUN_CONFIG_FILE
  tmp = path.with_suffix('.json.tmp')
  tmp.write_text(config.to_json(indent=2, sort_keys=True))
  tmp.replace(path)


def _as_tuples(tree):
  """JSON turns tuples into lists; the schema's sequence fields are tuples."""
  if isinstance(tree, dict):
    return {key: _as_tuples(value) for key, value in tree.items()}
  if isinstance(tree, list):
    return tuple(_as_tuples(value) for value in tree)
  return tree


def flatten(tree: dict, prefix: str = '') -> dict:
  """{'a': {'b': 1}} -> {'a.b': 1}."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def load_run_config(workdir: pathlib.Path) -> ml_collections.ConfigDict:
  """Reads the config a run was started with, over the current schema (new keys keep defaults)."""
  path = pathlib.Path(workdir) / RUN_CONFIG_FILE
  if not path.exists():
    raise ConfigError(f'{workdir} holds no {RUN_CONFIG_FILE}: is it the --workdir of a training run?')
  config = base_config()
  saved = _as_tuples(json.loads(path.read_text()))
  unknown = sorted(set(flatten(saved)) - set(flatten(config.to_dict())))
  if unknown:
    raise ConfigError(f'{path} was written by an older version of the package ({unknown[0]} is no longer a '
                      'config key): retrain the run, or use the version that trained it')
  config.update(saved)
  return config


def check_same_run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  """Raises ConfigError if `workdir` holds a run whose model or data set differ from `config`."""
  if not (pathlib.Path(workdir) / RUN_CONFIG_FILE).exists():
    return
  saved = flatten(load_run_config(workdir).to_dict())
  for key, value in flatten(config.to_dict()).items():
    if key.startswith(RUN_IDENTITY_KEYS) and saved.get(key) != value:
      raise ConfigError(
          f'{workdir} holds a run with {key}={saved.get(key)!r}, not {value!r}: '
          'use another --workdir, or the same config to resume')
