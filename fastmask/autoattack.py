"""AutoAttack (Croce & Hein, ICML 2020): a cascade of attacks, each on the points still robust.

    x_adv, report = autoattack(model, x, y, 0.3)                 # APGD-CE, APGD-T, (FAB-T), Square
    x_adv, report = autoattack(model, x, y, 0.3, version="rand")  # randomized defences

"standard" is the original's: APGD-CE (100 steps), APGD-T (9 targets x 100 steps),
FAB-T (9 targets x 100 steps) and Square (5000 queries), L-inf.
"rand" is for a model that draws masks at test time (fastmask.nn.FeatureMask):
APGD-CE and APGD-DLR, each step following the gradient averaged over 20 fresh mask
draws (EOT), and every result scored over `draws` (>= 5) independent forward draws:
a point leaves the cascade only once it is misclassified in every draw, a point's
x_adv is replaced only by one misclassified in more draws, and the report gives the
robust accuracy as the mean over the draws and the worst draw (the lowest), not one
lucky forward. A deterministic model is scored with one forward.

The sanity checks of the original become report["flags"]: a randomized model under
"standard", softmax (probability) outputs, zero input gradients, Square breaking
points the white-box attacks missed (> 0.2 points of robust accuracy), and a model
whose parameters or buffers change during forwards (a dynamic defence).
"""
import time

import torch

from .apgd import _apgd, check_eps, check_labels, check_output, check_targets
from . import _checks as C
from .attacks import _loss_value_grad, check_inputs, feature_masks, model_state
from .fab import fab_targeted
from .square import square

__all__ = ["autoattack", "square_flag", "VERSIONS", "ATTACKS", "STANDARD", "RAND"]

VERSIONS = ("standard", "rand", "custom")
ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square")
STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")
RAND = ("apgd-ce", "apgd-dlr")
SQUARE_ALPHA = 0.002  # the original's threshold: Square better than the white-box attacks by > 0.2 points


def square_flag(accs):
    """The original's check on a cascade's robust accuracies {attack: robust after it}: Square
    (gradient-free) ending more than 0.2 points below the white-box attacks says their
    gradients were uninformative somewhere. The message, or None."""
    if "square" not in accs or len(accs) < 2:
        return None
    white = min(v for k, v in accs.items() if k != "square")
    if accs["square"] < white - SQUARE_ALPHA:
        return (f"square stronger than the white-box attacks: robust {accs['square']:.2%} after it, "
                f"{white:.2%} before (gradient masking?)")
    return None


def _runner(name, eps, norm, steps, queries, targets, eot, masks, seed, batch_size):
    """fn(model, x, y, stats) -> x_adv for one attack of the cascade."""
    if name in ("apgd-ce", "apgd-dlr", "apgd-t"):
        loss = {"apgd-ce": "ce", "apgd-dlr": "dlr", "apgd-t": "dlr-targeted"}[name]
        tg = targets if name == "apgd-t" else None
        return lambda model, x, y, st: _apgd(model, x, y, eps, norm, steps, loss, 1, 0.75, eot, masks, seed,
                                             batch_size, 0.0, 1.0, tg, st)
    if name == "fab-t":
        return lambda model, x, y, st: fab_targeted(model, x, y, eps, norm=norm, steps=steps, targets=targets,
                                                    masks=masks, batch_size=batch_size, _stats=st)
    if name == "square":
        return lambda model, x, y, st: square(model, x, y, eps, norm=norm, queries=queries, seed=seed,
                                              masks=masks, batch_size=batch_size, _stats=st)
    raise ValueError(f"attacks must name attacks from {ATTACKS}, got {name!r}")


def _correct(model, x, y, draws, masks, batch_size):
    """N x draws bool: classified correctly in each of `draws` forwards (masks="random": fresh draws)."""
    out = []
    bs = x.shape[0] if batch_size is None else batch_size
    with torch.no_grad(), model_state(model, masks):
        for _ in range(draws):
            out.append(torch.cat([model(x[i:i + bs]).argmax(1) == y[i:i + bs]
                                  for i in range(0, x.shape[0], bs)]) if x.shape[0] else
                       torch.zeros(0, dtype=torch.bool, device=x.device))
    return torch.stack(out, 1)


