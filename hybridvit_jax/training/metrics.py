"""The clu metric collections the train and eval steps return."""
import flax.struct
from clu import metrics


@flax.struct.dataclass
class ClassificationMetrics(metrics.Collection):
  """Mean loss and top-1 accuracy over the examples seen (masked examples excluded).

  Build with `ClassificationMetrics.single_from_model_output(loss=[B], logits=[B, K],
  labels=[B] int, mask=[B] bool)`; merge across steps; `compute()` gives floats.
  """
  loss: metrics.Average.from_output('loss')
  accuracy: metrics.Accuracy


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
  """ClassificationMetrics' loss and accuracy, and the mean global norm of the gradients (before
  clipping) over the steps whose update was applied.

  Build with `TrainMetrics.single_from_model_output(loss=[B], logits=[B, K], labels=[B] int,
  grad_norm=[B] (the step's norm, broadcast), mask=[B] bool)`.
  """
  loss: metrics.Average.from_output('loss')
  accuracy: metrics.Accuracy
  grad_norm: metrics.Average.from_output('grad_norm')
