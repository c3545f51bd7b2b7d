#!/usr/bin/env bash
# Install as users do, and run from the installed copy: a non-editable
# `pip install --no-build-isolation .` into a fresh venv (torch and the build tools come
# from the dev venv through a .pth line, so nothing is downloaded), then `fastmask
# reproduce --preset smoke` from outside the source tree; it must import fastmask from
# the venv, with the extension loaded. Also: under pip's default build isolation the
# build stops at once with the one line of buildsys/fastmask_build.py.
#   bash .ci/wheel_install.sh [VENV]      (default VENV=.venv, built by make)
set -euo pipefail
cd "$(dirname "$0")/.."
DEV=$(cd "${1:-.venv}" && pwd)
SRC=$(pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$DEV/bin/python" -m venv "$WORK/venv"
SITE=$("$WORK/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
"$DEV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > "$SITE/_dev_venv.pth"
export PATH="$DEV/bin:$PATH"
echo "== [wheel] pip install --no-build-isolation . (non-editable)"
"$WORK/venv/bin/python" -m pip install -q --no-build-isolation --no-deps --no-index \
  --config-settings="build-dir=$WORK/build" "$SRC"
cd "$WORK"
"$WORK/venv/bin/python" - "$WORK/venv" <<'PY'
import sys
import fastmask, fastmask.ops as ops
assert fastmask.__file__.startswith(sys.argv[1]), f"fastmask imported from {fastmask.__file__}, not the venv"
assert ops.extension_loaded(), "the installed wheel has no working extension"
print("[wheel] fastmask from", fastmask.__file__, ops.build_info())
PY
echo "== [wheel] fastmask reproduce --preset smoke from the installed wheel"
"$WORK/venv/bin/fastmask" reproduce --preset smoke --rows baseline,random30 --out "$WORK/out" --quiet
test -s "$WORK/out/results.json" && test -s "$WORK/out/table.md"
"$WORK/venv/bin/python" -c "import json, sys; r = json.load(open(sys.argv[1])); assert r['versions']['extension_loaded'], r['versions']; print('[wheel] results.json ok, rows', list(r['rows']))" "$WORK/out/results.json"
echo "== [wheel] build isolation stops at once, with the line that says what to run"
set +e
"$DEV/bin/python" -m pip wheel -q --no-deps -w "$WORK/iso" "$SRC" > "$WORK/iso.log" 2>&1
rc=$?
set -e
grep -q "run \`pip install torch\` first, then \`pip install --no-build-isolation .\`" "$WORK/iso.log" && [ $rc -ne 0 ] \
  || { cat "$WORK/iso.log"; echo "[wheel] build isolation: expected the one-line stop"; exit 1; }
! grep -q "CMake" "$WORK/iso.log" || { echo "[wheel] build isolation reached CMake"; exit 1; }
echo "== [wheel] ok"