def _summary(c, n):
    """Robust accuracy over all n points from the N x draws correctness matrix."""
    per_draw = c.double().sum(0) / n
    return {"mean": per_draw.mean().item(), "worst": per_draw.min().item(),
            "all_draws": (c.all(1).double().sum() / n).item()}


def _flags(model, x, y, version, masks, batch_size):
    flags = []
    xs, ys = x[:min(len(x), 100)], y[:min(len(y), 100)]
    drawn = {id(b) for m in feature_masks(model) for b in m.buffers()}  # mask offsets: advance by design

    def tensors():
        return [t for t in list(model.parameters()) + list(model.buffers()) if id(t) not in drawn]
    state = [t.detach().clone() for t in tensors()]
    with torch.no_grad(), model_state(model, masks):
        z1, z2 = model(xs), model(xs)
    changed = any(not torch.equal(a, b) for a, b in zip(state, tensors()))
    if not torch.equal(z1, z2) and version != "rand":
        flags.append("randomized model: two forwards of the same input differ; use version='rand'")
    if changed:
        flags.append("dynamic defence: parameters or buffers changed during a forward")
    if z1.numel() and bool(((z1 >= 0) & (z1 <= 1)).all()) and torch.allclose(z1.sum(1), torch.ones_like(z1[:, 0])):
        flags.append("softmax output: the model returns probabilities; attacks need logits")
    with model_state(model, masks):
        g = _loss_value_grad(model, xs, ys, "ce")[0]
    zero = (g.flatten(1).abs().amax(1) == 0).double().mean().item() if g.numel() else 0.0
    if zero > 0:
        flags.append(f"zero gradients: {zero:.1%} of the first {len(xs)} points have an all-zero input gradient")
    return flags


def autoattack(model, x, y, eps, *, norm="inf", version="standard", attacks=None, seed=0, batch_size=None,
               log=None, draws=None, eot_samples=20, steps=100, queries=5000, targets=9):
    """The AutoAttack cascade (Croce & Hein 2020), each attack on the points still robust.

    Args:
        model: maps x (Tensor[N, C, H, W] in [0, 1]) to logits (N x classes); left as it was.
        x: Tensor[N, C, H, W]; y: Tensor[N] int64 true labels. eps: radius (>= 0) in `norm`.
        norm: "inf" or "2" (every attack has both versions). version: "standard"
            (STANDARD), "rand" (RAND with EOT over eot_samples draws, masks drawn fresh
            at every forward) or "custom" (the names in `attacks`, from ATTACKS).
        seed: Philox seed of every attack. batch_size: samples per batch (None: all).
        log: None or a callable taking one line of text per attack.
        draws: forwards that score each result (default 1 for "standard"/"custom", 5 for "rand";
            >= 5 for "rand"). eot_samples: gradients per APGD step under "rand" (20).
        steps, queries, targets: APGD steps (100), Square queries (5000), APGD-T targets (9).

    Returns:
        (x_adv, report): x_adv like x, each point the strongest adversarial point found
        (x itself where nothing beat the clean point); report a dict: "clean" and "robust"
        accuracy ({"mean", "worst", "all_draws"} over the draws), "attacks": per attack
        {"name", "attacked", "removed", "robust", "grads" | "queries", "seconds"}, "flags", and
        "correct" (N x draws bool: each point right at its x_adv in each scoring draw).
    """
    check_inputs(x, y, batch_size)
    norm = C.norm("norm", norm)
    eps = check_eps(eps)
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
    for name, v in (("steps", steps), ("queries", queries), ("targets", targets), ("eot_samples", eot_samples)):
        C.positive_int(name, v)
    if version == "custom":
        if not attacks:
            raise ValueError(f"version='custom' needs attacks= names from {ATTACKS}, got {attacks!r}")
        names = list(attacks)
    elif attacks is not None:
        raise ValueError(f"attacks= is for version='custom', got attacks={attacks!r} with version={version!r}")
    else:
        names = list(STANDARD if version == "standard" else RAND)
    randomized = version == "rand"
    draws = (5 if randomized else 1) if draws is None else C.positive_int("draws", draws)
    if randomized and draws < 5:
        raise ValueError(f"draws must be >= 5 for version='rand', got {draws}")
    masks = "random" if randomized else "model"
    eot = eot_samples if randomized else 1
    runners = [(n, _runner(n, eps, norm, steps, queries, targets, eot, masks, seed, batch_size)) for n in names]
    say = log if log is not None else (lambda line: None)

    # one model_state around the whole cascade: nested blocks restore mask offsets only at the
    # outermost exit, so no attack or scoring forward reuses another's mask draw
    with model_state(model, masks):
        return _cascade(model, x, y, eps, norm, version, names, runners, draws, masks, seed, targets,
                        batch_size, say)


