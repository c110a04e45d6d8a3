"""What the experiment files share: the base schema and the presets.

    get_config('')       the network's strong recipe (GPU/TPU budget); also get_config('default')
    get_config('paper')  the study as published: Adam, batch 128, 20 epochs, pixels in [0, 1],
                         no augmentation, no schedule
    get_config('cpu')    a fast track for 2 CPU cores on real CIFAR-10: a network and budget sized
                         for minutes, not hours (results: docs/results.md)
    get_config('gpu')    configs/hybrid.py only: the fast track for one GPU: airbench's regime, seconds of
                         training in bfloat16 on an image folder (no TensorFlow needed)
    get_config('smoke')  a tiny variant of the network on a tiny in-process synthetic data set:
                         under a minute on 2 CPU cores, writes everything a real run writes
"""
import ml_collections

from hybridvit_jax import configuration, models

PRESETS = ('', 'paper', 'cpu', 'gpu', 'smoke')

# The strong recipe of the Transformer networks (ViT and hybrid) for GPU/TPU budgets, after
# the public from-scratch CIFAR-10 results of small ViTs: AdamW, warmup + cosine, RandAugment,
# mixup + CutMix, random erasing, label smoothing, stochastic depth, EMA, test-time flip.
TRANSFORMER_RECIPE = {
    'batch_size': 256, 'optimizer.name': 'adamw', 'optimizer.learning_rate': 1e-3,
    'optimizer.weight_decay': 0.05, 'optimizer.warmup_epochs': 10.0, 'label_smoothing': 0.1,
    'model.vit.stochastic_depth_rate': 0.1, 'data.randaugment_num_ops': 2, 'data.randaugment_magnitude': 9.0,
    'data.mixup_alpha': 0.8, 'data.cutmix_alpha': 1.0, 'data.random_erasing': 0.25, 'ema_decay': 0.9998,
    'eval_flip': True}
# The paper's Transformers: timm ViTs trained with Adam.
TRANSFORMER_PAPER = {'optimizer.learning_rate': 1e-4}


def make_config(*, variant: str, smoke_variant: str, recipe: dict, paper: dict, cpu: dict,
                gpu: dict | None = None, preset: str = '') -> ml_collections.ConfigDict:
  """The base config with the network `variant` (models.VARIANTS) and the preset applied.

  recipe: overrides (dotted keys) that make the default preset; paper: the paper preset's
  network-specific overrides (its learning rate, say); cpu: the whole cpu preset; gpu: the whole
  gpu preset, for the networks that have one.
  """
  preset = '' if preset == 'default' else preset
  if preset not in PRESETS:
    raise configuration.ConfigError(
        f'preset {preset!r} is unknown: expected one of {", ".join(p or "(none)" for p in PRESETS)}')
  if preset == 'gpu' and gpu is None:
    raise configuration.ConfigError(
        "preset 'gpu' exists for configs/hybrid.py only; use the default preset on a GPU")
  config = configuration.base_config()
  config.model.update(models.VARIANTS[variant])
  if preset == '':
    _set(config, recipe)
  elif preset in ('cpu', 'gpu'):
    _set(config, {'log_every_steps': 50, 'eval_test_every_epoch': False, 'eval_flip': True,
                  **(cpu if preset == 'cpu' else gpu)})
  elif preset == 'paper':
    _set(config, {
        'batch_size': 128, 'num_epochs': 20, 'optimizer.name': 'adam', 'optimizer.schedule': 'constant',
        'optimizer.warmup_epochs': 0.0, 'optimizer.weight_decay': 0.0, 'optimizer.grad_clip_norm': 0.0,
        'data.mean': (0.0, 0.0, 0.0), 'data.std': (1.0, 1.0, 1.0), 'data.crop_padding': 0,
        'data.flip': False, 'label_smoothing': 0.0, **paper})
  else:
    config.model.update(models.VARIANTS[smoke_variant])
    _set(config, {
        'data.name': 'synthetic', 'data.train_split': 'train[:448]', 'data.val_split': 'train[448:]',
        'data.test_split': 'test', 'num_epochs': 3, 'batch_size': 64, 'eval_batch_size': 128,
        'log_every_steps': 5, 'optimizer.name': 'adam', 'optimizer.learning_rate': 3e-3,
        'optimizer.warmup_epochs': 0.0, 'optimizer.weight_decay': 0.0})
  return config


def _set(config: ml_collections.ConfigDict, overrides: dict) -> None:
  for dotted_key, value in overrides.items():
    *parents, leaf = dotted_key.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
