"""ViT-Ti/4 (width 192, depth 12, 3 heads, patch 4) on CIFAR-10.

    python launch.py --config=configs/vit.py --workdir=runs/vit
    python launch.py --config=configs/vit.py:paper --workdir=runs/vit_paper
"""
from configs import common


def get_config(preset: str = ''):
  return common.make_config(
      variant='vit_ti4', smoke_variant='vit_test', preset=preset,
      recipe={'num_epochs': 200, 'batch_size': 256, 'optimizer.name': 'adamw',
              'optimizer.learning_rate': 1e-3, 'optimizer.weight_decay': 0.05,
              'optimizer.warmup_epochs': 10.0, 'label_smoothing': 0.1,
              'model.stochastic_depth_rate': 0.1},
      paper={'optimizer.learning_rate': 1e-4})
