"""Auto-PGD (Croce & Hein, ICML 2020, Algorithm 1): APGD-CE, APGD-DLR and APGD-T.

The behaviour follows the authors' autoattack/autopgd_base.py (fra31/auto-attack):
initial step 2 * eps, momentum 0.75 (none on the first step), step-size checkpoints
p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06) (in steps: the
first interval int(0.22 n), each next one int(0.03 n) shorter, at least int(0.06 n)),
and at a checkpoint the step of a sample is halved when at most rho of the steps
since the last checkpoint raised its loss, or when it was not halved at the last
checkpoint and its best loss has not improved since; a halved sample restarts from
its best point (and that point's gradient). Each sample keeps its own best point.

Where this differs from the original, on purpose:
  - the random start is ops.random_start (Philox; uniform in the L-inf cube / L2 ball)
    instead of torch.rand, so a run is reproducible bit for bit. Layout:
    seed = `seed`, offset = (run << 32) | batch index, run = target rank * restarts + restart;
  - the first step-size check compares the first step's loss with the loss at the
    start point (the paper's rule; the original compares it with an unwritten 0);
  - a sample leaves the run the moment it is misclassified (its adversarial point is
    kept): the original keeps stepping it until the run ends. No robust-accuracy
    figure changes, and broken points cost nothing;
  - with eot_samples > 1 the per-sample loss is the mean over the draws, like the
    gradient (the original takes the last draw's loss); broken = last draw misclassifies.
"""
import math

import torch

from . import losses, ops
from . import _checks as C
from .attacks import _batched, _loss_value_grad, check_inputs, model_state

__all__ = ["apgd", "apgd_targeted", "checkpoints", "StepControl", "APGD_LOSSES"]

APGD_LOSSES = ("ce", "dlr")


# ----------------------------------------------------------------------------- checks (shared by square, autoattack)

def check_eps(eps):
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    return float(eps)


def check_output(z, n):
    """z must be N x classes logits; returns the number of classes."""
    if z.dim() != 2 or z.shape[0] != n:
        raise ValueError(f"model output must be N x classes (N = {n}), got shape {tuple(z.shape)}")
    return z.shape[1]


def check_labels(y, classes):
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= classes):
        bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
        raise ValueError(f"y must hold labels in [0, {classes}) (the model's classes), got {bad}")


def check_targets(targets, classes):
    """targets (None: untargeted) must leave at least one class: 1 <= targets < classes."""
    if targets is not None and targets >= classes:
        raise ValueError(f"targets must be an integer in [1, classes - 1 = {classes - 1}], got {targets}")


def clean_logits(model, xb, yb, loss, choices=losses.LOSSES, targets=None):
    """The clean forward every attack starts from: the logits z (N x classes), with the
    output shape, the labels, the loss and `targets` checked against the model's classes."""
    with torch.no_grad():
        z = model(xb)
    classes = check_output(z, xb.shape[0])
    check_labels(yb, classes)
    losses.check(loss, classes, choices)
    check_targets(targets, classes)
    return z


# ----------------------------------------------------------------------------- the step-size rule

def checkpoints(steps):
    """The step counts (1-based) after which APGD checks its step size, for `steps` steps."""
    k, dec, kmin = max(int(0.22 * steps), 1), max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
    out, w = [], k
    while w <= steps:
        out.append(w)
        k = max(k - dec, kmin)
        w += k
    return out


class StepControl:
    """APGD's per-sample step size, driven by nothing but the loss after each step.

    loss0: (N,) loss at the start point; eta0: the initial step. update(loss) after each
    step returns (improved, halve): improved marks samples whose best loss rose (take
    this point as their best), halve marks the samples whose step was just halved
    (restart them from their best point); halve is None between checkpoints.
    keep(mask) drops samples (those that left the run).
    """

    def __init__(self, loss0, steps, rho, eta0):
        self.rho = rho
        self.k = max(int(0.22 * steps), 1)
        self.dec, self.kmin = max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
        self.since = 0
        self.best = loss0.clone()
        self.prev = loss0.clone()
        self.best_last = loss0.clone()
        self.n_inc = torch.zeros_like(loss0, dtype=torch.int32)
        self.reduced_last = torch.ones_like(loss0, dtype=torch.bool)
        self.eta = torch.full_like(loss0, float(eta0))

    def update(self, loss):
        improved = loss > self.best
        self.best = torch.where(improved, loss, self.best)
        self.n_inc += loss > self.prev
        self.prev = loss
        self.since += 1
        if self.since < self.k:
            return improved, None
        halve = (self.n_inc <= self.k * self.rho) | (~self.reduced_last & (self.best_last >= self.best))
        self.reduced_last = halve
        self.best_last = self.best.clone()
        self.eta = torch.where(halve, self.eta / 2, self.eta)
        self.n_inc.zero_()
        self.since = 0
        self.k = max(self.k - self.dec, self.kmin)
        return improved, halve

    def keep(self, mask):
        for name in ("best", "prev", "best_last", "n_inc", "reduced_last", "eta"):
            setattr(self, name, getattr(self, name)[mask])


