"""Public fastmask ops: validation, dispatch to the C++ extension or the reference.

Every function checks its arguments (ValueError/TypeError naming the argument and
its value), then calls `torch.ops.fastmask.*` from the compiled extension
`fastmask._C` or, when that is absent or FASTMASK_DISABLE_EXT=1, the pure-PyTorch
reference in fastmask/reference.py. The exact semantics are in docs/ops.md.

When the extension is loaded this module also registers fake kernels for every op
(torch.compile, torch.library.opcheck). The autograd of mask_apply is C++
(csrc/autograd.cpp): its backward regenerates the mask from (seed, offset) with
mask_apply_backward; nothing is stored. In fallback mode the reference is plain
torch, so autograd and torch.compile work natively (learned_mask_apply's backward
there is the reference's, in a small autograd.Function, so both paths compute the
same gradient).

Seeds and offsets are integers in [0, 2^64). `mask_apply` also takes the offset as
a 0-d integer tensor (e.g. a counter buffer, see fastmask.nn.FeatureMask): the
value is then read inside a custom op, so torch.compile traces it once instead of
recompiling for each offset.

The attack-step ops (fgsm, pgd_step, random_start) are not differentiable: their
inputs are detached and the result never requires grad.
"""
import numbers
import os
from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from fastmask import _checks as C
from fastmask import reference

__all__ = [
    "philox", "mask_apply", "mask_generate", "fgsm", "pgd_step", "pgd_step_",
    "random_start", "grad_clip_noise_", "learned_mask_apply", "project_linf", "extension_loaded", "build_info",
    "MODES", "SCOPES", "CHANNELS", "NORMS",
]

MODES, SCOPES, CHANNELS, NORMS = C.MODES, C.SCOPES, C.CHANNELS, C.NORMS
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _load_extension() -> bool:
    if os.environ.get("FASTMASK_DISABLE_EXT", "") == "1":
        return False
    try:
        from fastmask import _C  # noqa: F401  (importing registers torch.ops.fastmask.*)
    except (ImportError, OSError):
        return False
    return hasattr(torch.ops.fastmask, "mask_apply")


_ext_available = _load_extension()
# Module-level switch: the ops call the extension while this is True. Tests set it
# to False to run the same checks through the reference (the fallback path).
_use_ext = _ext_available
# FeatureMask's training draw in one call (the counter, the op, the scale: csrc/register.cpp),
# which fastmask.nn uses while _use_ext is True
if _ext_available:
    from fastmask._C import _mask_step
else:
    _mask_step = None


def extension_loaded() -> bool:
    """True when the ops run on the compiled extension, False on the reference."""
    return _use_ext


def build_info() -> dict:
    """How the ops run here: {"extension": bool, "cpu_isa": "avx512" | "avx2" | "scalar" |
    None, ...}. cpu_isa is the ISA of the Philox-bound CPU kernels (pixel masks,
    random_start, grad_clip_noise_'s noise), picked at load time from the CPU and capped
    by the FASTMASK_CPU_ISA environment variable; None on the reference fallback."""
    if not _use_ext:
        return {"extension": False, "cpu_isa": None}
    from fastmask import _C
    return {"extension": True, **_C.build_info()}


# ----------------------------------------------------------------------------- checks

# the scalar checks are fastmask._checks (one set for ops, nn, attacks, the configs and the CLI)
_number = C.number
_u64 = C.u64  # seeds and offsets: int64 two's complement, as the C++ schema takes them
_choice = C.choice
_bounds = C.bounds
_mask_args = C.mask_args


def _fill(fill) -> float:
    return C.fill("fill", fill)


def _ratio(ratio) -> float:
    return C.ratio("ratio", ratio)


def _norm(norm) -> str:
    return C.norm("norm", norm)


def _eps(eps) -> float:
    return C.eps("eps", eps)


def _float_tensor(name: str, t) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32, "
                        f"float64), got {t.dtype}")
    return t


def _like(name: str, t, ref_name: str, ref: Tensor) -> Tensor:
    _float_tensor(name, t)
    if t.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, "
                         f"got {tuple(t.shape)}")
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), "
                         f"got {t.device}")
    return t


