#!/usr/bin/env bash
# One-shot GPU check (the lead runs it on a GPU machine; about 3-6 minutes in all):
# build fastmask with its CUDA kernels for this GPU, run the CUDA tests and the op
# tests, then the CUDA benchmark. Everything it writes goes under $OUT:
#   build.log, test_cuda.log, bench_cuda.json (+ bench.log), summary.txt
# Usage (repository root): OUT=/some/dir bash scripts/gpu_check.sh
# Env: PYTHON (default /opt/torch/.venv/bin/python3 if present, else python3),
#      TORCH_CUDA_ARCH_LIST (default 9.0: H100/H200), CUDA_HOME (default /usr/local/cuda).
set -x
set -uo pipefail
OUT="${OUT:?set OUT to a writable directory}"
mkdir -p "$OUT"
PY="${PYTHON:-/opt/torch/.venv/bin/python3}"
[ -x "$PY" ] || PY=python3
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PATH="$CUDA_HOME/bin:$PATH"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS=16 CMAKE_BUILD_PARALLEL_LEVEL=16 FASTMASK_FORCE_CUDA=1
T0=$SECONDS
status=0
note() { echo "[$((SECONDS - T0))s] $*" | tee -a "$OUT/summary.txt"; }
# Seconds a step may take: its own limit, cut so that the script ends by ~340 s.
budget() { local left=$((340 - (SECONDS - T0))); [ $left -lt 10 ] && left=10; echo $(($1 < left ? $1 : left)); }

nvidia-smi
"$PY" -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
"$PY" -c "import pytest, hypothesis" || note "WARNING: pytest or hypothesis missing"

# Build into a --target dir, then put the compiled module next to the sources, so
# that `import fastmask` from the repository root (tests, benchmarks) loads it.
TARGET="$(mktemp -d)"
timeout "$(budget 180)" "$PY" -m pip install --no-build-isolation --no-deps --no-index -v \
  --config-settings="build-dir=$TARGET/build" --target "$TARGET/site" . > "$OUT/build.log" 2>&1
rc=$?
grep "fastmask:" "$OUT/build.log"
if [ $rc -ne 0 ]; then
  tail -80 "$OUT/build.log"
  note "BUILD FAILED (rc=$rc)"
  exit 1
fi
cp "$TARGET"/site/fastmask/_C*.so fastmask/
note "build ok"
"$PY" -c "
import torch, fastmask, fastmask._C as C, fastmask.ops as ops
print(C.build_info(), 'extension_loaded', ops.extension_loaded())
assert C.build_info()['cuda'] and C.build_info()['cuda_launchers'] and ops.extension_loaded()
print(torch.ops.fastmask.philox(0, 0, 4, device='cuda').tolist())
" 2>&1 | tee -a "$OUT/summary.txt" || status=1

timeout "$(budget 200)" "$PY" -m pytest -q -rs --maxfail=20 -p no:cacheprovider tests/test_cuda.py tests/test_ops.py \
  2>&1 | tee "$OUT/test_cuda.log"
rc=${PIPESTATUS[0]}
note "tests rc=$rc: $(tail -1 "$OUT/test_cuda.log")"
[ $rc -eq 0 ] || status=1

if [ -f benchmarks/bench_ops.py ]; then
  timeout "$(budget 90)" "$PY" -m benchmarks.bench_ops --device cuda --json "$OUT/bench_cuda.json" \
    2>&1 | tee "$OUT/bench.log"
  rc=${PIPESTATUS[0]}
else  # fallback: GB/s of the element-wise ops at 2^26 float32 elements
  timeout "$(budget 90)" "$PY" - "$OUT/bench_cuda.json" <<'EOF' 2>&1 | tee "$OUT/bench.log"
import json, sys, torch
from fastmask import ops
n, dev = 2**26, "cuda"
x, g, xn = torch.rand(n, device=dev), torch.randn(n, device=dev), torch.rand(n, device=dev)
xa, dst = x.clone(), torch.empty_like(x)
def t(fn, reps=20):
    fn(); torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps): fn()
    e.record(); torch.cuda.synchronize()
    return s.elapsed_time(e) / 1e3 / reps
p = torch.cuda.get_device_properties(0)
clock, bus = getattr(p, "memory_clock_rate", 0), getattr(p, "memory_bus_width", 0)
copy_s = t(lambda: dst.copy_(x))
peak = 2 * clock * 1e3 * bus / 8 if clock and bus else 2 * n * 4 / copy_s
cases = {
    "mask_apply": (2, lambda: ops.mask_apply(x.view(n // 1024, 1, 32, 32), 0.3, seed=1, offset=0, channels="separate"),
                   lambda: x * (torch.rand_like(x) >= 0.3)),
    "fgsm": (3, lambda: ops.fgsm(x, g, 0.3, 0.0, 1.0), lambda: (x + 0.3 * g.sign()).clamp(0, 1)),
    "pgd_step_": (4, lambda: ops.pgd_step_(xa, xn, g, 0.01, 0.3, 0.0, 1.0, "inf"),
                  lambda: torch.min(torch.max(xa + 0.01 * g.sign(), xn - 0.3), xn + 0.3).clamp(0, 1)),
}
res = {"peak_GBps": peak / 1e9, "copy_GBps": 2 * n * 4 / copy_s / 1e9, "ops": {}}
for name, (k, fused, eager) in cases.items():
    tf, te = t(fused), t(eager)
    res["ops"][name] = {"GBps": k * n * 4 / tf / 1e9, "frac_of_peak": k * n * 4 / tf / peak,
                        "speedup_vs_eager": te / tf}
print(json.dumps(res, indent=1))
json.dump(res, open(sys.argv[1], "w"), indent=1)
EOF
  rc=${PIPESTATUS[0]}
fi
note "bench rc=$rc"
[ $rc -eq 0 ] || status=1
note "gpu_check finished, status=$status"
exit $status
