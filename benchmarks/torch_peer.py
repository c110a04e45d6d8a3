"""PyTorch + timm peer of `python -m hybridvit_jax.benchmark`: times the same train steps, for a ratio.

Not part of the package: hybridvit_jax depends on neither PyTorch nor timm, and this script is
never imported by it. Install them in an environment of their own (`pip install torch timm`) and run
it next to the package's benchmark on the same machine, one device each:

    python -m hybridvit_jax.benchmark --config=configs/vit.py:paper --config.batch_size=128
    python benchmarks/torch_peer.py --models=vit_ti4 --batch_size=128

    python -m hybridvit_jax.benchmark --config=configs/resnet50.py:paper --config.batch_size=64
    python benchmarks/torch_peer.py --models=resnet50 --batch_size=64

Options: --models=vit_ti4,resnet50 --batch_size=N (default: each model's, 128 and 64)
--device=cpu|cuda (default cuda if present) --dtype=float32|bfloat16 (bfloat16: torch.autocast)
--compile (torch.compile the model; default eager) --steps=20 --warmup=3 --threads=N (default: torch's).

A train step is forward, cross-entropy on float32 logits, backward and a torch.optim.Adam step
(lr 1e-4), on random normal float32 images [B,3,32,32] and random labels of 10 classes that are
already on the device; each step is waited for (torch.cuda.synchronize) before the clock stops.
step_ms is the median of --steps steps after --warmup untimed ones (with --compile, keep
--warmup >= 1: the first step compiles). Progress goes to stderr; stdout gets one JSON line per
model: peer, model, batch_size, dtype, compile, device, device_kind, params, step_ms,
images_per_s, torch_version, timm_version, threads.

The networks are the package's, built from timm:
  vit_ti4   timm VisionTransformer: 32x32 images, 4x4 patches (64 tokens + a class token), width
            192, 12 blocks, 3 heads, MLP 768 with exact GELU, qkv bias, LayerNorm eps 1e-6, learned
            position embeddings over the 65 tokens, final LayerNorm, class-token pooling, no
            dropout or drop-path (models.VARIANTS['vit_ti4'], models/vit.py).
  resnet50  timm resnet50 (v1.5: stride in the 3x3 conv; 1x1 conv + BN projections; last BN of each
            block zero-initialised) with the CIFAR stem: a 3x3 stride-1 bias-free conv + BN + ReLU and
            no max-pool (models.VARIANTS['resnet50'], models/resnet.py).
Both have the package's parameter count exactly. Differences that remain, none in the architecture:
  - Layout: PyTorch runs NCHW (its default memory format), the package NHWC.
  - Initialisation is timm's (the package zero-initialises the ViT head); it does not change the time.
  - The package's step does a little more around the same work: it gathers its batch from a uint8
    train set on the device and normalises it, checks the loss and gradient norm are finite, and
    accumulates loss and accuracy metrics; it also runs on every local device (data parallel), so
    compare on a machine with one device (CUDA_VISIBLE_DEVICES=0).
  - float32 on CUDA: the matrix products run in TF32 here (torch.set_float32_matmul_precision('high');
    convolutions already do by default), as XLA runs float32 products on Ampere and later GPUs.
  - bfloat16: autocast runs matrix products, convolutions and attention in bfloat16 but keeps the
    ops of its float32 list (LayerNorm on CUDA, the loss) in float32; the package computes every
    layer in bfloat16 with float32 parameters and logits.
  - Kernels: timm's attention is F.scaled_dot_product_attention (a fused kernel on GPU), the
    package's jax.nn.dot_product_attention (as XLA lowers it); Adam is torch's default (foreach)
    implementation, the package's optax.adam as XLA fuses it.
"""
import argparse
import functools
import json
import statistics
import sys
import time
from typing import Callable

try:
  import timm
  import torch
  import torch.nn.functional as F
  from timm.models.vision_transformer import VisionTransformer
  from torch import nn
except ImportError:
  print('error: torch_peer needs PyTorch and timm: pip install torch timm', file=sys.stderr, flush=True)
  sys.exit(2)

NUM_CLASSES = 10
IMAGE_SHAPE = (3, 32, 32)  # C, H, W: CIFAR-10 in PyTorch's channels-first layout
# The ViT paper preset's Adam rate (configs/common.py); ResNet50's is 1e-3, which costs the same time.
LEARNING_RATE = 1e-4
SIGNIFICANT_DIGITS = 5  # as the package's benchmark rounds its timings
DTYPES = ('float32', 'bfloat16')


# ---------------------------------------------------------------------------------- models
def vit_ti4() -> nn.Module:
  """ViT-Ti/4 as models.VARIANTS['vit_ti4'] builds it: every option the package fixes is spelled out,
  so a change of timm's defaults cannot silently change the network."""
  return VisionTransformer(
      img_size=IMAGE_SHAPE[1], patch_size=4, in_chans=IMAGE_SHAPE[0], num_classes=NUM_CLASSES,
      embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0, qkv_bias=True,
      class_token=True, global_pool='token', pos_embed='learn', no_embed_class=False, pre_norm=False,
      init_values=None, drop_rate=0.0, pos_drop_rate=0.0, proj_drop_rate=0.0, attn_drop_rate=0.0,
      drop_path_rate=0.0, norm_layer=functools.partial(nn.LayerNorm, eps=1e-6), act_layer=nn.GELU)


def resnet50_cifar() -> nn.Module:
  """timm's ResNet50 with models/resnet.py's CIFAR stem: 32x32 images keep their resolution into the
  first stage, so the 7x7 stride-2 conv becomes a 3x3 stride-1 one and the max-pool goes."""
  model = timm.create_model('resnet50', pretrained=False, num_classes=NUM_CLASSES)
  model.conv1 = nn.Conv2d(IMAGE_SHAPE[0], 64, kernel_size=3, stride=1, padding=1, bias=False)
  model.maxpool = nn.Identity()
  return model