def _writable(name: str, t: Tensor) -> Tensor:
    """An in-place output must not overlap itself (e.g. an expanded tensor): refuse it
    before anything is written (a list op would otherwise be left half-updated)."""
    if torch._debug_has_internal_overlap(t) == 1:
        raise ValueError(f"{name} has internally overlapping memory (e.g. an expanded tensor, "
                         f"stride {tuple(t.stride())}) and cannot be written in place; pass a .clone()")
    return t


def _out(out, x: Tensor) -> Tensor:
    """The out= tensor of fgsm / mask_apply / random_start: like x, writable, and not
    part of an autograd graph (as for torch's own out= functions)."""
    if not isinstance(out, Tensor):
        raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
    _like("out", out, "x", x)
    _writable("out", out)
    if torch.is_grad_enabled() and (out.requires_grad or x.requires_grad):
        raise ValueError("out= does not support autograd: x or out requires grad; call it under "
                         "torch.no_grad() or without out=")
    return out


# ----------------------------------------------------------------------------- ops

def philox(seed: int, offset: int, n: int, device=None) -> Tensor:
    """Words 0..n-1 of the Philox4x32-10 stream (seed, offset), as int64 in [0, 2^32).

    Word k is lane k % 4 of block k // 4; block b has counter (b, offset), key seed.
    """
    seed, offset = _u64("seed", seed), _u64("offset", offset)
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    device = torch.device(device) if device is not None else None
    if _use_ext:
        return torch.ops.fastmask.philox(seed, offset, int(n), device)
    return reference.philox(seed, offset, int(n), device)


def mask_generate(shape: Sequence[int], ratio: float, *, seed: int, offset: int = 0,
                  mode: str = "pixel", scope: str = "sample", channels: str = "shared",
                  device=None) -> Tensor:
    """The bool mask (True = kept) that mask_apply uses for an input of `shape` (N, C, H, W).

    mode: "pixel" (each element masked with probability ratio), "block" (one
    rectangle of area round(ratio*H*W) per mask unit) or "blur" (as pixel).
    scope: "sample" (a different mask per sample) or "fixed" (one mask for all).
    channels: "shared" (one mask for all channels) or "separate" (one per channel).
    """
    if isinstance(shape, Tensor) or not isinstance(shape, (list, tuple, torch.Size)) \
            or len(shape) != 4 or not all(isinstance(s, numbers.Integral) and not
                                          isinstance(s, bool) and s >= 0 for s in shape):
        raise ValueError(f"shape must be 4 non-negative integers (N, C, H, W), got {shape!r}")
    ratio, mode, scope, channels = _mask_args(ratio, mode, scope, channels)
    seed, offset = _u64("seed", seed), _u64("offset", offset)
    shape = [int(s) for s in shape]
    device = torch.device(device) if device is not None else None
    if _use_ext:
        return torch.ops.fastmask.mask_generate(shape, ratio, seed, offset, mode, scope,
                                                channels, device)
    return reference.mask_generate(shape, ratio, seed, offset, mode, scope, channels, device)


def _mask_apply_int(x, ratio, seed, offset, mode, scope, channels, fill):
    if _use_ext:
        return torch.ops.fastmask.mask_apply(x, ratio, seed, offset, mode, scope, channels, fill)
    return reference.mask_apply(x, ratio, seed, offset, mode, scope, channels, fill)


