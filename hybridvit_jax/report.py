"""Compares finished (or running) training runs: a table and the paper's figures.

    python -m hybridvit_jax.report runs/vit runs/resnet50 runs/hybrid --out=runs/report

Reads each RUN_DIR's config.json, history.jsonl and evaluations.jsonl (what `evaluate` recorded:
the test accuracy of a run that did not evaluate the test split while training) and writes into
--out:
  table.md, table.csv  one row per run: parameters, GFLOPs per image, epochs, wall time,
                       images/s, best validation accuracy, the test accuracy of the best-validation
                       epoch (what the best checkpoint scores) and the maximum test accuracy over
                       epochs (the paper's metric); table.md ends with the paper's published rows.
  curves.png           test accuracy per epoch of every run (the paper's Figure 6)
  loss.png             test loss per epoch of every run
  time.png             validation accuracy at each evaluation against the minutes the run had
                       taken by then (`elapsed_s`: training and evaluations, across resumes): which
                       run is ahead at every minute of equal-time runs
  RUN_NAME.png         per run: train/test loss and train/test accuracy per epoch (Figures 3-5)
A run without test numbers is drawn with its validation numbers (the legend says so). A value a
run does not have yet is '–' in table.md and an empty cell in table.csv.
"""
import csv
import dataclasses
import io
import pathlib
import statistics
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags
from flax import nnx
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from hybridvit_jax import cli, configuration, data, evaluate, flops, models
from hybridvit_jax.training import history, steps

MISSING = '–'
CURVES_FIGURE = 'curves'
LOSS_FIGURE = 'loss'
TIME_FIGURE = 'time'
TABLE_COLUMNS = ('run', 'model', 'parameters', 'gflops_per_image', 'epochs', 'planned_epochs', 'wall_time_s',
                 'images_per_s', 'best_val_accuracy', 'best_val_epoch', 'test_accuracy_at_best_val',
                 'max_test_accuracy', 'max_test_epoch')
MARKDOWN_COLUMNS = ('Run', 'Model', 'Parameters', 'GFLOPs/image', 'Epochs (run / planned)', 'Wall time', 'Images/s',
                    'Best val accuracy', 'Test accuracy at best val', 'Max test accuracy')
# Chai (2024), Research on the performance of hybrid vision models based on ViT: CIFAR-10 on a Colab GPU.
# (network, maximum test accuracy, epochs, wall time)
PAPER_RESULTS = (('ViT', 0.6097, 16, '7 h'), ('ResNet50', 0.7835, 19, '6 h 40 min'),
                 ('CNN+ViT', 0.7028, 10, '4 h 17 min'))


# ----------------------------------------------------------------------------- one run
@dataclasses.dataclass(frozen=True)
class Run:
  """A run directory read from disk: its config, its per-epoch records and its `evaluate` results,
  each oldest first."""
  name: str
  path: pathlib.Path
  config: ml_collections.ConfigDict
  history: list[dict[str, Any]]
  evaluations: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def run_names(run_dirs: Sequence[pathlib.Path]) -> list[str]:
  """Each directory's name, or parent_name where two runs share a name (runs/a/vit, runs/b/vit)."""
  names = [pathlib.Path(d).resolve().name for d in run_dirs]
  return ['_'.join(pathlib.Path(d).resolve().parts[-2:]) if names.count(name) > 1 else name
          for d, name in zip(run_dirs, names)]


def read_runs(run_dirs: Sequence[str | pathlib.Path]) -> list[Run]:
  """Every run's config and history; a directory without config.json is a ConfigError."""
  paths = [pathlib.Path(d) for d in run_dirs]
  return [Run(name, path, configuration.load_run_config(path), history.read_history(path),
              evaluate.read_evaluations(path))
          for name, path in zip(run_names(paths), paths)]


def series(history: list[dict[str, Any]], key: str, x: str = 'epoch') -> tuple[list[float], list[float]]:
  """(x values, values) of the records that hold `key` and `x` ('epoch' or 'elapsed_s')."""
  records = [r for r in history if r.get(key) is not None and r.get(x) is not None]
  return [r[x] for r in records], [r[key] for r in records]


def eval_split(history: list[dict[str, Any]]) -> str:
  """'test' when the run evaluated on the test split, else 'val'."""
  return 'test' if series(history, 'test_accuracy')[0] else 'val'


