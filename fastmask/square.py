"""Square Attack, L-inf and L2 (Andriushchenko et al., ECCV 2020), as autoattack/square.py of
fra31/auto-attack.

A score-based attack: no gradients, only forwards. It starts from vertical stripes
(x + eps * a random sign per sample, channel and column), then at every iteration
proposes, for each sample still classified correctly, one square window of side
s (from the p schedule) set to x_best + 2 eps * (a random sign per channel),
projected back onto the ball and [lo, hi], and keeps it where the margin loss
z_y - max_{i != y} z_i decreases (or the point becomes misclassified). One query
per iteration per still-robust sample, all of them in one forward; a sample
stops costing queries the moment it is misclassified.

Random draws: fastmask's Philox (ops.philox), so a run is bit-reproducible and the
same on CPU and CUDA. With j = the sample's row in x (its row in the whole input,
batches included) and TAG = 0x5351 << 48:
  stripes:      philox(seed, TAG, N*C*W), word j*C*W + c*W + w, bit 0: sign of
                (sample j, channel c, column w) (1: +, 0: -);
  iteration t:  philox(seed, TAG | (t + 1), 4*N), block j = words 4j..4j+3:
                w0 -> row vh = (w0 * (H - s)) >> 32, w1 -> column vw = (w1 * (W - s)) >> 32
                (in [0, H - s), as the original's random_int), bit c of w2 -> sign of channel c.
Unlike the original, which draws one window and one sign vector for the whole
batch per iteration, every sample draws its own: a sample's proposals do not depend
on the others in its batch (its losses may, by float rounding in the model's GEMMs).

L2 (norm="2"): the start is a grid of s x s squares (s = H // 5), each holding the
centred pattern eta(s) (positive top half, negative bottom half, peaked at the centres)
times a random sign per channel, rescaled to norm eps. A proposal moves the perturbation's
mass of one s x s window (s odd, >= 3, from the same p schedule) to another window with
a fresh eta pattern, keeping the image's norm at eps (the original's L2 update). Philox
layout, TAG2 = 0x5332 << 48, K = the grid's squares:
  start:        philox(seed, TAG2, 2*N*K), square k of sample j: word 2(jK + k), bit c -> sign of
                channel c; word 2(jK + k) + 1, bit 0 -> eta(s) transposed;
  iteration t:  philox(seed, TAG2 | (t + 1), 8*N), block j = words 8j..8j+7: w0, w1 -> the new
                window's row and column, w2, w3 -> the emptied window's, bit c of w4 -> sign of
                channel c, bit 0 of w5 -> eta(s) transposed (w6, w7 unused).
"""
import math

import torch

from . import losses, ops
from .apgd import check_eps, clean_logits
from . import _checks as C
from .attacks import _batched, _logits, check_inputs, model_state

__all__ = ["square", "p_selection", "stripes", "eta", "TAG", "TAG2"]

TAG = 0x5351 << 48
TAG2 = 0x5332 << 48


def p_selection(it, p_init=0.8, queries=None):
    """The fraction p of pixels a square covers at iteration `it` (0-based), the original's schedule.
    queries: rescale the schedule to this budget (the original's resc_schedule; AutoAttack: None)."""
    if queries is not None:
        it = int(it / queries * 10000)
    for bound, div in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64),
                       (6000, 128), (8000, 256)):
        if it <= bound:
            return p_init / div
    return p_init / 512


def side(p, h, w, c):
    """The square's side for fraction p of an h x w x c input (at least 1, at most min(h, w))."""
    return min(max(int(round(math.sqrt(p * h * w))), 1), h, w)


def side_l2(p, h, w, c):
    """The L2 square's side: odd, at least 3, at most min(h, w) (odd below it where that is even)."""
    s = max(int(round(math.sqrt(p * h * w))), 3)
    s += 1 - s % 2
    m = min(h, w)
    return s if s <= m else m - 1 + m % 2


