"""The Python costs that fastmask/nn.py's FeatureMask hot path (one call, ops._mask_step) and
fastmask/_checks.u64 avoid (once figures in code comments; now in benchmarks/RESULTS.md): per
call, the minimum over 7 interleaved repeats of timeit, 1 torch thread.

    python benchmarks/python_overhead.py
"""
import timeit
import torch
from fastmask import _checks as C, ops
from fastmask.nn import FeatureMask
torch.set_num_threads(1)
fm = FeatureMask(0.3, seed=1).train()
x = torch.rand(128, 1, 28, 28)
off_t = torch.tensor(5)
step = fm._buffers["step"]
cases = {
    "Module.__getattr__ (fm.step)": (lambda: fm.step, 200000),
    "fm._buffers['step']": (lambda: fm._buffers["step"], 200000),
    "C.u64 plain int": (lambda: C.u64("seed", 12345), 200000),
    "C.u64 slow path (an int >= 2^63)": (lambda: C.u64("seed", 2**63 + 5), 200000),
    "step.add_(1)": (lambda: step.add_(1), 100000),
    "with no_grad: step.add_(1)": (lambda: _ng(), 100000),
    "ops._mask_apply_int (no Python checks)": (lambda: ops._mask_apply_int(x, 0.3, 1, 5, "pixel", "sample", "shared", 0.0), 2000),
    "ops._mask_step (FeatureMask's hot path: counter, op, scale)": (
        lambda: ops._mask_step(x, 0.3, 1, step, 0, 0, "pixel", "sample", "shared", 0.0, 1.0), 2000),
    "ops.mask_apply int offset (checked)": (lambda: ops.mask_apply(x, 0.3, seed=1, offset=5), 2000),
    "ops.mask_apply tensor offset (custom op)": (lambda: ops.mask_apply(x, 0.3, seed=1, offset=off_t), 2000),
    "FeatureMask forward": (lambda: fm(x), 2000),
}


def _ng():
    with torch.no_grad():
        step.add_(1)
best = {k: float("inf") for k in cases}
for r in range(7):
    for k, (fn, n) in cases.items():
        best[k] = min(best[k], timeit.timeit(fn, number=n) / n)
for k, v in best.items():
    print(f"| {k} | {v * 1e6:.2f} us |")
print("build:", ops.build_info().get("cpu_isa"), torch.__version__)
