"""What a FeatureMask costs one MLP training step, end to end, split by this VM's phases
(benchmarks/RESULTS.md, session 10). The step is benchmarks/bench_train's (fastmask.train's
fused Adam, batch 128 MNIST); the variants:
    plain      no mask (nn.Identity, as bench_train's baseline),
    one-call   FeatureMask as it runs: one call into the extension per training draw
               (ops._mask_step: the counter, the op, the scale),
    composed   the same draws as separate calls from Python (FeatureMask._separate_calls: the
               counter's read, the op, its add_; the path without the extension's one-call
               function),
in pairs of BLOCK-step blocks, base then other and other then base in turn (as
harness.paired). The machines measured run the same step at two speeds for seconds to
minutes (1.3 ms or 2.2-2.5 ms for the plain step), and the mask's share differs between
them, so each pair is put in the fast or the slow phase by its base block's per-step time
(below or above SPLIT_MS; "base step" is that block's median) and the median increase, with its distribution-free 95 %
interval, is given for each phase and for all pairs.

    python -m benchmarks.mask_step_phases [PAIRS] [BLOCK] [THREADS] [MASK]

MASK: a bench_train variant name ("fused random 30%", "menu blur 30%", ...).
"""
import sys
import time

import torch
from torch import nn

from benchmarks import bench_train as B
from benchmarks.harness import isa_info, machine_info, median_ci
from fastmask.nn import FeatureMask

SPLIT_MS = 1.8  # between the two phases' plain steps (1.3 and 2.2-2.5 ms on the EPYC measured)


class ComposedMask(FeatureMask):
    """FeatureMask drawing through separate calls (its path when the one-call function is not used)."""

    def forward(self, x):
        return self._separate_calls(x)


def composed(mask):
    mask.__class__ = ComposedMask  # the same module and state, drawing through separate calls
    return mask


def pairs(base, other, n, block):
    """n pairs (alternating order) -> [(base s/step, other s/step)]."""
    def run(fn):
        t0 = time.perf_counter()
        for _ in range(block):
            fn()
        return (time.perf_counter() - t0) / block

    for _ in range(20):
        base()
        other()
    out = []
    for i in range(n):
        if i % 2 == 0:
            a = run(base)
            b = run(other)
        else:
            b = run(other)
            a = run(base)
        out.append((a, b))
    return out


def summary(ps):
    rows = []
    for name, sel in (("fast", [p for p in ps if p[0] * 1e3 < SPLIT_MS]),
                      ("slow", [p for p in ps if p[0] * 1e3 >= SPLIT_MS]), ("all", ps)):
        if len(sel) < 10:
            rows.append(f"{name} {len(sel)} pairs")
            continue
        med, lo, hi = median_ci([b / a - 1 for a, b in sel])
        base = sorted(a for a, _ in sel)[len(sel) // 2]
        rows.append(f"{name} {len(sel)} pairs: {100 * med:+.2f} % [{100 * lo:+.2f}, {100 * hi:+.2f}] "
                    f"(base step {1e3 * base:.2f} ms)")
    return "; ".join(rows)


def main(argv):
    n = int(argv[0]) if argv else 600
    block = int(argv[1]) if len(argv) > 1 else 10
    threads = int(argv[2]) if len(argv) > 2 else 2
    name = argv[3] if len(argv) > 3 else "fused random 30%"
    torch.set_num_threads(threads)
    m = machine_info()
    print(f"CPU {m['cpu']} (family/model {m.get('cpu_family_model')}), {isa_info()}, {threads} threads, "
          f"{name}, {n} pairs of {block} steps")
    pool, source = B.batches(50, 128, "cpu")
    mask = B.named_mask(name)
    if not isinstance(mask, FeatureMask):
        raise SystemExit(f"{name!r} is not a FeatureMask variant")
    plain = B.trainer("mlp", nn.Identity(), pool, "cpu")
    one = B.trainer("mlp", mask, pool, "cpu")
    comp = B.trainer("mlp", composed(B.named_mask(name)), pool, "cpu")
    for label, a, b in (("plain -> one-call", plain, one), ("plain -> composed", plain, comp),
                        ("composed -> one-call", comp, one)):
        print(f"{label:22s} {summary(pairs(a, b, n, block))}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