def best_val_record(history: list[dict[str, Any]]) -> dict[str, Any]:
  """The first record with the highest val_accuracy: the epoch the loop keeps in checkpoints/best.
  `history` must not be empty."""
  return max(history, key=lambda r: r['val_accuracy'])  # max() keeps the first of equals


def history_summary(history: list[dict[str, Any]]) -> dict[str, Any]:
  """The table's numbers that come from the history; None where the run has no such number.

  Accuracies are fractions in [0, 1]; the best-validation epoch is the first with the highest
  val_accuracy, as the loop keeps the first one in checkpoints/best.
  """
  summary = dict.fromkeys(('epochs', 'wall_time_s', 'images_per_s', 'best_val_accuracy', 'best_val_epoch',
                           'test_accuracy_at_best_val', 'max_test_accuracy', 'max_test_epoch'))
  if not history:
    return summary
  last = history[-1]
  summary.update(epochs=last['epoch'], wall_time_s=last.get('elapsed_s'))
  speeds = [r['images_per_s'] for r in history if r.get('images_per_s') is not None]
  summary['images_per_s'] = statistics.median(speeds) if speeds else None
  best_val = best_val_record(history)
  summary.update(best_val_accuracy=best_val['val_accuracy'], best_val_epoch=best_val['epoch'],
                 test_accuracy_at_best_val=best_val.get('test_accuracy'))
  tested = [r for r in history if r.get('test_accuracy') is not None]
  if tested:
    best_test = max(tested, key=lambda r: r['test_accuracy'])
    summary.update(max_test_accuracy=best_test['test_accuracy'], max_test_epoch=best_test['epoch'])
  return summary


def evaluated_test_accuracy(history: list[dict[str, Any]], evaluations: list[dict[str, Any]],
                            test_split: str) -> float | None:
  """The newest accuracy `evaluate` recorded on `test_split` for the trained (not EMA) weights of
  the best-validation epoch's step (what `evaluate --checkpoint=best --split=test` measures); None
  if there is none, or if the run has moved on to a better epoch since."""
  if not history:
    return None
  best_step = best_val_record(history)['step']
  matches = [e for e in evaluations
             if e.get('split') == test_split and e.get('step') == best_step and e.get('weights') == 'trained']
  return matches[-1]['accuracy'] if matches else None


def planned_epochs(config: ml_collections.ConfigDict, history: list[dict[str, Any]]) -> float:
  """num_epochs, or fewer where max_steps or the time budget's plan ends the run first (known once
  an epoch is recorded)."""
  if not (history and history[-1]['epoch']):
    return config.num_epochs
  steps_per_epoch = history[-1]['step'] / history[-1]['epoch']
  planned_steps = history[-1].get('planned_steps') or config.max_steps
  if not planned_steps:
    return config.num_epochs
  return min(config.num_epochs, round(planned_steps / steps_per_epoch, 3))


def model_cost(model_config: ml_collections.ConfigDict, *, num_classes: int,
               image_shape: tuple[int, int, int]) -> tuple[int, float]:
  """(parameters, GFLOPs of a forward pass on one float32 image [1, H, W, C]).

  Both from abstract shapes (nnx.eval_shape): nothing is allocated. FLOPs are
  `flops.traced_flops` of the forward pass, as `benchmark` counts its step.
  """
  abstract_model = nnx.eval_shape(lambda: models.create_model(
      model_config, num_classes=num_classes, image_shape=image_shape, rngs=nnx.Rngs(0)))
  graphdef, params, model_state = nnx.split(abstract_model, nnx.Param, ...)

  def forward(params, model_state, images):
    return steps.apply_model(graphdef, params, model_state, images, train=False)[0]

  image = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  lowered = jax.jit(forward).lower(nnx.to_pure_dict(params), nnx.to_pure_dict(model_state), image)
  return models.count_params(abstract_model), flops.traced_flops(lowered) / 1e9


def run_row(run: Run) -> dict[str, Any]:
  """The run's table row (TABLE_COLUMNS); None where a value is missing.

  Parameters and GFLOPs need the data set's metadata (classes, image shape); if the data set
  cannot be found they are missing rather than an error.
  """
  try:
    info = data.dataset_info(run.config.data)
  except data.DataError:
    parameters, gflops = None, None
  else:
    parameters, gflops = model_cost(run.config.model, num_classes=info.num_classes, image_shape=info.image_shape)
  summary = history_summary(run.history)
  if summary['test_accuracy_at_best_val'] is None:
    summary['test_accuracy_at_best_val'] = evaluated_test_accuracy(
        run.history, run.evaluations, run.config.data.test_split)
  return {'run': run.name, 'model': run.config.model.name, 'parameters': parameters, 'gflops_per_image': gflops,
          'planned_epochs': planned_epochs(run.config, run.history), **summary}


