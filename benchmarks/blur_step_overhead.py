"""Does the blur-masked MLP step pay for anything besides the blur op? (benchmarks/RESULTS.md,
"the blur row: what the masked step pays besides the op"). Interleaved, rotating order, the
minimum per call over the rounds, 1 torch thread:

    op             torch.ops.fastmask.mask_apply(x, 0.3, ..., "blur", ...) (the C++ op alone)
    module         FeatureMask(0.3, mode="blur").train()(x) (its Python path and the op)
    step none      one MLP training step (Adam, batch 128 MNIST), no mask
    step op        the same step with the op called directly in front of the model
    step module    the same step with the FeatureMask module in front

    python -m benchmarks.blur_step_overhead [ROUNDS] [BLOCK]
"""
import sys

import torch
from torch import nn

from benchmarks.bench_train import batches, trainer
from benchmarks.harness import cpu_model, isa_info
from benchmarks.learned_mask_ab import interleaved
from fastmask.nn import FeatureMask


class BareBlur(nn.Module):
    """The op with no module logic: a fresh offset per call, nothing checked in Python."""

    def __init__(self):
        super().__init__()
        self.k = 0

    def forward(self, x):
        self.k += 1
        return torch.ops.fastmask.mask_apply(x, 0.3, 0, self.k, "blur", "sample", "shared", 0.0)


def step(mask, pool):
    return trainer("mlp", mask, pool, "cpu")  # the same MLP step as bench_train's end-to-end rows


def main(rounds=300, block=5):
    torch.set_num_threads(1)
    pool, source = batches(8, 128, "cpu")
    x = pool[0][0]
    bare, module = BareBlur(), FeatureMask(0.3, mode="blur", seed=0).train()
    t = interleaved({"op": lambda: bare(x), "module": lambda: module(x),
                     "step none": step(nn.Identity(), pool), "step op": step(BareBlur(), pool),
                     "step module": step(FeatureMask(0.3, mode="blur", seed=0), pool)}, rounds, block)
    print(f"{cpu_model()} ({isa_info()}), torch {torch.__version__}, 1 thread, data: {source}, "
          f"{rounds} rounds x {block} calls")
    print("| variant | min | mean CPU |")
    print("|---|---|---|")
    for k, (w, c) in t.items():
        print(f"| {k} | {w * 1e6:.1f} us | {c * 1e6:.1f} us |")
    none = t["step none"][0]
    print(f"step op - step none: {(t['step op'][0] - none) * 1e6:.1f} us ({t['step op'][0] / none - 1:+.1%}); "
          f"step module - step none: {(t['step module'][0] - none) * 1e6:.1f} us ({t['step module'][0] / none - 1:+.1%})")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
