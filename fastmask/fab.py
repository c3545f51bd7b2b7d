"""FAB-T, L-inf and L2: the targeted Fast Adaptive Boundary attack (Croce & Hein, ICML 2020), as the
standard version of AutoAttack runs it (fra31/auto-attack fab_pt.py / fab_base.py: 100
steps, 9 targets, one run per target without a random start, alpha_max 0.1, eta 1.05,
beta 0.9).

FAB looks for the smallest perturbation that crosses the decision boundary. At each
step it linearises f(x) = z_t - z_y (target t, true class y) around the iterate x1,
projects both x1 and the clean point x0 onto the hyperplane {f = 0} (in L-inf, inside
the box [lo, hi]: `project_linf`; in L2 `project_l2`), and moves to the convex combination
(1 - a) (x1 + eta d1) + a (x0 + eta d2), a = min(|d1| / (|d1| + |d2|), alpha_max),
which stays close to x0. When the step lands on an adversarial point it keeps it if it
is the nearest so far and pulls the iterate back towards x0 by beta.

For an evaluation at radius eps a sample is broken once such a point lies within eps;
it then leaves the run (the original keeps shrinking its perturbation, which changes no
robust-accuracy figure). Deterministic: there are no random draws.
"""
import torch

from . import ops
from .apgd import check_eps, clean_logits
from . import _checks as C
from .attacks import _batched, _logits, _loss_value_grad, check_inputs, model_state

__all__ = ["fab_targeted", "project_linf", "project_l2"]

project_linf = ops.project_linf  # the projection is an op (fastmask.ops); its name here for FAB's readers


def project_l2(t, w, b, lo=0.0, hi=1.0):
    """The smallest L2 step d (rows of t, w: N x D; b: N) with w.(t + d) = b and t + d in [lo, hi],
    or, where the box does not reach the hyperplane, the box point nearest to it. Coordinates
    with |w| <= 1e-8 do not move (as in the original's projection_l2).

    With c = |w.t - b| and w signed so that the plane is below: d(l) = -min(l, r) w, where
    r_i = the l at which coordinate i meets its bound; c(l) = sum w_i^2 min(l, r_i) grows
    piecewise linearly in l, so l solves c(l) = c on the segment between two sorted r_i."""
    c = (w * t).sum(1) - b
    w = torch.where((c < 0).unsqueeze(1), -w, w)
    c = c.abs()
    live = w.abs() > 1e-8
    wl = torch.where(live, w, torch.ones_like(w))
    r = torch.where(live, torch.maximum((t - lo) / wl, (t - hi) / wl).clamp_min(0), torch.zeros_like(w))
    rs, order = r.sort(1)
    w2 = (w * w * live).gather(1, order)
    cum_w2 = w2.cumsum(1)
    cum_rw2 = (w2 * rs).cumsum(1)
    total = cum_w2[:, -1:]
    reach = cum_rw2 + rs * (total - cum_w2)  # c(l) at each sorted breakpoint, non-decreasing
    k = (reach < c.unsqueeze(1)).sum(1, keepdim=True)  # the segment holding the solution (D: none)
    zero = torch.zeros_like(c).unsqueeze(1)
    prev_w2 = torch.cat((zero, cum_w2), 1).gather(1, k)
    prev_rw2 = torch.cat((zero, cum_rw2), 1).gather(1, k)
    lam = (c.unsqueeze(1) - prev_rw2) / (total - prev_w2).clamp_min(torch.finfo(t.dtype).tiny)
    lam = torch.where(k == t.shape[1], torch.full_like(lam, float("inf")), lam)  # out of reach: every bound
    return -torch.minimum(lam, r) * w * live


def _dist(d, norm):
    """Per-row norm of d (N x D): L-inf or L2."""
    return d.abs().amax(1) if norm == "inf" else d.pow(2).sum(1).sqrt()


