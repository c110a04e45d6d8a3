"""The GPU check's stages; run it through tools/gpu_check.sh, which installs what is missing first.

    python tools/gpu_check.py --archive=cifar10-jpeg.tar.gz [--out=runs/gpu_check] [--only=STAGES]
    python tools/gpu_check.py --dry-run [--out=DIR]

Stages, in order (--only picks some, comma-separated):
  environment  JAX's backend and devices (on a GPU run, anything but 'gpu' fails)
  tests        pytest of tests/test_models.py and tests/test_recipes.py on the backend's devices
  train        launch.py with the hybrid's :gpu preset on the image folder: once for one step, which
               fills JAX's compilation cache (its wall time is compile_and_first_step_s), then the
               measured run, whose elapsed_s is its training without compiling (loads included)
  evaluate     the measured run's best checkpoint on the test split (target_met: accuracy >= 94%)
  benchmark    `hybridvit_jax.benchmark` of the three default presets in float32 and bfloat16
  torch        benchmarks/torch_peer.py: ViT-Ti/4 and ResNet50 in PyTorch + timm at the same batch
               sizes and dtypes, then one `ratio` line each (this package's images/s over torch's)

Every result is one JSON line {"check": stage, "ok": bool, "seconds": wall time, ...} on stdout
and in OUT/gpu_check.jsonl; commands' own output goes to OUT/logs/. Exits 1 if any check failed.

--dry-run runs the same stages on the CPU backend with the smoke presets, a generated 10-class
image folder and 2 timed benchmark steps; without PyTorch it skips the torch stage. Each command
runs in its own process, so JAX and PyTorch never hold the GPU at the same time.
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys
import tarfile
import time

import numpy as np
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]
STAGES = ('environment', 'tests', 'train', 'evaluate', 'benchmark', 'torch')
MODELS = ('vit', 'resnet50', 'hybrid')
DTYPES = ('float32', 'bfloat16')
TORCH_MODELS = {'vit': 'vit_ti4', 'resnet50': 'resnet50'}  # the networks torch_peer.py has
TEST_ACCURACY_TARGET = 0.94
# Examples of the generated dry-run folder: the smoke preset's shapes and splits.
DRY_RUN_TRAIN_PER_CLASS, DRY_RUN_TEST_PER_CLASS = 8, 2
DRY_RUN_SPLITS = ('--config.data.train_split=train[:64]', '--config.data.val_split=train[64:]')


class OneLineParser(argparse.ArgumentParser):
  """Bad arguments as one line `error: ...` and exit code 2, as the package's commands do."""

  def error(self, message: str):
    self.exit(2, f'error: {message}\n')


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = OneLineParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default='runs/gpu_check', help='Folder for the runs, logs and results.')
  parser.add_argument('--archive', help='CIFAR-10 as JPEG folders in a .tar.gz (train/<class>/*, test/<class>/*).')
  parser.add_argument('--data', help='An unpacked image folder instead of --archive.')
  parser.add_argument('--only', default=','.join(STAGES), help='Comma-separated stages to run.')
  parser.add_argument('--dry-run', action='store_true', help='CPU backend, smoke presets, tiny data.')
  parser.add_argument('--tests', default='', help='pytest -k expression narrowing the tests stage.')
  parser.add_argument('--benchmarks', default=','.join(f'{m}:{d}' for m in MODELS for d in DTYPES),
                      help='MODEL:DTYPE pairs for the benchmark stage.')
  args = parser.parse_args(argv)
  args.only = [stage.strip() for stage in args.only.split(',') if stage.strip()]
  unknown = sorted(set(args.only) - set(STAGES))
  if unknown:
    parser.error(f'--only: unknown stages {unknown}; choose among {",".join(STAGES)}')
  args.benchmarks = [tuple(pair.split(':')) for pair in args.benchmarks.split(',') if pair]
  bad = [pair for pair in args.benchmarks if len(pair) != 2 or pair[0] not in MODELS or pair[1] not in DTYPES]
  if bad:
    parser.error(f'--benchmarks: {bad} are not MODEL:DTYPE with MODEL in {MODELS} and DTYPE in {DTYPES}')
  if not args.dry_run and not (args.archive or args.data) and {'train', 'evaluate', 'benchmark'} & set(args.only):
    parser.error('--archive=cifar10-jpeg.tar.gz or --data=ROOT is needed (or --dry-run)')
  return args