def mask_apply(x: Tensor, ratio: float, *, seed: int, offset: Union[int, Tensor] = 0,
               mode: str = "pixel", scope: str = "sample", channels: str = "shared",
               fill: float = 0.0, out: Optional[Tensor] = None) -> Tensor:
    """Mask the N x C x H x W input x with the mask of (seed, offset).

    pixel/block: masked elements are set to `fill`; blur: replaced by the mean of
    their 3x3 neighbourhood (fill unused). ratio 0 returns a copy of x, no RNG.
    Differentiable w.r.t. x (the backward regenerates the mask, nothing is stored).
    `offset` may be an int in [0, 2^64) or a 0-d integer tensor (read as int64 two's
    complement), which lets torch.compile trace one graph for every offset.
    out: write the result into this tensor (shape, dtype and device of x; may be x
    itself) and return it: no new allocation, no autograd.
    """
    _float_tensor("x", x)
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    ratio, mode, scope, channels = _mask_args(ratio, mode, scope, channels)
    seed = _u64("seed", seed)
    fill = _fill(fill)
    if out is not None:
        _out(out, x)
        if isinstance(offset, Tensor):
            raise TypeError("out= takes an int offset, not a tensor")
        offset = _u64("offset", offset)
        if _use_ext:
            torch.ops.fastmask.mask_apply_out(x, ratio, seed, offset, mode, scope, channels, fill, out)
        else:
            out.copy_(reference.mask_apply(x, ratio, seed, offset, mode, scope, channels, fill))
        return out
    if isinstance(offset, Tensor):
        if offset.dim() != 0 or offset.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"offset tensor must be a 0-d int64 or int32 tensor, got shape "
                             f"{tuple(offset.shape)} dtype {offset.dtype}")
        # a copy, so that changing the caller's counter later cannot change the backward
        return torch.ops.fastmask_py.mask_apply_at(x, ratio, seed, offset.detach().clone(),
                                                   mode, scope, channels, fill)
    return _mask_apply_int(x, ratio, seed, _u64("offset", offset), mode, scope, channels, fill)


def fgsm(x: Tensor, grad: Tensor, eps: float, lo: float = 0.0, hi: float = 1.0, *,
         out: Optional[Tensor] = None) -> Tensor:
    """y = clamp(x + eps * sign(grad), lo, hi), with sign(0) = sign(NaN) = 0.
    out: write y into this tensor (like x; may be x itself) and return it."""
    _float_tensor("x", x)
    _like("grad", grad, "x", x)
    eps = _eps(eps)
    lo, hi = _bounds(lo, hi)
    x, grad = x.detach(), grad.detach()
    if out is not None:
        _out(out, x)
        if _use_ext:
            torch.ops.fastmask.fgsm_out(x, grad, eps, lo, hi, out)
        else:
            out.copy_(reference.fgsm(x, grad, eps, lo, hi))
        return out
    if _use_ext:
        return torch.ops.fastmask.fgsm(x, grad, eps, lo, hi)
    return reference.fgsm(x, grad, eps, lo, hi)


def _pgd_args(x_adv, x_nat, grad, alpha, eps, lo, hi, norm):
    _float_tensor("x_adv", x_adv)
    _like("x_nat", x_nat, "x_adv", x_adv)
    _like("grad", grad, "x_adv", x_adv)
    alpha = _number("alpha", alpha)
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    eps = _eps(eps)
    lo, hi = _bounds(lo, hi)
    norm = _norm(norm)
    if norm == "2" and x_adv.dim() == 0:
        raise ValueError("x_adv must have a batch dimension (dim 0) for norm '2', got a 0-d tensor")
    return x_adv.detach(), x_nat.detach(), grad.detach(), alpha, eps, lo, hi, norm


def pgd_step(x_adv: Tensor, x_nat: Tensor, grad: Tensor, alpha: float, eps: float,
             lo: float = 0.0, hi: float = 1.0, norm: str = "inf") -> Tensor:
    """One PGD step from x_adv along grad, projected on the eps-ball around x_nat.

    norm "inf": clamp(min(max(x_adv + alpha*sign(grad), x_nat - eps), x_nat + eps), lo, hi).
    norm "2": per sample (dim 0) a step of length alpha along grad/||grad||, then the
    difference to x_nat is rescaled into the L2 ball of radius eps, then clamped.
    """
    args = _pgd_args(x_adv, x_nat, grad, alpha, eps, lo, hi, norm)
    if _use_ext:
        return torch.ops.fastmask.pgd_step(*args)
    return reference.pgd_step(*args)


def pgd_step_(x_adv: Tensor, x_nat: Tensor, grad: Tensor, alpha: float, eps: float,
              lo: float = 0.0, hi: float = 1.0, norm: str = "inf") -> Tensor:
    """pgd_step written into x_adv in place; returns x_adv."""
    args = _pgd_args(x_adv, x_nat, grad, alpha, eps, lo, hi, norm)
    _writable("x_adv", x_adv)
    if _use_ext:
        torch.ops.fastmask.pgd_step_(*args)
    else:
        reference.pgd_step_(*args)
    return x_adv


