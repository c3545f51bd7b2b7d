"""Which CPU ISA paths of the extension this machine can run, and a runner that executes
code on one of them (FASTMASK_CPU_ISA caps the load-time choice, so each ISA needs its
own process). A test asking for an ISA the CPU lacks is skipped with the reason; one
that runs asserts that the extension really picked the ISA it asked for
(fastmask.ops.build_info()["cpu_isa"]), so an [avx512] case can never pass on AVX2.

    python tests/isa.py        # one line: the chosen ISA and the ISA paths testable here
"""
import functools
import os
import subprocess
import sys

import pytest

ISAS = ("scalar", "avx2", "avx512")  # each includes the ones before it
_ASK = "import fastmask.ops as o; print(o.build_info()['cpu_isa'])"


def _env(isa=None):
    env = {k: v for k, v in os.environ.items() if k != "FASTMASK_CPU_ISA"}
    if isa is not None:
        env["FASTMASK_CPU_ISA"] = isa
    return env


@functools.lru_cache(maxsize=None)
def best_isa():
    """The ISA the extension picks in this environment (None: the extension is not built). A
    FASTMASK_CPU_ISA set for the whole run caps it, so `FASTMASK_CPU_ISA=avx2 make test`
    runs the suite as on an AVX2-only CPU (the avx512 cases skip)."""
    out = subprocess.run([sys.executable, "-c", _ASK], env=dict(os.environ), capture_output=True, text=True,
                         timeout=120)
    isa = out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout.strip() else "None"
    return None if isa == "None" else isa


def available():
    """The ISA paths this CPU can run, in ISAS order."""
    best = best_isa()
    return () if best is None else ISAS[:ISAS.index(best) + 1]


def run_on(isa, code, timeout=300):
    """Run `code` in a fresh interpreter capped at `isa`; skip when this CPU lacks it.
    The code must print "ok" last; the ISA the extension picked must be `isa`."""
    if best_isa() is None:
        pytest.skip("the extension is not in use (not built, or FASTMASK_DISABLE_EXT=1)")
    if isa not in available():
        cap = os.environ.get("FASTMASK_CPU_ISA")
        why = f"FASTMASK_CPU_ISA={cap} caps this run" if cap else "this CPU has no such path"
        pytest.skip(f"no {isa} here ({why}; best: {best_isa()}): the {isa} case runs on a CPU that has it")
    prelude = ("import fastmask.ops as _o\n"
               f"_isa = _o.build_info()['cpu_isa']\n"
               f"assert _isa == {isa!r}, f'asked for {isa}, the extension picked {{_isa}}'\n")
    out = subprocess.run([sys.executable, "-c", prelude + code], env=_env(isa), capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def summary():
    best = best_isa()
    if best is None:
        return "fastmask extension not in use: no CPU ISA path runs (reference fallback)"
    skipped = [i for i in ISAS if i not in available()]
    cap = os.environ.get("FASTMASK_CPU_ISA")
    cap = f" (capped by FASTMASK_CPU_ISA={cap})" if cap else ""
    return (f"fastmask CPU ISA: {best} chosen{cap}; "
            f"ISA-parametrised tests run {', '.join(available())}"
            + (f"; skip {', '.join(skipped)}" if skipped else ""))


if __name__ == "__main__":
    print(summary())
