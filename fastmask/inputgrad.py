"""The attack gradient d(sum CE)/dx (or of any per-sample loss on the logits, value_grad) of a
plain layer chain, without building an autograd graph.

An attack step needs only the input gradient. For a model that is a chain of
Flatten / Linear / ReLU / Conv2d / MaxPool2d / Identity modules (the paper's MLP
and CNN, bare or inside a fastmask.models.Net without a FeatureMask), `plan`
returns the layers and `loss_grad` runs the forward, keeping what the backward
needs, then calls the ATen backward kernels autograd itself would call
(mm, threshold_backward, max_pool2d_with_indices_backward, convolution_backward
for the input only, nll_loss_backward, _log_softmax_backward_data). The result
equals torch.autograd.grad bit for bit (tests/test_inputgrad.py). Anything else
(other layer types or subclasses, hooks, a FeatureMask, a dtype other than the
parameters') gives plan() -> None and the caller uses autograd. `logits` runs the same
forward for attacks that only query the model (Square, FAB's checks).

Channels-last convolutions on CPU (CPU_CHANNELS_LAST): the convolutions run with their
weights in channels-last layout, so oneDNN keeps the activations NHWC and max-pooling takes
its NHWC kernel: the paper's CNN forward ran ~2x and its gradient ~1.5x faster on the Zen 4
measured (benchmarks/RESULTS.md). The function is the model's; the values are the layout's kernels',
equal to the NCHW ones up to float rounding, and where rounding flips which of two nearly
equal values a max-pool window picks the gradient flows through the other one (a
subgradient of the same function). So on CPU the gradient equals autograd's bit for bit on
the model converted with `model.to(memory_format=torch.channels_last)`, not on the NCHW
model. Attacks judge their results with the model itself. CPU_CHANNELS_LAST = False gives
the NCHW kernels (autograd's on the model as it is).

Micro-batches on CPU: every layer here treats samples independently, so a large
batch runs in equal pieces (of at least MIN_PIECE rows) whose largest activation
stays under CPU_CHUNK_BYTES. The reason is the allocator, not the arithmetic:
glibc serves blocks above its mmap threshold (at most 32 MiB) with fresh pages,
so each forward of a 500-image CNN batch (43 MB per conv activation) page-faults
its activations anew, about a third of the step's time here. The per-sample
values are the same kernels' on fewer rows: equal up to float rounding (GEMM and
convolution libraries may block a different row count differently; with pieces
of >= 32 rows they gave identical bits on the machines tested, see the tests).
Set CPU_CHUNK_BYTES = 0 to switch micro-batches off.
"""
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module
from torch.nn.modules.utils import _pair

__all__ = ["plan", "loss_grad", "value_grad", "logits", "pieces", "CPU_CHUNK_BYTES", "MIN_PIECE",
           "CPU_CHANNELS_LAST"]

CPU_CHUNK_BYTES = 8 << 20  # largest activation of one micro-batch on CPU; 0: no micro-batches
MIN_PIECE = 32             # rows per micro-batch at least (equal pieces, differing by at most 1)
CPU_CHANNELS_LAST = True   # convolutions with channels-last weights on CPU (see above)
_LEAVES = (nn.Flatten, nn.Linear, nn.ReLU, nn.Conv2d, nn.MaxPool2d, nn.Identity)
_A = torch.ops.aten
_per_sample = weakref.WeakKeyDictionary()  # model -> {(layer ids, shape, dtype): largest activation bytes per sample}


def _hooked(m):
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None))


def _global_hooks():
    return any(getattr(_module, name, None) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
        "_global_backward_pre_hooks"))


def _leaves(m, out):
    if _hooked(m):
        return False
    if type(m) is nn.Sequential:
        return all(_leaves(c, out) for c in m)
    if type(m) not in _LEAVES:
        return False
    if type(m) is nn.Conv2d and (m.padding_mode != "zeros" or isinstance(m.padding, str)):
        return False
    if type(m) is nn.MaxPool2d and m.return_indices:
        return False
    out.append(m)
    return True


def plan(model):
    """The model's layers in order when loss_grad can differentiate it, else None."""
    from .models import Net
    if _global_hooks():
        return None
    if type(model) is Net:
        if type(model.mask) is not nn.Identity or _hooked(model) or _hooked(model.mask):
            return None
        model = model.net
    layers = []
    if not _leaves(model, layers):
        return None
    params = [p for m in layers for p in m.parameters(recurse=False)]
    if not params or any(p.dtype != params[0].dtype or p.device != params[0].device for p in params):
        return None
    return layers


class _Unsupported(Exception):
    """A layer met an input it is not written for (e.g. Linear on a 3-D tensor): use autograd."""


def _forward(layers, x):
    """(logits, what each layer's backward needs)."""
    saved = []
    for m in layers:
        t = type(m)
        if t is nn.Linear:
            if x.dim() != 2:
                raise _Unsupported
            y = F.linear(x, m.weight, m.bias)
            saved.append(None)
        elif t is nn.ReLU:
            y = torch.relu(x)
            saved.append(y)
        elif t is nn.Conv2d:
            if x.dim() != 4:
                raise _Unsupported
            w = m.weight
            if CPU_CHANNELS_LAST and w.device.type == "cpu":
                w = w.to(memory_format=torch.channels_last)  # also where C_in = 1 (strides of a size-1 dim)
            y = F.conv2d(x, w, m.bias, m.stride, m.padding, m.dilation, m.groups)
            saved.append((x, w))
        elif t is nn.MaxPool2d:
            if x.dim() != 4:
                raise _Unsupported
            y, idx = F.max_pool2d(x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, True)
            saved.append((x, idx))
        elif t is nn.Flatten:
            y = x.flatten(m.start_dim, m.end_dim)
            saved.append(x.shape)
        else:  # Identity
            y = x
            saved.append(None)
        x = y
    return x, saved


