"""The hybrid CNN+ViT: a 3-layer conv stem whose 8x8 output positions are the tokens of a
width-192 Transformer encoder. `--config.model.stem_layers=0` gives back the plain ViT.

    python launch.py --config=configs/hybrid.py --workdir=runs/hybrid
    python launch.py --config=configs/hybrid.py:paper --workdir=runs/hybrid_paper
"""
from configs import common

HYBRID = {'name': 'hybrid', 'stem_layers': 3, 'stem_channels': (64, 128, 192), 'stem_kernel_sizes': (3,),
          'stem_strides': (1,), 'stem_pools': (False, True, True), 'patch_size': 1}


def get_config(preset: str = ''):
  config = common.make_config(
      variant='vit_ti4', smoke_variant='hybrid_test', preset=preset,
      recipe={'num_epochs': 300, 'batch_size': 256, 'optimizer.name': 'adamw',
              'optimizer.learning_rate': 1e-3, 'optimizer.weight_decay': 0.05,
              'optimizer.warmup_epochs': 10.0, 'label_smoothing': 0.1,
              'model.stochastic_depth_rate': 0.1},
      paper={'optimizer.learning_rate': 1e-4})
  if preset != 'smoke':
    config.model.update(HYBRID)
  return config
