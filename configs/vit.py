"""ViT-Ti/4 (width 192, depth 12, 3 heads, patch 4) on CIFAR-10.

Default preset: 200 epochs of the Transformer recipe; a GPU/TPU budget. `:cpu` is the 2-core
fast track: a 4-layer ViT/4 of width 128 for an hour (results: docs/results.md).

    python launch.py --config=configs/vit.py:cpu --workdir=runs/vit_cpu --config.data.manual_dir=DIR
    python launch.py --config=configs/vit.py --workdir=runs/vit
    python launch.py --config=configs/vit.py:paper --workdir=runs/vit_paper
"""
from hybridvit_jax.configs import common

# A small ViT/4 trained for many epochs beats a larger one trained for few: 4 layers of width 128
# learn about as much per step as 6 of width 192 at a third of the step time. Muon on every matrix
# but the head, SGD-Nesterov on the rest: far ahead of AdamW after an epoch. The time budget
# trains fewer epochs on a machine too slow to fit them in the hour.
CPU_RECIPE = {
    'num_epochs': 30, 'budget_minutes': 60.0, 'eval_every_epochs': 3, 'batch_size': 256,
    'model.vit.num_layers': 4, 'model.vit.hidden_size': 128, 'model.vit.num_heads': 2, 'model.vit.mlp_dim': 256,
    'optimizer.name': 'muon', 'optimizer.muon_all_matrices': True, 'optimizer.muon_learning_rate': 0.015,
    'optimizer.muon_momentum': 0.95, 'optimizer.learning_rate': 0.1, 'optimizer.momentum': 0.9,
    'optimizer.nesterov': True, 'optimizer.weight_decay': 5e-4, 'optimizer.warmup_epochs': 0.5,
    'label_smoothing': 0.1}


def get_config(preset: str = ''):
  return common.make_config(
      variant='vit_ti4', smoke_variant='vit_test', preset=preset,
      recipe={**common.TRANSFORMER_RECIPE, 'num_epochs': 200},
      paper=common.TRANSFORMER_PAPER, cpu=CPU_RECIPE)