def eta(s, dtype=torch.float32, device=None):
    """The original's s x s L2 pattern: concentric rings of weight 1 / (ring + 1)^2 around the
    centre of the top half (+) and of the bottom half (-), each half and the whole of unit norm."""
    def rings(a, b):
        d = torch.zeros(a, b, dtype=torch.float64)
        ca, cb = a // 2, b // 2
        for k in range(max(ca, cb) + 1):
            d[max(ca - k, 0):ca + k + 1, max(cb - k, 0):cb + k + 1] += 1.0 / (k + 1) ** 2
        return d / d.norm() if a else d
    d = torch.cat((rings(s // 2, s), -rings(s - s // 2, s)))
    return (d / d.norm()).to(dtype=dtype, device=device)


def _bits(words, c):
    """+1 / -1 from bit k of each word, k < c: shape words.shape + (c,)."""
    return ((words.unsqueeze(-1) >> torch.arange(c, device=words.device)) & 1).to(torch.float32) * 2 - 1


def _windows(wr, wc, s, shape):
    """Flat indices (n x c*s*s) of each sample's s x s window in every channel of an n x c x h x w
    input, its corner at row (wr * (h - s)) >> 32 and column (wc * (w - s)) >> 32 (the words wr, wc
    as uniform draws in [0, h - s) and [0, w - s), as the original's random_int)."""
    _, c, h, w = shape
    vh, vw = (wr * (h - s)) >> 32, (wc * (w - s)) >> 32
    chan = (torch.arange(c, device=wr.device) * (h * w)).view(1, c, 1)
    sq = torch.arange(s, device=wr.device)
    return ((vh * w + vw).view(-1, 1, 1) + chan + (sq.view(s, 1) * w + sq).view(1, 1, s * s)).flatten(1)


def _l2_start(x, rows, eps, seed, lo, hi):
    """The L2 start: x + eps * (the signed eta grid, unit norm), clamped to [lo, hi]."""
    n, c, h, w = x.shape
    s = max(h // 5, 1)
    s0 = max((h - s * 5) // 2, 0)
    gh, gw = (h - s0) // s, (w - s0) // s
    k = gh * gw
    top = int(rows.max()) + 1 if n else 0
    words = ops.philox(seed, TAG2, 2 * top * k, device=x.device).view(top, k, 2)[rows]
    e = eta(s, x.dtype, x.device)
    pat = torch.where((words[..., 1] & 1).bool().view(n, k, 1, 1), e.t(), e)  # (n, k, s, s)
    cells = _bits(words[..., 0], c).to(x.dtype).permute(0, 2, 1).reshape(n, c, gh, gw, 1, 1) \
        * pat.view(n, 1, gh, gw, s, s)
    delta = torch.zeros_like(x)
    delta[:, :, s0:s0 + gh * s, s0:s0 + gw * s] = cells.permute(0, 1, 2, 4, 3, 5).reshape(n, c, gh * s, gw * s)
    return (x + delta / (_l2(delta) + 1e-12) * eps).clamp_(lo, hi)


def _l2(d):
    """Per-sample L2 norms, shaped to broadcast over d."""
    return d.pow(2).flatten(1).sum(1).sqrt().view(-1, *[1] * (d.dim() - 1))


def _l2_proposal(x, x_best, rows, t, s, eps, seed, lo, hi):
    """One L2 proposal per sample (the original's update): the perturbation's norm inside the
    new window and the emptied one moved into the new window with a fresh signed eta pattern,
    the image rescaled to norm eps and clamped to [lo, hi]."""
    n, c = x.shape[:2]
    top = int(rows.max()) + 1
    blk = ops.philox(seed, TAG2 | (t + 1), 8 * top, device=x.device).view(top, 8)[rows]
    win, win2 = _windows(blk[:, 0], blk[:, 1], s, x.shape), _windows(blk[:, 2], blk[:, 3], s, x.shape)
    delta = (x_best - x).flatten(1)
    old = delta.gather(1, win).view(n, c, s * s)
    both = torch.zeros_like(delta, dtype=torch.bool).scatter_(1, win, True).scatter_(1, win2, True)
    norm_win = (delta.pow(2) * both).sum(1).sqrt().view(n, 1, 1)
    norm_img = delta.pow(2).sum(1).sqrt().view(n, 1, 1)
    e = eta(s, x.dtype, x.device)
    pat = torch.where((blk[:, 5] & 1).bool().view(n, 1, 1), e.t().flatten(), e.flatten())
    new = pat * _bits(blk[:, 4], c).to(x.dtype).unsqueeze(-1) + old / (old.pow(2).sum(2, keepdim=True).sqrt() + 1e-12)
    room = ((eps ** 2 - norm_img.pow(2)).clamp_min(0) / c + norm_win.pow(2)).sqrt()
    new = new / (new.pow(2).sum(2, keepdim=True).sqrt() + 1e-12) * room
    delta = delta.scatter(1, win2, 0.0).scatter_(1, win, new.flatten(1)).view_as(x)
    return (x + delta / (_l2(delta) + 1e-12) * eps).clamp_(lo, hi)


def stripes(shape, rows, seed):
    """The initial signs (+1 / -1) as a tensor rows.numel() x C x 1 x W for samples `rows` of x."""
    _, c, _, w = shape
    n = int(rows.max()) + 1 if rows.numel() else 0
    words = ops.philox(seed, TAG, n * c * w, device=rows.device).view(n, c, 1, w)[rows]
    return (words & 1).to(torch.float32) * 2 - 1


def _margin(model, x, y):
    return -losses.value("cw", _logits(model, x), y)  # z_y - max_{i != y} z_i


def _run(model, x, y, rows, eps, norm, queries, p_init, seed, lo, hi, stats):
    """Square on points (x, y) at rows `rows` of the input. Returns (x_best, broken)."""
    n, c, h, w = x.shape
    if norm == "inf":
        x_best = (x + eps * stripes(x.shape, rows, seed).to(x.dtype)).clamp_(lo, hi)
    else:
        x_best = _l2_start(x, rows, eps, seed, lo, hi)
    margin = _margin(model, x_best, y)
    stats["queries"] += n
    broken = torch.zeros(n, dtype=torch.bool, device=x.device)
    out = x_best.clone()
    idx = torch.arange(n, device=x.device)
    x_lo, x_hi = (x - eps).flatten(1), (x + eps).flatten(1)  # the L-inf ball, once: every proposal is clipped to it
    hi_row = int(rows.max()) + 1 if n else 0
    for t in range(queries):
        done = margin <= 0
        if done.any():
            out[idx[done]] = x_best[done]
            broken[idx[done]] = True
            keep = ~done
            idx, y, rows, x, x_best, margin, x_lo, x_hi = (
                v[keep] for v in (idx, y, rows, x, x_best, margin, x_lo, x_hi))
        if idx.numel() == 0:
            break
        if norm == "2":  # every proposal rescales the whole perturbation: accept or keep whole rows
            x_new = _l2_proposal(x, x_best, rows, t, side_l2(p_selection(t, p_init), h, w, c), eps, seed, lo, hi)
            m_new = _margin(model, x_new, y)
            stats["queries"] += idx.numel()
            better = (m_new < margin) | (m_new <= 0)
            margin = torch.where(better, m_new, margin)
            x_best = torch.where(better.view(-1, 1, 1, 1), x_new, x_best)
            continue
        s = side(p_selection(t, p_init), h, w, c)
        blk = ops.philox(seed, TAG | (t + 1), 4 * hi_row, device=x.device).view(hi_row, 4)[rows]
        sign = _bits(blk[:, 2], c).to(x.dtype)  # (n, c)
        # only the s x s window changes (elsewhere x_best is already inside the ball and [lo, hi]):
        # its flat indices per sample and channel, so every pass below touches n * c * s * s values
        win = _windows(blk[:, 0], blk[:, 1], s, x.shape)
        flat = x_best.flatten(1)
        old = flat.gather(1, win)
        new = old + (2 * eps * sign).repeat_interleave(s * s, 1)
        new = torch.minimum(torch.maximum(new, x_lo.gather(1, win)), x_hi.gather(1, win)).clamp_(lo, hi)
        x_new = flat.clone().scatter_(1, win, new).view_as(x_best)
        m_new = _margin(model, x_new, y)
        stats["queries"] += idx.numel()
        better = (m_new < margin) | (m_new <= 0)  # margin loss: the loss is the margin
        margin = torch.where(better, m_new, margin)
        flat.scatter_(1, win, torch.where(better.view(-1, 1), new, old))
    if idx.numel():
        done = margin <= 0
        broken[idx[done]] = True
        out[idx] = x_best
    return out, broken


def square(model, x, y, eps, *, norm="inf", queries=5000, p_init=0.8, seed=0, masks="model",
           batch_size=None, lo=0.0, hi=1.0, _stats=None):
    """Square Attack, L-inf or L2 (Andriushchenko et al. 2020): score-based, forwards only.

    Args:
        model: maps x (Tensor[N, C, H, W]) to logits (N x classes); left as it was.
        x: Tensor[N, C, H, W] in [lo, hi] (C <= 32); y: Tensor[N] int64 true labels.
        eps: radius, >= 0, in `norm`: "inf" or "2" (the two versions of the original).
        queries: iterations, i.e. queries per sample at most besides the first (5000).
        p_init: the fraction of pixels of the first squares (0.8); the schedule is
            p_selection's without rescaling (as in AutoAttack).
        seed: Philox seed (the layout is in the module docstring). masks: as in fastmask.attacks.
        batch_size: samples per batch on the model's device (None: all). lo, hi: valid range.

    Returns:
        Tensor like x: the first misclassified point found, or for samples still robust
        the point of lowest margin; x itself where the clean point is misclassified.
    """
    check_inputs(x, y, batch_size)
    norm = C.norm("norm", norm)
    eps = check_eps(eps)
    C.positive_int("queries", queries)
    if isinstance(p_init, bool) or not isinstance(p_init, (int, float)) or not 0 < p_init <= 1:
        raise ValueError(f"p_init must be in (0, 1], got {p_init!r}")
    if x.dim() != 4 or x.shape[1] > 32:
        raise ValueError(f"x must be N x C x H x W with C <= 32, got shape {tuple(x.shape)}")
    stats = {"queries": 0} if _stats is None else _stats
    bs = x.shape[0] if batch_size is None else batch_size

    def one(xb, yb, k):
        with torch.no_grad():
            z = clean_logits(model, xb, yb, "cw")
            todo = (z.argmax(1) == yb).nonzero().squeeze(1)
            adv = xb.clone()
            if todo.numel():
                adv[todo] = _run(model, xb[todo], yb[todo], todo + k * bs, eps, norm, queries, p_init, seed,
                                 lo, hi, stats)[0]
        return adv
    with model_state(model, masks):
        return _batched(model, x, y, batch_size, one)
