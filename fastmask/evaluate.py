"""Clean metrics, accuracy under attack and the gradient-masking checks.

- evaluate(model, x, y): accuracy, loss, macro precision/recall/F1, confusion
  matrix, inference time, model size (the paper's Table II metrics);
  classification_metrics(pred, y) is their one home (training validates with it).
- robustness(model, x, y, eps_list=...): accuracy per attack per eps, the
  per-sample correctness behind it, and the robust accuracy (per sample, the
  worst case over the clean input and every attack run).
- sanity_checks(results): the usual signs that an evaluation is fooled by
  gradient masking (Athalye et al. 2018; Carlini et al. 2019).
The honest evaluation of many models (every attack, the checks, the tests
against a baseline) is fastmask.honest; its Markdown is fastmask.report.

test_mask=True evaluates a model the way a randomized defence is deployed: its
FeatureMask modules draw a fresh mask at every forward (attacks.model_state
"random"); the draws never repeat inside one call and the model's offsets are
restored afterwards.
"""
import time

import torch
import torch.nn.functional as F

from . import _checks as C
from . import attacks as A
from . import distributed

__all__ = ["evaluate", "predict", "logits", "classification_metrics", "confusion_matrix", "robustness", "sanity_checks",
           "model_size_bytes", "HONEST_EPS"]

HONEST_EPS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 1.0)


def model_size_bytes(model):
    """Bytes of all parameters and buffers (what a state_dict holds, without its pickling overhead)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def _logits(model, x, batch_size):
    dev = A.device_of(model, x)
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch_size].to(dev)).float().cpu() for i in range(0, len(x), batch_size)])


def logits(model, x, *, batch_size=1000, masks="model"):
    """The model's logits (CPU float32), in batches, the model left unchanged."""
    C.positive_int("batch_size", batch_size)
    with A.model_state(model, masks):
        return _logits(model, x, batch_size)


def predict(model, x, *, batch_size=1000, masks="model"):
    """Predicted labels (CPU int64), the model left unchanged."""
    return logits(model, x, batch_size=batch_size, masks=masks).argmax(1)


def confusion_matrix(pred, y, num_classes=10):
    """cm[i, j] = number of samples of true class i predicted as j."""
    k = num_classes
    return torch.bincount(y * k + pred, minlength=k * k).view(k, k)


def classification_metrics(pred, y, num_classes=10):
    """Accuracy, macro precision / recall / F1 (over the classes present in y or in pred, 0 where
    undefined, as scikit-learn), their per-class lists and the confusion matrix (rows: true
    class, columns: predicted) of predicted labels `pred` against `y` (CPU int64)."""
    conf = confusion_matrix(pred, y, num_classes)
    tp = conf.diag().double()
    npred, ntrue = conf.sum(0).double(), conf.sum(1).double()
    prec = torch.where(npred > 0, tp / npred.clamp(min=1), torch.zeros_like(tp))
    rec = torch.where(ntrue > 0, tp / ntrue.clamp(min=1), torch.zeros_like(tp))
    f1 = torch.where(prec + rec > 0, 2 * prec * rec / (prec + rec).clamp(min=1e-300), torch.zeros_like(tp))
    present = (npred > 0) | (ntrue > 0)
    return {"accuracy": (pred == y).double().mean().item(),
            "precision": prec[present].mean().item(), "recall": rec[present].mean().item(),
            "f1": f1[present].mean().item(),
            "per_class": {"precision": prec.tolist(), "recall": rec.tolist(), "f1": f1.tolist()},
            "confusion": conf.tolist()}


def evaluate(model, x, y, *, batch_size=1000, num_classes=None, masks="model"):
    """Clean metrics of `model` on (x, y).

    Returns n, accuracy, loss (mean cross-entropy), precision / recall / f1
    (macro over the classes present in y or in the predictions, 0 where
    undefined, as scikit-learn), per-class lists, confusion (rows: true class,
    columns: predicted), correct (per-sample bool tensor), inference_time_s
    (wall time of all forwards), model_size_bytes and model_size_mb (10^6 bytes).
    """
    A.check_inputs(x, y, batch_size)
    with A.model_state(model, masks):
        if x.device.type == "cuda" or A.device_of(model, x).type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = _logits(model, x, batch_size)
        elapsed = time.perf_counter() - t0
    y = y.cpu()
    k = num_classes or out.shape[1]
    if y.numel() and (y.min() < 0 or y.max() >= k):
        raise ValueError(f"labels must be in [0, {k}), got min {int(y.min())} max {int(y.max())}")
    pred = out.argmax(1)
    m = classification_metrics(pred, y, k)
    size = model_size_bytes(model)
    return {"n": len(y), "accuracy": m["accuracy"], "loss": F.cross_entropy(out, y).item(),
            "precision": m["precision"], "recall": m["recall"], "f1": m["f1"], "per_class": m["per_class"],
            "confusion": m["confusion"], "correct": pred == y, "inference_time_s": elapsed,
            "model_size_bytes": size, "model_size_mb": size / 1e6}


