"""Per-sample attack losses on logits, with their closed-form gradients w.r.t. the logits.

Every loss here is one an attack *ascends* (larger = closer to, or further past, a
misclassification), computed per sample on N x K logits:

  "ce"            cross-entropy CE(z, y)
  "cw"            the margin max_{i != y} z_i - z_y (Carlini & Wagner; the MNIST challenge)
  "dlr"           -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12)         (Croce & Hein 2020)
  "dlr-targeted"  -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)
  "logit-diff"    z_t - z_y (FAB-T's linearised function: the boundary to the target is 0)

where z_pi1 >= z_pi2 >= ... are the sorted logits and t the target class. The
ordering of ties is torch.sort's (ascending, as in fra31/auto-attack), so
`grad` equals autograd through `value` exactly where the sort picks the same
indices. `grad` lets fastmask.inputgrad backpropagate any of them without a
graph; the CE gradient uses the ATen kernels autograd itself calls
(log-softmax + NLL backward), so it is autograd's bit for bit.
"""
import torch

__all__ = ["LOSSES", "check", "value", "grad", "value_and_grad"]

LOSSES = ("ce", "cw", "dlr", "dlr-targeted", "logit-diff")
_MIN_CLASSES = {"ce": 1, "cw": 2, "dlr": 3, "dlr-targeted": 4, "logit-diff": 2}
_A = torch.ops.aten


def check(name, classes=None, choices=LOSSES):
    """The loss name, validated against `choices` (and, given the number of classes, that it is defined for them)."""
    if name not in choices:
        raise ValueError(f"loss must be one of {tuple(choices)}, got {name!r}")
    if classes is not None and classes < _MIN_CLASSES[name]:
        raise ValueError(f"loss={name!r} needs at least {_MIN_CLASSES[name]} classes, the model gives {classes}")
    return name


def _others_max(z, y):
    """(index of max_{i != y} z_i, sorted indices ascending)."""
    _, order = z.sort(dim=1)
    top, second = order[:, -1], order[:, -2]
    return torch.where(top == y, second, top), order


def value(name, z, y, target=None):
    """The per-sample loss (N,) of logits z (N x K) at labels y (N,); target (N,) for "dlr-targeted".
    Plain torch ops, differentiable by autograd (the oracle for `grad`)."""
    rows = torch.arange(z.shape[0], device=z.device)
    zy = z[rows, y]
    if name == "ce":
        return torch.nn.functional.cross_entropy(z, y, reduction="none")
    if name == "logit-diff":
        return z[rows, target] - zy
    zs, order = z.sort(dim=1)
    if name in ("cw", "dlr"):
        zm = torch.where(order[:, -1] == y, zs[:, -2], zs[:, -1])
        if name == "cw":
            return zm - zy
        return -(zy - zm) / (zs[:, -1] - zs[:, -3] + 1e-12)
    if name == "dlr-targeted":
        return -(zy - z[rows, target]) / (zs[:, -1] - 0.5 * (zs[:, -3] + zs[:, -4]) + 1e-12)
    raise ValueError(f"loss must be one of {LOSSES}, got {name!r}")


def _ce(z, y):
    ls = torch.log_softmax(z, 1)
    loss = -ls.gather(1, y[:, None])[:, 0]
    _, total = _A.nll_loss_forward(ls, y, None, 2, -100)  # reduction 2 = sum
    g = _A.nll_loss_backward(ls.new_ones(()), ls, y, None, 2, -100, total)
    return loss, _A._log_softmax_backward_data(g, ls, 1, ls.dtype)


def value_and_grad(name, z, y, target=None):
    """(loss (N,), d loss_i / d z_i (N x K)) in closed form; z is not modified."""
    if name == "ce":
        return _ce(z, y)
    z = z.detach()
    rows = torch.arange(z.shape[0], device=z.device)
    m, order = _others_max(z, y)
    zy = z[rows, y]
    g = torch.zeros_like(z)
    if name == "logit-diff":
        g[rows, target] = 1.0
        g[rows, y] -= 1.0
        return z[rows, target] - zy, g
    if name == "cw":
        g[rows, m] = 1.0
        g[rows, y] -= 1.0
        return z[rows, m] - zy, g
    if name == "dlr":
        a = zy - z[rows, m]                                   # L = -a / b
        b = z[rows, order[:, -1]] - z[rows, order[:, -3]] + 1e-12
        g.index_put_((rows, y), -1.0 / b, accumulate=True)
        g.index_put_((rows, m), 1.0 / b, accumulate=True)
        c = a / (b * b)                                       # dL/db
        g.index_put_((rows, order[:, -1]), c, accumulate=True)
        g.index_put_((rows, order[:, -3]), -c, accumulate=True)
        return -a / b, g
    if name == "dlr-targeted":
        a = zy - z[rows, target]
        b = z[rows, order[:, -1]] - 0.5 * (z[rows, order[:, -3]] + z[rows, order[:, -4]]) + 1e-12
        g.index_put_((rows, y), -1.0 / b, accumulate=True)
        g.index_put_((rows, target), 1.0 / b, accumulate=True)
        c = a / (b * b)
        g.index_put_((rows, order[:, -1]), c, accumulate=True)
        g.index_put_((rows, order[:, -3]), -0.5 * c, accumulate=True)
        g.index_put_((rows, order[:, -4]), -0.5 * c, accumulate=True)
        return -a / b, g
    raise ValueError(f"loss must be one of {LOSSES}, got {name!r}")


def grad(name, z, y, target=None):
    """d loss_i / d z_i (N x K), closed form (see value_and_grad)."""
    return value_and_grad(name, z, y, target)[1]
