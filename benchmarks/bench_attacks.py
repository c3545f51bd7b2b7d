"""Attack throughput (images/s): fastmask vs torchattacks vs ART vs a plain eager loop.

FGSM and PGD-40 (eps 0.3, alpha 0.01, L-inf, no random start, batch 500) on the
paper's MLP and CNN. Correctness first: before anything is timed, every
implementation's adversarial examples are compared with fastmask's (see verify). The ART timing includes its numpy round trip,
since that is what an ART user pays.
"""
import numpy as np
import torch
import torch.nn.functional as F

from benchmarks import harness

EPS, ALPHA, STEPS, BATCH = 0.3, 0.01, 40, 500
# fastmask's throughput at least this multiple of each library's, FGSM and PGD alike
TARGETS = {"mlp": {"torchattacks": 1.15, "art": 3.0}, "cnn": {"torchattacks": 1.03}}


def mnist_batch(n, device):
    """n real MNIST test images if fastmask.data finds them offline, else uniform noise."""
    try:
        from fastmask import data
        d = data.load("mnist")
        return data.to_float(d.x_test[:n]).to(device), d.y_test[:n].to(device), "MNIST test"
    except Exception:
        g = torch.Generator().manual_seed(0)
        x = torch.rand(n, 1, 28, 28, generator=g)
        return x.to(device), torch.randint(0, 10, (n,), generator=g).to(device), "uniform noise"


def eager_fgsm(model, x, y, eps):
    """What a user writes without a library (summed cross-entropy, as fastmask.attacks)."""
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)
    return (x.detach() + eps * g.sign()).clamp(0, 1)


def eager_pgd(model, x, y, eps, alpha, steps):
    x_adv = x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y, reduction="sum"), x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
    return x_adv


def implementations(model, steps, device):
    """{name: (fgsm(x, y), pgd(x, y))} for every library that is installed; plus notes."""
    from fastmask import attacks
    impls = {
        "fastmask": (lambda x, y: attacks.fgsm(model, x, y, EPS),
                     lambda x, y: attacks.pgd(model, x, y, EPS, alpha=ALPHA, steps=steps, random_start=False)),
        "eager": (lambda x, y: eager_fgsm(model, x, y, EPS),
                  lambda x, y: eager_pgd(model, x, y, EPS, ALPHA, steps)),
    }
    notes = []
    try:
        import torchattacks
        ta_fgsm = torchattacks.FGSM(model, eps=EPS)
        ta_pgd = torchattacks.PGD(model, eps=EPS, alpha=ALPHA, steps=steps, random_start=False)
        impls["torchattacks"] = (ta_fgsm, ta_pgd)
    except ImportError:
        notes.append("torchattacks not installed: skipped (pip install fastmask[bench])")
    try:
        from art.attacks.evasion import FastGradientMethod, ProjectedGradientDescent
        from art.estimators.classification import PyTorchClassifier
        clf = PyTorchClassifier(model=model, loss=torch.nn.CrossEntropyLoss(), input_shape=(1, 28, 28),
                                nb_classes=10, clip_values=(0.0, 1.0),
                                device_type="gpu" if device == "cuda" else "cpu")
        art_fgsm = FastGradientMethod(clf, norm=np.inf, eps=EPS, batch_size=BATCH)
        art_pgd = ProjectedGradientDescent(clf, norm=np.inf, eps=EPS, eps_step=ALPHA, max_iter=steps,
                                           num_random_init=0, batch_size=BATCH, verbose=False)

        def via_numpy(atk):
            return lambda x, y: torch.from_numpy(
                atk.generate(x.cpu().numpy(), y=y.cpu().numpy())).to(x.device)
        impls["art"] = (via_numpy(art_fgsm), via_numpy(art_pgd))
    except ImportError:
        notes.append("adversarial-robustness-toolbox not installed: skipped (pip install fastmask[bench])")
    return impls, notes


def agreement(a, b):
    """max |a - b|, and the fractions of pixels and of samples that differ beyond rounding (1e-5)."""
    d = (a - b).abs() > 1e-5
    return {"max_abs_diff": (a - b).abs().max().item(), "frac_differ": d.double().mean().item(),
            "samples_differ": d.flatten(1).any(1).double().mean().item()}


def verify(name, adv, ref, x, kind):
    """Correctness before speed. The eager loop uses fastmask's loss (summed cross-entropy)
    and must agree to rounding everywhere. torchattacks and ART average the loss over the
    batch: the gradients then differ by rounding, and where a pixel's gradient is within
    rounding of 0 its sign can flip; over PGD's steps that sample's path then diverges.
    So for them FGSM must agree everywhere and PGD on at least 99 % of the samples."""
    a = agreement(adv, ref)
    assert ((adv - x).abs() <= EPS + 1e-5).all() and adv.min() >= 0 and adv.max() <= 1, \
        f"{name} {kind}: outside the eps-ball or [0, 1]"
    if name == "eager" or kind == "fgsm":
        assert a["frac_differ"] <= 1e-4, f"{name} {kind} differs from fastmask: {a}"
    else:
        assert a["samples_differ"] <= 0.01, f"{name} {kind} differs from fastmask: {a}"
    return a


def bench(args, report):
    from fastmask import inputgrad, models
    dev = args.device
    steps = 2 if args.tiny else (10 if args.quick else STEPS)
    n = 16 if args.tiny else BATCH
    x, y, source = mnist_batch(n, dev)
    base_opts = harness.timing_opts(args)
    for arch in ("mlp",) if args.tiny else ("mlp", "cnn"):
        model = models.build(arch, seed=0).to(dev).eval()
        if arch == "cnn" and dev == "cpu" and inputgrad.CPU_CHANNELS_LAST:
            # fastmask's gradient runs the convolutions channels-last on CPU (fastmask.inputgrad):
            # every implementation gets the model in that layout, so all run the same kernels and
            # the eager loop equals fastmask bit for bit
            model = model.to(memory_format=torch.channels_last)
        impls, notes = implementations(model, steps, dev)
        for note in notes:
            report.note(note)
        for kind, which in (("fgsm", 0), (f"pgd-{steps}", 1)):
            opts = dict(base_opts)
            if not args.tiny and which:  # PGD: one whole attack per sample (seconds on the CNN)
                opts.update(repeats=5, warmup=0, target_s=1e-9)  # the calibration call warms up
            elif not args.tiny:  # FGSM: milliseconds, so many calls per sample
                opts.update(repeats=11, warmup=3, target_s=0.2)
            ref = impls["fastmask"][which](x, y)
            agree = {name: verify(name, fns[which](x, y), ref, x, kind.split("-")[0])
                     for name, fns in impls.items() if name != "fastmask"}
            t = harness.compare({name: (lambda f=fns[which]: f(x, y)) for name, fns in impls.items()},
                                **opts)
            metrics = {k: {"images/s": n / v["median_s"]} for k, v in t.items()}
            for k, a in agree.items():
                metrics[k].update(a)
            speed = {k: t[k]["median_s"] / t["fastmask"]["median_s"] for k in t if k != "fastmask"}
            checks = [harness.check(f"{arch} {kind} fastmask throughput / {lib}", speed[lib], target)
                      for lib, target in TARGETS[arch].items() if lib in speed]
            report.add("attacks", f"{kind} {arch} batch {n} ({source})", t, baseline="eager",
                       metrics=metrics, checks=checks,
                       params={"attack": kind, "model": arch, "batch": n, "eps": EPS, "alpha": ALPHA,
                               "steps": steps if which else 1, "random_start": False,
                               "verified_against_fastmask": sorted(agree), "speedup_of_fastmask": speed})