def random_start(x: Tensor, eps: float, *, seed: int, offset: int = 0, norm: str = "inf",
                 lo: float = 0.0, hi: float = 1.0, out: Optional[Tensor] = None) -> Tensor:
    """x plus a uniform random point of the eps-ball (L-inf cube or, per sample, L2 ball),
    clamped to [lo, hi]. out: write the result into this tensor (like x; may be x
    itself) and return it."""
    _float_tensor("x", x)
    eps = _eps(eps)
    seed, offset = _u64("seed", seed), _u64("offset", offset)
    norm = _norm(norm)
    lo, hi = _bounds(lo, hi)
    if norm == "2" and x.dim() == 0:
        raise ValueError("x must have a batch dimension (dim 0) for norm '2', got a 0-d tensor")
    x = x.detach()
    if out is not None:
        _out(out, x)
        if _use_ext:
            torch.ops.fastmask.random_start_out(x, eps, seed, offset, norm, lo, hi, out)
        else:
            out.copy_(reference.random_start(x, eps, seed, offset, norm, lo, hi))
        return out
    if _use_ext:
        return torch.ops.fastmask.random_start(x, eps, seed, offset, norm, lo, hi)
    return reference.random_start(x, eps, seed, offset, norm, lo, hi)


def project_linf(t: Tensor, w: Tensor, b: Tensor, lo: float = 0.0, hi: float = 1.0) -> Tensor:
    """FAB's L-inf projection: per row, the L-inf-smallest d with <w, t + d> = b and lo <= t + d <= hi.

    Args:
        t, w: Tensor[N, D] of one floating dtype and device; b: Tensor[N] of that dtype.
        lo, hi: the box (lo <= hi).
    Returns:
        d (N x D): with c = <w, t> - b >= 0 (else w and c flipped), d_i = -sign(w_i) min(lam, room_i),
        room_i the distance from t_i to the face that lowers <w, x>, lam the least with
        sum_i |w_i| min(lam, room_i) >= c; where no lam inside the box reaches c, d goes all the
        way to that corner (the original's rule). The CPU kernel (float32 / float64) finds lam by
        selection with float64 sums, the reference (other devices and dtypes) by a sort: the same
        lam up to rounding (docs/ops.md).
    """
    for name, v in (("t", t), ("w", w), ("b", b)):
        _float_tensor(name, v)
    if t.dim() != 2 or w.shape != t.shape:
        raise ValueError(f"t and w must be N x D of one shape, got t {tuple(t.shape)} and w {tuple(w.shape)}")
    if b.shape != t.shape[:1]:
        raise ValueError(f"b must have shape ({t.shape[0]},), got {tuple(b.shape)}")
    if w.dtype != t.dtype or b.dtype != t.dtype or w.device != t.device or b.device != t.device:
        raise ValueError(f"t, w and b must share dtype and device, got {t.dtype}/{t.device}, "
                         f"{w.dtype}/{w.device}, {b.dtype}/{b.device}")
    lo, hi = _bounds(lo, hi)
    if _use_ext and t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64):
        return torch.ops.fastmask.project_linf(t, w, b, lo, hi)
    return reference.project_linf(t, w, b, lo, hi)


