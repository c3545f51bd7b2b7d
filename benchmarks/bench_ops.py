"""Each fused op against the eager PyTorch a user would write, and against the copy floor.

Element-wise ops are memory bound, so besides the ratio to eager code we report
effective bandwidth: the bytes the op must move at least (read every input once,
write the output once) divided by its time, and the time of a plain `copy_`
that moves the same number of bytes (the floor no element-wise op can beat).

    python -m benchmarks.bench_ops [--quick] [--device cuda] [--json out.json]
"""
import torch

from benchmarks import harness

EPS, ALPHA, RATIO = 0.3, 0.01, 0.3
SHAPES = ((1, 28, 28), (3, 32, 32))


def sizes(args):
    """(N, C, H, W) cases for this run."""
    if args.tiny:
        return [(8, 1, 8, 8)]
    if args.device == "cuda":  # >= 2^26 elements each
        return [(65536, 1, 32, 32), (87382, 3, 16, 16)]
    batches = (128, 4096) if args.quick else (128, 500, 4096)
    return [(n,) + s for n in batches for s in SHAPES]


def peak_bandwidth(device):
    """(bytes/s, how it was found): device properties, else NVML, else a measured copy."""
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:  # double data rate
        return 2 * clock_khz * 1e3 * bus_bits / 8, "device properties (2 x memory clock x bus width)"
    try:  # CUDA 13 dropped memoryClockRate from cudaDeviceProp; NVML still has both
        import pynvml
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        mhz = pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM)
        bits = pynvml.nvmlDeviceGetMemoryBusWidth(h)
        if mhz and bits:
            return 2 * mhz * 1e6 * bits / 8, "NVML (2 x max memory clock x bus width)"
    except Exception:
        pass
    src = torch.empty(2 ** 28, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = harness.compare({"copy": lambda: dst.copy_(src)}, device=device)["copy"]["median_s"]
    return 2 * src.numel() / t, "measured device-to-device copy (neither properties nor NVML said)"


def copy_floor(nbytes, device):
    """A copy_ that moves nbytes in total (reads nbytes/2, writes nbytes/2)."""
    src = torch.rand(nbytes // 8, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def eager_mask(x, r):
    return x * (torch.rand_like(x) >= r)


def eager_fgsm(x, g, eps):
    return (x + eps * g.sign()).clamp(0, 1)


def eager_pgd(x_adv, x_nat, g, alpha, eps):
    return torch.min(torch.max(x_adv + alpha * g.sign(), x_nat - eps), x_nat + eps).clamp(0, 1)


def eager_random_start(x, eps):
    return (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)


def verify(ops, x, g, x_nat):
    """Correctness before speed: fused == eager bit for bit where the math is the same."""
    y = ops.fgsm(x, g, EPS, 0.0, 1.0)
    assert torch.equal(y, eager_fgsm(x, g, EPS)), "fgsm differs from the eager composite"
    xa = x.clone()
    ops.pgd_step_(xa, x_nat, g, ALPHA, EPS, 0.0, 1.0, "inf")
    assert torch.equal(xa, eager_pgd(x, x_nat, g, ALPHA, EPS)), "pgd_step_ differs from eager"
    kept = (ops.mask_apply(x + 1, RATIO, seed=7, offset=0, mode="pixel", scope="sample",
                           channels="separate") != 0).double().mean().item()
    assert abs(kept - (1 - RATIO)) < 0.05 + 3 / x.numel() ** 0.5, f"mask kept {kept:.3f}"
    y = ops.random_start(x, EPS, seed=7, offset=0, norm="inf", lo=0.0, hi=1.0)
    assert ((y - x).abs() <= EPS + 1e-6).all() and (y >= 0).all() and (y <= 1).all()
    out = torch.empty_like(x)
    assert torch.equal(ops.random_start(x, EPS, seed=7, offset=0, out=out), y), "random_start out="
    assert torch.equal(ops.fgsm(x, g, EPS, out=out), eager_fgsm(x, g, EPS)), "fgsm out="
    assert torch.equal(ops.mask_apply(x, RATIO, seed=7, out=out), ops.mask_apply(x, RATIO, seed=7)), \
        "mask_apply out="
    return ["fgsm == eager", "pgd_step_ == eager", "mask_apply keeps 1-r", "random_start in ball",
            "out= == functional"]


def bench_elementwise(args, report, shape, opts, peak):
    from fastmask import ops
    dev = args.device
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.rand(shape, device=dev, generator=gen)
    g = torch.randn(shape, device=dev, generator=gen)
    x_nat = torch.rand(shape, device=dev, generator=gen)
    x_adv = x.clone()
    out = torch.empty_like(x)  # the out= variants write here (no allocation, no page faults)
    verified = verify(ops, x, g, x_nat)
    n = x.numel()
    case_sfx = f"{'x'.join(map(str, shape))} float32 ({n * 4 / 2**20:.1f} MiB)"
    big = args.device == "cuda" or shape[0] >= 4096
    mask = dict(mode="pixel", scope="sample", channels="separate")
    cases = [  # name, bytes moved at least, fused, eager, fused into `out` (None: in place already)
        ("mask_apply", 2 * n * 4,
         lambda: ops.mask_apply(x, RATIO, seed=1, offset=0, **mask),
         lambda: eager_mask(x, RATIO),
         lambda: ops.mask_apply(x, RATIO, seed=1, offset=0, **mask, out=out)),
        ("fgsm", 3 * n * 4, lambda: ops.fgsm(x, g, EPS, 0.0, 1.0), lambda: eager_fgsm(x, g, EPS),
         lambda: ops.fgsm(x, g, EPS, 0.0, 1.0, out=out)),
        ("pgd_step_", 4 * n * 4, lambda: ops.pgd_step_(x_adv, x_nat, g, ALPHA, EPS, 0.0, 1.0, "inf"),
         lambda: eager_pgd(x_adv, x_nat, g, ALPHA, EPS), None),
        ("random_start", 2 * n * 4,
         lambda: ops.random_start(x, EPS, seed=1, offset=0, norm="inf", lo=0.0, hi=1.0),
         lambda: eager_random_start(x, EPS),
         lambda: ops.random_start(x, EPS, seed=1, offset=0, norm="inf", lo=0.0, hi=1.0, out=out)),
    ]
    for name, nbytes, fused, eager, fused_out in cases:
        impls = {"fastmask": fused, "eager": eager, "copy_floor": copy_floor(nbytes, dev)}
        if fused_out is not None:
            impls["fastmask out="] = fused_out
        if name == "mask_apply" and dev == "cuda":
            # scope "fixed": the same Philox work per element, but the general mask-index
            # path (two divmods per group) instead of the identity path of scope "sample"
            impls["fastmask fixed scope"] = lambda: ops.mask_apply(
                x, RATIO, seed=1, offset=0, mode="pixel", scope="fixed", channels="separate")
        t = harness.compare(impls, **opts)
        gbps = {k: nbytes / v["median_s"] / 1e9 for k, v in t.items()}
        speedup = t["eager"]["median_s"] / t["fastmask"]["median_s"]
        # The memory floor is a copy_ into an existing tensor, so the like-for-like
        # comparison is the op writing into an existing tensor too (out=); a fresh
        # output costs page faults on the CPU that no kernel can avoid (reported too).
        floor_impl = "fastmask out=" if fused_out is not None else "fastmask"
        vs_copy = t[floor_impl]["median_s"] / t["copy_floor"]["median_s"]
        metrics = {k: {"GB/s": gbps[k]} for k in t}
        for k in ("fastmask", "fastmask out="):
            if k in t:
                metrics[k]["x_copy_time"] = t[k]["median_s"] / t["copy_floor"]["median_s"]
        checks = []
        if name in ("mask_apply", "pgd_step_") or args.device == "cuda":
            checks.append(harness.check(f"{name} speedup vs eager", speedup, 3.0))
        if big and args.device == "cpu":
            label = f"{name}{' (out=)' if fused_out is not None else ''} time / copy floor"
            checks.append(harness.check(label, vs_copy, 2.0, False))
        if peak and name != "random_start":
            frac = nbytes / t["fastmask"]["median_s"] / peak[0]
            metrics["fastmask"]["frac_of_peak"] = frac
            checks.append(harness.check(f"{name} fraction of peak bandwidth", frac, 0.8))
        report.add("ops", f"{name} {case_sfx}", t, baseline="eager", checks=checks,
                   metrics=metrics, params={"op": name, "shape": list(shape), "bytes": nbytes,
                                            "verified": verified})


def bench_grad_clip_noise(args, report, opts):
    from fastmask import models, ops
    model = models.build("cnn", seed=0).to(args.device)
    params = list(model.parameters())[-2:] if args.tiny else list(model.parameters())
    n = sum(p.numel() for p in params)
    max_norm, std = 1.0, 0.01

    def eager():
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        for p in params:
            p.grad.add_(torch.randn_like(p.grad), alpha=std)

    def fused():
        ops.grad_clip_noise_(grads, max_norm=max_norm, noise_std=std, seed=1, offset=0)

    # correctness first: without noise the fused clip equals clip_grad_norm_ (allclose)
    g0 = [torch.randn_like(p) for p in params]
    for p, g in zip(params, g0):
        p.grad = g.clone()
    ref_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    a = [g.clone() for g in g0]
    norm = ops.grad_clip_noise_(a, max_norm=max_norm, noise_std=0.0, seed=1, offset=0)
    assert torch.allclose(norm.double(), ref_norm.double(), rtol=1e-5), \
        f"grad_clip_noise_ norm {norm.item()} != clip_grad_norm_ {ref_norm.item()}"
    assert all(torch.allclose(u, p.grad, rtol=1e-5, atol=1e-7) for u, p in zip(a, params)), \
        "grad_clip_noise_ clipping differs from clip_grad_norm_"
    for p, g in zip(params, g0):
        p.grad = g
    grads = [p.grad for p in params]
    nbytes = 3 * n * 4  # norm pass reads g; update pass reads and writes g
    t = harness.compare({"fastmask": fused, "eager": eager, "copy_floor": copy_floor(nbytes, args.device)},
                        **opts)
    speedup = t["eager"]["median_s"] / t["fastmask"]["median_s"]
    report.add("ops", f"grad_clip_noise_ paper CNN{' (last layer)' if args.tiny else ''} ({len(params)} tensors, {n} params)", t,
               baseline="eager", params={"op": "grad_clip_noise_", "tensors": len(params),
                                         "numel": n, "max_norm": max_norm, "noise_std": std,
                                         "verified": ["norm and clipping == clip_grad_norm_"]},
               metrics={k: {"GB/s": nbytes / v["median_s"] / 1e9} for k, v in t.items()},
               checks=[harness.check("grad_clip_noise_ speedup vs clip_grad_norm_ + randn_like",
                                     speedup, 2.0)])


def bench(args, report):
    opts = harness.timing_opts(args)
    peak = None
    if args.device == "cuda":
        peak = peak_bandwidth(torch.device("cuda"))
        report.note(f"peak memory bandwidth {peak[0] / 1e9:.0f} GB/s from {peak[1]}")
    for shape in sizes(args):
        bench_elementwise(args, report, shape, opts, peak)
    bench_grad_clip_noise(args, report, opts)


if __name__ == "__main__":
    harness.run(prog="python -m benchmarks.bench_ops", only_default=("ops",))
