"""Classifies image files with a run's checkpoint.

    python -m hybridvit_jax.predict --workdir=runs/vit [--checkpoint=best|latest] [--top=3] IMAGE [IMAGE ...]

Any file PIL opens, of any size and mode: it is converted to RGB (L for one-channel data sets),
centre-cropped to the data set's aspect ratio and resized to its image shape. Prints, per file,
the `--top` classes by name with their probabilities, then as the last line one JSON object
{file: [{"class": name, "probability": p}, ...]}. A file that does not exist or is not an image
stops the command before the model is restored: one line naming it, exit code 2.
"""
import json
import pathlib
from collections.abc import Sequence

import jax
import numpy as np
from absl import app, flags
from PIL import Image, ImageOps, UnidentifiedImageError

from hybridvit_jax import cli, configuration, data, evaluate
from hybridvit_jax.training import steps
from hybridvit_jax.training.state import model_graphdef

PIL_MODES = {1: 'L', 3: 'RGB'}  # by the data set's number of channels


def load_image(path: str | pathlib.Path, image_shape: tuple[int, int, int]) -> np.ndarray:
  """uint8 [H, W, C] for image_shape (H, W, C): converted, centre-cropped, resized (bicubic).

  Raises ConfigError naming the file if it is missing or not an image.
  """
  height, width, channels = image_shape
  if channels not in PIL_MODES:
    raise configuration.ConfigError(f"the run's data set has {channels}-channel images: predict reads 1 or 3")
  try:
    with Image.open(path) as image:
      fitted = ImageOps.fit(image.convert(PIL_MODES[channels]), (width, height),
                            method=Image.Resampling.BICUBIC)
  except FileNotFoundError:
    raise configuration.ConfigError(f'{path}: no such file') from None
  except UnidentifiedImageError:
    raise configuration.ConfigError(f'{path} is not an image (PIL cannot identify it)') from None
  except OSError as error:  # a directory, a truncated or damaged image
    raise configuration.ConfigError(f'{path} cannot be read as an image: {error}') from None
  return np.asarray(fitted, np.uint8).reshape(image_shape)


def padded_batches(images: np.ndarray, batch_size: int):
  """Yields (uint8 [batch_size, H, W, C], how many rows are images) covering `images` [N, H, W, C]
  in order; the last batch is padded with zeros, so the step compiles for one shape."""
  for start in range(0, len(images), batch_size):
    batch = images[start:start + batch_size]
    padding = np.zeros((batch_size - len(batch), *batch.shape[1:]), batch.dtype)
    yield np.concatenate([batch, padding]), len(batch)


def top_classes(probabilities: np.ndarray, class_names: Sequence[str], top: int) -> list[dict]:
  """The `top` most probable classes of probabilities [K], most probable first."""
  order = np.argsort(-probabilities, kind='stable')[:top]
  return [{'class': class_names[k], 'probability': float(probabilities[k])} for k in order]


def predict(workdir: str, image_paths: Sequence[str], checkpoint: str = 'best', top: int = 3) -> dict[str, list]:
  """{path: top_classes(...)} of each image under the run's `checkpoint`.

  Every file is read before the model is restored, so a bad one costs no restore.
  """
  run_config = configuration.load_run_config(pathlib.Path(workdir))
  info = data.dataset_info(run_config.data)
  images = np.stack([load_image(path, info.image_shape) for path in image_paths])  # uint8 [N, H, W, C]

  config, info, _, state, _ = evaluate.restore_run(pathlib.Path(workdir), checkpoint)
  graphdef = model_graphdef(config.model, num_classes=info.num_classes, image_shape=info.image_shape)

  @jax.jit
  def class_probabilities(params, model_state, batch):  # uint8 [B, H, W, C] -> float32 [B, K]
    logits, _ = steps.apply_model(graphdef, params, model_state, steps.prepare_images(batch, config.data),
                                  train=False)
    return jax.nn.softmax(logits)

  batch_size = min(config.eval_batch_size, len(images))
  probabilities = np.concatenate([
      np.asarray(class_probabilities(state.params, state.model_state, batch))[:count]
      for batch, count in padded_batches(images, batch_size)])
  return {str(path): top_classes(p, info.class_names, top) for path, p in zip(image_paths, probabilities)}


def format_predictions(predictions: dict[str, list]) -> str:
  """Per file its name, then one line per class: probability in % and class name."""
  lines = []
  for path, classes in predictions.items():
    lines.append(path)
    lines.extend(f'  {100 * c["probability"]:6.2f}%  {c["class"]}' for c in classes)
  return '\n'.join(lines)


def define_flags() -> None:
  """The command's flags, defined only when it runs (importing this module adds none)."""
  flags.DEFINE_string('workdir', None, 'The --workdir of a training run.', required=True)
  flags.DEFINE_enum('checkpoint', 'best', ['best', 'latest'], 'best: best validation accuracy; latest: the newest.')
  flags.DEFINE_integer('top', 3, 'How many classes to show per image.', lower_bound=1)


def main(argv):
  if len(argv) < 2:
    cli.fail('give at least one IMAGE: python -m hybridvit_jax.predict --workdir=DIR IMAGE [IMAGE ...]')
  cli.quiet_library_logs()
  options = flags.FLAGS
  predictions = cli.run_and_exit(predict, options.workdir, argv[1:], options.checkpoint, options.top)
  print(format_predictions(predictions), flush=True)
  print(json.dumps(predictions), flush=True)


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=cli.parse_flags_or_exit)
