"""Forward and forward+backward of ViT-Ti/4 at batch 128 on this machine, with one piece swapped out.

    python benchmarks/vit_step_parts.py baseline|no_attention|relu|no_layernorm|patch_matmul_conv

One JSON line: the median ms of the jitted loss and of its gradient (4 calls after one). The
results and what they taught: docs/experiments/vit-cpu-step.md.
"""
import json
import statistics
import sys
import time

import jax
import optax
from flax import nnx
from hybridvit_jax import models
from hybridvit_jax.models import layers


def vit_ti4_loss(variant: str = 'baseline'):
  """(loss_fn, params): the cross-entropy of ViT-Ti/4 on a random batch of 128 as a function of
  its parameters, with `variant`'s piece swapped out."""
  if variant == 'no_attention':
    layers.backend_attention = lambda query, key, value: value
  elif variant == 'relu':
    nnx.gelu = lambda x, approximate=False: jax.nn.relu(x)
  elif variant == 'no_layernorm':
    nnx.LayerNorm.__call__ = lambda self, x: x
  cfg = models.variant_config('vit_ti4')
  model = models.create_model(cfg, num_classes=10, image_shape=(32, 32, 3), rngs=nnx.Rngs(0))
  if variant == 'patch_matmul_conv':  # the patch embedding through layers.matmul_conv, not XLA's conv
    model.patch_embedding.conv_general_dilated = layers.matmul_conv
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  images = jax.random.normal(jax.random.key(0), (128, 32, 32, 3))
  labels = jax.random.randint(jax.random.key(1), (128,), 0, 10)

  def loss_fn(params):
    logits = nnx.merge(graphdef, params, rest)(images, train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss_fn, params


def timed(fn, *args, n=4):
  jax.block_until_ready(fn(*args)); ts = []
  for _ in range(n):
    t = time.perf_counter(); jax.block_until_ready(fn(*args)); ts.append(time.perf_counter() - t)
  return round(statistics.median(ts) * 1000, 1)


if __name__ == '__main__':
  loss_fn, params = vit_ti4_loss(sys.argv[1])
  forward, grads = jax.jit(loss_fn), jax.jit(jax.grad(loss_fn))
  print(json.dumps({'variant': sys.argv[1], 'forward_ms': timed(forward, params),
                    'forward_backward_ms': timed(grads, params)}), flush=True)
