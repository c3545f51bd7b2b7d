"""Two op rules that random inputs almost never exercise, against oracles written from
docs/ops.md (not fastmask.reference), through both backends (the `backend` fixture):

- the keep boundary: keep iff (w >> 8) >= T(ratio) = ceil(ratio 2^24), so with ratio
  = u(word k) exactly, word k is kept (a random test hits the boundary with
  probability 2^-24 per element);
- pgd_step's order: project onto the eps ball, then clamp to [lo, hi], with x_nat near
  (and beyond) the box edge, where the other order gives other points.
"""
import numpy as np
import pytest
import torch

from fastmask import ops

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def mask_index(shape, scope, channels):
    """docs/ops.md's mask index i of every element (n, c, h, w)."""
    N, C, H, W = shape
    n, c, h, w = torch.meshgrid(*(torch.arange(s) for s in shape), indexing="ij")
    unit = {("sample", "shared"): n, ("sample", "separate"): n * C + c,
            ("fixed", "shared"): torch.zeros_like(n), ("fixed", "separate"): c}[(scope, channels)]
    return (unit * H + h) * W + w


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scope,channels", [("sample", "separate"), ("sample", "shared"),
                                            ("fixed", "separate"), ("fixed", "shared")])
def test_keep_boundary_ratio_equal_to_u(backend, dtype, scope, channels):
    shape = (3, 2, 11, 13)
    idx = mask_index(shape, scope, channels)
    words = ops.philox(9, 2 ** 63 + 1, int(idx.max()) + 1)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    for k in (0, 5, len(words) - 1):
        t = int(words[k]) >> 8
        ratio = t * 2.0 ** -24  # exact: T(ratio) = t
        keep = ((words >> 8) >= t)[idx]
        assert keep.reshape(-1)[(idx.reshape(-1) == k).nonzero()[0]].all()  # word k itself is kept
        kw = dict(seed=9, offset=2 ** 63 + 1, scope=scope, channels=channels)
        for mode in ("pixel", "blur"):
            assert torch.equal(ops.mask_generate(shape, ratio, mode=mode, **kw), keep), (mode, k)
        y = ops.mask_apply(x, ratio, fill=float("nan"), **kw)
        assert torch.equal(y.isnan(), ~keep) and torch.equal(y[keep], x[keep])
        yb = ops.mask_apply(x, ratio, mode="blur", **kw)
        assert torch.equal(yb[keep], x[keep])
        xr = x.clone().requires_grad_(True)
        ops.mask_apply(xr, ratio, **kw).backward(torch.ones_like(x))
        assert torch.equal(xr.grad, keep.to(dtype))


# ----------------------------------------------------------------------------- pgd_step order

def pgd_inf_oracle(xa, xn, g, alpha, eps, lo, hi):
    """docs/ops.md: clamp(min(max(x_adv + alpha sign(g), x_nat - eps), x_nat + eps), lo, hi)."""
    v = xa + alpha * np.sign(g)
    return np.clip(np.minimum(np.maximum(v, xn - eps), xn + eps), lo, hi)


def pgd_l2_oracle(xa, xn, g, alpha, eps, lo, hi):
    """docs/ops.md, per sample (rows): step alpha along g / ||g||, scale d = v - x_nat into
    the eps ball, then clamp x_nat + d to [lo, hi]. float64 numpy."""
    gn = np.sqrt((g * g).sum(1, keepdims=True))
    v = xa + alpha * g / np.maximum(gn, 1e-12)
    d = v - xn
    dn = np.sqrt((d * d).sum(1, keepdims=True))
    d = d * np.minimum(1.0, eps / np.maximum(dn, 1e-12))
    return np.clip(xn + d, lo, hi)


def pgd_l2_wrong_order(xa, xn, g, alpha, eps, lo, hi):
    """Clamp first, then project: what a wrong kernel would do (to show the points differ)."""
    gn = np.sqrt((g * g).sum(1, keepdims=True))
    d = np.clip(xa + alpha * g / np.maximum(gn, 1e-12), lo, hi) - xn
    dn = np.sqrt((d * d).sum(1, keepdims=True))
    return xn + d * np.minimum(1.0, eps / np.maximum(dn, 1e-12))


