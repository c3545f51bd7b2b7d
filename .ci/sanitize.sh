#!/usr/bin/env bash
# CI job: the C++ CPU kernels built with AddressSanitizer + UndefinedBehaviorSanitizer,
# then the op tests run against that build. Any ASan report or UB aborts the run.
#   1. cmake straight into build/asan (never touches the normal build) with
#      -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
#   2. a copy of the fastmask package in a temp dir with the sanitized _C dropped in
#   3. pytest tests/test_kernels_cpu.py tests/test_ops.py tests/test_properties.py
#      with libasan preloaded (python itself is not instrumented), `python -S` with
#      PYTHONPATH on the copy + site-packages (an editable install's import hook would
#      otherwise win), FASTMASK_REQUIRE_EXT=1 (a failed import cannot silently fall back)
# Usage: .ci/sanitize.sh [PYTHON]   (PYTHON: the project venv's python, default .venv/bin/python
#        or /tmp/venv-cpu/bin/python; its torch, pybind11, cmake and ninja are used)
# Env: KEEP=1 keeps the temp dir; ARGS="..." extra pytest arguments.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${1:-}"
if [ -z "$PY" ]; then
  for c in "$ROOT/.venv/bin/python" /tmp/venv-cpu/bin/python; do
    if [ -x "$c" ]; then PY="$c"; break; fi
  done
fi
[ -n "$PY" ] || { echo "sanitize.sh: no python given and no .venv found" >&2; exit 2; }
BIN="$(dirname "$PY")"
BUILD="$ROOT/build/asan"
WORK="$(mktemp -d /tmp/fastmask-asan.XXXXXX)"
cleanup() { if [ "${KEEP:-0}" != 1 ]; then rm -rf "$WORK"; fi; }
trap cleanup EXIT
T0=$SECONDS
step() { echo "== [sanitize $((SECONDS - T0))s] $*"; }

SAN="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g"
LIBASAN="$(${CXX:-g++} -print-file-name=libasan.so)"
LIBSTDCXX="$(readlink -f "$(${CXX:-g++} -print-file-name=libstdc++.so)")"
[ -f "$LIBASAN" ] || { echo "sanitize.sh: libasan.so not found ($LIBASAN)" >&2; exit 2; }

step "configure + build $BUILD (python $PY)"
PATH="$BIN:$PATH" cmake -S "$ROOT" -B "$BUILD" -G Ninja \
  -DPython_EXECUTABLE="$PY" \
  -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DFASTMASK_DISABLE_CUDA=ON \
  -DCMAKE_CXX_FLAGS="$SAN" \
  -DCMAKE_MODULE_LINKER_FLAGS="-fsanitize=address,undefined" \
  -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=address,undefined" > "$WORK/configure.log" 2>&1 \
  || { tail -40 "$WORK/configure.log"; exit 1; }
PATH="$BIN:$PATH" cmake --build "$BUILD" -j "$(nproc)" > "$WORK/build.log" 2>&1 \
  || { tail -60 "$WORK/build.log"; exit 1; }
SO="$(ls "$BUILD"/_C*.so)"
[ "$(nm -D "$SO" | grep -c __asan_report)" -gt 0 ] || { echo "sanitize.sh: $SO is not instrumented" >&2; exit 1; }

step "package copy with the sanitized extension in $WORK/pkg"
mkdir -p "$WORK/pkg"
cp -r "$ROOT/fastmask" "$WORK/pkg/fastmask"
rm -f "$WORK"/pkg/fastmask/_C*.so
cp "$SO" "$WORK/pkg/fastmask/"
cp -r "$ROOT/tests" "$WORK/tests"
cp "$ROOT/pyproject.toml" "$WORK/"
find "$WORK" -name __pycache__ -prune -exec rm -rf {} +

step "pytest under ASan + UBSan"
cd "$WORK"
# detect_leaks=0: CPython and torch keep allocations alive at exit by design.
# new_delete_type_mismatch=0: torch's own (uninstrumented) operator delete overloads.
# Reports go to $WORK/san.* (pytest captures fd 2, and an abort would lose them).
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:new_delete_type_mismatch=0:allocator_may_return_null=1:log_path=$WORK/san.asan"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$WORK/san.ubsan"
report() { for f in "$WORK"/san.*; do [ -f "$f" ] && { echo "== $f"; cat "$f"; }; done; }
# libstdc++ preloaded too: python does not link it, and ASan's __cxa_throw interceptor must
# find it at start-up (else "CHECK failed ... real___cxa_throw" on the first C++ exception).
export LD_PRELOAD="$LIBASAN $LIBSTDCXX"
# python -S: no site processing, so an editable install's import hook (a .pth file) cannot
# send `import fastmask` back to the source tree; site-packages comes in through PYTHONPATH.
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
export PYTHONPATH="$WORK/pkg:$SITE"
export FASTMASK_REQUIRE_EXT=1
"$PY" -S - <<'EOF'
import fastmask, fastmask.ops as ops, fastmask._C as C
assert ops.extension_loaded(), "the sanitized extension did not load"
assert "/fastmask-asan." in C.__file__ and "/fastmask-asan." in fastmask.__file__, (C.__file__, fastmask.__file__)
print("sanitized extension:", C.__file__)
EOF
"$PY" -S -m pytest -q -p no:cacheprovider -x tests/test_kernels_cpu.py tests/test_ops.py \
  tests/test_properties.py ${ARGS:-} || { rc=$?; report; exit $rc; }
unset LD_PRELOAD
if ls "$WORK"/san.* > /dev/null 2>&1; then report; exit 1; fi
step "clean: no ASan/UBSan report"