def _run(model, x0, y, tgt, eps, norm, steps, alpha_max, eta, beta, lo, hi, stats):
    """FAB-T on (x0, y) towards targets tgt; returns (x_out, broken) with x_out within eps where broken."""
    n = x0.shape[0]
    out = x0.clone()
    broken = torch.zeros(n, dtype=torch.bool, device=x0.device)
    best = torch.full((n,), float("inf"), dtype=x0.dtype, device=x0.device)
    idx = torch.arange(n, device=x0.device)
    x1 = x0.clone()
    project = ops.project_linf if norm == "inf" else project_l2
    for _ in range(steps):
        g, df, _ = _loss_value_grad(model, x1, y, "logit-diff", tgt)   # df = z_t - z_y, g its gradient
        stats["grads"] += idx.numel()
        w = g.flatten(1)
        b = -df + (w * x1.flatten(1)).sum(1)
        d = project(torch.cat((x1.flatten(1), x0.flatten(1))), torch.cat((w, w)), torch.cat((b, b)), lo, hi)
        a0 = _dist(d, norm).clamp_min(1e-8)
        m = idx.numel()
        d1, d2 = d[:m].view_as(x1), d[m:].view_as(x1)
        alpha = (a0[:m] / (a0[:m] + a0[m:])).clamp(0.0, alpha_max).view(-1, *[1] * (x1.dim() - 1))
        x1 = ((x1 + eta * d1) * (1 - alpha) + (x0 + eta * d2) * alpha).clamp(lo, hi)
        adv = _logits(model, x1).argmax(1) != y
        stats["queries"] += m
        if adv.any():
            dist = _dist((x1 - x0).flatten(1), norm)
            nearer = adv & (dist < best)
            best = torch.where(nearer, dist, best)
            out[idx[nearer]] = x1[nearer]
            x1 = torch.where(adv.view(-1, *[1] * (x1.dim() - 1)), x0 + (x1 - x0) * beta, x1)
            done = best <= eps
            if done.any():  # within eps: broken at this radius, no need to shrink further
                broken[idx[done]] = True
                keep = ~done
                idx, x0, x1, y, tgt, best = (v[keep] for v in (idx, x0, x1, y, tgt, best))
                if idx.numel() == 0:
                    break
    return out, broken


def fab_targeted(model, x, y, eps, *, norm="inf", steps=100, targets=9, alpha_max=0.1, eta=1.05, beta=0.9,
                 masks="model", batch_size=None, lo=0.0, hi=1.0, _stats=None):
    """FAB-T, L-inf or L2 (Croce & Hein 2020, the standard AutoAttack version): a minimum-norm attack
    towards each of the `targets` highest-scoring other classes in turn, evaluated at radius eps.

    Args:
        model: maps x (Tensor[N, ...]) to logits (N x classes); left as it was.
        x: Tensor[N, ...] in [lo, hi]; y: Tensor[N] int64 true labels. eps: radius, >= 0, in `norm`.
        norm: "inf" or "2". steps: iterations per target (100).
        targets: target classes in [1, classes - 1] (9). alpha_max (0.1), eta (1.05), beta (0.9):
            the original's bias towards x, overshoot and backward step.
        masks, batch_size, lo, hi: as in fastmask.attacks.

    Returns:
        Tensor like x: a misclassified point within eps of x where one was found, else x.
    """
    check_inputs(x, y, batch_size)
    norm = C.norm("norm", norm)
    eps = check_eps(eps)
    C.positive_int("steps", steps)
    C.positive_int("targets", targets)
    for name, v, ok in (("alpha_max", alpha_max, 0 <= alpha_max <= 1), ("eta", eta, eta >= 1),
                        ("beta", beta, 0 <= beta <= 1)):
        if not ok:
            raise ValueError(f"{name} out of range, got {v!r}")
    stats = {"grads": 0, "queries": 0} if _stats is None else _stats

    def one(xb, yb, k):
        z = clean_logits(model, xb, yb, "logit-diff", targets=targets)
        robust = z.argmax(1) == yb
        order = z.argsort(dim=1, descending=True)
        adv = xb.clone()
        for t in range(targets):
            todo = robust.nonzero().squeeze(1)
            if todo.numel() == 0:
                break
            out, broken = _run(model, xb[todo], yb[todo], order[todo, t + 1], eps, norm, steps, alpha_max, eta, beta,
                               lo, hi, stats)
            adv[todo[broken]] = out[broken]
            robust[todo[broken]] = False
        return adv
    with model_state(model, masks):
        return _batched(model, x, y, batch_size, one)
