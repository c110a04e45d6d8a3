"""The model registry, the model config schema and the parameter groups.

    cfg = variant_config('vit_ti4')       # or default_model_config(), then override keys
    model = create_model(cfg, num_classes=10, image_shape=(32, 32, 3), rngs=nnx.Rngs(0))
    logits = model(images, train=True, rngs=nnx.Rngs(dropout=key))   # [B,H,W,C] -> float32 [B,num_classes]

`model.name` picks a module from MODELS; the module reads only its own config groups
(`config_groups()`: `vit` and `stem` for the ViT and the hybrid, a ViT with a conv stem; `resnet`
for the ResNet), builds the network (`build`) and checks its groups (`validate`). Adding a network
is one module with those three functions, one line in MODELS and one config file,
configs/<name>.py (the study trains every name in MODELS from its file).
"""

import math
import types

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from hybridvit_jax.models import checks, layers, resnet, vit

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}

MODELS: dict[str, types.ModuleType] = {
    'vit': vit,
    'resnet50': resnet,
    'hybrid': vit,  # the ViT with model.stem.stages
}

_VIT_TINY = dict(hidden_size=192, num_layers=12, num_heads=3, mlp_dim=768)
_VIT_TEST = dict(hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64)

# Named networks: overrides of default_model_config(), by group.
VARIANTS = {
    # ViT-Ti with 4x4 patches: 64 tokens on 32x32 images.
    'vit_ti4': dict(name='vit', vit=dict(patch_size=4, **_VIT_TINY)),
    'resnet50': dict(name='resnet50', resnet=dict(stage_sizes=(3, 4, 6, 3), width=64, stem='cifar')),
    # Tiny networks for tests and smoke runs.
    'vit_test': dict(name='vit', vit=dict(patch_size=4, **_VIT_TEST)),
    'hybrid_test': dict(name='hybrid', vit=dict(patch_size=2, **_VIT_TEST), stem=dict(stages=((8,), (16,)))),
    'resnet_test': dict(name='resnet50', resnet=dict(stage_sizes=(1, 1, 1, 1), width=8, stem='cifar')),
}


def default_model_config() -> ml_collections.ConfigDict:
  """The model config schema: name, dtype and every registered network's groups (ViT-Ti/4)."""
  config = ml_collections.ConfigDict(dict(
      name='vit',  # one of MODELS
      dtype='float32',  # compute dtype, one of DTYPES; parameters are float32 and logits float32
  ))
  for module in dict.fromkeys(MODELS.values()):
    for group_name, group in module.config_groups().items():
      config[group_name] = group
  return config


def variant_config(variant: str) -> ml_collections.ConfigDict:
  """The default config updated with the overrides of VARIANTS[variant]."""
  if variant not in VARIANTS:
    raise ValueError(f'unknown model variant {variant!r}; choose one of {", ".join(VARIANTS)}')
  cfg = default_model_config()
  cfg.update(VARIANTS[variant])
  return cfg


def create_model(
    cfg: ml_collections.ConfigDict, num_classes: int, image_shape: tuple[int, int, int], rngs: nnx.Rngs
) -> nnx.Module:
  """Validates `cfg` and builds its model for images of image_shape (H, W, C) and num_classes logits.

  The model maps float32 images [B,H,W,C] to float32 logits [B,num_classes]; parameters come from `rngs`.
  """
  validate_model_config(cfg, image_shape)
  return MODELS[cfg.name].build(cfg, num_classes=num_classes, image_shape=image_shape, dtype=DTYPES[cfg.dtype],
                                rngs=rngs)


def validate_model_config(cfg: ml_collections.ConfigDict, image_shape: tuple[int, int, int]) -> None:
  """Raises ValueError with a one-line message naming the offending key if cfg cannot build a model for
  images of image_shape (H, W, C). Only the groups the chosen model reads are checked."""
  checks.choice(cfg.name, 'model.name', MODELS)
  checks.choice(cfg.dtype, 'model.dtype', DTYPES)
  MODELS[cfg.name].validate(cfg, image_shape)


def abstract_model(cfg: ml_collections.ConfigDict, *, num_classes: int,
                   image_shape: tuple[int, int, int]) -> nnx.Module:
  """The model with shape-only parameters (nothing allocated): its structure and declarations."""
  return nnx.eval_shape(lambda: create_model(cfg, num_classes=num_classes, image_shape=image_shape,
                                             rngs=nnx.Rngs(0)))


def param_groups(model: nnx.Module) -> dict:
  """Each parameter's group as its layer declared it (layers.KERNEL, NORMALIZED_KERNEL,
  HEAD_KERNEL, or layers.UNGROUPED): a nested dict shaped as the model's pure parameter dict."""
  params = nnx.state(model, nnx.Param)
  groups = jax.tree.map(lambda param: param.get_metadata().get('group', layers.UNGROUPED), params,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(groups) if isinstance(groups, nnx.State) else groups


def fits_to_data(model: nnx.Module) -> bool:
  """Whether the model has parts set from training images before training (`fit_to_images`):
  variables of type layers.FittedKernel."""
  return bool(jax.tree.leaves(nnx.state(model, layers.FittedKernel)))


def count_params(model: nnx.Module) -> int:
  """Number of scalars in the model's nnx.Param variables (works on nnx.eval_shape models too)."""
  return sum(math.prod(param.shape) for param in jax.tree.leaves(nnx.state(model, nnx.Param)))