# ------------------------------------------------------------------------------- tables
def format_duration(seconds: float) -> str:
  """3725.4 -> '1 h 2 min 5 s'; leading zero units left out."""
  hours, rest = divmod(round(seconds), 3600)
  minutes, secs = divmod(rest, 60)
  parts = [(hours, 'h'), (minutes, 'min'), (secs, 's')]
  while len(parts) > 1 and parts[0][0] == 0:
    parts.pop(0)
  return ' '.join(f'{value} {unit}' for value, unit in parts)


def format_count(count: int) -> str:
  """23520842 -> '23.52M', 21162 -> '21.2k'."""
  if count >= 1e6:
    return f'{count / 1e6:.2f}M'
  return f'{count / 1e3:.1f}k' if count >= 1e3 else str(count)


def _percent(fraction: float | None) -> str:
  return MISSING if fraction is None else f'{100 * fraction:.2f}%'


def _with_epoch(text: str, epoch: float | None) -> str:
  return text if epoch is None else f'{text} (epoch {epoch:g})'


def markdown_cells(row: dict[str, Any]) -> dict[str, str]:
  """The cells of one run in table.md, by column header (MARKDOWN_COLUMNS)."""
  def present(key, form):
    return MISSING if row[key] is None else form(row[key])
  epochs = MISSING if row['epochs'] is None else f'{row["epochs"]:g}'
  return {
      'Run': row['run'],
      'Model': row['model'],
      'Parameters': present('parameters', format_count),
      'GFLOPs/image': present('gflops_per_image', lambda g: f'{g:.3g}'),
      'Epochs (run / planned)': f'{epochs} / {row["planned_epochs"]}',
      'Wall time': present('wall_time_s', format_duration),
      'Images/s': present('images_per_s', lambda s: f'{s:.0f}'),
      'Best val accuracy': _with_epoch(_percent(row['best_val_accuracy']), row['best_val_epoch']),
      'Test accuracy at best val': _percent(row['test_accuracy_at_best_val']),
      'Max test accuracy': _with_epoch(_percent(row['max_test_accuracy']), row['max_test_epoch']),
  }


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  return '\n'.join(lines + ['| ' + ' | '.join(cells) + ' |' for cells in rows]) + '\n'


def paper_table() -> str:
  """The published results, for reference under the runs' table."""
  rows = [[network, _percent(accuracy), str(epochs), wall_time] for network, accuracy, epochs, wall_time
          in PAPER_RESULTS]
  return ('Published (Chai 2024, *Research on the performance of hybrid vision models based on ViT*, '
          'CIFAR-10, Colab GPU):\n\n'
          + markdown_table(['Network (paper)', 'Max test accuracy', 'Epochs', 'Wall time'], rows))


def report_markdown(rows: Sequence[dict[str, Any]]) -> str:
  """table.md: the runs' table, then the paper's rows."""
  cells = [markdown_cells(row) for row in rows]
  return (markdown_table(MARKDOWN_COLUMNS, [[c[column] for column in MARKDOWN_COLUMNS] for c in cells]) + '\n'
          'GFLOPs: one forward pass on one image (XLA cost analysis, a multiply-add is 2 FLOPs). '
          'Images/s: training throughput, median over epochs. '
          'Test accuracy at best val: what checkpoints/best scores.\n\n' + paper_table())


def report_csv(rows: Sequence[dict[str, Any]]) -> str:
  """table.csv: TABLE_COLUMNS, unformatted (accuracies as fractions, times in seconds); missing = empty."""
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=TABLE_COLUMNS, lineterminator='\n')
  writer.writeheader()
  writer.writerows({key: '' if row[key] is None else row[key] for key in TABLE_COLUMNS} for row in rows)
  return buffer.getvalue()


# ------------------------------------------------------------------------------ figures
def new_figure(width_in: float, height_in: float, panels: int = 1):
  """(figure, axes) drawn with the Agg backend, outside pyplot's global state."""
  figure = Figure(figsize=(width_in, height_in))
  FigureCanvasAgg(figure)
  return figure, figure.subplots(1, panels)