KNOBS = (("pgd_steps", "steps"), ("pgd_alpha", "alpha"), ("restarts", "restarts"), ("eot_samples", "samples"))


def attack_options(name, knobs, options=None):
    """The settings attack `name` runs with: robustness's shared knobs (pgd_steps -> steps, ...) for
    the settings the entry has, then options[name] (checked by the registry)."""
    entry = A.get(name)
    opts = {key: knobs[knob] for knob, key in KNOBS if key in entry.settings}
    opts.update((options or {}).get(name, {}))
    return entry.options(opts)


def robustness(model, x, y, *, eps_list, attacks=("fgsm", "pgd"), options=None, pgd_steps=40, pgd_alpha=None,
               restarts=1, test_mask=False, batch_size=500, seed=0, eot_samples=20, surrogate=None):
    """Accuracy of `model` under each attack at each eps (L-inf, inputs in [0, 1]).

    attacks: names from the registry (attacks.REGISTRY: "fgsm", "pgd", "eot",
    "frozen", "pgd_l2", "transfer", ...), or (label, fn) with fn(model, x, y, eps) -> x_adv.
    "transfer" is PGD crafted on `surrogate` (a model) or precomputed examples {eps: x_adv}.
    pgd_steps, pgd_alpha (None: 2.5 * eps / pgd_steps), restarts, eot_samples: the
    steps, alpha, restarts and samples of every attack that has that setting;
    options {name: {key: value}} then sets any setting of one attack (--attack-opt).
    test_mask: FeatureMask modules draw a fresh mask at every forward (crafting
    and scoring); otherwise the model runs as in eval mode.

    Returns eps, n, masks, clean_accuracy, clean_correct, grad (fraction of
    samples whose input gradient is all zero / has a NaN, mean |grad|),
    accuracy {attack: [per eps]}, correct {attack: bool tensor eps x n},
    robust_accuracy [per eps] and robust_correct (clean and every attack right).
    """
    A.check_inputs(x, y, batch_size)
    eps_list = [float(e) for e in eps_list]
    if not eps_list or any(not e >= 0 for e in eps_list):
        raise ValueError(f"eps_list must be a non-empty list of eps >= 0, got {eps_list}")
    names = [a if isinstance(a, str) else a[0] for a in attacks]
    if len(set(names)) != len(names):
        raise ValueError(f"attack labels must be unique, got {names}")
    for a in attacks:
        if isinstance(a, str) and a not in A.REGISTRY:
            raise ValueError(f"unknown attack {a!r}: use one of {tuple(A.REGISTRY)} or (label, fn)")
    for name in options or {}:
        if name not in names:
            raise ValueError(f"options for {name!r}, which is not one of the attacks {names}")
    if "transfer" in names and surrogate is None:
        raise ValueError("attack 'transfer' needs surrogate= (a model or {eps: x_adv})")
    masks = "random" if test_mask else "model"
    distributed.mask_streams(model)  # random masks: each rank draws its own
    knobs = dict(pgd_steps=pgd_steps, pgd_alpha=pgd_alpha, restarts=restarts, eot_samples=eot_samples)
    cfg = dict(knobs, seed=seed, batch_size=batch_size)
    if options:
        cfg["options"] = {k: dict(v) for k, v in options.items()}
    settings = {name: attack_options(name, knobs, options) for name in names if name in A.REGISTRY}
    y_cpu = y.cpu()
    out = {"eps": eps_list, "n": len(y), "masks": masks, "attacks": names,
           "config": cfg, "accuracy": {}, "correct": {}}
    with A.model_state(model, masks):  # outermost: mask offsets advance through the whole call, restored at exit
        clean = predict(model, x, batch_size=batch_size, masks=masks) == y_cpu
        g = A.input_grad(model, x, y, masks=masks, batch_size=batch_size).flatten(1)
        out["clean_correct"], out["clean_accuracy"] = clean, clean.double().mean().item()
        out["grad"] = {"zero_frac": (g == 0).all(1).double().mean().item(),
                       "nan_frac": g.isnan().any(1).double().mean().item(),
                       "mean_abs": g.abs().nan_to_num().mean().item()}
        work = [(a, name, eps) for a, name in zip(attacks, names) for eps in eps_list]

        def run(j):  # one (attack, eps) item
            a, name, eps = work[j]
            if eps == 0:  # the eps-0 ball is x itself: every attack returns x, no need to run it
                return clean.clone()
            if name == "transfer" and isinstance(surrogate, dict):
                x_adv = surrogate[eps]
            elif isinstance(a, str):
                x_adv = A.get(name).bind(eps, settings[name], seed=seed, masks=masks, batch_size=batch_size,
                                         surrogate=surrogate)(model, x, y)
            else:
                x_adv = a[1](model, x, y, eps)
            return predict(model, x_adv, batch_size=batch_size, masks=masks) == y_cpu
        # under torchrun the items are shared out over the ranks and gathered (fastmask.distributed);
        # in one process this is the plain loop, in order
        done = distributed.shard_map(run, len(work))
        for k, name in enumerate(names):
            out["correct"][name] = torch.stack(done[k * len(eps_list):(k + 1) * len(eps_list)])
            out["accuracy"][name] = out["correct"][name].double().mean(1).tolist()
    robust = clean.expand(len(eps_list), -1).clone()
    for c in out["correct"].values():
        robust &= c
    out["robust_correct"], out["robust_accuracy"] = robust, robust.double().mean(1).tolist()
    return out


