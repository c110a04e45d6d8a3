"""Times variants of the ViT-Ti/4 train step side by side on this machine (CPU exploration).

    python benchmarks/vit_step_variants.py [BATCH]     # default 128; one JSON line per timing

Each variant swaps one piece of the `:paper` preset's step (Adam, no augmentation, synthetic data)
by patching the function the model calls, then times it with `hybridvit_jax.benchmark`; the
variants run in turn, twice, so a drift of the machine's speed shows as a spread, not a winner.
The results and what they taught: docs/experiments/vit-cpu-step.md.
"""
import json
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from hybridvit_jax import benchmark, cli
from hybridvit_jax.configs import vit

_GELU, _ATTENTION = nnx.gelu, jax.nn.dot_product_attention
REPETITIONS, STEPS = 2, 4


def einsum_attention(query, key, value, *args, **kwargs):
  """Attention spelled out as two einsums and a float32 softmax: [B,T,N,H] x3 -> [B,T,N,H]."""
  del args, kwargs
  logits = jnp.einsum('bqnh,bknh->bnqk', query * query.shape[-1] ** -0.5, key)
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(value.dtype)
  return jnp.einsum('bnqk,bknh->bqnh', weights, value)


def heads_first_attention(query, key, value, *args, **kwargs):
  """Attention on [B,N,T,H] operands (heads before tokens), as PyTorch lays them out."""
  del args, kwargs
  query, key, value = (x.transpose(0, 2, 1, 3) for x in (query, key, value))
  weights = jax.nn.softmax(jnp.matmul(query * query.shape[-1] ** -0.5, key.transpose(0, 1, 3, 2)), axis=-1)
  return jnp.matmul(weights, value).transpose(0, 2, 1, 3)


VARIANTS = {
    'baseline': {},
    'tanh_gelu': {'gelu': lambda x, approximate=False: _GELU(x, approximate=True)},
    'einsum_attention': {'attention': einsum_attention},
    'heads_first_attention': {'attention': heads_first_attention},
}


def time_variant(name: str, batch_size: int) -> dict:
  variant = VARIANTS[name]
  nnx.gelu = variant.get('gelu', _GELU)
  jax.nn.dot_product_attention = variant.get('attention', _ATTENTION)
  config = vit.get_config('paper')
  config.batch_size, config.data.name = batch_size, 'synthetic'
  result = benchmark.benchmark(config, steps=STEPS, warmup=1)
  return {'variant': name, 'batch_size': batch_size,
          **{key: result[key] for key in ('step_ms', 'achieved_gflops', 'peak_gflops', 'mfu', 'compile_s')}}


def main() -> None:
  cli.quiet_library_logs()
  batch_size = int(sys.argv[1]) if len(sys.argv) > 1 else 128
  for _ in range(REPETITIONS):
    for name in VARIANTS:
      print(json.dumps(time_variant(name, batch_size)), flush=True)


if __name__ == '__main__':
  main()
