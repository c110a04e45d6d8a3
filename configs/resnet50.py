"""ResNet50 with the CIFAR stem (3x3 stride 1, no max-pool) on CIFAR-10.

    python launch.py --config=configs/resnet50.py --workdir=runs/resnet50
    python launch.py --config=configs/resnet50.py:paper --workdir=runs/resnet50_paper
"""
from configs import common


def get_config(preset: str = ''):
  return common.make_config(
      variant='resnet50', smoke_variant='resnet_test', preset=preset,
      recipe={'num_epochs': 200, 'batch_size': 128, 'optimizer.name': 'sgd',
              'optimizer.learning_rate': 0.1, 'optimizer.momentum': 0.9, 'optimizer.nesterov': True,
              'optimizer.weight_decay': 5e-4, 'optimizer.warmup_epochs': 1.0,
              'optimizer.grad_clip_norm': 0.0},
      # The paper's Keras run: Adam at its default rate, EarlyStopping on validation accuracy.
      paper={'optimizer.learning_rate': 1e-3, 'early_stopping_patience': 3})