def save_figure(figure: Figure, path: pathlib.Path) -> None:
  figure.tight_layout()
  figure.savefig(path, dpi=150)


def _finish_axes(axes, *, ylabel: str, title: str, xlabel: str = 'epoch') -> None:
  """Labels, grid and legend; an epoch axis gets whole-number ticks."""
  axes.set_xlabel(xlabel)
  if xlabel == 'epoch':
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
  axes.set_ylabel(ylabel)
  axes.set_title(title)
  axes.grid(True, alpha=0.3)
  if axes.get_legend_handles_labels()[0]:
    axes.legend()


def split_label(splits: set[str]) -> str:
  """How a chart's y axis names the splits drawn on it."""
  return {frozenset({'test'}): 'test', frozenset({'val'}): 'validation'}.get(frozenset(splits),
                                                                              'test (or validation)')


def plot_all_runs(runs: Sequence[Run], metric: str, path: pathlib.Path) -> None:
  """One chart of `metric` ('accuracy' in %, or 'loss') per epoch, one line per run: test
  numbers, or validation numbers where a run has none (its legend says '(val)'). Runs without a
  finished epoch are left out."""
  figure, axes = new_figure(8, 5)
  runs = [run for run in runs if run.history]
  splits = {eval_split(run.history) for run in runs}
  for run in runs:
    split = eval_split(run.history)
    epochs, values = series(run.history, f'{split}_{metric}')
    if metric == 'accuracy':
      values = [100 * v for v in values]
    axes.plot(epochs, values, marker='o', label=run.name if split == 'test' else f'{run.name} (val)')
  quantity = f'{split_label(splits)} ' + ('accuracy (%)' if metric == 'accuracy' else 'cross-entropy loss')
  _finish_axes(axes, ylabel=quantity, title=f'{quantity.split(" (%)")[0].capitalize()} per epoch')
  save_figure(figure, path)


def plot_time_to_accuracy(runs: Sequence[Run], path: pathlib.Path) -> None:
  """One chart of validation accuracy (%) at each evaluation against elapsed minutes, one line per
  run. Runs without a finished epoch are left out."""
  figure, axes = new_figure(8, 5)
  for run in runs:
    seconds, accuracies = series(run.history, 'val_accuracy', x='elapsed_s')
    if seconds:
      axes.plot([s / 60 for s in seconds], [100 * a for a in accuracies], marker='o', label=run.name)
  _finish_axes(axes, ylabel='validation accuracy (%)', title='Validation accuracy against training time',
               xlabel='elapsed minutes (training and evaluations)')
  save_figure(figure, path)


def plot_run(run: Run, path: pathlib.Path) -> None:
  """Two panels: train and test (or val) loss, and train and test (or val) accuracy, per epoch."""
  split = eval_split(run.history)
  figure, (loss_axes, accuracy_axes) = new_figure(12, 4.5, panels=2)
  for name in ('train', split):
    loss_axes.plot(*series(run.history, f'{name}_loss'), marker='o', label=name)
    epochs, accuracies = series(run.history, f'{name}_accuracy')
    accuracy_axes.plot(epochs, [100 * a for a in accuracies], marker='o', label=name)
  _finish_axes(loss_axes, ylabel='cross-entropy loss', title='Loss')
  _finish_axes(accuracy_axes, ylabel='accuracy (%)', title='Accuracy')
  status = '' if run.history else ': no epoch finished yet'
  figure.suptitle(f'{run.name} ({run.config.model.name}){status}')
  save_figure(figure, path)


def run_figure_name(run_name: str) -> str:
  """RUN_NAME.png, unless that would overwrite one of the shared figures."""
  return f'run_{run_name}.png' if run_name in (CURVES_FIGURE, LOSS_FIGURE, TIME_FIGURE) else f'{run_name}.png'


