#!/usr/bin/env bash
# The GPU check: this package end to end on a bare GPU machine, one JSON line per result.
#
#   tools/gpu_check.sh --wheels=DIR --archive=cifar10-jpeg.tar.gz [--out=DIR] [--only=STAGES]
#   tools/gpu_check.sh --dry-run [--out=DIR]          # the same steps on CPU, smoke presets
#   tools/gpu_check.sh --download-wheels=DIR          # on a machine with internet, beforehand
#
# The machine needs Python >= 3.11 with JAX (CUDA), Flax, Optax, Orbax, Pillow, numpy, absl,
# etils, protobuf, six, tensorboard, pytest (+ pytest-xdist, hypothesis) and setuptools >= 70.1
# (it builds the editable install without `wheel`), and PyTorch + timm for the side-by-side
# steps; no TensorFlow, no internet. Checked on CPU in such an environment (--dry-run). --wheels=DIR installs the rest from wheels made beforehand with
# --download-wheels (pure Python, so any platform's download serves): clu, ml-collections,
# tensorflow-datasets, tensorflow-metadata, googleapis-common-protos, immutabledict, promise
# and toml; then this package, editable; all into $PYTHON's environment with --no-deps, so the
# machine's JAX is kept. The stages and their output: tools/gpu_check.py. Exits non-zero if any
# check failed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
WHEELS=(clu==0.0.12 ml-collections==1.1.0 tensorflow-datasets==4.9.10 tensorflow-metadata==1.21.0
        googleapis-common-protos==1.76.0 immutabledict==4.3.1 promise==2.3 toml==0.10.2)

args=()
for arg in "$@"; do
  case "$arg" in
    --download-wheels=*)
      # `pip wheel` also builds promise, which is published as a source archive only.
      exec "$PYTHON" -m pip wheel --quiet --no-deps -w "${arg#*=}" "${WHEELS[@]}" ;;
    --wheels=*)
      wheels="${arg#*=}"
      if ! ls "$wheels"/*.whl >/dev/null 2>&1; then
        echo "error: --wheels=$wheels holds no .whl files; make them with --download-wheels=DIR" >&2
        exit 2
      fi
      "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile "$wheels"/*.whl
      # The package itself, editable as for development (configs/ is hybridvit_jax.configs), built
      # with the machine's setuptools: nothing can be fetched for an isolated build.
      "$PYTHON" -m pip install --quiet --no-index --no-deps --no-build-isolation -e . ;;
    *) args+=("$arg") ;;
  esac
done
exec "$PYTHON" tools/gpu_check.py ${args[@]+"${args[@]}"}
