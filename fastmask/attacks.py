"""White-box and transfer attacks built on the fused ops (fastmask.ops).

Every attack has the form attack(model, x, y, ...) -> x_adv: x is N x ... in
[lo, hi] (default [0, 1]), y the N labels (the targets when targeted=True).
x_adv has x's shape, dtype and device; batches of `batch_size` run on the
model's device. The model is left exactly as it was: training flags,
parameters' requires_grad and the buffers (RNG offsets) of its FeatureMask
modules are restored. Input gradients come from torch.autograd.grad with the
parameters frozen, so no parameter .grad is touched; plain Linear/Conv2d/ReLU/
MaxPool2d chains (the paper's models without a mask) take fastmask.inputgrad
instead: the same ATen backward kernels without a graph, in cache-sized
micro-batches on CPU, bit for bit the same gradient.

The loss is summed over the batch (per-sample gradients do not depend on the
batch): the cross-entropy by default, or loss="cw" / "dlr" (fastmask.losses).
Targeted attacks descend the loss to the target labels instead.

masks= says what the FeatureMask modules do while the attack runs:
  "model"  - what the model does in eval mode (no mask, or its consistent mask)
  "random" - a fresh mask draw at every forward (the FeatureMask modules run in
             training mode, advancing their offsets); the randomized defence
  "frozen" - one draw, reused by every forward of the attack
Nested model_state() blocks restore the offsets only at the outermost exit, so
inside one evaluation (fastmask.evaluate) no mask draw is ever reused.
"""
import contextlib
import functools
import weakref

import torch
import torch.nn.functional as F

from . import inputgrad, losses, ops

__all__ = ["fgsm", "pgd", "eot_pgd", "pgd_frozen_mask", "transfer", "make_attack",
           "model_state", "feature_masks", "input_grad", "MASK_STATES", "ATTACKS"]

MASK_STATES = ("model", "random", "frozen")
PGD_LOSSES = ("ce", "cw", "dlr")
ATTACKS = ("fgsm", "pgd", "eot", "frozen", "pgd_l2")
_depth = weakref.WeakKeyDictionary()  # model -> nesting depth of model_state


def feature_masks(model, modules=None):
    """The fastmask.nn.FeatureMask modules inside `model` (in module order)."""
    try:
        from .nn import FeatureMask
    except ImportError:  # nn not built yet / stripped-down install
        return []
    return [m for m in (model.modules() if modules is None else modules) if isinstance(m, FeatureMask)]


def _mask_buffers(fms):
    return [b for m in fms for b in m.buffers(recurse=False)]


@contextlib.contextmanager
def model_state(model, masks="model"):
    """Everything in eval mode, parameters frozen, FeatureMask modules per `masks`; all restored on exit."""
    if masks not in MASK_STATES:
        raise ValueError(f"masks must be one of {MASK_STATES}, got {masks!r}")
    mods = list(model.modules())
    fms = feature_masks(model, mods)
    flags = [(m, m.training) for m in mods]
    frozen = [p for p in model.parameters() if p.requires_grad]
    outer = _depth.get(model, 0) == 0
    saved = [b.clone() for b in _mask_buffers(fms)] if outer else None
    hooks = []
    _depth[model] = _depth.get(model, 0) + 1
    try:
        if any(t for _, t in flags):
            model.eval()
        for p in frozen:
            p.requires_grad_(False)
        if masks != "model":
            for m in fms:
                m.train()
        if masks == "frozen":  # every forward starts from the same offsets: the same draw
            snap = {m: [b.clone() for b in m.buffers(recurse=False)] for m in fms}

            def rewind(m, args):
                for b, s in zip(m.buffers(recurse=False), snap[m]):
                    b.copy_(s)
            hooks = [m.register_forward_pre_hook(rewind) for m in fms]
        yield model
    finally:
        for h in hooks:
            h.remove()
        _depth[model] -= 1
        if outer:
            del _depth[model]
            for b, s in zip(_mask_buffers(fms), saved):
                b.copy_(s)
        for m, t in flags:
            if m.training != t:
                m.training = t
        for p in frozen:
            p.requires_grad_(True)


def _loss_value_grad(model, x, y, loss, target=None):
    """(d(sum L)/dx, L (N,), logits) for the per-sample loss L = losses.value(loss, logits, y, target);
    zeros where the output does not depend on x. Graph-free for plain layer chains."""
    def fn(z, rows):
        return losses.value_and_grad(loss, z, y[rows], None if target is None else target[rows])
    layers = inputgrad.plan(model)
    if layers is not None:
        r = inputgrad.value_grad(model, layers, x, fn)
        if r is not None:
            return r
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        z = model(x)
    out, gz = fn(z.detach(), slice(None))
    g = torch.autograd.grad(z, x, gz, allow_unused=True)[0] if z.requires_grad else None
    return (torch.zeros_like(x) if g is None else g), out, z.detach()


