"""Per-op times of the ViT-Ti/4 gradient at batch 128 on this machine, from a jax.profiler trace.

    python benchmarks/vit_grad_profile.py [--xla_dense] [--xla_attention] [--release_memory] [--out=DIR]

Traces two calls of the jitted gradient of the cross-entropy (after four untimed ones), sums the
duration of each XLA op from the trace's perfetto JSON (no TensorBoard plugin needed) and prints:
the wall time of each call, the ops' total and its split into matrix products (XLA:CPU's YNNPACK
fusions) and the rest by fusion kind, then each product shape's time and GFLOP/s. Ops run
concurrently on the 2 cores, so a product's GFLOP/s is a lower bound when another runs beside it.

--xla_dense: the Linear layers through lax.dot_general (XLA's own gradients) instead of
layers.backend_dot_general. --xla_attention: attention through jax.nn.dot_product_attention instead
of layers.backend_attention. --release_memory: without cli.keep_freed_host_memory (glibc's default,
every step's temporaries faulted in again). The results and what they taught:
docs/experiments/vit-cpu-step.md.
"""
import argparse
import collections
import glob
import gzip
import json
import math
import re
import tempfile
import time

from hybridvit_jax import cli

parser = argparse.ArgumentParser()
parser.add_argument('--xla_dense', action='store_true')
parser.add_argument('--xla_attention', action='store_true')
parser.add_argument('--release_memory', action='store_true')
parser.add_argument('--out', default=None, help='trace directory (default: a temporary one)')
options = parser.parse_args()
if not options.release_memory:
  cli.keep_freed_host_memory()

import jax  # pylint: disable=wrong-import-position  # after the host-memory setting
from hybridvit_jax.models import layers  # pylint: disable=wrong-import-position
from vit_step_parts import vit_ti4_loss  # pylint: disable=wrong-import-position  # this script's folder

if options.xla_dense:
  layers.backend_dot_general = lambda x, k, numbers, precision=None, preferred_element_type=None, out_sharding=None: (
      jax.lax.dot_general(x, k, numbers, precision=precision, preferred_element_type=preferred_element_type))
if options.xla_attention:
  layers.backend_attention = jax.nn.dot_product_attention
loss_fn, params = vit_ti4_loss()
grads = jax.jit(jax.grad(loss_fn))
hlo = grads.lower(params).compile().as_text()
for _ in range(4):  # the first calls may still grow the heap (page faults), which the trace would show
  jax.block_until_ready(grads(params))
out = options.out or tempfile.mkdtemp()
with jax.profiler.trace(out, create_perfetto_trace=True):
  for _ in range(2):
    start = time.perf_counter()
    jax.block_until_ready(grads(params))
    print(f'call: {(time.perf_counter() - start) * 1000:.0f} ms')

events = json.load(gzip.open(glob.glob(f'{out}/plugins/profile/*/perfetto_trace.json.gz')[0]))['traceEvents']
op_us = collections.Counter()
for event in events:
  if event.get('ph') == 'X' and re.fullmatch(r'[\w-]+(\.\d+)?', event['name']) and 'fusion' in event['name'] + 'dot':
    op_us[event['name']] += event['dur'] / 2  # per call
kinds = collections.Counter()
for name, us in op_us.items():
  kinds['matrix products' if name.startswith(('ynn_fusion', 'dot')) else re.sub(r'\.\d+$', '', name)] += us
print(f'ops: {sum(op_us.values()) / 1000:.0f} ms a call')
for kind, us in kinds.most_common(8):
  print(f'  {us / 1000:7.1f} ms  {kind}')

# Each product's shape, from the compiled HLO: fusion name -> the dot inside its fused computation.
computations = dict(re.findall(r'^(%[\w.\-]+) \(.*?\) -> .*? \{\n(.*?)\n\}', hlo, re.S | re.M))
callee = dict(re.findall(r'  %(ynn_fusion[\w.]*) = .*?calls=(%[\w.\-]+)', hlo))
products = collections.defaultdict(lambda: [0.0, 0.0, 0])
for name, us in op_us.items():
  body = computations.get(callee.get(name), '') if name.startswith('ynn') else hlo
  prefix = '' if name.startswith('ynn') else '%' + re.escape(name) + ' '
  dot = re.search(prefix + r'= f32\[([\d,]*)\]\S* dot\((%[\w.\-]+), (%[\w.\-]+)\), '
                  r'(lhs_batch_dims=\{[\d,]*\}, )?lhs_contracting_dims=\{([\d,]*)\}', body)
  if not dot:
    continue
  lhs = re.search(re.escape(dot.group(2)) + r' = f32\[([\d,]*)\]', body) or re.search(
      re.escape(dot.group(2)) + r' = f32\[([\d,]*)\]', hlo)
  lhs_shape = [int(n) for n in lhs.group(1).split(',')] if lhs else []
  out_shape = [int(n) for n in dot.group(1).split(',')]
  contracted = math.prod(lhs_shape[int(i)] for i in dot.group(5).split(',')) if lhs_shape else 0
  entry = products[f'{lhs_shape} -> {out_shape}']
  entry[0] += us
  entry[1] += 2 * math.prod(out_shape) * contracted
  entry[2] += 1
print('products (lhs -> output): ms a call, count, GFLOP/s')
for shape, (us, flops, count) in sorted(products.items(), key=lambda item: -item[1][0])[:12]:
  print(f'  {us / 1000:7.1f} ms {count:3d}x {flops / us / 1e3:6.0f}  {shape}')
