"""Peak memory of a PGD-40 run (batch 500): fastmask's in-place steps vs the eager loop.

What is measured, honestly:
- CUDA: torch.cuda.max_memory_allocated() minus the memory allocated before the
  run: the peak of live tensor bytes the run added (the caching allocator's own
  reserve is not counted).
- CPU: the same quantity from torch's profiler. With profile_memory=True every
  allocation and free of torch's CPU allocator (which the extension's kernels use
  too, through at::empty) is reported with its size; we replay them in order and
  take the peak of the running sum. It counts tensor storage only, not the
  Python interpreter, the allocator's slack or the memory of libraries that
  bypass torch (ART's numpy arrays, for instance), so ART is not measured here.
  tracemalloc cannot see torch's allocations, and the process's peak RSS is
  dominated by everything else that was ever loaded.
"""
import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import harness
from benchmarks.bench_attacks import ALPHA, BATCH, EPS, STEPS, eager_pgd, mnist_batch


def peak_bytes(fn, device):
    """Peak live tensor bytes allocated by fn() beyond what was live when it started."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def bench(args, report):
    from fastmask import attacks, models
    dev = args.device
    steps = 2 if args.tiny else (10 if args.quick else STEPS)
    n = 16 if args.tiny else BATCH
    x, y, source = mnist_batch(n, dev)
    for arch in ("mlp",) if args.tiny else ("mlp", "cnn"):
        model = models.build(arch, seed=0).to(dev).eval()
        for p in model.parameters():  # what the attacks do too: no parameter gradients
            p.requires_grad_(False)
        runs = {
            "fastmask": lambda: attacks.pgd(model, x, y, EPS, alpha=ALPHA, steps=steps, random_start=False),
            "eager": lambda: eager_pgd(model, x, y, EPS, ALPHA, steps),
        }
        try:
            import torchattacks
            ta = torchattacks.PGD(model, eps=EPS, alpha=ALPHA, steps=steps, random_start=False)
            runs["torchattacks"] = lambda: ta(x, y)
        except ImportError:
            report.note("torchattacks not installed: skipped in the memory benchmark")
        for fn in runs.values():  # warm-up: one-time allocations (e.g. lazy init) are not the run's
            fn()
        peaks = {k: peak_bytes(fn, dev) for k, fn in runs.items()}
        input_bytes = x.numel() * x.element_size()
        metrics = {k: {"peak_MiB": v / 2**20, "peak_in_inputs": v / input_bytes} for k, v in peaks.items()}
        ratio = peaks["fastmask"] / max(peaks["eager"], 1)
        checks = [harness.check(f"{arch} PGD peak memory fastmask / eager", ratio, 1.0, False)]
        report.add("memory", f"pgd-{steps} {arch} batch {n} ({source}): peak live tensor bytes", {},
                   metrics=metrics, checks=checks,
                   params={"model": arch, "batch": n, "steps": steps, "eps": EPS, "alpha": ALPHA,
                           "method": "cuda max_memory_allocated" if dev == "cuda"
                           else "torch.profiler memory events, running sum",
                           "input_bytes": input_bytes, "peak_bytes": peaks})