# Each model: (constructor, default batch size); the comment names the package config it is the peer of.
MODELS: dict[str, tuple[Callable[[], nn.Module], int]] = {
    'vit_ti4': (vit_ti4, 128),  # configs/vit.py:paper
    'resnet50': (resnet50_cifar, 64),  # configs/resnet50.py:paper
}


# ---------------------------------------------------------------------------------- timing
def make_train_step(model: nn.Module, device: torch.device, dtype: str,
                    batch_size: int) -> Callable[[], torch.Tensor]:
  """One train step of `model` on a fixed random batch already on `device`, as a closure."""
  images = torch.randn(batch_size, *IMAGE_SHAPE, device=device)
  labels = torch.randint(0, NUM_CLASSES, (batch_size,), device=device)
  optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)

  def train_step() -> torch.Tensor:
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == 'bfloat16'):
      logits = model(images)
    # The package takes the loss of float32 logits in every dtype.
    loss = F.cross_entropy(logits.float(), labels)
    loss.backward()
    optimizer.step()
    return loss

  return train_step


def median_step_seconds(step: Callable[[], torch.Tensor], device: torch.device, *, steps: int,
                        warmup: int) -> float:
  """Median wall-clock seconds of `steps` calls of `step` after `warmup` untimed ones; each call is
  timed until the device has finished it (CUDA runs asynchronously)."""
  synchronize = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
  durations = []
  for _ in range(warmup + steps):
    start = time.perf_counter()
    step()
    synchronize()
    durations.append(time.perf_counter() - start)
  return statistics.median(durations[warmup:])


def device_kind(device: torch.device) -> str:
  """The GPU's name, or 'cpu' (JAX's device_kind there), so the two benchmarks' lines pair up."""
  return torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'


def _significant(value: float) -> float:
  """`value` rounded to SIGNIFICANT_DIGITS significant digits."""
  return float(f'{value:.{SIGNIFICANT_DIGITS}g}')


def benchmark(name: str, *, batch_size: int, device: torch.device, dtype: str, compile_model: bool,
              steps: int, warmup: int) -> dict:
  """Builds model `name`, times its train step and returns the JSON fields (module docstring)."""
  torch.manual_seed(0)
  model = MODELS[name][0]().to(device).train()
  params = sum(param.numel() for param in model.parameters())
  if compile_model:
    model = torch.compile(model)
  print(f'torch_peer: {name}, batch {batch_size}, {dtype}, {"compiled" if compile_model else "eager"}, '
        f'{device_kind(device)}, {params:,} params; timing {steps} steps after {warmup}', file=sys.stderr,
        flush=True)
  step_s = median_step_seconds(make_train_step(model, device, dtype, batch_size), device, steps=steps,
                               warmup=warmup)
  print(f'torch_peer: {name}: step {step_s * 1e3:.2f} ms', file=sys.stderr, flush=True)
  return {
      'peer': 'torch', 'model': name, 'batch_size': batch_size, 'dtype': dtype, 'compile': compile_model,
      'device': device.type, 'device_kind': device_kind(device), 'params': params,
      'step_ms': _significant(step_s * 1e3), 'images_per_s': _significant(batch_size / step_s),
      'torch_version': torch.__version__, 'timm_version': timm.__version__,
      'threads': torch.get_num_threads(),
  }


# ---------------------------------------------------------------------------------- command
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """The command's options; a bad one exits with argparse's usage line and exit code 2."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--models', default=','.join(MODELS), help=f'comma-separated, of {", ".join(MODELS)}')
  parser.add_argument('--batch_size', type=int, help="each model's batch size (default: the model's own)")
  parser.add_argument('--device', choices=('cpu', 'cuda'),
                      default='cuda' if torch.cuda.is_available() else 'cpu')
  parser.add_argument('--dtype', choices=DTYPES, default='float32', help='bfloat16: torch.autocast')
  parser.add_argument('--compile', action='store_true', help='torch.compile the model (default: eager)')
  parser.add_argument('--steps', type=int, default=20, help='timed steps; their median is reported')
  parser.add_argument('--warmup', type=int, default=3, help='untimed steps before the timed ones')
  parser.add_argument('--threads', type=int, help="torch.set_num_threads (default: torch's)")
  args = parser.parse_args(argv)
  args.models = [name.strip() for name in args.models.split(',') if name.strip()]
  unknown = [name for name in args.models if name not in MODELS]
  if unknown or not args.models:
    parser.error(f'--models: unknown {", ".join(unknown) or "(none given)"}; choose from {", ".join(MODELS)}')
  for option, minimum in (('batch_size', 1), ('steps', 1), ('warmup', 0), ('threads', 1)):
    value = getattr(args, option)
    if value is not None and value < minimum:
      parser.error(f'--{option}={value} must be >= {minimum}')
  if args.device == 'cuda' and not torch.cuda.is_available():
    parser.error('--device=cuda: PyTorch finds no CUDA device')
  return args


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  if args.threads:
    torch.set_num_threads(args.threads)
  if args.device == 'cuda':
    # XLA runs float32 matrix products in TF32 on these GPUs; PyTorch's default is full float32.
    torch.set_float32_matmul_precision('high')
  for name in args.models:
    result = benchmark(name, batch_size=args.batch_size or MODELS[name][1], device=torch.device(args.device),
                       dtype=args.dtype, compile_model=args.compile, steps=args.steps, warmup=args.warmup)
    print(json.dumps(result), flush=True)


if __name__ == '__main__':
  main()