@pytest.mark.parametrize("dtype", DTYPES)
def test_pgd_inf_projects_then_clamps(backend, dtype):
    """Exact dyadic points (every operation exact in every dtype): x_nat inside the box by
    less than eps, on the edge, and beyond it (there clamp-then-project leaves the box)."""
    lo, hi, eps, alpha = 0.0, 1.0, 0.0625, 0.125
    xn = np.array([0.96875, 1.0, 1.125, 0.03125, 0.0, -0.125, 0.5, 1.03125])
    rows = []
    for s in (1.0, -1.0):  # step up and down from x_adv = x_nat and from x_adv = x_nat -+ eps
        for shift in (0.0, -s * eps):
            rows.append((xn + shift, xn, np.full_like(xn, s)))
    xa, xnat, g = (np.stack(t) for t in zip(*rows))
    want = pgd_inf_oracle(xa, xnat, g, alpha, eps, lo, hi)
    wrong = np.minimum(np.maximum(np.clip(xa + alpha * np.sign(g), lo, hi), xnat - eps), xnat + eps)
    assert (want != wrong).any()  # the points tell the orders apart
    t = lambda a: torch.tensor(a, dtype=dtype)  # noqa: E731
    got = ops.pgd_step(t(xa), t(xnat), t(g), alpha, eps, lo=lo, hi=hi)
    assert torch.equal(got, t(want)), (got, want)
    assert bool(((got >= lo) & (got <= hi)).all())


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("lo,hi", [(0.0, 1.0), (-1.0, 0.5)])
def test_pgd_l2_projects_then_clamps(backend, dtype, rtol, lo, hi):
    """x_nat within 0.1 of either box edge, steps longer than eps: the clamp is active on
    many coordinates. float32 agrees with the float64 oracle to 1e-6 relative (the norms
    are float64; the rest is a few float32 roundings of values near 1)."""
    g = torch.Generator().manual_seed(4)
    N, D = 8, 24
    edge = torch.where(torch.rand(N, D, generator=g) < 0.5, torch.tensor(hi), torch.tensor(lo))
    xn = (edge + torch.where(edge == hi, -1.0, 1.0) * 0.1 * torch.rand(N, D, generator=g,
                                                                        dtype=torch.float64)).to(dtype)
    grad = torch.randn(N, D, generator=g, dtype=torch.float64).to(dtype)
    for xa, alpha, eps in ((xn, 0.8, 0.3), (xn + 0.05 * (edge - xn).sign(), 0.5, 0.4), (xn, 0.05, 1.0)):
        xa = xa.to(dtype)
        args = [a.double().numpy() for a in (xa, xn, grad)] + [alpha, eps, lo, hi]
        want = pgd_l2_oracle(*args)
        if alpha > eps:  # a long step out of the box: the two orders differ
            assert np.abs(want - pgd_l2_wrong_order(*args)).max() > 1e-3
        got = ops.pgd_step(xa, xn, grad, alpha, eps, lo=lo, hi=hi, norm="2")
        torch.testing.assert_close(got.double(), torch.from_numpy(want), rtol=rtol, atol=rtol)
        assert bool(((got >= lo) & (got <= hi)).all())
        xi = xa.clone()
        ops.pgd_step_(xi, xn, grad, alpha, eps, lo=lo, hi=hi, norm="2")
        assert torch.equal(xi, got)


@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e-4), (torch.float32, 1e20), (torch.float16, 300.0),
                                         (torch.float64, 1e-9)])
def test_pgd_l2_step_length_for_any_gradient_size(backend, dtype, scale):
    """The step is alpha along grad / ||grad|| whatever ||grad|| is: tiny (below 1), or so large
    that its square overflows the dtype (the norms are float64: docs/ops.md)."""
    g = torch.Generator().manual_seed(5)
    xn = (0.5 + 0.01 * torch.randn(3, 40, generator=g, dtype=torch.float64)).to(dtype)
    grad = (scale * torch.randn(3, 40, generator=g, dtype=torch.float64)).to(dtype)
    got = ops.pgd_step(xn, xn, grad, 0.2, 10.0, lo=-10.0, hi=10.0, norm="2")
    want = pgd_l2_oracle(*[a.double().numpy() for a in (xn, xn, grad)], 0.2, 10.0, -10.0, 10.0)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(got.double(), torch.from_numpy(want), rtol=tol, atol=tol)
    step = (got.double() - xn.double()).norm(dim=1)
    assert torch.allclose(step, torch.full_like(step, 0.2), rtol=10 * tol, atol=10 * tol)


@pytest.mark.parametrize("mode", ["pixel", "blur", "block"])
def test_one_element_masks_its_gradient(backend, mode):
    """A 1 x 1 x 1 x 1 input is masked like any other: ratio 1 drops its gradient (pixel,
    block) or spreads it to its own 1-pixel mean (blur: the gradient passes)."""
    x = torch.tensor([[[[2.0]]]], requires_grad=True)
    y = ops.mask_apply(x, 1.0, seed=0, offset=torch.tensor(0), mode=mode, fill=-1.0)
    y.backward(torch.ones_like(y))
    assert y.item() == (2.0 if mode == "blur" else -1.0)
    assert x.grad.item() == (1.0 if mode == "blur" else 0.0)


