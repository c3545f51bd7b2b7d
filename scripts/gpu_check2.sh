#!/usr/bin/env bash
# Short GPU re-check (fits ~4 minutes of device time): build for this GPU, then
#   1. tests/test_kernels_cpu.py (it crashed on the torch 2.11 GPU image before the
#      mask_apply autograd moved from Python to C++), with faulthandler;
#   2. tests/test_cuda.py;
#   3. the CUDA op benchmark.
# Everything it writes goes under $OUT. Usage: OUT=dir bash scripts/gpu_check2.sh
set -uo pipefail
OUT="${OUT:?set OUT}"; mkdir -p "$OUT"
PY="${PYTHON:-/opt/torch/.venv/bin/python3}"; [ -x "$PY" ] || PY=python3
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" PATH="${CUDA_HOME:-/usr/local/cuda}/bin:$PATH"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" CMAKE_BUILD_PARALLEL_LEVEL=16 FASTMASK_FORCE_CUDA=1
T0=$SECONDS
note() { echo "[$((SECONDS - T0))s] $*" | tee -a "$OUT/summary.txt"; }
"$PY" -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name(0))" | tee -a "$OUT/summary.txt"
TARGET="$(mktemp -d)"
timeout 150 "$PY" -m pip install --no-build-isolation --no-deps --no-index \
  -C build-dir="$TARGET/build" --target "$TARGET/site" . > "$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; note "BUILD FAILED"; exit 1; }
cp "$TARGET"/site/fastmask/_C*.so fastmask/
note "build ok"
timeout 60 "$PY" -X faulthandler -m pytest -q -p no:cacheprovider tests/test_kernels_cpu.py > "$OUT/kernels_cpu.log" 2>&1
note "test_kernels_cpu rc=$?: $(tail -1 "$OUT/kernels_cpu.log")"
grep -m3 -A12 "Fatal Python" "$OUT/kernels_cpu.log" | tee -a "$OUT/summary.txt"
timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py > "$OUT/test_cuda.log" 2>&1
note "test_cuda rc=$?: $(tail -1 "$OUT/test_cuda.log")"
timeout 60 "$PY" -m benchmarks.bench_ops --device cuda --json "$OUT/bench_cuda.json" > "$OUT/bench.log" 2>&1
note "bench rc=$?"
grep -E "mask_apply|fgsm|pgd_step_|random_start|grad_clip|peak" "$OUT/bench.log" | head -30 | tee -a "$OUT/summary.txt"