def _backward(layers, saved, g):
    for m, s in zip(reversed(layers), reversed(saved)):
        t = type(m)
        if t is nn.Linear:
            g = g.mm(m.weight)
        elif t is nn.ReLU:
            g = _A.threshold_backward(g, s, 0)
        elif t is nn.Conv2d:
            x, w = s
            g = _A.convolution_backward(g, x, w, None, list(m.stride), list(m.padding), list(m.dilation),
                                        False, [0, 0], m.groups, [True, False, False])[0]
        elif t is nn.MaxPool2d:
            x, idx = s
            stride = m.stride if m.stride is not None else m.kernel_size
            g = _A.max_pool2d_with_indices_backward(g, x, _pair(m.kernel_size), _pair(stride), _pair(m.padding),
                                                    _pair(m.dilation), m.ceil_mode, idx)
        elif t is nn.Flatten:
            g = g.reshape(s)
    return g.contiguous()


def _one_value(layers, x, rows, fn):
    logits, saved = _forward(layers, x)
    if logits.dim() != 2:
        raise _Unsupported
    out, g = fn(logits, rows)
    return _backward(layers, saved, g), out, logits


def _one(layers, x, y, targeted):
    logits, saved = _forward(layers, x)
    if logits.dim() != 2:
        raise _Unsupported
    ls = torch.log_softmax(logits, 1)
    _, total = _A.nll_loss_forward(ls, y, None, 2, -100)  # reduction 2 = sum
    g = _A.nll_loss_backward(ls.new_full((), -1.0 if targeted else 1.0), ls, y, None, 2, -100, total)
    return _backward(layers, saved, _A._log_softmax_backward_data(g, ls, 1, ls.dtype))


def pieces(model, layers, x):
    """How many micro-batches x runs in on CPU (1: the whole batch at once)."""
    n = x.shape[0]
    if x.device.type != "cpu" or CPU_CHUNK_BYTES <= 0 or n < 2 * MIN_PIECE:
        return 1
    key = (tuple(id(m) for m in layers), tuple(x.shape[1:]), x.dtype)
    cache = _per_sample.setdefault(model, {})
    if key not in cache:
        with torch.no_grad():
            h, biggest = x[:1], x[:1].numel()
            for m in layers:
                h = m(h)
                biggest = max(biggest, h.numel())
        cache[key] = biggest * x.element_size()
    per_piece = max(1, CPU_CHUNK_BYTES // cache[key])
    return max(1, min(-(-n // per_piece), n // MIN_PIECE))


def _graph_free(model, layers, x, compute):
    """compute(x, k) under no_grad, x detached and k = pieces(model, layers, x) micro-batches;
    None when x's dtype or device differ from the parameters' or a layer meets an input
    shape it does not handle (then the caller uses autograd)."""
    p = next(p for m in layers for p in m.parameters(recurse=False))
    if x.dtype != p.dtype or x.device != p.device:
        return None
    x = x.detach()
    try:
        with torch.no_grad():
            return compute(x, pieces(model, layers, x))
    except _Unsupported:
        return None


def loss_grad(model, layers, x, y, targeted=False):
    """d(sum CE(model(x), y))/dx (its negative when targeted) through `layers` = plan(model);
    None when a layer meets an input shape it does not handle (then use autograd)."""
    def compute(x, k):
        if k == 1:
            return _one(layers, x, y, targeted)
        return torch.cat([_one(layers, xp, yp, targeted) for xp, yp in zip(x.tensor_split(k), y.tensor_split(k))])
    return _graph_free(model, layers, x, compute)


def logits(model, layers, x):
    """model(x) through `layers` = plan(model), under no_grad, in the micro-batches and layout of
    the gradients above; None when a layer meets an input it does not handle (use model(x))."""
    def compute(x, k):
        outs = [_forward(layers, xp)[0] for xp in (x.tensor_split(k) if k > 1 else (x,))]
        if outs[0].dim() != 2:
            raise _Unsupported
        return outs[0] if k == 1 else torch.cat(outs)
    return _graph_free(model, layers, x, compute)


def value_grad(model, layers, x, fn):
    """(d(sum_i L_i)/dx, L, logits) through `layers` = plan(model), for any per-sample loss
    given by fn(logits, rows) -> (L (n,), dL/dlogits (n x K)), where rows is the slice of x
    the logits belong to (micro-batches); None when a layer meets an input it does not handle."""
    def compute(x, k):
        if k == 1:
            return _one_value(layers, x, slice(0, x.shape[0]), fn)
        parts, i = [], 0
        for xp in x.tensor_split(k):
            parts.append(_one_value(layers, xp, slice(i, i + xp.shape[0]), fn))
            i += xp.shape[0]
        return tuple(torch.cat(t) for t in zip(*parts))
    return _graph_free(model, layers, x, compute)