def _kind(label):
    """The registry kind of an L-inf attack label; "<name>_restarts" (the honest evaluation's PGD
    with restarts) is of its attack's kind; custom (label, fn) and L2 attacks have none."""
    name = label[:-len("_restarts")] if label.endswith("_restarts") else label
    e = A.REGISTRY.get(name)
    return e.kind if e is not None and e.norm == "inf" else None


def sanity_checks(results, *, tol=0.01, zero_grad_frac=0.05, max_acc_at_large_eps=0.10):
    """Flags of gradient masking / a broken evaluation in a robustness() result.

    Each flag is {"flag": name, "detail": text}; an empty list means no sign found.
    tol is the accuracy margin (absolute) tolerated before an ordering is flagged.
      zero_gradients / nan_gradients: input gradients all zero (> zero_grad_frac of samples) or NaN
      iterative_weaker_than_single_step: a PGD variant above FGSM at the same eps
      white_box_weaker_than_transfer: the best white-box attack above transfer
      eot_stronger_than_pgd: EOT below plain PGD on a randomized model (plain PGD overstates robustness)
      eot_weaker_than_pgd: EOT above plain PGD (the EOT attack is misconfigured)
      not_broken_at_large_eps: the best white-box attack (else the robust accuracy) above
        max_acc_at_large_eps at eps >= 1 (an eps-1 L-inf ball holds every image in [0, 1])
      accuracy_rises_with_eps: robust accuracy, or an attack's accuracy, higher at a larger eps
    """
    r = results.get("robustness", results)
    eps, acc, flags = r["eps"], r["accuracy"], []
    # white-box: gradient attacks (single step and iterative, from the registry's kinds)
    iterative = [a for a in acc if _kind(a) == "iterative"]
    white_box = [a for a in acc if _kind(a) in ("single_step", "iterative")]

    def flag(name, detail):
        flags.append({"flag": name, "detail": detail})
    g = r.get("grad", {})
    if g.get("zero_frac", 0.0) > zero_grad_frac:
        flag("zero_gradients", f"{g['zero_frac']:.1%} of samples have an all-zero input gradient")
    if g.get("nan_frac", 0.0) > 0:
        flag("nan_gradients", f"{g['nan_frac']:.1%} of samples have a NaN input gradient")
    for i, e in enumerate(eps):
        if e == 0:
            continue
        for it in iterative:
            if "fgsm" in acc and acc[it][i] > acc["fgsm"][i] + tol:
                flag("iterative_weaker_than_single_step",
                     f"eps={e:g}: {it} accuracy {acc[it][i]:.3f} > fgsm {acc['fgsm'][i]:.3f}")
        wb = [acc[a][i] for a in white_box]
        if wb and "transfer" in acc and min(wb) > acc["transfer"][i] + tol:
            flag("white_box_weaker_than_transfer",
                 f"eps={e:g}: best white-box accuracy {min(wb):.3f} > transfer {acc['transfer'][i]:.3f}")
        if "eot" in acc and "pgd" in acc:
            if acc["eot"][i] < acc["pgd"][i] - tol:
                flag("eot_stronger_than_pgd", f"eps={e:g}: EOT accuracy {acc['eot'][i]:.3f} < plain PGD "
                     f"{acc['pgd'][i]:.3f}: randomness hides the gradient from plain PGD")
            elif acc["eot"][i] > acc["pgd"][i] + tol:
                flag("eot_weaker_than_pgd",
                     f"eps={e:g}: EOT accuracy {acc['eot'][i]:.3f} > plain PGD {acc['pgd'][i]:.3f}")
        best = min(wb) if wb else r["robust_accuracy"][i]
        if e >= 1.0 and best > max_acc_at_large_eps:
            flag("not_broken_at_large_eps",
                 f"eps={e:g}: accuracy under the best white-box attack {best:.3f} > {max_acc_at_large_eps:g}")
    order = sorted(range(len(eps)), key=lambda i: eps[i])
    for label, series in [("robust", r["robust_accuracy"])] + sorted(acc.items()):
        for i, j in zip(order, order[1:]):
            if eps[j] > eps[i] and series[j] > series[i] + tol:
                flag("accuracy_rises_with_eps", f"{label}: accuracy {series[i]:.3f} at eps={eps[i]:g} "
                     f"< {series[j]:.3f} at eps={eps[j]:g}")
    return flags