def _loss_grad(model, x, y, targeted, loss="ce"):
    """d(sum L)/dx (minus it when targeted); zeros where the output does not depend on x.
    Plain layer chains skip autograd (fastmask.inputgrad: the same kernels, the same bits)."""
    if loss != "ce":
        g = _loss_value_grad(model, x, y, loss)[0]
        return -g if targeted else g
    layers = inputgrad.plan(model)
    if layers is not None:
        g = inputgrad.loss_grad(model, layers, x, y, targeted)
        if g is not None:
            return g
    x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(model(x), y, reduction="sum")
    if not loss.requires_grad:
        return torch.zeros_like(x)
    (g,) = torch.autograd.grad(-loss if targeted else loss, x, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


def _norm(norm):
    s = str(norm).lower()
    if s in ("inf", "linf"):
        return "inf"
    if s in ("2", "2.0", "l2"):
        return "2"
    raise ValueError(f"norm must be 'inf' or '2', got {norm!r}")


def _positive_int(name, v):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    return v


def _check(x, y, batch_size):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.dtype != torch.long:
        raise TypeError(f"y must be a 1-D int64 tensor of labels, got {getattr(y, 'dtype', type(y).__name__)} "
                        f"with shape {tuple(getattr(y, 'shape', ()))}")
    if x.dim() < 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same number of samples, got x {tuple(x.shape)} and y {tuple(y.shape)}")
    if batch_size is not None:
        _positive_int("batch_size", batch_size)


def _device(model, x):
    p = next(model.parameters(), None)
    return x.device if p is None else p.device


def _batched(model, x, y, batch_size, fn):
    """fn(xb, yb, k) -> adversarial batch, over batches k of x on the model's device; result on x's device."""
    dev, n = _device(model, x), x.shape[0]
    bs = n if batch_size is None else batch_size
    if n <= bs:
        return fn(x.to(dev).contiguous(), y.to(dev), 0).to(x.device)
    out = torch.empty_like(x)
    for k, i in enumerate(range(0, n, bs)):
        out[i:i + bs] = fn(x[i:i + bs].to(dev).contiguous(), y[i:i + bs].to(dev), k)
    return out


def input_grad(model, x, y, *, targeted=False, masks="model", batch_size=None):
    """The attack's input gradient d(sum CE)/dx, batched, model left unchanged."""
    _check(x, y, batch_size)
    with model_state(model, masks):
        return _batched(model, x, y, batch_size, lambda xb, yb, k: _loss_grad(model, xb, yb, targeted))


def fgsm(model, x, y, eps, *, targeted=False, lo=0.0, hi=1.0, masks="model", batch_size=None):
    """Fast gradient sign method: clamp(x + eps * sign(grad), lo, hi) (one fused op)."""
    _check(x, y, batch_size)

    def one(xb, yb, k):
        return ops.fgsm(xb, _loss_grad(model, xb, yb, targeted), eps, lo, hi)
    with model_state(model, masks):
        return _batched(model, x, y, batch_size, one)


def _pgd_run(model, x_nat, y, eps, alpha, steps, rand, seed, offset, norm, targeted, lo, hi, samples, loss):
    if rand:
        x_adv = ops.random_start(x_nat, eps, seed=seed, offset=offset, norm=norm, lo=lo, hi=hi)
    else:
        x_adv = x_nat.clone()
    for _ in range(steps):
        g = _loss_grad(model, x_adv, y, targeted, loss)
        for _ in range(samples - 1):  # EOT: sum (= k x mean) of the gradients over fresh draws
            g += _loss_grad(model, x_adv, y, targeted, loss)
        ops.pgd_step_(x_adv, x_nat, g, alpha, eps, lo, hi, norm)
    return x_adv


def _pgd(model, x, y, eps, alpha, steps, random_start, seed, restarts, norm, targeted, lo, hi,
         masks, batch_size, samples, loss="ce"):
    _check(x, y, batch_size)
    norm = _norm(norm)
    losses.check(loss, choices=PGD_LOSSES)
    _positive_int("steps", steps)
    _positive_int("restarts", restarts)
    _positive_int("samples", samples)
    if restarts > 1 and not random_start:
        raise ValueError(f"restarts={restarts} needs random_start=True (restarts from x itself are identical)")

    def one(xb, yb, k):
        best = best_broken = best_loss = None
        for r in range(restarts):
            adv = _pgd_run(model, xb, yb, eps, alpha, steps, random_start, seed, (r << 32) + k,
                           norm, targeted, lo, hi, samples, loss)
            if restarts == 1:
                return adv
            with torch.no_grad():  # keep the per-sample worst case: broken first, then highest loss
                logits = model(adv)
                value = losses.value(loss, logits, yb)
                broken = (logits.argmax(1) == yb) if targeted else (logits.argmax(1) != yb)
                value = -value if targeted else value
            if best is None:
                best, best_broken, best_loss = adv, broken, value
                continue
            better = (broken & ~best_broken) | ((broken == best_broken) & (value > best_loss))
            best[better] = adv[better]
            best_broken |= broken
            best_loss = torch.where(better, value, best_loss)
        return best
    with model_state(model, masks):
        return _batched(model, x, y, batch_size, one)


def pgd(model, x, y, eps, alpha, steps, random_start=True, seed=0, restarts=1, norm="inf",
        targeted=False, *, lo=0.0, hi=1.0, masks="model", batch_size=None, loss="ce"):
    """Projected gradient descent (Madry et al.), L-inf or L2, in place with ops.pgd_step_.

    loss: "ce" (cross-entropy), "cw" (margin max_{i!=y} z_i - z_y) or "dlr" (fastmask.losses).
    random_start: start from ops.random_start (uniform in the L-inf ball, uniform in
    the L2 ball) with Philox (seed, offset = restart << 32 | batch index).
    restarts > 1: per sample, keep the restart that breaks it (or, if none does,
    the one with the highest loss), so a sample counts as broken if any restart breaks it.
    """
    return _pgd(model, x, y, eps, alpha, steps, random_start, seed, restarts, norm, targeted,
                lo, hi, masks, batch_size, 1, loss)


def eot_pgd(model, x, y, eps, alpha, steps, samples=20, seed=0, random_start=True, restarts=1,
            norm="inf", targeted=False, *, lo=0.0, hi=1.0, masks="random", batch_size=None, loss="ce"):
    """PGD with Expectation over Transformation: each step follows the gradient
    averaged over `samples` fresh mask draws (masks="random": FeatureMask modules
    draw at every forward; their offsets are restored afterwards). loss: as for pgd."""
    return _pgd(model, x, y, eps, alpha, steps, random_start, seed, restarts, norm, targeted,
                lo, hi, masks, batch_size, samples, loss)


def pgd_frozen_mask(model, x, y, eps, alpha, steps, random_start=True, seed=0, restarts=1,
                    norm="inf", targeted=False, *, lo=0.0, hi=1.0, batch_size=None):
    """PGD against one frozen mask draw (every forward of the attack sees the same masks)."""
    return _pgd(model, x, y, eps, alpha, steps, random_start, seed, restarts, norm, targeted,
                lo, hi, "frozen", batch_size, 1)


def transfer(surrogate, model, x, y, attack):
    """Black-box transfer: x_adv = attack(surrogate, x, y), crafted without `model`'s gradients.

    attack is any attack(model, x, y) -> x_adv, e.g. make_attack("pgd", 0.1).
    """
    if surrogate is model:
        raise ValueError("transfer needs a surrogate other than the attacked model")
    if not callable(attack):
        raise TypeError(f"attack must be callable as attack(model, x, y), got {attack!r}")
    return attack(surrogate, x, y)


def make_attack(name, eps, *, steps=40, alpha=None, restarts=1, samples=20, seed=0,
                masks="model", batch_size=None, lo=0.0, hi=1.0):
    """An attack(model, x, y) -> x_adv by name: "fgsm", "pgd", "eot", "frozen" (L-inf) or "pgd_l2".

    alpha=None picks 2.5 * eps / steps (Madry et al.), so the steps can cross the ball.
    "eot" uses masks="random" unless masks is given other than "model".
    """
    if name not in ATTACKS:
        raise ValueError(f"attack name must be one of {ATTACKS}, got {name!r}")
    if alpha is None:
        alpha = 2.5 * eps / steps if eps > 0 else 1.0  # eps = 0: any alpha leaves x unchanged
    common = dict(lo=lo, hi=hi, batch_size=batch_size)
    if name == "fgsm":
        return functools.partial(fgsm, eps=eps, masks=masks, **common)
    pgd_args = dict(eps=eps, alpha=alpha, steps=steps, seed=seed, restarts=restarts, **common)
    if name == "pgd":
        return functools.partial(pgd, masks=masks, **pgd_args)
    if name == "pgd_l2":
        return functools.partial(pgd, masks=masks, norm="2", **pgd_args)
    if name == "eot":
        return functools.partial(eot_pgd, samples=samples, masks="random" if masks == "model" else masks,
                                 **pgd_args)
    return functools.partial(pgd_frozen_mask, **pgd_args)


# ----------------------------------------------------------------------------- AutoAttack components
# (issue #14; each lives in its own module and imports the machinery above)
from .apgd import apgd, apgd_targeted  # noqa: E402
from .square import square  # noqa: E402
from .fab import fab_targeted  # noqa: E402
from .autoattack import autoattack  # noqa: E402
__all__ += ["apgd", "apgd_targeted", "square", "fab_targeted", "autoattack"]