def _cascade(model, x, y, eps, norm, version, names, runners, draws, masks, seed, targets, batch_size, say):
    randomized = version == "rand"
    n = x.shape[0]
    with torch.no_grad(), model_state(model, masks):
        z = model(x[:1]) if n else None
    if n:
        classes = check_output(z, 1)
        check_labels(y, classes)
        if "apgd-t" in names or "fab-t" in names:
            check_targets(targets, classes)
    t_all = time.perf_counter()
    flags = _flags(model, x, y, version, masks, batch_size) if n else []
    if randomized and not feature_masks(model):
        flags.append("version='rand' on a model without FeatureMask modules (nothing is drawn)")
    correct = _correct(model, x, y, draws, masks, batch_size)
    report = {"version": version, "norm": norm, "eps": eps, "n": n, "draws": draws, "seed": seed,
              "clean": _summary(correct, max(n, 1)), "attacks": [], "flags": flags}
    say(f"clean: {report['clean']['mean']:.2%}")
    x_adv = x.clone()
    for name, run in runners:
        todo = correct.any(1).nonzero().squeeze(1)
        entry = {"name": name, "attacked": int(todo.numel())}
        stats = {"grads": 0} if name.startswith("apgd") else {"queries": 0} if name == "square" else \
            {"grads": 0, "queries": 0}
        t0 = time.perf_counter()
        if todo.numel():
            xa = run(model, x[todo], y[todo], stats)
            c = _correct(model, xa, y[todo], draws, masks, batch_size)
            better = c.sum(1) < correct[todo].sum(1)
            x_adv[todo[better]] = xa[better]
            before = correct.any(1).sum()
            correct[todo[better]] = c[better]
            entry["removed"] = int(before - correct.any(1).sum())
        else:
            entry["removed"] = 0
        entry.update(stats)
        entry["seconds"] = time.perf_counter() - t0
        entry["robust"] = _summary(correct, max(n, 1))
        report["attacks"].append(entry)
        say(f"{name}: robust {entry['robust']['mean']:.2%} (worst draw {entry['robust']['worst']:.2%}), "
            f"{entry['removed']} removed of {entry['attacked']} attacked, {entry['seconds']:.1f} s")
    report["robust"] = _summary(correct, max(n, 1))
    flag = square_flag({e["name"]: e["robust"]["mean"] for e in report["attacks"]})
    if flag:
        flags.append(flag)
    report["seconds"] = time.perf_counter() - t_all
    report["correct"] = correct  # N x draws: each point classified right in each scoring draw
    return x_adv, report


def autoattack_examples(model, x, y, eps, *, version="standard", seed=0, batch_size=None, steps=100, queries=5000,
                        targets=9, draws=None, eot_samples=20):
    """autoattack(...)[0]: the cascade as a plain attack(model, x, y, eps) -> x_adv (the registry's
    "autoattack" entry, for make_attack and evaluate.robustness); the report is dropped."""
    return autoattack(model, x, y, eps, version=version, seed=seed, batch_size=batch_size, steps=steps,
                      queries=queries, targets=targets, draws=draws, eot_samples=eot_samples)[0]
