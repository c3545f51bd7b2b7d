"""The learned soft mask's cost on one MLP training step (benchmarks/RESULTS.md, "the learned
mask, fused"): the step of benchmarks/bench_train (fastmask.train's optimizer, batch 128 MNIST,
cross-entropy) plus the penalty lambda * R(M) as fastmask.train adds it, for
    none          no mask,
    none, x grad  no mask, but the input needs its gradient (the first layer's grad-input product,
                  which a trained mask composed in front of the model makes the backward compute),
    autograd      x * sigmoid(logits) and l1 * sigmoid(logits).abs().sum(), autograd's ops,
    op            the same with ops.learned_mask_apply as the mask's forward,
    linear        fastmask.nn.LearnedMask as fastmask.models.Net runs it in the MLP: fused with the
                  first Linear layer (LearnedMask.linear), whose backward needs no grad-input product,
and the mask alone (its forward, the penalty, and their backward from a given output gradient),
interleaved: every round runs BLOCK steps of each variant in turn (the order rotating), and the
figure of a variant is its minimum per-step time over the rounds (the machine may be loaded).

    python -m benchmarks.learned_mask_ab [ROUNDS] [BLOCK] [THREADS]
"""
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.bench_train import batches
from benchmarks.harness import cpu_model, isa_info
from fastmask import ops
from fastmask.nn import LearnedMask
from fastmask.train import TrainConfig, make_optimizer


class ComposedLearnedMask(LearnedMask):
    """LearnedMask composed in front of the model (a subclass: Net fuses only LearnedMask itself),
    with the penalty as autograd's composition of ops."""

    def penalty(self):
        return self.l1 * self.mask().abs().sum()


class FusedLearnedMask(ComposedLearnedMask):
    """LearnedMask with the fused op as its forward (one op forward, one backward)."""

    def forward(self, x):
        return ops.learned_mask_apply(x, self.logits)


def step_with_penalty(mask, pool, x_grad=False):
    """One training step of a fresh MLP (the same initial weights for every variant) behind `mask`."""
    from fastmask import models
    model = models.build("mlp", seed=0)
    model.mask = mask
    model.train()
    opt = make_optimizer(model, TrainConfig(lr=1e-3))
    learned = isinstance(mask, LearnedMask)
    state = {"i": 0}

    def run():
        x, y = pool[state["i"] % len(pool)]
        state["i"] += 1
        if x_grad:
            x = x.detach().requires_grad_()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        if learned:
            loss = loss + mask.penalty()
        loss.backward()
        opt.step()
    return run


def mask_alone(mask, x, g):
    def run():
        torch.autograd.backward([mask(x), mask.penalty()], [g, torch.ones(())])
        mask.logits.grad = None
    return run


def interleaved(variants, rounds, block):
    """{name: (min wall s per call, mean CPU s per call)} over `rounds` rotating rounds of `block` calls."""
    names = list(variants)
    for fn in variants.values():  # warm-up
        for _ in range(10):
            fn()
    best = {k: float("inf") for k in names}
    cpu = {k: 0.0 for k in names}
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            fn = variants[k]
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(block):
                fn()
            t1, c1 = time.perf_counter(), time.process_time()
            best[k] = min(best[k], (t1 - t0) / block)
            cpu[k] += c1 - c0
    return {k: (best[k], cpu[k] / (rounds * block)) for k in names}


def main(rounds=300, block=5, threads=1):
    torch.set_num_threads(threads)
    pool, source = batches(8, 128, "cpu")
    variants = {"none": step_with_penalty(nn.Identity(), pool),
                "none, x grad": step_with_penalty(nn.Identity(), pool, x_grad=True),
                "autograd": step_with_penalty(ComposedLearnedMask((1, 28, 28)), pool),
                "op": step_with_penalty(FusedLearnedMask((1, 28, 28)), pool),
                "linear": step_with_penalty(LearnedMask((1, 28, 28)), pool)}
    t = interleaved(variants, rounds, block)
    x = pool[0][0]
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    m = interleaved({"autograd": mask_alone(ComposedLearnedMask((1, 28, 28)), x, g),
                     "op": mask_alone(FusedLearnedMask((1, 28, 28)), x, g)}, rounds, 4 * block)
    print(f"{cpu_model()} ({isa_info()}), torch {torch.__version__}, {threads} thread(s), data: {source}, "
          f"{rounds} rounds x {block} steps")
    print("| variant | step, min | vs none | mean CPU per step |")
    print("|---|---|---|---|")
    for k, (w, c) in t.items():
        print(f"| {k} | {w * 1e3:.3f} ms | {w / t['none'][0] - 1:+.1%} | {c * 1e3:.3f} ms |")
    print("| mask alone (forward, penalty, backward) | min | mean CPU |")
    print("|---|---|---|")
    for k, (w, c) in m.items():
        print(f"| {k} | {w * 1e6:.1f} us | {c * 1e6:.1f} us |")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:4]))
