"""Times variants of the ViT-Ti/4 train step side by side on this machine (CPU exploration).

    python benchmarks/vit_step_variants.py [BATCH [VARIANT...]]   # default 128, all; one JSON line each

Each variant swaps one piece of the `:paper` preset's step (Adam, no augmentation, synthetic data)
by patching the function the model calls, then times it with `hybridvit_jax.benchmark`; the
variants run in turn, twice, so a drift of the machine's speed shows as a spread, not a winner.
The results and what they taught: docs/experiments/vit-cpu-step.md.
"""
import functools
import json
import sys

import jax
import jax.numpy as jnp
from jax import lax
from flax import nnx

from hybridvit_jax import benchmark, cli
from hybridvit_jax.configs import vit
from hybridvit_jax.models import layers

_GELU, _ATTENTION, _COLUMNS_TIMES_KERNEL = nnx.gelu, layers.backend_attention, layers.columns_times_kernel
REPETITIONS, STEPS = 2, 4


def einsum_attention(query, key, value):
  """Attention spelled out as two einsums and a float32 softmax: [B,T,N,H] x3 -> [B,T,N,H]."""
  logits = jnp.einsum('bqnh,bknh->bnqk', query * query.shape[-1] ** -0.5, key)
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(value.dtype)
  return jnp.einsum('bnqk,bknh->bqnh', weights, value)


def pytorch_layout_attention(query, key, value):
  """Attention on [B,N,T,H] operands (heads before tokens), as PyTorch lays them out, left to
  autodiff (unlike `layers.heads_first_attention`)."""
  query, key, value = (x.transpose(0, 2, 1, 3) for x in (query, key, value))
  weights = jax.nn.softmax(jnp.matmul(query * query.shape[-1] ** -0.5, key.transpose(0, 1, 3, 2)), axis=-1)
  return jnp.matmul(weights, value).transpose(0, 2, 1, 3)


def padded_attention(query, key, value, multiple=16, pad_queries=True):
  """`jax.nn.dot_product_attention` on tokens zero-padded to a multiple of `multiple` (keys and
  values always, queries if `pad_queries`), the padded keys masked out: the same values, on
  products whose every dimension is a whole number of 16-float vectors (65 tokens are not)."""
  tokens = query.shape[1]
  padding = [(0, 0), (0, -tokens % multiple), (0, 0), (0, 0)]
  key, value = jnp.pad(key, padding), jnp.pad(value, padding)
  query = jnp.pad(query, padding) if pad_queries else query
  real_keys = (jnp.arange(key.shape[1]) < tokens)[None, None, None, :]  # [1,1,1,S] of [B,N,T,S]
  return jax.nn.dot_product_attention(query, key, value, mask=real_keys)[:, :tokens]


def halves_attention(query, key, value):
  """Attention of each half of the batch apart: two independent products XLA may run at once."""
  half = query.shape[0] // 2
  return jnp.concatenate([jax.nn.dot_product_attention(query[:half], key[:half], value[:half]),
                          jax.nn.dot_product_attention(query[half:], key[half:], value[half:])])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def row_major_columns_times_kernel(columns, kernel, precision=None, preferred_element_type=None):
  """`layers.columns_times_kernel` whose input gradient reads the kernel transposed and written out
  ([O,K], small), so that product is row-major too."""
  return _COLUMNS_TIMES_KERNEL(columns, kernel, precision, preferred_element_type)


def _row_major_forward(columns, kernel, precision, preferred_element_type):
  return _COLUMNS_TIMES_KERNEL(columns, kernel, precision, preferred_element_type), (columns, kernel)


def _row_major_backward(precision, preferred_element_type, residuals, output_grad):
  del preferred_element_type
  columns, kernel = residuals
  columns_grad = lax.dot_general(output_grad.astype(kernel.dtype), layers.written_out(kernel.T),
                                 (((output_grad.ndim - 1,), (0,)), ((), ())), precision=precision)
  rows = columns.size // columns.shape[-1]
  kernel_grad = lax.dot_general(columns.reshape(rows, -1), output_grad.astype(columns.dtype).reshape(rows, -1),
                                (((0,), (0,)), ((), ())), precision=precision)
  return columns_grad, kernel_grad


row_major_columns_times_kernel.defvjp(_row_major_forward, _row_major_backward)


VARIANTS = {
    'baseline': {},
    'tanh_gelu': {'gelu': lambda x, approximate=False: _GELU(x, approximate=True)},
    'einsum_attention': {'attention': einsum_attention},
    'heads_first_attention': {'attention': pytorch_layout_attention},
    'padded_attention': {'attention': padded_attention},
    'padded_keys_attention': {'attention': functools.partial(padded_attention, pad_queries=False)},
    'padded_8_attention': {'attention': functools.partial(padded_attention, multiple=8)},
    'halves_attention': {'attention': halves_attention},
    'xla_attention': {'attention': jax.nn.dot_product_attention},
    'row_major_input_grad': {'columns_times_kernel': row_major_columns_times_kernel},
}


def time_variant(name: str, batch_size: int) -> dict:
  variant = VARIANTS[name]
  nnx.gelu = variant.get('gelu', _GELU)
  layers.backend_attention = variant.get('attention', _ATTENTION)
  layers.columns_times_kernel = variant.get('columns_times_kernel', _COLUMNS_TIMES_KERNEL)
  config = vit.get_config('paper')
  config.batch_size, config.data.name = batch_size, 'synthetic'
  result = benchmark.benchmark(config, steps=STEPS, warmup=1)
  return {'variant': name, 'batch_size': batch_size,
          **{key: result[key] for key in ('step_ms', 'achieved_gflops', 'peak_gflops', 'mfu', 'compile_s')}}


def main() -> None:
  cli.keep_freed_host_memory()  # as the training commands do, before the backend starts
  cli.quiet_library_logs()
  batch_size = int(sys.argv[1]) if len(sys.argv) > 1 else 128
  names = sys.argv[2:] or list(VARIANTS)
  for _ in range(REPETITIONS):
    for name in names:
      print(json.dumps(time_variant(name, batch_size)), flush=True)


if __name__ == '__main__':
  main()
