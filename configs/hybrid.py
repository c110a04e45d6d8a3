"""The hybrid CNN+ViT: a conv stem whose output positions are the tokens of a Transformer encoder.

Default preset: a 3-conv stem (64, 128 | 192; each stage ends in a 2x2 max-pool) in front of
ViT-Ti, 300 epochs of the Transformer recipe; a GPU/TPU budget. The token grid stays 8x8 whatever
the stem (the patch size follows), so without stem stages it is the plain ViT-Ti/4.
`:cpu` is the 2-core fast track: 30 minutes of airbench's conv stack and one Transformer layer
(results: docs/results.md). `:gpu` is the same network and recipe sized for one GPU: bfloat16,
15 epochs in seconds, read from an image folder (no TensorFlow needed).

    python launch.py --config=configs/hybrid.py:gpu --workdir=runs/hybrid_gpu --config.data.data_dir=ROOT
    python launch.py --config=configs/hybrid.py:cpu --workdir=runs/hybrid_cpu --config.data.manual_dir=DIR
    python launch.py --config=configs/hybrid.py --workdir=runs/hybrid
    python launch.py --config=configs/hybrid.py:paper --workdir=runs/hybrid_paper
"""
from hybridvit_jax.configs import common

HYBRID = {'name': 'hybrid', 'vit': {'token_grid': 8},
          'stem': {'stages': ((64, 128), (192,)), 'pool_position': 'last'}}

# Accuracy per FLOP in a few epochs: airbench94's stem (a fixed 2x2 patch whitening, then three
# stages of two GELU convs, the pool after each stage's first conv) whose 3x3 output positions
# are the tokens of one Transformer layer of width 256, mean-pooled.
CPU_HYBRID = {
    'name': 'hybrid',
    'vit': {'token_grid': 3, 'hidden_size': 256, 'num_layers': 1, 'num_heads': 4, 'mlp_dim': 512, 'pooling': 'mean'},
    'stem': {'stages': ((64, 64), (256, 256), (256, 256)), 'pool_position': 'first', 'whiten_patch_size': 2,
             'activation': 'gelu'}}

# The cpu preset's recipe, airbench's where it applies. Muon trains the BatchNorm conv stem far
# faster than SGD or AdamW; SGD-Nesterov takes the rest (0.4 is near its edge of stability at
# batch 500). Batch 500 gives Muon less noisy gradients for the same images/s. Lookahead, label
# smoothing 0.2, reflect-padded light crops, alternating flips and a linear decay to 0 suit a run
# of a few epochs. The time budget plans the steps (the machine's speed drifts), evaluating every
# 3 epochs on 1,000 held-out images; the best checkpoint is the lowest val loss, which is steadier
# than the accuracy on so few images. Test-time flip and 1-pixel shifts.
CPU_RECIPE = {
    'num_epochs': 15, 'budget_minutes': 30.0, 'batch_size': 500, 'eval_every_epochs': 3,
    'best_checkpoint_metric': 'val_loss', 'eval_translate': 1, 'label_smoothing': 0.2,
    'data.train_split': 'train[:49000]', 'data.val_split': 'train[49000:]',
    'data.crop_padding': 2, 'data.crop_padding_mode': 'reflect', 'data.alternate_flip': True,
    'optimizer.name': 'muon', 'optimizer.learning_rate': 0.4, 'optimizer.muon_learning_rate': 0.12,
    'optimizer.momentum': 0.9, 'optimizer.muon_momentum': 0.75, 'optimizer.nesterov': True,
    'optimizer.weight_decay': 5e-4, 'optimizer.warmup_epochs': 0.3, 'optimizer.schedule': 'linear',
    'optimizer.grad_clip_norm': 0.0, 'lookahead_decay': 0.7738, 'lookahead_every_steps': 5}

# The cpu preset on one GPU, after airbench94's 10 epochs in seconds: the same batch and optimizer,
# whose step takes a few milliseconds in bfloat16 there, so more epochs fit in ten seconds; no
# time budget (it would count compilation); one evaluation per 5 epochs. The data set is an image
# folder: accelerator images often lack TensorFlow, which tfds's preparation needs.
GPU_RECIPE = {
    **CPU_RECIPE, 'num_epochs': 15, 'budget_minutes': 0.0, 'eval_every_epochs': 5,
    'model.dtype': 'bfloat16', 'data.name': 'image_folder'}


def get_config(preset: str = ''):
  config = common.make_config(
      variant='vit_ti4', smoke_variant='hybrid_test', preset=preset,
      recipe={**common.TRANSFORMER_RECIPE, 'num_epochs': 300},
      paper=common.TRANSFORMER_PAPER, cpu=CPU_RECIPE, gpu=GPU_RECIPE)
  if preset in ('cpu', 'gpu'):
    config.model.update(CPU_HYBRID)
  elif preset != 'smoke':
    config.model.update(HYBRID)
  return config