# ----------------------------------------------------------------------------- the attack

def _view(v, x):
    return v.view(-1, *([1] * (x.dim() - 1)))


def _project(x_nat, x, eps, norm, lo, hi):
    """x projected onto the eps-ball around x_nat, then clamped to [lo, hi] (as the original)."""
    if norm == "inf":
        return torch.minimum(torch.maximum(x, x_nat - eps), x_nat + eps).clamp_(lo, hi)
    d = x - x_nat
    n = d.flatten(1).norm(dim=1)
    scale = torch.clamp(eps / (n + 1e-12), max=1.0)  # = min(eps, |d|) / |d|, up to the 1e-12
    return (x_nat + d * _view(scale, d)).clamp_(lo, hi)


def _unit(g, norm):
    if norm == "inf":
        return g.sign()
    return g / _view(g.flatten(1).norm(dim=1) + 1e-12, g)


def _value_grad(model, x, y, loss, target, eot):
    g, v, z = _loss_value_grad(model, x, y, loss, target)
    for _ in range(eot - 1):  # EOT: mean gradient and loss over fresh draws; z is the last draw's
        g2, v2, z = _loss_value_grad(model, x, y, loss, target)
        g += g2
        v = v + v2
    if eot > 1:
        g /= eot
        v = v / eot
    return g, v, z


def _run(model, x, x_adv, y, target, eps, steps, norm, loss, rho, eot, lo, hi, stats):
    """One APGD run on the points (x, y) from the start x_adv (consumed). Returns (x_out, broken):
    x_out is the first misclassified iterate where broken, else the highest-loss point."""
    out = x_adv.clone()
    broken_all = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    idx = torch.arange(x.shape[0], device=x.device)
    g, v, z = _value_grad(model, x_adv, y, loss, target, eot)
    stats["grads"] += x.shape[0] * eot
    ctl = StepControl(v, steps, rho, 2 * eps)
    x_best, g_best, x_old = x_adv.clone(), g.clone(), x_adv.clone()
    tgt = target
    # L-inf: the ball and [lo, hi] as one box per element (clamp to it = the original's min/max then clamp)
    box_lo, box_hi = ((x - eps).clamp_(min=lo), (x + eps).clamp_(max=hi)) if norm == "inf" else (x, x)
    for i in range(steps + 1):
        broken = z.argmax(1) != y
        if broken.any():  # record and drop the samples that are misclassified now
            out[idx[broken]] = x_adv[broken]
            broken_all[idx[broken]] = True
            keep = ~broken
            idx, x, y, x_adv, x_old, x_best, g, g_best, box_lo, box_hi = (
                t[keep] for t in (idx, x, y, x_adv, x_old, x_best, g, g_best, box_lo, box_hi))
            tgt = None if tgt is None else tgt[keep]
            v = v[keep]
            if i > 0:
                ctl.keep(keep)
            else:
                ctl = StepControl(v, steps, rho, 2 * eps)
        if i == steps or idx.numel() == 0:
            break
        if i > 0:
            improved, halve = ctl.update(v)
            x_best[improved] = x_adv[improved]
            g_best[improved] = g[improved]
            if halve is not None and halve.any():
                x_adv[halve] = x_best[halve]
                g[halve] = g_best[halve]
        # the step: x1 = P(x + eta * u(g)); x_new = P(x + a (x1 - x) + (1 - a)(x - x_old))
        a = 1.0 if i == 0 else 0.75
        if norm == "inf":
            x1 = torch.clamp(torch.addcmul(x_adv, _view(ctl.eta, x), g.sign()), box_lo, box_hi)
            x_new = torch.clamp(x_adv + a * (x1 - x_adv) + (1 - a) * (x_adv - x_old), box_lo, box_hi)
        else:
            x1 = _project(x, x_adv + _view(ctl.eta, x) * _unit(g, norm), eps, norm, lo, hi)
            x_new = _project(x, x_adv + a * (x1 - x_adv) + (1 - a) * (x_adv - x_old), eps, norm, lo, hi)
        x_old, x_adv = x_adv, x_new
        g, v, z = _value_grad(model, x_adv, y, loss, tgt, eot)
        stats["grads"] += idx.numel() * eot
    if idx.numel():  # the last step's improvement, then the robust samples' best points
        if i == steps:
            improved, _ = ctl.update(v)
            x_best[improved] = x_adv[improved]
        out[idx] = x_best
    return out, broken_all