def grad_clip_noise_(grads: Sequence[Tensor], max_norm: Optional[float] = None,
                     noise_std: float = 0.0, *, seed: int, offset: int = 0,
                     clip_value: Optional[float] = None, smoothing: Optional[float] = None,
                     state: Optional[Sequence[Tensor]] = None) -> Tensor:
    """Gradient manipulation in place, in this order (docs/ops.md):

    1. norm = global L2 norm of all grads (float64 accumulation);
    2. max_norm: scale every grad by min(1, max_norm / (norm + 1e-6));
    3. clip_value: clamp every element to [-clip_value, clip_value];
    4. noise_std > 0: add noise_std * z_k, z_k the Gaussian of global element k of
       the stream (seed, offset) (k runs over the grads in list order);
    5. smoothing beta: s <- beta*s + (1 - beta)*g, g <- s (state: tensors like grads).

    Returns the norm before clipping (0-d; float64 for float64 grads, else float32).
    """
    if isinstance(grads, Tensor) or not isinstance(grads, (list, tuple)):
        raise TypeError(f"grads must be a list of tensors, got {type(grads).__name__}")
    grads = list(grads)
    for i, g in enumerate(grads):
        _float_tensor(f"grads[{i}]", g)
        _writable(f"grads[{i}]", g)
        if g.device != grads[0].device:
            raise ValueError(f"grads[{i}] must be on the device of grads[0] ({grads[0].device}), "
                             f"got {g.device}")
    if max_norm is not None:
        max_norm = _number("max_norm", max_norm)
        if max_norm <= 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm}")
    noise_std = _number("noise_std", noise_std)
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    if clip_value is not None:
        clip_value = _number("clip_value", clip_value)
        if clip_value <= 0:
            raise ValueError(f"clip_value must be > 0, got {clip_value}")
    seed, offset = _u64("seed", seed), _u64("offset", offset)
    state = [] if state is None else list(state)
    if smoothing is not None:
        smoothing = _number("smoothing", smoothing)
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        if len(state) != len(grads):
            raise ValueError(f"state must be a list of {len(grads)} tensors like grads when "
                             f"smoothing is set, got {len(state)}")
        for i, (s, g) in enumerate(zip(state, grads)):
            _like(f"state[{i}]", s, f"grads[{i}]", g)
            _writable(f"state[{i}]", s)
    elif state:
        raise ValueError(f"state must be empty when smoothing is None, got {len(state)} tensors")
    with torch.no_grad():
        if _use_ext:
            return torch.ops.fastmask.grad_clip_noise_(grads, max_norm, noise_std, seed, offset,
                                                       clip_value, smoothing, state)
        return reference.grad_clip_noise_(grads, max_norm, noise_std, seed, offset, clip_value,
                                          smoothing, state)


class _LearnedMaskReference(torch.autograd.Function):
    """The fallback's autograd: the reference's backward, the same math as the C++ one."""

    @staticmethod
    def forward(ctx, x, logits):
        ctx.save_for_backward(x, logits)
        return reference.learned_mask_apply(x, logits)

    @staticmethod
    def backward(ctx, g):
        x, logits = ctx.saved_tensors
        gx = reference.learned_mask_apply(g, logits) if ctx.needs_input_grad[0] else None
        gl = reference.learned_mask_apply_backward(g, x, logits) if ctx.needs_input_grad[1] else None
        return gx, gl


def learned_mask_apply(x: Tensor, logits: Tensor) -> Tensor:
    """The learned soft mask: y[n] = x[n] * sigmoid(logits), one fused op forward and backward.

    Args:
        x: Tensor[N, ...] (any sample shape F).
        logits: Tensor[F], x's dtype and device.
    Returns:
        Tensor[N, ...] like x. Differentiable w.r.t. x (grad * sigmoid(logits)) and logits
        (the batch sum of grad * x, accumulated in float64, times s (1 - s)); docs/ops.md.
    """
    _float_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have a batch dimension (dim >= 1), got a 0-d tensor")
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.shape != x.shape[1:]:
        raise ValueError(f"logits must have the shape of one sample of x {tuple(x.shape[1:])}, "
                         f"got {tuple(logits.shape)}")
    if logits.dtype != x.dtype:
        raise ValueError(f"logits must have the dtype of x ({x.dtype}), got {logits.dtype}")
    if logits.device != x.device:
        raise ValueError(f"logits must be on the device of x ({x.device}), got {logits.device}")
    if _use_ext:
        return torch.ops.fastmask.learned_mask_apply(x, logits)
    return _LearnedMaskReference.apply(x, logits)


# ----------------------------------------------------------------- offset-as-tensor op
# mask_apply with the offset in a 0-d tensor: torch.compile sees one opaque op whose
# inputs do not change between calls, so a counter buffer costs no recompilation.

@torch.library.custom_op("fastmask_py::mask_apply_at", mutates_args=())
def _mask_apply_at(x: Tensor, ratio: float, seed: int, offset: Tensor, mode: str, scope: str,
                   channels: str, fill: float) -> Tensor:
    return _mask_apply_int(x.contiguous(), ratio, seed, int(offset), mode, scope, channels,
                           fill).contiguous()