class Check:
  """Runs the stages' commands and records one JSON line per result."""

  def __init__(self, args: argparse.Namespace):
    self.args = args
    self.out = pathlib.Path(args.out).resolve()
    (self.out / 'logs').mkdir(parents=True, exist_ok=True)
    self.results_path = self.out / 'gpu_check.jsonl'
    self.results_path.write_text('')
    self.failed = False
    self.env = dict(os.environ, PYTHONUNBUFFERED='1')
    self.env['HYBRIDVIT_TEST_PLATFORM'] = 'cpu' if args.dry_run else 'gpu'
    if args.dry_run:
      self.env['JAX_PLATFORMS'] = 'cpu'
    # One compilation cache for the check, so the measured run and evaluate reuse its compiles.
    self.env.setdefault('JAX_COMPILATION_CACHE_DIR', str(self.out / 'jax_cache'))

  def record(self, check: str, ok: bool, seconds: float, **fields) -> dict:
    """Prints and keeps one result line; a failed one makes the check exit 1."""
    line = {'check': check, 'ok': ok, 'seconds': round(seconds, 2), **fields}
    self.failed |= not ok
    print(json.dumps(line), flush=True)
    with self.results_path.open('a') as results:
      results.write(json.dumps(line) + '\n')
    return line

  def command(self, name: str, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    """Runs `python ARGS` in the repository; its output goes to OUT/logs/NAME.log."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, *args], cwd=REPO, env=self.env, capture_output=True, text=True,
                            check=False)
    (self.out / 'logs' / f'{name}.log').write_text(f'$ python {" ".join(args)}\n{result.stdout}{result.stderr}')
    return result, time.perf_counter() - start

  def fail_reason(self, name: str, result: subprocess.CompletedProcess) -> dict:
    """The fields of a failed command's line: exit code, its last stderr line, its log."""
    last = (result.stderr.strip().splitlines() or [''])[-1]
    return {'returncode': result.returncode, 'error': last[-300:], 'log': str(self.out / 'logs' / f'{name}.log')}


def last_json_line(text: str) -> dict | None:
  """The last line of `text` that is a JSON object, or None."""
  for line in reversed(text.strip().splitlines()):
    if line.startswith('{'):
      try:
        return json.loads(line)
      except json.JSONDecodeError:
        return None
  return None


def image_folder(check: Check) -> pathlib.Path:
  """The image folder of the train, evaluate and benchmark stages: --data, --archive unpacked
  into OUT/data, or (dry run) a generated 10-class folder of 32x32 noise."""
  if check.args.data:
    return pathlib.Path(check.args.data).resolve()
  root = check.out / 'data'
  if (root / 'train').is_dir():
    return root
  if check.args.archive:
    with tarfile.open(check.args.archive) as archive:
      archive.extractall(root, filter='data')
    return root
  rng = np.random.default_rng(0)
  for split, per_class in (('train', DRY_RUN_TRAIN_PER_CLASS), ('test', DRY_RUN_TEST_PER_CLASS)):
    for label in range(10):
      (root / split / f'class{label}').mkdir(parents=True, exist_ok=True)
      for index in range(per_class):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            root / split / f'class{label}' / f'{index}.png')
  return root


def timing_flags(check: Check) -> list[str]:
  """The timed and untimed steps of the benchmark and torch stages (few in a dry run)."""
  return ['--steps=2', '--warmup=1'] if check.args.dry_run else ['--steps=20', '--warmup=3']


def data_flags(check: Check, root: pathlib.Path) -> list[str]:
  flags = ['--config.data.name=image_folder', f'--config.data.data_dir={root}']
  return flags + list(DRY_RUN_SPLITS) if check.args.dry_run and not check.args.data else flags


# ----------------------------------------------------------------------------------- stages
def environment(check: Check) -> None:
  script = ('import json, jax; d = jax.devices(); print(json.dumps({"backend": jax.default_backend(), '
            '"devices": len(d), "device_kind": d[0].device_kind, "jax_version": jax.__version__}))')
  result, seconds = check.command('environment', '-c', script)
  found = last_json_line(result.stdout) if result.returncode == 0 else None
  if found is None:
    check.record('environment', False, seconds, **check.fail_reason('environment', result))
    return
  expected = 'cpu' if check.args.dry_run else 'gpu'
  check.record('environment', found['backend'] == expected, seconds, expected_backend=expected, **found)


def tests(check: Check) -> None:
  # One process (-n 0): parallel workers would each take most of the GPU's memory.
  args = ['-m', 'pytest', '-n', '0', '-p', 'no:cacheprovider', 'tests/test_models.py', 'tests/test_recipes.py']
  result, seconds = check.command('tests', *args, *(['-k', check.args.tests] if check.args.tests else []))
  summary = (result.stdout.strip().splitlines() or [''])[-1]
  fields = {} if result.returncode == 0 else check.fail_reason('tests', result)
  check.record('tests', result.returncode == 0, seconds, summary=summary, **fields)


