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