@torch.library.custom_op("fastmask_py::mask_apply_backward_at", mutates_args=())
def _mask_apply_backward_at(grad: Tensor, ratio: float, seed: int, offset: Tensor, mode: str,
                            scope: str, channels: str) -> Tensor:
    grad = grad.contiguous()
    offset = int(offset)
    if _use_ext:
        return torch.ops.fastmask.mask_apply_backward(grad, ratio, seed, offset, mode, scope,
                                                      channels)
    return reference.mask_apply_backward(grad, ratio, seed, offset, mode, scope, channels)


@_mask_apply_at.register_fake
def _(x, ratio, seed, offset, mode, scope, channels, fill):
    return x.new_empty(x.shape)


@_mask_apply_backward_at.register_fake
def _(grad, ratio, seed, offset, mode, scope, channels):
    return grad.new_empty(grad.shape)


def _at_setup(ctx, inputs, output):
    ctx.args = inputs[1:7]  # ratio, seed, offset, mode, scope, channels


def _at_backward(ctx, g):
    ratio, seed, offset, mode, scope, channels = ctx.args
    gx = torch.ops.fastmask_py.mask_apply_backward_at(g, ratio, seed, offset, mode, scope,
                                                      channels)
    return (gx,) + (None,) * 7


def _at_double_backward(ctx, gg):
    # mask_apply_backward is linear in grad; its adjoint is the linear part of
    # mask_apply, i.e. mask_apply with fill 0.
    ratio, seed, offset, mode, scope, channels = ctx.args
    return (torch.ops.fastmask_py.mask_apply_at(gg, ratio, seed, offset, mode, scope,
                                                channels, 0.0),) + (None,) * 6


_mask_apply_at.register_autograd(_at_backward, setup_context=_at_setup)
_mask_apply_backward_at.register_autograd(_at_double_backward, setup_context=_at_setup)


# ----------------------------------------------- fake kernels and autograd (extension)

def _register_extension_kernels() -> None:
    def fake(name):
        qualname = f"fastmask::{name}"
        # philox/mask_generate are CompositeExplicitAutograd in C++ (they handle meta).
        if torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Meta"):
            return lambda fn: fn
        return torch.library.register_fake(qualname)

    @fake("philox")
    def _(seed, offset, n, device=None):
        return torch.empty((n,), dtype=torch.int64, device=device)

    @fake("mask_generate")
    def _(shape, ratio, seed, offset, mode, scope, channels, device=None):
        return torch.empty(shape, dtype=torch.bool, device=device)

    @fake("mask_apply")
    def _(x, ratio, seed, offset, mode, scope, channels, fill):
        return x.new_empty(x.shape)

    @fake("mask_apply_backward")
    def _(grad, ratio, seed, offset, mode, scope, channels):
        return grad.new_empty(grad.shape)

    @fake("fgsm")
    def _(x, grad, eps, lo, hi):
        return x.new_empty(x.shape)

    @fake("pgd_step")
    def _(x_adv, x_nat, grad, alpha, eps, lo, hi, norm):
        return x_adv.new_empty(x_adv.shape)

    @fake("pgd_step_")
    def _(x_adv, x_nat, grad, alpha, eps, lo, hi, norm):
        return None

    @fake("random_start")
    def _(x, eps, seed, offset, norm, lo, hi):
        return x.new_empty(x.shape)

    @fake("mask_apply_out")
    def _(x, ratio, seed, offset, mask_mode, scope, channels, fill, out):
        return None

    @fake("fgsm_out")
    def _(x, grad, eps, lo, hi, out):
        return None

    @fake("random_start_out")
    def _(x, eps, seed, offset, norm, lo, hi, out):
        return None

    @fake("learned_mask_apply")
    def _(x, logits):
        return x.new_empty(x.shape)

    @fake("learned_mask_apply_backward")
    def _(grad, x, logits):
        return logits.new_empty(logits.shape)

    @fake("project_linf")
    def _(t, w, b, lo, hi):
        return t.new_empty(t.shape)

    @fake("grad_clip_noise_")
    def _(grads, max_norm, noise_std, seed, offset, clip_value, smoothing, state):
        if len(grads) == 0:
            return torch.empty((), dtype=torch.float32)
        dtype = torch.float64 if grads[0].dtype == torch.float64 else torch.float32
        return grads[0].new_empty((), dtype=dtype)

    # Autograd of mask_apply / mask_apply_backward / learned_mask_apply is C++ (csrc/autograd.cpp).


if _ext_available:
    _register_extension_kernels()
