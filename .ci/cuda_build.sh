#!/usr/bin/env bash
# CI job: build the CUDA kernels against a CUDA build of torch (no GPU needed) and
# check what can be checked without one. Starts clean: its own venv in a temp dir.
#   1. venv with torch==2.14.1 (CUDA 13.0 build, from local disk) + build/test deps
#   2. pip install --no-build-isolation -e . with nvcc (FASTMASK_FORCE_CUDA=1)
#   3. the module imports; every op has a CUDA kernel (philox / mask_generate: the
#      CUDA launcher table); the .so holds sm_80 and sm_90 device code
#   4. the CPU test suite in that venv (tests/test_cuda.py skips without a GPU)
# Usage: .ci/cuda_build.sh            (from anywhere; KEEP=1 keeps the temp dir)
# Env: CUDA_HOME (default /usr/local/cuda), TORCH_CUDA_ARCH_LIST (default "8.0;9.0"),
#      FASTMASK_CI_DIR (work dir, default a new mktemp -d), PYTHON (default python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${FASTMASK_CI_DIR:-$(mktemp -d /tmp/fastmask-cuda-ci.XXXXXX)}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export FASTMASK_FORCE_CUDA=1
export PATH="$CUDA_HOME/bin:$PATH"
cleanup() { if [ "${KEEP:-0}" != 1 ]; then rm -rf "$WORK"; fi; }
trap cleanup EXIT
T0=$SECONDS
step() { echo "== [cuda_build $((SECONDS - T0))s] $*"; }

step "work dir $WORK; nvcc: $(nvcc --version | tail -1)"
"${PYTHON:-python3}" -m venv "$WORK/venv"
PY="$WORK/venv/bin/python"
"$PY" -m pip install -q --upgrade pip
step "installing torch==2.14.1 and the build/test deps"
"$PY" -m pip install -q torch==2.14.1 numpy pytest hypothesis scikit-build-core pybind11 cmake ninja
"$PY" -c "import torch; assert torch.version.cuda, 'torch is not a CUDA build'; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

step "building fastmask with CUDA (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
cd "$ROOT"
"$PY" -m pip install --no-build-isolation --no-deps -v -C "build-dir=$WORK/build" -e . \
  > "$WORK/build.log" 2>&1 || { tail -60 "$WORK/build.log"; exit 1; }
grep "fastmask:" "$WORK/build.log"

step "import, dispatch keys, device code"
"$PY" - <<'EOF'
import torch
import fastmask._C as C

info = C.build_info()
print(info)
assert info["cuda"] and info["cuda_launchers"], "CUDA kernels / launchers missing"
ops = ["mask_apply", "mask_apply_backward", "fgsm", "pgd_step", "pgd_step_", "random_start",
       "grad_clip_noise_", "learned_mask_apply", "learned_mask_apply_backward", "project_linf"]
missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fastmask::{op}", "CUDA")]
assert not missing, f"no CUDA kernel for {missing}"
for op in ["philox", "mask_generate"]:  # tensor-less: dispatch on `device`, via the launchers
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastmask::{op}", "CompositeExplicitAutograd"), op
print("CUDA kernels registered for", ops, "+ philox, mask_generate (launchers)")
EOF
SO="$("$PY" -c "import fastmask._C as C; print(C.__file__)")"
CUOBJDUMP="$(command -v cuobjdump || true)"
if [ -z "$CUOBJDUMP" ]; then  # the toolkit may lack it; triton (a torch dependency) ships one
  CUOBJDUMP="$("$PY" -c "import os, triton; print(os.path.join(os.path.dirname(triton.__file__), 'backends/nvidia/bin/cuobjdump'))")"
fi
ELFS="$("$CUOBJDUMP" --list-elf "$SO")"
echo "$ELFS"
for arch in sm_80 sm_90; do
  echo "$ELFS" | grep -q "\.$arch\.cubin" || { echo "no $arch device code in $SO"; exit 1; }
done

step "CPU test suite in the CUDA venv"
"$PY" -m pytest -q -m "not slow" -p no:cacheprovider tests/test_ops.py tests/test_kernels_cpu.py tests/test_cuda.py \
  tests/test_learned_mask.py
step "done"
