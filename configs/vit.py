"""ViT-Ti/4 (width 192, depth 12, 3 heads, patch 4) on CIFAR-10.

Default preset: 200 epochs of the Transformer recipe, aiming at >= 94% test accuracy (a target
for a GPU/TPU budget, not a result measured here).

    python launch.py --config=configs/vit.py --workdir=runs/vit
    python launch.py --config=configs/vit.py:paper --workdir=runs/vit_paper
"""
from configs import common


def get_config(preset: str = ''):
  return common.make_config(
      variant='vit_ti4', smoke_variant='vit_test', preset=preset,
      recipe={**common.TRANSFORMER_RECIPE, 'num_epochs': 200},
      paper=common.TRANSFORMER_PAPER,
      # Target on 2 CPU cores: >= 75% test accuracy within 60 minutes (patch embedding only). A
      # 6-layer, MLP-384 ViT/4 trains at ~98 images/s there (BENCHMARKS.md): 6 epochs of 45,000
      # images plus evaluation take ~52 minutes.
      cpu={'num_epochs': 6, 'batch_size': 256, 'model.num_layers': 6, 'model.mlp_dim': 384,
           'optimizer.name': 'adamw', 'optimizer.learning_rate': 2e-3, 'optimizer.weight_decay': 0.05,
           'optimizer.warmup_epochs': 0.5, 'label_smoothing': 0.1})