# ------------------------------------------------------------------------------- report
def write_report(run_dirs: Sequence[str | pathlib.Path], out_dir: str | pathlib.Path) -> dict[str, Any]:
  """Writes the tables and figures of `run_dirs` into `out_dir` (created).

  Returns {'rows': the table rows (TABLE_COLUMNS, None where missing), 'markdown': table.md's
  text, 'files': the paths written}. Every directory is checked before anything is written.
  """
  runs = read_runs(run_dirs)
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  rows = [run_row(run) for run in runs]
  markdown = report_markdown(rows)
  files = {'table.md': markdown, 'table.csv': report_csv(rows)}
  for name, text in files.items():
    (out_dir / name).write_text(text)
  plot_all_runs(runs, 'accuracy', out_dir / f'{CURVES_FIGURE}.png')
  plot_all_runs(runs, 'loss', out_dir / f'{LOSS_FIGURE}.png')
  plot_time_to_accuracy(runs, out_dir / f'{TIME_FIGURE}.png')
  run_figures = [out_dir / run_figure_name(run.name) for run in runs]
  for run, path in zip(runs, run_figures):
    plot_run(run, path)
  written = [out_dir / name for name in files] + [out_dir / f'{name}.png' for name in
                                                  (CURVES_FIGURE, LOSS_FIGURE, TIME_FIGURE)]
  return {'rows': rows, 'markdown': markdown, 'files': written + run_figures}


# -------------------------------------------------------------------------------- sweeps
def sweep_markdown(key: str, values: Sequence[Any], rows: Sequence[dict[str, Any]]) -> str:
  """A table of the report's rows against the swept config value."""
  columns = ['Run', 'Parameters', 'GFLOPs/image', 'Epochs (run / planned)', 'Images/s', 'Best val accuracy',
             'Test accuracy at best val', 'Max test accuracy']
  table = [[str(value), *(markdown_cells(row)[column] for column in columns)] for value, row in zip(values, rows)]
  return f'Sweep over {key}, every other setting the same.\n\n' + markdown_table([key, *columns], table)


def plot_sweep(key: str, values: Sequence[Any], rows: Sequence[dict[str, Any]], path: pathlib.Path) -> None:
  """Two panels against the swept value: best val and max test accuracy (%), and training images/s.
  Numeric values are placed on a numeric axis, others one per tick in the given order."""
  numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
  positions = list(values) if numeric else list(range(len(values)))
  figure, (accuracy_axes, speed_axes) = new_figure(12, 4.5, panels=2)

  def plot(axes, column, label, scale=1.0):
    points = [(x, scale * row[column]) for x, row in zip(positions, rows) if row[column] is not None]
    axes.plot([x for x, _ in points], [y for _, y in points], marker='o', label=label)

  plot(accuracy_axes, 'best_val_accuracy', 'best validation accuracy', 100)
  plot(accuracy_axes, 'max_test_accuracy', 'max test accuracy', 100)
  plot(speed_axes, 'images_per_s', 'median over epochs')
  for axes in (accuracy_axes, speed_axes):
    axes.set_xticks(positions, [str(v) for v in values])
  _finish_axes(accuracy_axes, ylabel='accuracy (%)', title=f'Accuracy against {key}', xlabel=key)
  _finish_axes(speed_axes, ylabel='training throughput (images/s)', title=f'Training speed against {key}',
               xlabel=key)
  save_figure(figure, path)


def write_sweep_report(key: str, values: Sequence[Any], rows: Sequence[dict[str, Any]],
                       out_dir: str | pathlib.Path, name: str) -> list[pathlib.Path]:
  """Writes NAME.md and NAME.png (see sweep_markdown, plot_sweep) for the rows of write_report,
  one per value, in that order; returns their paths."""
  out_dir = pathlib.Path(out_dir)
  table, figure = out_dir / f'{name}.md', out_dir / f'{name}.png'
  table.write_text(sweep_markdown(key, values, rows))
  plot_sweep(key, values, rows, figure)
  return [table, figure]


# ---------------------------------------------------------------------------------- main
def print_report(report: dict[str, Any]) -> None:
  print(report['markdown'], flush=True)
  print('wrote ' + ', '.join(str(path) for path in report['files']), flush=True)


def main(argv):
  if len(argv) < 2:
    cli.fail('give at least one RUN_DIR: python -m hybridvit_jax.report RUN_DIR [RUN_DIR ...] --out=DIR')
  cli.quiet_library_logs()
  cli.use_compilation_cache(True)
  print_report(cli.run_and_exit(write_report, argv[1:], flags.FLAGS.out))


if __name__ == '__main__':
  # Defined only when the report is the program: study imports this module and has no --out.
  flags.DEFINE_string('out', None, 'Directory for the tables and figures (created).', required=True)
  app.run(main, flags_parser=cli.parse_flags_or_exit)
