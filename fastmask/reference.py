"""Pure-PyTorch reference of every fastmask op, exactly as docs/ops.md specifies.

This file is the documentation-by-code of the ops, the fallback used when the C++
extension is absent, and the oracle the tests compare the kernels against. It runs
on any device (CPU or CUDA tensors) and does no argument checking: fastmask.ops
validates and then calls either the extension or these functions.

Conventions (docs/ops.md): element math runs in `opmath` (float32 for
float16/bfloat16/float32, float64 for float64) and is rounded to the tensor's dtype
once at the end; scalars are converted to opmath first. Seeds and offsets are
integers in [0, 2^64) (negative int64 values are read as two's complement).
Philox words are held in int64 tensors with values in [0, 2^32).
"""
import math

import torch

_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_U32 = 0xFFFFFFFF
_U64 = (1 << 64) - 1
_TWO_POW_M24 = 2.0 ** -24


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64, float32 for every other floating dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scalar(value, dtype, device):
    """A Python scalar converted to `dtype` (the opmath type) as a 0-d tensor."""
    return torch.tensor(float(value), dtype=dtype, device=device)


# ----------------------------------------------------------------------------- Philox

def _mulhilo(m: int, c: torch.Tensor):
    """(hi, lo) 32-bit halves of the 64-bit product m * c, for m, c < 2^32.

    int64 cannot hold the product, so c is split in 16-bit halves:
    m*c = a + b*2^16 with a = m*(c & 0xffff) < 2^48 and b = m*(c >> 16) < 2^48.
    """
    a = m * (c & 0xFFFF)
    b = m * (c >> 16)
    low = a + ((b & 0xFFFF) << 16)  # < 2^49: no overflow
    return (low >> 32) + (b >> 16), low & _U32


def philox_blocks(seed: int, offset: int, blocks: torch.Tensor) -> torch.Tensor:
    """Philox4x32-10 of the given block indices (int64 tensor): shape blocks.shape + (4,)."""
    seed, offset = seed & _U64, offset & _U64
    k0, k1 = seed & _U32, seed >> 32
    c0 = blocks & _U32
    c1 = (blocks >> 32) & _U32  # blocks >= 2^63 arrive as negative int64
    c2 = torch.full_like(blocks, offset & _U32)
    c3 = torch.full_like(blocks, offset >> 32)
    for r in range(10):
        if r > 0:
            k0, k1 = (k0 + _W0) & _U32, (k1 + _W1) & _U32
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return torch.stack([c0, c1, c2, c3], dim=-1)


def philox(seed: int, offset: int, n: int, device=None, start: int = 0) -> torch.Tensor:
    """Words start..start+n-1 of the stream (seed, offset): word k = lane k % 4 of block k // 4."""
    first, last = start // 4, (start + n + 3) // 4
    blocks = torch.arange(first, last, dtype=torch.int64, device=device)
    words = philox_blocks(seed, offset, blocks).reshape(-1)
    return words[start - 4 * first:start - 4 * first + n]


