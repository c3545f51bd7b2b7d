#!/bin/sh
# The results check of issue 13: the smoke reproduce, a surrogate (baseline, seed 1) and
# `fastmask evaluate --preset smoke` on the smoke checkpoints, then the digests of
# results.json / honest.json without timings and versions (scripts/results_digest.py).
#   scripts/results_check.sh OUTDIR    (run it on two commits, compare the digests)
# FASTMASK=CMD runs another fastmask (default .venv/bin/fastmask), PYTHON the digest.
set -e
OUT=$1
FM=${FASTMASK:-.venv/bin/fastmask}
PY=${PYTHON:-.venv/bin/python}
"$FM" reproduce --preset smoke --out "$OUT/reproduce" --quiet
"$FM" reproduce --preset smoke --seed 1 --rows baseline --out "$OUT/surrogate" --quiet
"$FM" evaluate --preset smoke --from "$OUT/reproduce" --surrogate "$OUT/surrogate/checkpoints/baseline.pt" \
    --out "$OUT/evaluate" --quiet
"$PY" scripts/results_digest.py --root "$OUT" "$OUT/reproduce/results.json" \
    "$OUT/surrogate/results.json" "$OUT/evaluate/honest.json"
