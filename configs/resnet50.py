"""ResNet50 with the CIFAR stem (3x3 stride 1, no max-pool) on CIFAR-10.

Default preset: 200 epochs of SGD-Nesterov with crop, flip and Cutout; a GPU/TPU budget.
`:cpu` is the 2-core fast track: as many steps as fit in an hour (results: docs/results.md).

    python launch.py --config=configs/resnet50.py:cpu --workdir=runs/resnet50_cpu --config.data.manual_dir=DIR
    python launch.py --config=configs/resnet50.py --workdir=runs/resnet50
    python launch.py --config=configs/resnet50.py:paper --workdir=runs/resnet50_paper
"""
from hybridvit_jax.configs import common

RECIPE = {'num_epochs': 200, 'batch_size': 128, 'optimizer.name': 'sgd', 'optimizer.learning_rate': 0.1,
          'optimizer.momentum': 0.9, 'optimizer.nesterov': True, 'optimizer.weight_decay': 5e-4,
          'optimizer.warmup_epochs': 1.0, 'optimizer.grad_clip_norm': 0.0, 'data.cutout_size': 16,
          'label_smoothing': 0.1, 'eval_flip': True}

# The paper's Keras run: Adam at its default rate, EarlyStopping on validation accuracy.
PAPER = {'optimizer.learning_rate': 1e-3, 'early_stopping_patience': 3}

# A ResNet50 step takes seconds on 2 cores, so the time budget plans the steps (at most 2 epochs).
# Muon on every convolution (each is followed by BatchNorm), SGD-Nesterov on the rest: far ahead
# of SGD alone after a few hundred steps. No test-time flip: it would double the evaluations'
# minutes. A checkpoint every 50 steps bounds what a crash loses, and the budget plans again
# there from the speed since (a slow first minute is not kept).
CPU_RECIPE = {
    'num_epochs': 2, 'budget_minutes': 60.0, 'batch_size': 128, 'eval_flip': False, 'checkpoint_every_steps': 50,
    'optimizer.name': 'muon', 'optimizer.muon_learning_rate': 0.06, 'optimizer.muon_momentum': 0.85,
    'optimizer.learning_rate': 0.1, 'optimizer.momentum': 0.9, 'optimizer.nesterov': True,
    'optimizer.weight_decay': 5e-4, 'optimizer.warmup_epochs': 0.1, 'optimizer.grad_clip_norm': 0.0,
    'label_smoothing': 0.1}


def get_config(preset: str = ''):
  return common.make_config(variant='resnet50', smoke_variant='resnet_test', preset=preset, recipe=RECIPE,
                            paper=PAPER, cpu=CPU_RECIPE)