def test_reference_defaults_are_the_documented_ones():
    """fastmask.reference called with its defaults is the op with docs/ops.md's defaults (pixel,
    per sample, fill 0, box [0, 1], L-inf): the fallback is usable on its own. Against the
    extension's kernels where they are built; inputs near the box edges, so [0, 1] clamps."""
    from fastmask import reference as R
    g = torch.Generator().manual_seed(5)
    x = torch.rand(3, 2, 5, 6, generator=g)
    grad = torch.randn(3, 2, 5, 6, generator=g)
    kw = dict(mode="pixel", scope="sample", channels="shared")
    assert torch.equal(R.mask_generate(x.shape, 0.4, 7, 2), ops.mask_generate(x.shape, 0.4, seed=7, offset=2, **kw))
    assert torch.equal(R.mask_apply(x, 0.4, 7, 2), ops.mask_apply(x, 0.4, seed=7, offset=2, fill=0.0, **kw))
    keep = ops.mask_generate(x.shape, 0.4, seed=7, offset=2, **kw)
    assert torch.equal(R.mask_apply_backward(grad, 0.4, 7, 2), torch.where(keep, grad, 0.0))
    assert torch.equal(R.fgsm(x, grad, 0.3), ops.fgsm(x, grad, 0.3, 0.0, 1.0))
    want = ops.pgd_step(x, x, grad, 0.3, 0.3, 0.0, 1.0, "inf")
    assert torch.equal(R.pgd_step(x, x, grad, 0.3, 0.3), want)
    xa = x.clone()
    R.pgd_step_(xa, x, grad, 0.3, 0.3)
    assert torch.equal(xa, want)
    assert torch.equal(R.random_start(x, 0.3, 7, 2), ops.random_start(x, 0.3, seed=7, offset=2, norm="inf", lo=0.0,
                                                                      hi=1.0))


def test_empty_and_ratio_zero_masks_are_all_kept_bools():
    """A shape with no element (H, W or C = 0) or ratio 0 gives an all-True bool mask of the shape."""
    from fastmask import reference as R
    for shape in ((2, 3, 4, 0), (2, 3, 0, 4), (2, 0, 4, 4), (0, 3, 4, 4)):
        for channels in ("shared", "separate"):
            for mode in ("pixel", "block"):
                m = R.mask_generate(shape, 0.5, 1, 0, mode, "sample", channels)
                assert m.dtype == torch.bool and m.shape == shape, (shape, channels, mode)
    for mode in ("pixel", "block", "blur"):
        m = R.mask_generate((2, 3, 4, 4), 0.0, 1, 0, mode, "sample", "shared")
        assert m.dtype == torch.bool and bool(m.all())


def test_reference_grad_clip_noise_rounds_once_from_opmath():
    """The reference's gradient manipulation in the docs' order, computed in the opmath type
    (float32 for float16, float64 for float64) and rounded once: against the same formula
    written out (scale = min(1, max_norm / (norm + 1e-6)), clamp, beta state + (1 - beta) t),
    bit for bit; its defaults add no noise, and noise follows (seed 0, offset 0)."""
    from fastmask import reference as R
    for dtype, op in ((torch.float16, torch.float32), (torch.float64, torch.float64)):
        gen = torch.Generator().manual_seed(3)
        grads = [torch.randn(40, generator=gen).to(dtype), torch.randn(3, 7, generator=gen).to(dtype)]
        state = [torch.rand(40, generator=gen).to(dtype), torch.rand(3, 7, generator=gen).to(dtype)]
        total = sum(g.to(torch.float64).pow(2).sum() for g in grads).sqrt()
        scale = (0.5 / (total + 1e-6)).clamp_max(1.0).to(op)
        want_g, want_s = [], []
        for g, s in zip(grads, state):
            t = (g.to(op) * scale).clamp(-0.05, 0.05)
            t = torch.tensor(0.9, dtype=op) * s.to(op) + (1 - torch.tensor(0.9, dtype=op)) * t
            want_g.append(t.to(dtype))
            want_s.append(t.to(dtype))
        gs, ss = [g.clone() for g in grads], [s.clone() for s in state]
        norm = R.grad_clip_noise_(gs, 0.5, 0.0, 0, 0, 0.05, 0.9, ss)
        assert norm.item() == total.to(torch.float64 if dtype == torch.float64 else torch.float32).item(), dtype
        for got, want in zip(gs + ss, want_g + want_s):
            assert torch.equal(got, want), dtype
    g = [torch.randn(50, generator=torch.Generator().manual_seed(4))]
    plain = [g[0].clone()]
    R.grad_clip_noise_(plain)
    assert torch.equal(plain[0], g[0])
    noisy, want = [g[0].clone()], [g[0].clone()]
    R.grad_clip_noise_(noisy, None, 0.1)
    ops.grad_clip_noise_(want, None, 0.1, seed=0, offset=0)
    torch.testing.assert_close(noisy[0], want[0])


def test_philox_blocks_keeps_the_shape_of_its_blocks():
    """philox_blocks(seed, offset, blocks) has shape blocks.shape + (4,), word j of block b last."""
    from fastmask import reference as R
    blocks = torch.arange(6, dtype=torch.int64).reshape(2, 3)
    flat = R.philox_blocks(5, 9, blocks.reshape(-1))
    assert torch.equal(R.philox_blocks(5, 9, blocks), flat.reshape(2, 3, 4))
