"""The one FLOP count `benchmark` (a train step) and `report` (a forward pass) use: XLA's cost
analysis of a program as traced, the same on every backend."""
import jax


def traced_flops(lowered: jax.stages.Lowered) -> float:
  """Flops of one call of a lowered (not yet compiled) program, all devices together, one
  multiply-add counting as 2. Compiled programs are not counted: the GPU compiler turns matrix
  products and convolutions into cuBLAS/cuDNN calls whose flops its cost analysis leaves out (an
  H200's compiled hybrid step counted 0.24 of the 3.1 GFLOP an image). Some jax versions return
  a list with one dict per program."""
  analysis = lowered.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis['flops'])