def uniform(words: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """u(w) = (w >> 8) * 2^-24 in [0, 1): exact in every float type of >= 24 bits."""
    return (words >> 8).to(dtype) * _TWO_POW_M24


def keep_threshold(ratio: float) -> int:
    """T(r) = ceil(r * 2^24) in float64 (exact): keep iff (w >> 8) >= T(r)."""
    return math.ceil(float(ratio) * 16777216.0)


# Gaussian: float32 Box-Muller from IEEE +, -, *, /, sqrt and exact bit operations in a
# fixed order (csrc/include/fastmask/philox.h does the same, so the kernels agree bit for
# bit). Constants are float32 values, written exactly in hex.
_F = lambda h: float.fromhex(h)  # noqa: E731
_LG1, _LG2, _LG3, _LG4 = _F("0x1.555554p-1"), _F("0x1.999c26p-2"), _F("0x1.23d3dcp-2"), _F("0x1.f13c4cp-3")
_LN2_HI, _LN2_LO = _F("0x1.62e3p-1"), _F("0x1.2fefa2p-17")
_S1, _S2, _S3 = _F("-0x1.9943f2p-13"), _F("0x1.11073cp-7"), _F("-0x1.555546p-3")
_C1, _C2, _C3 = _F("0x1.99eb9cp-16"), _F("-0x1.6c0c34p-10"), _F("0x1.55554ap-5")
_PI_2PM23 = _F("0x1.921fb6p+1") * 2.0 ** -23  # float32(pi) * 2^-23, exact


def logf(x: torch.Tensor) -> torch.Tensor:
    """ln(x) of a float32 tensor of positive normal numbers (fdlibm/musl logf, < 1 ulp).

    x = 2^k (1 + f) with 1 + f in [sqrt(2)/2, sqrt(2)) by integer operations on the bits;
    s = f / (2 + f); ln x = f - f^2/2 + s (f^2/2 + R) + k ln 2, R a polynomial in s^2.
    """
    ix = x.view(torch.int32) + (0x3F800000 - 0x3F3504F3)
    k = ((ix >> 23) - 0x7F).to(torch.float32)
    f = ((ix & 0x007FFFFF) + 0x3F3504F3).view(torch.float32) - 1.0
    s = f / (f + 2.0)
    z = s * s
    w = z * z
    t1 = w * (w * _LG4 + _LG2)
    t2 = z * (w * _LG3 + _LG1)
    R = t2 + t1
    hfsq = (f * 0.5) * f
    return ((((s * (hfsq + R)) + k * _LN2_LO) - hfsq) + f) + k * _LN2_HI


def cos2pi_q24(j: torch.Tensor) -> torch.Tensor:
    """cos(2 pi j 2^-24) in float32 for integers j in [0, 2^24) (< 2 ulp).

    Quadrant q = j >> 22, r = j mod 2^22, r' = min(r, 2^22 - r): x = r' (pi/2) 2^-22 in
    [0, pi/4], Cephes' sinf/cosf polynomials; cos, -sin, -cos, sin for q = 0..3, with
    sin and cos swapped where r' != r.
    """
    q, r = j >> 22, j & 0x3FFFFF
    swap = r > 0x200000
    x = torch.where(swap, 0x400000 - r, r).to(torch.float32) * _PI_2PM23
    z = x * x
    sn = ((((z * _S1 + _S2) * z + _S3) * z) * x) + x
    cs = (((((z * _C1 + _C2) * z + _C3) * z) * z) - z * 0.5) + 1.0
    v = torch.where((q & 1).bool() != swap, sn, cs)
    return torch.where((q == 1) | (q == 2), -v, v)


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 sqrt of x >= 0 (IEEE sqrtf, as the kernels use).

    torch.sqrt on CPU goes through MKL VML, which may be off by an ulp; so take its
    float64 result rounded to float32 as a candidate s and move it to the neighbour
    whose rounding interval holds sqrt(x). The midpoints m between s and its
    neighbours have 25 significant bits, so m * m is exact in float64 (no ties exist).
    """
    s = torch.sqrt(x.double()).float()
    lo, hi = torch.nextafter(s, torch.zeros_like(s)), torch.nextafter(s, torch.full_like(s, math.inf))
    x64, s64 = x.double(), s.double()
    m_lo, m_hi = (s64 + lo.double()) * 0.5, (s64 + hi.double()) * 0.5
    s = torch.where(x64 < m_lo * m_lo, lo, torch.where(x64 > m_hi * m_hi, hi, s))
    return torch.where(x == 0, x, s)  # sqrt(-0) = -0


def box_muller(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """float32 z = sqrt(-2 ln u1) cos(2 pi u2), u1 = ((a >> 8) + 1) 2^-24, u2 = (b >> 8) 2^-24."""
    u1 = ((a >> 8) + 1).to(torch.float32) * _TWO_POW_M24  # (0, 1], exact
    return sqrt_rn(logf(u1) * -2.0) * cos2pi_q24((b >> 8).to(torch.int32))


def normal(seed: int, offset: int, n: int, device=None, start: int = 0) -> torch.Tensor:
    """Gaussians start..start+n-1 (float32 Box-Muller, returned as float64): element k uses words 2k, 2k+1."""
    w = philox(seed, offset, 2 * n, device, start=2 * start).reshape(n, 2)
    return box_muller(w[:, 0], w[:, 1]).to(torch.float64)


# ----------------------------------------------------------------------------- masks

def _mask_units(N, C, scope, channels):
    """Shape of the mask units: the (n, c) planes that share one mask plane."""
    return (N if scope == "sample" else 1, C if channels == "separate" else 1)


def mask_generate(shape, ratio, seed, offset, mode="pixel", scope="sample",
                  channels="shared", device=None) -> torch.Tensor:
    """Bool mask of shape N x C x H x W, True = kept (docs/ops.md, mask_apply)."""
    N, C, H, W = (int(s) for s in shape)
    un, uc = _mask_units(N, C, scope, channels)
    if ratio == 0 or un * uc * H * W == 0:
        return torch.ones((N, C, H, W), dtype=torch.bool, device=device)
    if mode in ("pixel", "blur"):
        # mask index i = (unit * H + h) * W + w, unit = n, n*C + c, 0 or c.
        words = philox(seed, offset, un * uc * H * W, device)
        keep = (words >> 8) >= keep_threshold(ratio)
        return keep.reshape(un, uc, H, W).expand(N, C, H, W).contiguous()
    # block: one rectangle per unit, from the four words of Philox block `unit`.
    A = math.floor(float(ratio) * (H * W) + 0.5)
    if A == 0:
        return torch.ones((N, C, H, W), dtype=torch.bool, device=device)
    w = philox_blocks(seed, offset, torch.arange(un * uc, dtype=torch.int64, device=device))
    hmin, hmax = (A + W - 1) // W, min(H, A)
    h = hmin + w[:, 0] % (hmax - hmin + 1)
    wd = torch.clamp((2 * A + h) // (2 * h), max=W)  # round(A / h), half up
    top = w[:, 1] % (H - h + 1)
    left = w[:, 2] % (W - wd + 1)
    rows = torch.arange(H, device=device)[None, :]
    cols = torch.arange(W, device=device)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < (top + h)[:, None])  # units x H
    in_cols = (cols >= left[:, None]) & (cols < (left + wd)[:, None])  # units x W
    masked = in_rows[:, :, None] & in_cols[:, None, :]
    return (~masked).reshape(un, uc, H, W).expand(N, C, H, W).contiguous()


def _box_sum(t: torch.Tensor) -> torch.Tensor:
    """s[h, w] = sum of t over the in-bounds 3x3 neighbourhood, dh outer, dw inner.

    Out-of-bounds terms add +0, which leaves s unchanged bit for bit (s starts at +0),
    so zero padding gives exactly the spec's summation order.
    """
    H, W = t.shape[-2:]
    p = torch.nn.functional.pad(t, (1, 1, 1, 1))
    s = torch.zeros_like(t)
    for dh in (-1, 0, 1):
        for dw in (-1, 0, 1):
            s = s + p[..., 1 + dh:1 + dh + H, 1 + dw:1 + dw + W]
    return s


def _blur_count(H, W, dtype, device):
    """Number of in-bounds pixels of each 3x3 neighbourhood (9, 6, 4, ...), H x W."""
    return _box_sum(torch.ones((H, W), dtype=dtype, device=device))


def mask_apply(x, ratio, seed, offset, mode="pixel", scope="sample", channels="shared",
               fill=0.0) -> torch.Tensor:
    """y = where(mask, x, fill) (pixel, block) or where(mask, x, blur3x3(x)) (blur)."""
    if ratio == 0 or x.numel() == 0:
        return x.clone()
    keep = mask_generate(x.shape, ratio, seed, offset, mode, scope, channels, x.device)
    op = opmath_dtype(x.dtype)
    xo = x.to(op)
    if mode == "blur":
        H, W = x.shape[-2:]
        other = _box_sum(xo) / _blur_count(H, W, op, x.device)
    else:
        other = _scalar(fill, op, x.device)
    return torch.where(keep, xo, other).to(x.dtype)


def mask_apply_backward(grad, ratio, seed, offset, mode="pixel", scope="sample",
                        channels="shared") -> torch.Tensor:
    """Gradient of mask_apply w.r.t. x; the mask is regenerated from (seed, offset).

    pixel/block: grad where kept, 0 elsewhere.
    blur (exact adjoint): gx[q] = keep_q * g_q + sum_{p masked, q in N(p)} g_p / cnt_p.
    """
    if ratio == 0 or grad.numel() == 0:
        return grad.clone()
    keep = mask_generate(grad.shape, ratio, seed, offset, mode, scope, channels, grad.device)
    op = opmath_dtype(grad.dtype)
    g = grad.to(op)
    zero = torch.zeros((), dtype=op, device=grad.device)
    gx = torch.where(keep, g, zero)
    if mode == "blur":
        H, W = grad.shape[-2:]
        spread = torch.where(keep, zero, g / _blur_count(H, W, op, grad.device))
        gx = gx + _box_sum(spread)  # the 3x3 neighbourhood relation is symmetric
    return gx.to(grad.dtype)


# ----------------------------------------------------------------------------- attacks

def _sign(g: torch.Tensor) -> torch.Tensor:
    """(g > 0) - (g < 0): sign(0) = sign(NaN) = 0."""
    return (g > 0).to(g.dtype) - (g < 0).to(g.dtype)


def _clamp(t, lo, hi):
    """min(max(t, lo), hi), NaN-propagating (lo, hi: opmath 0-d tensors)."""
    return torch.minimum(torch.maximum(t, lo), hi)


def fgsm(x, grad, eps, lo=0.0, hi=1.0) -> torch.Tensor:
    """y = clamp(x + eps * sign(grad), lo, hi)."""
    op = opmath_dtype(x.dtype)
    s = lambda v: _scalar(v, op, x.device)  # noqa: E731
    y = x.to(op) + s(eps) * _sign(grad.to(op))
    return _clamp(y, s(lo), s(hi)).to(x.dtype)


def _per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    """||t_n||_2 over all but dim 0, accumulated in float64: shape N x 1 x ... x 1."""
    t64 = t.to(torch.float64).reshape(t.shape[0], math.prod(t.shape[1:]))
    return t64.pow(2).sum(dim=1).sqrt().reshape((-1,) + (1,) * (t.dim() - 1))


def pgd_step(x_adv, x_nat, grad, alpha, eps, lo=0.0, hi=1.0, norm="inf") -> torch.Tensor:
    """One projected-gradient step (docs/ops.md, pgd_step)."""
    op = opmath_dtype(x_adv.dtype)
    s = lambda v: _scalar(v, op, x_adv.device)  # noqa: E731
    xa, xn, g = x_adv.to(op), x_nat.to(op), grad.to(op)
    if norm == "inf":
        v = xa + s(alpha) * _sign(g)
        below, above = xn - s(eps), xn + s(eps)
        y = torch.minimum(torch.maximum(v, below), above)
    else:  # "2": per sample n along dim 0
        gscale = (alpha / _per_sample_norm(grad).clamp_min(1e-12)).to(op)
        d = (xa + g * gscale) - xn
        dscale = (eps / _per_sample_norm(d).clamp_min(1e-12)).clamp_max(1.0).to(op)
        y = xn + d * dscale
    return _clamp(y, s(lo), s(hi)).to(x_adv.dtype)


def pgd_step_(x_adv, x_nat, grad, alpha, eps, lo=0.0, hi=1.0, norm="inf") -> None:
    """pgd_step written into x_adv."""
    x_adv.copy_(pgd_step(x_adv, x_nat, grad, alpha, eps, lo, hi, norm))


def random_start(x, eps, seed, offset, norm="inf", lo=0.0, hi=1.0) -> torch.Tensor:
    """x plus a uniform point of the eps-ball (L-inf cube or L2 ball), clamped."""
    op = opmath_dtype(x.dtype)
    s = lambda v: _scalar(v, op, x.device)  # noqa: E731
    xo = x.to(op)
    n = x.numel()
    if norm == "inf":
        u = uniform(philox(seed, offset, n, x.device), op).reshape(x.shape)
        y = xo + s(eps) * (2 * u - 1)
    else:  # "2": element k of sample n uses Gaussian k; radius uses word 2*numel + n
        N = x.shape[0]
        if n == 0:
            return x.clone()
        D = n // N
        z = normal(seed, offset, n, x.device).reshape(x.shape)
        u = uniform(philox(seed, offset, N, x.device, start=2 * n), torch.float64)
        r = (eps * u.pow(1.0 / D)).reshape((-1,) + (1,) * (x.dim() - 1))
        f = r / _per_sample_norm(z).clamp_min(1e-12)
        y = xo + (z * f).to(op)
    return _clamp(y, s(lo), s(hi)).to(x.dtype)


# ----------------------------------------------------------------------------- learned mask

def learned_mask_apply(x, logits) -> torch.Tensor:
    """y[n] = x[n] * sigmoid(logits): x is N x F..., logits F... (x's dtype); the product in opmath."""
    op = opmath_dtype(x.dtype)
    return (x.to(op) * torch.sigmoid(logits).to(op)).to(x.dtype)


def learned_mask_apply_backward(grad, x, logits) -> torch.Tensor:
    """The logits' gradient of learned_mask_apply: (gsum * (1 - s)) * s in opmath, s = sigmoid(logits),
    gsum = sum over the batch of grad * x, in float64, added in batch order (cumsum is sequential)."""
    op = opmath_dtype(x.dtype)
    s = torch.sigmoid(logits).to(op)
    if x.shape[0] == 0:
        gsum = torch.zeros(logits.shape, dtype=torch.float64, device=x.device)
    else:
        gsum = (grad.to(torch.float64) * x.to(torch.float64)).cumsum(0)[-1]
    return ((gsum.to(op) * (1 - s)) * s).to(x.dtype)


# ----------------------------------------------------------------------------- gradients

def grad_clip_noise_(grads, max_norm=None, noise_std=0.0, seed=0, offset=0,
                     clip_value=None, smoothing=None, state=()) -> torch.Tensor:
    """Clip by global norm, clamp, add Gaussian noise, smooth; in place on grads/state.

    Returns the global L2 norm before clipping (0-d; float64 if grads[0] is float64,
    else float32). Global element k runs over the grads in list order, C-contiguous.
    """
    if len(grads) == 0:
        return torch.zeros((), dtype=torch.float32)
    device = grads[0].device
    total = torch.zeros((), dtype=torch.float64, device=device)
    for g in grads:
        total = total + g.to(torch.float64).pow(2).sum()
    total = total.sqrt()
    scale = None
    if max_norm is not None:
        scale = (max_norm / (total + 1e-6)).clamp_max(1.0)
    k = 0  # global element index of the first element of g
    for i, g in enumerate(grads):
        op = opmath_dtype(g.dtype)
        t = g.to(op)
        if scale is not None:
            t = t * scale.to(op)
        if clip_value is not None:
            t = _clamp(t, _scalar(-clip_value, op, device), _scalar(clip_value, op, device))
        if noise_std > 0:
            z = normal(seed, offset, g.numel(), device, start=k).reshape(g.shape)
            t = t + (noise_std * z).to(op)
        if smoothing is not None:
            beta = _scalar(smoothing, op, device)
            t = beta * state[i].to(op) + (1 - beta) * t
            state[i].copy_(t.to(state[i].dtype))
        g.copy_(t.to(g.dtype))
        k += g.numel()
    return total.to(torch.float64 if grads[0].dtype == torch.float64 else torch.float32)


def project_linf(t, w, b, lo=0.0, hi=1.0):
    """FAB's L-inf projection (ops.project_linf) by a full sort of the breakpoints: the
    L-inf-smallest d with <w, t + d> = b and lo <= t + d <= hi, per row (t, w: N x D; b: N).

    With c = <w, t> - b >= 0 (else flip w and b), the best move of L-inf size lam is
    d_i = -sign(w_i) min(lam, room_i), room_i the distance from t_i to the box face that
    lowers <w, x>; f(lam) = sum |w_i| min(lam, room_i) is piecewise linear and increasing,
    so lam solves f(lam) = c on the segment found among the sorted rooms. When no lam
    reaches c inside the box, d goes all the way to that corner (the original's rule).
    """
    c = (w * t).sum(1) - b
    flip = torch.where(c < 0, -1.0, 1.0).to(t.dtype)
    w, c = w * flip[:, None], c * flip
    aw = w.abs()
    room = torch.where(w > 0, t - lo, hi - t).clamp_(min=0)
    room_s, order = room.sort(dim=1)
    aw_s = aw.gather(1, order)
    mass = aw_s * room_s
    below = torch.cumsum(mass, 1).sub_(mass)                   # sum_{j<k} |w_j| room_j
    above = aw_s.flip(1).cumsum(1).flip(1)                     # sum_{j>=k} |w_j|
    f_k = below + room_s * above                               # f at the k-th breakpoint
    k = torch.searchsorted(f_k, c[:, None].contiguous()).squeeze(1)   # first breakpoint with f >= c
    feasible = k < t.shape[1]
    kk = k.clamp(max=t.shape[1] - 1)[:, None]
    lam = (c - below.gather(1, kk)[:, 0]) / above.gather(1, kk)[:, 0].clamp_min(1e-30)
    lam = torch.where(feasible, lam, torch.full_like(lam, float("inf")))
    return torch.sign(w).neg_().mul_(torch.minimum(lam[:, None], room))  # where w == 0: -0 * step = 0