def preset(check: Check, model: str, gpu_preset: str) -> str:
  return f'configs/{model}.py:smoke' if check.args.dry_run else f'configs/{model}.py{gpu_preset}'


def train(check: Check) -> None:
  root, config = image_folder(check), preset(check, 'hybrid', ':gpu')
  flags = [f'--config={config}', *data_flags(check, root)]
  warmup, warmup_s = check.command('train_warmup', 'launch.py', *flags, '--config.max_steps=1',
                                   f'--workdir={check.out / "warmup_run"}')
  if warmup.returncode:
    check.record('train', False, warmup_s, config=config, **check.fail_reason('train_warmup', warmup))
    return
  workdir = check.out / 'train_run'
  result, seconds = check.command('train', 'launch.py', *flags, f'--workdir={workdir}')
  if result.returncode:
    check.record('train', False, seconds, config=config, **check.fail_reason('train', result))
    return
  records = [json.loads(line) for line in (workdir / 'history.jsonl').read_text().splitlines()]
  last = records[-1]
  check.record('train', True, seconds, config=config, data_dir=str(root), compile_and_first_step_s=round(warmup_s, 2),
               elapsed_s=last['elapsed_s'], steps=last['step'], planned_steps=last['planned_steps'],
               epochs=last['epoch'], val_accuracy=last['val_accuracy'], workdir=str(workdir))


def evaluate(check: Check) -> None:
  workdir = check.out / 'train_run'
  result, seconds = check.command('evaluate', '-m', 'hybridvit_jax.evaluate', f'--workdir={workdir}', '--split=test')
  found = last_json_line(result.stdout) if result.returncode == 0 else None
  if found is None:
    check.record('evaluate', False, seconds, **check.fail_reason('evaluate', result))
    return
  target = {} if check.args.dry_run else {'target': TEST_ACCURACY_TARGET,
                                          'target_met': found['accuracy'] >= TEST_ACCURACY_TARGET}
  check.record('evaluate', True, seconds, **found, **target)


def benchmark(check: Check) -> list[dict]:
  root = image_folder(check)
  steps = timing_flags(check)
  lines = []
  for model, dtype in check.args.benchmarks:
    name = f'benchmark_{model}_{dtype}'
    result, seconds = check.command(name, '-m', 'hybridvit_jax.benchmark', f'--config={preset(check, model, "")}',
                                    f'--config.model.dtype={dtype}', *data_flags(check, root), *steps)
    found = last_json_line(result.stdout) if result.returncode == 0 else None
    if found is None:
      check.record('benchmark', False, seconds, model=model, dtype=dtype, **check.fail_reason(name, result))
    else:
      lines.append(check.record('benchmark', True, seconds, **found))
  return lines


def torch(check: Check, benchmarks: list[dict]) -> None:
  steps = timing_flags(check)
  device = 'cpu' if check.args.dry_run else 'cuda'
  comparable = [line for line in benchmarks if line['model'] in TORCH_MODELS]
  if not comparable:
    check.record('torch', False, 0.0, error='no benchmark of vit or resnet50 to compare with: run the'
                 ' benchmark stage with one')
  for line in comparable:
    peer_model = TORCH_MODELS[line['model']]
    name = f'torch_{peer_model}_{line["dtype"]}'
    result, seconds = check.command(name, 'benchmarks/torch_peer.py', f'--models={peer_model}', f'--device={device}',
                                    f'--batch_size={line["batch_size"]}', f'--dtype={line["dtype"]}', *steps)
    if result.returncode == 2 and check.args.dry_run:  # PyTorch or timm is missing
      check.record('torch', True, seconds, skipped=(result.stderr.strip().splitlines() or [''])[-1])
      return
    found = last_json_line(result.stdout) if result.returncode == 0 else None
    if found is None:
      check.record('torch', False, seconds, model=peer_model, dtype=line['dtype'], **check.fail_reason(name, result))
      continue
    check.record('torch', True, seconds, **found)
    check.record('ratio', True, 0.0, model=line['model'], dtype=line['dtype'], batch_size=line['batch_size'],
                 images_per_s=line['images_per_s'], torch_images_per_s=found['images_per_s'],
                 ratio=round(line['images_per_s'] / found['images_per_s'], 3))


def main(argv: list[str]) -> int:
  check = Check(parse_args(argv))
  stages = check.args.only
  benchmarks = []
  for stage in STAGES:
    if stage not in stages:
      continue
    print(f'gpu_check: {stage}', file=sys.stderr, flush=True)
    if stage == 'benchmark':
      benchmarks = benchmark(check)
    elif stage == 'torch':
      torch(check, benchmarks)
    else:
      {'environment': environment, 'tests': tests, 'train': train, 'evaluate': evaluate}[stage](check)
  return 1 if check.failed else 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