def _apgd(model, x, y, eps, norm, steps, loss, restarts, rho, eot_samples, masks, seed, batch_size,
          lo, hi, targets, stats):
    check_inputs(x, y, batch_size)
    norm = C.norm("norm", norm)
    eps = check_eps(eps)
    C.positive_int("steps", steps)
    C.positive_int("restarts", restarts)
    C.positive_int("eot_samples", eot_samples)
    if not 0 <= rho <= 1:
        raise ValueError(f"rho must be in [0, 1], got {rho!r}")
    if targets is not None:
        C.positive_int("targets", targets)

    def one(xb, yb, k):
        z = clean_logits(model, xb, yb, loss, APGD_LOSSES if targets is None else ("dlr-targeted",), targets)
        # under fresh mask draws one forward says little: every sample is attacked
        robust = z.argmax(1) == yb if masks != "random" else torch.ones_like(yb, dtype=torch.bool)
        order = z.argsort(dim=1, descending=True)  # the target of rank j: the j-th highest non-top class
        adv = xb.clone()
        for t in range(1 if targets is None else targets):
            for r in range(restarts):
                todo = robust.nonzero().squeeze(1)
                if todo.numel() == 0:
                    return adv
                tgt = None if targets is None else order[todo, t + 1]
                # drawn for the whole batch, so a sample's start does not depend on who is left
                x0 = ops.random_start(xb, eps, seed=seed, offset=((t * restarts + r) << 32) | k,
                                      norm=norm, lo=lo, hi=hi)
                out, broken = _run(model, xb[todo], x0[todo], yb[todo], tgt, eps, steps, norm, loss,
                                   rho, eot_samples, lo, hi, stats)
                adv[todo] = out
                robust[todo[broken]] = False
        return adv
    with model_state(model, masks):
        return _batched(model, x, y, batch_size, one)



def apgd(model, x, y, eps, *, norm="inf", steps=100, loss="ce", restarts=1, rho=0.75, eot_samples=1,
         masks="model", seed=0, batch_size=None, lo=0.0, hi=1.0):
    """Auto-PGD, untargeted (APGD-CE / APGD-DLR; Croce & Hein 2020), L-inf or L2.

    Args:
        model: maps x (N x ...) to logits (N x classes); left as it was (attacks.model_state).
        x: Tensor[N, ...] in [lo, hi]; y: Tensor[N] int64 true labels.
        eps: radius of the ball (L-inf or L2 distance to x), >= 0.
        norm: "inf" or "2". steps: iterations per run (100). loss: "ce" or "dlr".
        restarts: runs from fresh random starts, each on the points still robust (1).
        rho: halving threshold of the step-size rule (0.75).
        eot_samples: gradients averaged per step (with masks="random": fresh mask draws) (1).
        masks: "model" | "random" | "frozen", as in fastmask.attacks. seed: Philox seed of the starts.
        batch_size: samples per batch on the model's device (None: all). lo, hi: the valid range.

    Returns:
        Tensor like x: where the attack misclassifies, the adversarial point; for samples
        misclassified already, x itself (with masks="random" every sample is attacked);
        for the rest, each one's highest-loss point.
    """
    return _apgd(model, x, y, eps, norm, steps, loss, restarts, rho, eot_samples, masks, seed,
                 batch_size, lo, hi, None, {"grads": 0})


def apgd_targeted(model, x, y, eps, *, norm="inf", steps=100, targets=9, loss="dlr-targeted", restarts=1,
                  rho=0.75, eot_samples=1, masks="model", seed=0, batch_size=None, lo=0.0, hi=1.0):
    """APGD-T: Auto-PGD on the targeted DLR loss, one run per target class (Croce & Hein 2020).

    The targets of a sample are its `targets` highest-scoring classes other than the top
    one at the clean point, taken in order, each on the points still robust. y are the
    true labels (the attack is untargeted in effect: any misclassification counts).
    Other arguments, shapes and the return value as in apgd; targets in [1, classes - 1] (9).
    """
    return _apgd(model, x, y, eps, norm, steps, loss, restarts, rho, eot_samples, masks, seed,
                 batch_size, lo, hi, targets, {"grads": 0})
