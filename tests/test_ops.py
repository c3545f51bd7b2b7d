"""fastmask.ops against docs/ops.md: independent oracles (scalar Philox, the index
table, hand cases), statistics, bit-for-bit agreement with fastmask.reference, the
argument checks, autograd and torch.library.opcheck.

Tests taking the `backend` fixture (tests/conftest.py) run twice: through the C++
extension and through the pure-PyTorch fallback.
"""
import math
import os
import subprocess
import sys

import pytest
import torch

from fastmask import ops
from fastmask import reference as ref

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
MODES, SCOPES, CHANNELS = ops.MODES, ops.SCOPES, ops.CHANNELS
U64 = (1 << 64) - 1
needs_ext = pytest.mark.skipif(not ops._ext_available,
                               reason="fastmask._C is not built or FASTMASK_DISABLE_EXT=1")


def rand(shape, dtype=torch.float32, seed=0, lo=0.0, hi=1.0):
    g = torch.Generator().manual_seed(seed)
    return (lo + (hi - lo) * torch.rand(shape, generator=g, dtype=torch.float64)).to(dtype)


def randn(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def same(a, b):
    """Bit-for-bit equality of values (NaN == NaN), dtype and shape."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    if a.is_floating_point():
        eq = (a == b) | (torch.isnan(a) & torch.isnan(b))
        assert bool(eq.all()), f"{int((~eq).sum())} of {a.numel()} elements differ"
    else:
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- Philox

def philox_scalar(seed, offset, block):
    """Philox4x32-10 with Python integers: an oracle independent of reference.py."""
    mask = 0xFFFFFFFF
    c = [block & mask, block >> 32, offset & mask, offset >> 32]
    k0, k1 = seed & mask, seed >> 32
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & mask, (k1 + 0xBB67AE85) & mask
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k0, p1 & mask, (p0 >> 32) ^ c[3] ^ k1, p0 & mask]
    return c


def test_philox_known_answers_random123():
    # Random123 kat_vectors, philox4x32_10: (ctr, key) -> out
    zero = ref.philox_blocks(0, 0, torch.tensor([0]))[0].tolist()
    assert zero == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    ones = ref.philox_blocks(U64, U64, torch.tensor([-1]))[0].tolist()
    assert ones == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    pi = ref.philox_blocks(0x299F31D0A4093822, 0x0370734413198A2E,
                           torch.tensor([0x85A308D3243F6A88 - (1 << 64)]))[0].tolist()
    assert pi == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def test_mulhilo_exact():
    c = torch.tensor([0, 1, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0xDEADBEEF])
    for m in (0xD2511F53, 0xCD9E8D57, 0xFFFFFFFF):
        hi, lo = ref._mulhilo(m, c)
        assert hi.tolist() == [(m * v) >> 32 for v in c.tolist()]
        assert lo.tolist() == [(m * v) & 0xFFFFFFFF for v in c.tolist()]


def test_philox_op(backend):
    w = ops.philox(0, 0, 4)
    assert w.dtype == torch.int64 and w.tolist() == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C,
                                                     0x9B00DBD8]
    for seed, offset in [(0, 1), (123456789, 987654321), (U64, 2 ** 63), (2 ** 63 + 5, U64)]:
        w = ops.philox(seed, offset, 11)
        expect = [v for b in range(3) for v in philox_scalar(seed, offset, b)][:11]
        assert w.tolist() == expect
    assert ops.philox(5, 6, 0).shape == (0,)
    # word k of a stream does not depend on how many words are drawn, or where from
    same(ops.philox(7, 8, 1001)[:13], ops.philox(7, 8, 13))
    same(ref.philox(7, 8, 9, start=5), ref.philox(7, 8, 14)[5:])


def test_philox_distinct_streams(backend):
    a, b, c = ops.philox(1, 0, 64), ops.philox(1, 1, 64), ops.philox(2, 0, 64)
    assert not torch.equal(a, b) and not torch.equal(a, c)


# ----------------------------------------------------------------------------- masks

def mask_oracle(shape, ratio, seed, offset, scope, channels):
    """Pixel keep mask from the index table of docs/ops.md, element by element."""
    N, C, H, W = shape
    T = math.ceil(ratio * 2 ** 24)
    keep = torch.empty(shape, dtype=torch.bool)
    for n in range(N):
        for c in range(C):
            for h in range(H):
                for w in range(W):
                    i = {("sample", "shared"): (n * H + h) * W + w,
                         ("sample", "separate"): ((n * C + c) * H + h) * W + w,
                         ("fixed", "shared"): h * W + w,
                         ("fixed", "separate"): (c * H + h) * W + w}[(scope, channels)]
                    word = philox_scalar(seed, offset, i // 4)[i % 4]
                    keep[n, c, h, w] = (word >> 8) >= T
    return keep


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("channels", CHANNELS)
def test_mask_index_table(backend, scope, channels):
    shape = (2, 3, 4, 5)
    expect = mask_oracle(shape, 0.4, 11, 2 ** 63 + 3, scope, channels)
    for mode in ("pixel", "blur"):
        got = ops.mask_generate(shape, 0.4, seed=11, offset=2 ** 63 + 3, mode=mode, scope=scope,
                                channels=channels)
        same(got, expect)


def block_oracle(H, W, ratio, words):
    """The rectangle (top, left, h, wd) of docs/ops.md from a unit's four words."""
    A = math.floor(ratio * H * W + 0.5)
    if A == 0:
        return None
    hmin, hmax = -(-A // W), min(H, A)
    h = hmin + words[0] % (hmax - hmin + 1)
    wd = min(W, (2 * A + h) // (2 * h))
    return words[1] % (H - h + 1), words[2] % (W - wd + 1), h, wd


@pytest.mark.parametrize("scope,channels", [("sample", "shared"), ("sample", "separate"),
                                            ("fixed", "shared"), ("fixed", "separate")])
@pytest.mark.parametrize("H,W,ratio", [(28, 28, 0.3), (5, 9, 0.5), (7, 3, 0.1), (1, 6, 0.5),
                                       (4, 4, 1.0), (6, 6, 0.01)])
def test_block_rectangles(backend, scope, channels, H, W, ratio):
    N, C = 3, 2
    m = ops.mask_generate((N, C, H, W), ratio, seed=3, offset=4, mode="block", scope=scope,
                          channels=channels)
    A = math.floor(ratio * H * W + 0.5)
    for n in range(N):
        for c in range(C):
            unit = {("sample", "shared"): n, ("sample", "separate"): n * C + c,
                    ("fixed", "shared"): 0, ("fixed", "separate"): c}[(scope, channels)]
            rect = block_oracle(H, W, ratio, philox_scalar(3, 4, unit))
            masked = ~m[n, c]
            if rect is None:
                assert not masked.any()
                continue
            top, left, h, wd = rect
            expect = torch.zeros(H, W, dtype=torch.bool)
            expect[top:top + h, left:left + wd] = True
            same(masked, expect)
            # the closest area a rectangle of this height can have
            assert abs(h * wd - A) <= h / 2 and wd <= W and h <= H


def test_block_area_statistics(backend):
    m = ops.mask_generate((500, 1, 28, 28), 0.3, seed=0, mode="block")
    areas = (~m).sum(dim=(1, 2, 3)).float()
    A = round(0.3 * 784)
    assert (areas - A).abs().max() <= 14  # h <= 28 rows: off by at most h/2
    assert abs(areas.mean().item() - A) < 3
    tops = (~m).any(dim=3)[:, 0].float().argmax(dim=1)
    assert tops.unique().numel() > 5  # positions vary between samples


@pytest.mark.parametrize("ratio", [0.1, 0.5])
def test_mask_fraction(backend, ratio):
    m = ops.mask_generate((16, 1, 256, 256), ratio, seed=1, offset=2)  # 2^20 pixels
    n = m.numel()
    frac = 1 - m.float().mean().item()
    assert abs(frac - ratio) < 5 * math.sqrt(ratio * (1 - ratio) / n)


def test_mask_extremes(backend):
    x = rand((2, 3, 4, 5))
    for mode in MODES:
        assert ops.mask_generate(x.shape, 0.0, seed=0, mode=mode).all()
        assert not ops.mask_generate(x.shape, 1.0, seed=0, mode=mode).any()
        same(ops.mask_apply(x, 0.0, seed=0, mode=mode, fill=5.0), x)
    same(ops.mask_apply(x, 1.0, seed=0, fill=-2.0), torch.full_like(x, -2.0))
    same(ops.mask_apply(x, 1.0, seed=0, fill=float("nan")), torch.full_like(x, float("nan")))


def test_mask_scopes(backend):
    shape = (8, 3, 16, 16)
    kw = dict(seed=5, mode="pixel")
    fixed = ops.mask_generate(shape, 0.5, offset=0, scope="fixed", **kw)
    assert (fixed == fixed[0:1]).all()  # identical across samples
    assert (fixed == fixed[:, 0:1]).all()  # and channels (shared)
    same(fixed, ops.mask_generate(shape, 0.5, offset=0, scope="fixed", **kw))  # across calls
    sample = ops.mask_generate(shape, 0.5, offset=0, **kw)
    assert not (sample == sample[0:1]).all(dim=(1, 2, 3))[1:].any()  # differs across samples
    assert not torch.equal(sample, ops.mask_generate(shape, 0.5, offset=1, **kw))
    sep = ops.mask_generate(shape, 0.5, offset=0, channels="separate", **kw)
    assert not torch.equal(sep[:, 0], sep[:, 1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_mask_apply_matches_reference(backend, dtype, mode):
    x = rand((3, 2, 7, 6), dtype, lo=-1)
    for scope in SCOPES:
        for channels in CHANNELS:
            for ratio, seed, offset in [(0.3, 0, 0), (0.7, U64, 2 ** 63 + 1), (1.0, 9, 9)]:
                args = (ratio, seed, offset, mode, scope, channels)
                y = ops.mask_apply(x, ratio, seed=seed, offset=offset, mode=mode, scope=scope,
                                   channels=channels, fill=0.1)
                same(y, ref.mask_apply(x, *args, fill=0.1))
                keep = ops.mask_generate(x.shape, ratio, seed=seed, offset=offset, mode=mode,
                                         scope=scope, channels=channels)
                other = ref._box_sum(x.float() if dtype != torch.float64 else x) \
                    / ref._blur_count(7, 6, ref.opmath_dtype(dtype), "cpu") \
                    if mode == "blur" else torch.tensor(0.1, dtype=ref.opmath_dtype(dtype))
                same(y, torch.where(keep, x.to(ref.opmath_dtype(dtype)), other).to(dtype))
                g = rand(x.shape, dtype, seed=1, lo=-1)
                if backend == "ext":  # the kernel against the reference: bit for bit (docs/ops.md)
                    got = torch.ops.fastmask.mask_apply_backward(g, ratio, ops._u64("s", seed),
                                                                 ops._u64("o", offset), mode, scope,
                                                                 channels)
                    same(got, ref.mask_apply_backward(g, *args))
                # both backends: the backward op (reached through a tensor offset: the
                # mask_apply_at path; an int offset in the ref backend is autograd through the
                # reference forward) against the adjoint of where(keep, x, fill or the 3x3
                # mean) taken by torch's autograd in float64, not the reference's formula
                xr = x.clone().requires_grad_(True)
                ops.mask_apply(xr, ratio, seed=seed, offset=torch.tensor(ops._u64("o", offset)),
                               mode=mode, scope=scope, channels=channels, fill=0.1).backward(g)
                x64 = x.detach().double().clone().requires_grad_(True)
                other = torch.nn.functional.avg_pool2d(x64, 3, 1, 1, count_include_pad=False) \
                    if mode == "blur" else torch.tensor(0.1, dtype=torch.float64)
                torch.where(keep, x64, other).backward(g.double())
                if mode == "blur":  # sums of g / cnt in opmath: a few roundings
                    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else \
                        dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else \
                        dict(rtol=2 * torch.finfo(dtype).eps, atol=2 * torch.finfo(dtype).eps)
                    torch.testing.assert_close(xr.grad.double(), x64.grad, **tol)
                else:  # a selection: exact
                    same(xr.grad, x64.grad.to(dtype))


def test_blur_hand_case(backend):
    x = torch.arange(9, dtype=torch.float64).reshape(1, 1, 3, 3)
    y = ops.mask_apply(x, 1.0, seed=0, mode="blur")
    expect = torch.nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    torch.testing.assert_close(y, expect, rtol=0, atol=1e-15)
    assert y[0, 0, 1, 1].item() == 4.0 and y[0, 0, 0, 0].item() == (0 + 1 + 3 + 4) / 4
    one = torch.tensor([[[[3.5]]]])
    same(ops.mask_apply(one, 1.0, seed=0, mode="blur"), one)  # 1x1: its own mean


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scope,channels", [("sample", "shared"), ("fixed", "separate")])
def test_mask_apply_gradcheck(backend, mode, scope, channels):
    x = rand((2, 2, 5, 4), torch.float64, lo=-1).requires_grad_()
    f = lambda t: ops.mask_apply(t, 0.4, seed=1, offset=2, mode=mode, scope=scope,  # noqa: E731
                                 channels=channels, fill=0.5)
    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))
    y = f(x)
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    keep = ops.mask_generate(x.shape, 0.4, seed=1, offset=2, mode=mode, scope=scope,
                             channels=channels)
    if mode != "blur":
        same(gx, keep.double())


def test_mask_apply_offset_tensor(backend):
    x = rand((2, 1, 6, 6), torch.float64).requires_grad_()
    off = torch.tensor(2 ** 63 + 7 - 2 ** 64)
    y = ops.mask_apply(x, 0.5, seed=1, offset=off, mode="blur")
    same(y, ops.mask_apply(x, 0.5, seed=1, offset=2 ** 63 + 7, mode="blur"))
    off += 1  # changing the caller's tensor must not change the backward
    (gx,) = torch.autograd.grad(y.sum(), x)
    same(gx, ref.mask_apply_backward(torch.ones_like(x), 0.5, 1, 2 ** 63 + 7, "blur"))
    f = lambda t: ops.mask_apply(t, 0.5, seed=1, offset=torch.tensor(3), mode="blur")  # noqa
    assert torch.autograd.gradcheck(f, (x,)) and torch.autograd.gradgradcheck(f, (x,))


@needs_ext
@pytest.mark.parametrize("op", ["mask_apply", "learned_mask_apply"])
def test_autograd_kernel_skips_the_graph_only_when_nothing_needs_it(op):
    """The C++ autograd kernels go straight to the device kernel when no input needs a gradient
    (a training step's input, or no_grad): the same values as the graph path, no grad_fn; an
    input that needs a gradient still gets the graph, and a forward-mode tangent still raises."""
    import torch.autograd.forward_ad as fwAD
    x = rand((3, 1, 5, 5), seed=4)
    logits = randn((1, 5, 5), seed=5)

    def call(x, logits):
        if op == "mask_apply":
            return torch.ops.fastmask.mask_apply(x, 0.4, 1, 9, "pixel", "sample", "shared", 0.25)
        return torch.ops.fastmask.learned_mask_apply(x, logits)

    graph = call(x.clone().requires_grad_(), logits.clone().requires_grad_())
    assert graph.grad_fn is not None
    plain = call(x, logits)
    assert plain.grad_fn is None and not plain.requires_grad
    same(plain, graph.detach())
    with torch.no_grad():
        same(call(x.clone().requires_grad_(), logits.clone().requires_grad_()), plain)
    if op == "learned_mask_apply":  # the logits alone needing a gradient is enough for a graph
        y = call(x, logits.clone().requires_grad_())
        assert y.grad_fn is not None
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.ones_like(x))
        with pytest.raises(RuntimeError, match="(?i)forward|jvp"):
            call(dual, logits)


# ----------------------------------------------------------------------------- attacks

def with_special(t):
    """t with a zero, a NaN and +-inf planted in the gradient-like tensor."""
    t = t.clone()
    flat = t.view(-1)
    flat[0], flat[1], flat[2], flat[3] = 0.0, float("nan"), float("inf"), -float("inf")
    return t


@pytest.mark.parametrize("dtype", DTYPES)
def test_fgsm(backend, dtype):
    x = rand((4, 3, 5, 5), dtype)
    g = with_special(randn(x.shape, dtype, seed=1))
    y = ops.fgsm(x, g, 0.1)
    same(y, ref.fgsm(x, g, 0.1, 0.0, 1.0))
    x64 = x.double()
    s = torch.sign(torch.nan_to_num(g.double(), nan=0.0))
    torch.testing.assert_close(y.double(), (x64 + 0.1 * s).clamp(0, 1).to(dtype).double())
    assert y.view(-1)[1] == x.view(-1)[1]  # NaN gradient: no step
    same(ops.fgsm(x, g, 0.3, lo=-0.5, hi=0.25), ref.fgsm(x, g, 0.3, -0.5, 0.25))


@pytest.mark.parametrize("dtype", DTYPES)
def test_pgd_inf(backend, dtype):
    x_nat = rand((4, 3, 5, 5), dtype)
    x_adv = (x_nat.double() + rand(x_nat.shape, torch.float64, seed=2, lo=-0.05, hi=0.05)
             ).to(dtype)
    g = with_special(randn(x_nat.shape, dtype, seed=1))
    y = ops.pgd_step(x_adv, x_nat, g, 0.02, 0.03)
    same(y, ref.pgd_step(x_adv, x_nat, g, 0.02, 0.03, 0.0, 1.0, "inf"))
    op = ref.opmath_dtype(dtype)
    ulp = torch.finfo(dtype).eps  # rounding to dtype at the end, values in [0, 1]
    assert ((y.to(op) - x_nat.to(op)).abs() <= 0.03 + ulp).all()
    xa = x_adv.clone()
    assert ops.pgd_step_(xa, x_nat, g, 0.02, 0.03) is xa
    same(xa, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_pgd_l2(backend, dtype):
    x_nat = rand((5, 2, 6, 6), dtype, lo=0.2, hi=0.8)
    x_adv = x_nat.clone()
    g = randn(x_nat.shape, dtype, seed=1)
    eps = 0.5
    for _ in range(4):
        y = ops.pgd_step(x_adv, x_nat, g, 0.3, eps, norm="2")
        expect = ref.pgd_step(x_adv, x_nat, g, 0.3, eps, 0.0, 1.0, "2")
        tol = {} if dtype != torch.float16 else dict(atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(y, expect, **tol)
        d = (y.double() - x_nat.double()).reshape(5, -1).norm(dim=1)
        assert (d <= eps * 1.01).all()
        xa = x_adv.clone()
        ops.pgd_step_(xa, x_nat, g, 0.3, eps, norm=2)
        torch.testing.assert_close(xa, y, **tol)
        x_adv = y
    # first step from x_nat, no clamp active: a step of length alpha along grad / ||grad||
    x_nat = torch.full((3, 4), 0.5, dtype=torch.float64)
    g = randn((3, 4), torch.float64)
    y = ops.pgd_step(x_nat, x_nat, g, 0.1, 1.0, lo=-10, hi=10, norm="2")
    torch.testing.assert_close(y - x_nat, 0.1 * g / g.norm(dim=1, keepdim=True))


@pytest.mark.parametrize("dtype", DTYPES)
def test_random_start_inf(backend, dtype):
    x = rand((4, 3, 8, 8), dtype)
    y = ops.random_start(x, 0.1, seed=3, offset=4, lo=-1, hi=2)
    same(y, ref.random_start(x, 0.1, 3, 4, "inf", -1.0, 2.0))
    u = (ops.philox(3, 4, x.numel()) >> 8).double() * 2.0 ** -24
    torch.testing.assert_close(y.double(), (x.double() + 0.1 * (2 * u.reshape(x.shape) - 1))
                               .to(dtype).double(), atol=1e-2, rtol=1e-2)
    same(ops.random_start(x, 0.1, seed=3, offset=4), ref.random_start(x, 0.1, 3, 4, "inf", 0, 1))


def test_random_start_inf_uniform(backend):
    x = torch.zeros(1 << 18, dtype=torch.float64)
    d = ops.random_start(x, 0.5, seed=1, lo=-1, hi=1)
    assert d.abs().max() <= 0.5 and abs(d.mean().item()) < 5 * 0.5 / math.sqrt(3 * d.numel())
    assert abs(d.var().item() - 0.25 / 3) < 0.003


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_random_start_l2(backend, dtype):
    x = torch.full((2000, 1, 3, 3), 0.5, dtype=dtype)
    y = ops.random_start(x, 0.3, seed=1, offset=2, norm="2")
    torch.testing.assert_close(y, ref.random_start(x, 0.3, 1, 2, "2", 0.0, 1.0))
    r = (y.double() - 0.5).reshape(2000, -1).norm(dim=1)
    assert (r <= 0.3 * (1 + 1e-5)).all()
    # uniform in the 9-ball: P(r <= 0.3 t) = t^9
    assert abs((r <= 0.3 * 0.5 ** (1 / 9)).double().mean().item() - 0.5) < 5 * 0.5 / math.sqrt(2000)


# ----------------------------------------------------------------------------- gradients

def grad_list(dtype=torch.float32, seed=0):
    return [randn((3, 4), dtype, seed) * 3, randn((5,), dtype, seed + 1),
            randn((2, 2, 2), dtype, seed + 2)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_clip_noise_matches_reference(backend, dtype):
    for kw in [dict(), dict(max_norm=1.0), dict(clip_value=0.5), dict(noise_std=0.1),
               dict(max_norm=2.0, clip_value=0.3, noise_std=0.05, smoothing=0.9)]:
        a, b = grad_list(dtype), grad_list(dtype)
        sa = [torch.ones_like(t) for t in a] if "smoothing" in kw else None
        sb = [torch.ones_like(t) for t in b] if "smoothing" in kw else []
        n = ops.grad_clip_noise_(a, seed=U64, offset=2 ** 63, state=sa, **kw)
        m = ref.grad_clip_noise_(b, kw.get("max_norm"), kw.get("noise_std", 0.0), U64, 2 ** 63,
                                 kw.get("clip_value"), kw.get("smoothing"), sb)
        assert n.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(n, m)
        for t, u in zip(a, b):
            torch.testing.assert_close(t, u)
        for t, u in zip(sa or [], sb):
            torch.testing.assert_close(t, u)


def test_grad_clip_noise_semantics(backend):
    g = grad_list(torch.float64)
    orig = [t.clone() for t in g]
    norm = ops.grad_clip_noise_(g, max_norm=1.0, seed=0)
    total = math.sqrt(sum(t.pow(2).sum().item() for t in orig))
    assert norm.dtype == torch.float64 and norm.item() == pytest.approx(total)
    assert math.sqrt(sum(t.pow(2).sum().item() for t in g)) == pytest.approx(1.0, rel=1e-5)
    for t, o in zip(g, orig):
        torch.testing.assert_close(t, o / (total + 1e-6))
    g = grad_list(torch.float64)
    ops.grad_clip_noise_(g, max_norm=1e9, clip_value=0.5, seed=0)  # no scaling, clamping only
    for t, o in zip(g, orig):
        torch.testing.assert_close(t, o.clamp(-0.5, 0.5))
    # noise: global element k gets noise_std * Gaussian k, across tensor boundaries
    z = [torch.zeros(1000), torch.zeros(3, 500)]
    ops.grad_clip_noise_(z, noise_std=2.0, seed=4, offset=5)
    flat = torch.cat([t.reshape(-1) for t in z]).double()
    torch.testing.assert_close(flat, 2.0 * ref.normal(4, 5, 2500), atol=1e-5, rtol=1e-5)
    assert abs(flat.std().item() - 2.0) < 0.15 and abs(flat.mean().item()) < 0.2
    # smoothing: s <- beta s + (1 - beta) g, g <- s
    g, s = [torch.full((4,), 2.0)], [torch.full((4,), 1.0)]
    ops.grad_clip_noise_(g, smoothing=0.75, seed=0, state=s)
    torch.testing.assert_close(g[0], torch.full((4,), 1.25))
    torch.testing.assert_close(s[0], torch.full((4,), 1.25))
    assert ops.grad_clip_noise_([], max_norm=1.0, seed=0).item() == 0.0


# ----------------------------------------------------------------------------- edge cases

def test_empty_tensors(backend):
    for shape in [(0, 3, 4, 4), (2, 3, 0, 4), (2, 0, 4, 4)]:
        x = torch.rand(shape)
        for mode in MODES:
            assert ops.mask_apply(x, 0.5, seed=0, mode=mode).shape == shape
            assert ops.mask_generate(shape, 0.5, seed=0, mode=mode).shape == shape
        assert ops.fgsm(x, x, 0.1).shape == shape
        assert ops.pgd_step(x, x, x, 0.1, 0.1).shape == shape
        assert ops.pgd_step(x, x, x, 0.1, 0.1, norm="2").shape == shape
        assert ops.random_start(x, 0.1, seed=0).shape == shape
        assert ops.random_start(x, 0.1, seed=0, norm="2").shape == shape
    e = [torch.zeros(0), torch.ones(2)]
    assert ops.grad_clip_noise_(e, max_norm=1.0, noise_std=0.1, seed=0).item() == \
        pytest.approx(math.sqrt(2))


def test_non_contiguous(backend):
    base = rand((4, 3, 9, 8), lo=-1)
    x = base.transpose(2, 3)  # 4 x 3 x 8 x 9, not contiguous
    assert not x.is_contiguous()
    xc = x.contiguous()
    for mode in MODES:
        same(ops.mask_apply(x, 0.4, seed=2, offset=3, mode=mode),
             ops.mask_apply(xc, 0.4, seed=2, offset=3, mode=mode))
    g = randn(x.shape, seed=5)[:, :, :, :]
    gnc = randn((4, 3, 9, 8), seed=5).transpose(2, 3)
    same(ops.fgsm(x, gnc, 0.1), ops.fgsm(xc, gnc.contiguous(), 0.1))
    same(ops.pgd_step(x, xc, gnc, 0.1, 0.2), ops.pgd_step(xc, xc, gnc.contiguous(), 0.1, 0.2))
    torch.testing.assert_close(ops.pgd_step(x, xc, gnc, 0.1, 0.2, norm="2"),
                               ops.pgd_step(xc, xc, gnc.contiguous(), 0.1, 0.2, norm="2"))
    same(ops.random_start(x, 0.1, seed=1), ops.random_start(xc, 0.1, seed=1))
    xa, xb = base.clone().transpose(2, 3), xc.clone()
    ops.pgd_step_(xa, xc, g, 0.1, 0.2)
    ops.pgd_step_(xb, xc, g, 0.1, 0.2)
    same(xa.contiguous(), xb)
    ga = [randn((6, 5), seed=1).t()]
    gb = [ga[0].contiguous()]
    ops.grad_clip_noise_(ga, max_norm=1.0, noise_std=0.1, seed=0)
    ops.grad_clip_noise_(gb, max_norm=1.0, noise_std=0.1, seed=0)
    torch.testing.assert_close(ga[0], gb[0])


# ----------------------------------------------------------------------------- errors

X = torch.rand(2, 1, 4, 4)
BAD = [
    (lambda: ops.mask_apply(X, 1.5, seed=0), ValueError, "ratio"),
    (lambda: ops.mask_apply(X, -0.1, seed=0), ValueError, "ratio"),
    (lambda: ops.mask_apply(X, float("nan"), seed=0), ValueError, "ratio"),
    (lambda: ops.mask_apply(X, "0.3", seed=0), TypeError, "ratio"),
    (lambda: ops.mask_apply(X, 0.3, seed=-1), ValueError, "seed"),
    (lambda: ops.mask_apply(X, 0.3, seed=2 ** 64), ValueError, "seed"),
    (lambda: ops.mask_apply(X, 0.3, seed=1.5), TypeError, "seed"),
    (lambda: ops.mask_apply(X, 0.3, seed=0, offset=-1), ValueError, "offset"),
    (lambda: ops.mask_apply(X, 0.3, seed=0, offset=2 ** 64), ValueError, "offset"),
    (lambda: ops.mask_apply(X, 0.3, seed=0, offset=torch.zeros(2, dtype=torch.long)),
     ValueError, "offset"),
    (lambda: ops.mask_apply(X[0], 0.3, seed=0), ValueError, "x"),
    (lambda: ops.mask_apply(X, 0.3, seed=0, mode="dots"), ValueError, "mode"),
    (lambda: ops.mask_apply(X, 0.3, seed=0, scope="batch"), ValueError, "scope"),
    (lambda: ops.mask_apply(X, 0.3, seed=0, channels="rgb"), ValueError, "channels"),
    (lambda: ops.mask_apply(X.long(), 0.3, seed=0), TypeError, "x"),
    (lambda: ops.mask_apply([1.0], 0.3, seed=0), TypeError, "x"),
    (lambda: ops.mask_apply(X, 0.3, seed=0, fill="0"), TypeError, "fill"),
    (lambda: ops.mask_generate((2, 4, 4), 0.3, seed=0), ValueError, "shape"),
    (lambda: ops.mask_generate((2, 1, -4, 4), 0.3, seed=0), ValueError, "shape"),
    (lambda: ops.philox(0, 0, -1), ValueError, "n"),
    (lambda: ops.philox(2 ** 64, 0, 1), ValueError, "seed"),
    (lambda: ops.fgsm(X, X, -0.1), ValueError, "eps"),
    (lambda: ops.fgsm(X, X, 0.1, lo=1.0, hi=0.0), ValueError, "lo"),
    (lambda: ops.fgsm(X, X[0], 0.1), ValueError, "grad"),
    (lambda: ops.fgsm(X, X.double(), 0.1), ValueError, "grad"),
    (lambda: ops.fgsm(X, X.to("meta"), 0.1), ValueError, "grad"),
    (lambda: ops.fgsm(X, X.long(), 0.1), TypeError, "grad"),
    (lambda: ops.pgd_step(X, X, X, 0.0, 0.1), ValueError, "alpha"),
    (lambda: ops.pgd_step(X, X, X, 0.1, -1.0), ValueError, "eps"),
    (lambda: ops.pgd_step(X, X, X, 0.1, 0.1, norm="1"), ValueError, "norm"),
    (lambda: ops.pgd_step(X, X.double(), X, 0.1, 0.1), ValueError, "x_nat"),
    (lambda: ops.pgd_step(X, X, X[:1], 0.1, 0.1), ValueError, "grad"),
    (lambda: ops.pgd_step_(X, X, X, 0.1, 0.1, lo=2.0, hi=1.0), ValueError, "lo"),
    (lambda: ops.random_start(X, -0.1, seed=0), ValueError, "eps"),
    (lambda: ops.random_start(X, 0.1, seed=0, norm="l2"), ValueError, "norm"),
    (lambda: ops.random_start(X, 0.1, seed=0, offset=-5), ValueError, "offset"),
    (lambda: ops.grad_clip_noise_([X], max_norm=0.0, seed=0), ValueError, "max_norm"),
    (lambda: ops.grad_clip_noise_([X], noise_std=-1.0, seed=0), ValueError, "noise_std"),
    (lambda: ops.grad_clip_noise_([X], clip_value=0.0, seed=0), ValueError, "clip_value"),
    (lambda: ops.grad_clip_noise_([X], smoothing=1.0, seed=0, state=[X]), ValueError,
     "smoothing"),
    (lambda: ops.grad_clip_noise_([X], smoothing=0.5, seed=0), ValueError, "state"),
    (lambda: ops.grad_clip_noise_([X], smoothing=0.5, seed=0, state=[X[0]]), ValueError,
     "state[0]"),
    (lambda: ops.grad_clip_noise_([X, X.long()], seed=0), TypeError, "grads[1]"),
    (lambda: ops.grad_clip_noise_([X, X.to("meta")], seed=0), ValueError, "grads[1]"),
    (lambda: ops.grad_clip_noise_(X, seed=0), TypeError, "grads"),
    (lambda: ops.grad_clip_noise_([X], seed=2 ** 64), ValueError, "seed"),
]


@pytest.mark.parametrize("call,exc,name", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_arguments(backend, call, exc, name):
    with pytest.raises(exc, match=rf"\b{name.replace('[', '.').replace(']', '.')}"):
        call()


def test_error_message_names_value():
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\], got 1.5"):
        ops.mask_apply(X, 1.5, seed=0)
    with pytest.raises(ValueError, match=r"mode must be one of .*got 'dots'"):
        ops.mask_generate((1, 1, 2, 2), 0.5, seed=0, mode="dots")


# ----------------------------------------------------------------------------- extension

def test_seed_mapping_to_int64():
    assert ops._u64("seed", 0) == 0 and ops._u64("seed", 2 ** 63 - 1) == 2 ** 63 - 1
    assert ops._u64("seed", 2 ** 63) == -(2 ** 63) and ops._u64("seed", U64) == -1


def test_require_extension():
    if os.environ.get("FASTMASK_REQUIRE_EXT") != "1":
        pytest.skip("FASTMASK_REQUIRE_EXT is not 1")
    assert ops.extension_loaded(), "fastmask._C did not load but FASTMASK_REQUIRE_EXT=1"


def test_disable_extension_subprocess():
    code = ("import torch, fastmask\n"
            "from fastmask import ops\n"
            "assert not ops.extension_loaded()\n"
            "x = torch.rand(2, 1, 4, 4)\n"
            "y = ops.mask_apply(x, 0.5, seed=1)\n"
            "assert torch.equal(y, fastmask.reference.mask_apply(x, 0.5, 1, 0))\n"
            "print('fallback ok')\n")
    env = dict(os.environ, FASTMASK_DISABLE_EXT="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "fallback ok" in out.stdout, out.stderr


@needs_ext
def test_opcheck_every_op():
    fm = torch.ops.fastmask
    x = rand((2, 3, 5, 4), torch.float32)
    xg = rand((2, 3, 5, 4), torch.float64).requires_grad_()
    g = randn(x.shape, seed=1)
    cases = [
        (fm.philox.default, (1, -2, 10, None)),
        (fm.mask_generate.default, ([2, 3, 5, 4], 0.3, 1, 2, "block", "sample", "shared", None)),
        (fm.fgsm.default, (x, g, 0.1, 0.0, 1.0)),
        (fm.pgd_step.default, (x, x, g, 0.1, 0.2, 0.0, 1.0, "inf")),
        (fm.pgd_step.default, (x, x, g, 0.1, 0.2, 0.0, 1.0, "2")),
        (fm.pgd_step_.default, (x.clone(), x, g, 0.1, 0.2, 0.0, 1.0, "inf")),
        (fm.random_start.default, (x, 0.1, 1, 2, "inf", 0.0, 1.0)),
        (fm.random_start.default, (x, 0.1, 1, 2, "2", 0.0, 1.0)),
        (fm.grad_clip_noise_.default,
         ([g.clone(), g[0].clone()], 1.0, 0.1, 1, 2, 0.5, 0.9, [g.clone(), g[0].clone()])),
        (fm.grad_clip_noise_.default, ([g.clone()], None, 0.0, 1, 2, None, None, [])),
    ]
    for mode in MODES:
        for scope, channels in [("sample", "shared"), ("fixed", "separate")]:
            cases.append((fm.mask_apply.default, (xg, 0.4, 3, -4, mode, scope, channels, 0.5)))
            cases.append((fm.mask_apply_backward.default, (g, 0.4, 3, -4, mode, scope, channels)))
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_opcheck_offset_tensor_op():
    x = rand((2, 3, 5, 4), torch.float64).requires_grad_()
    args = (x, 0.4, 3, torch.tensor(5), "blur", "sample", "shared", 0.0)
    torch.library.opcheck(torch.ops.fastmask_py.mask_apply_at.default, args)
    torch.library.opcheck(torch.ops.fastmask_py.mask_apply_backward_at.default,
                          (x.detach(), 0.4, 3, torch.tensor(5), "blur", "sample", "shared"))


# ------------------------------------------------------------------ out= variants

OUT_CASES = [
    ("fgsm", lambda x, g, **kw: ops.fgsm(x, g, 0.1, **kw)),
    ("random_start inf", lambda x, g, **kw: ops.random_start(x, 0.1, seed=3, offset=5, **kw)),
    ("random_start 2", lambda x, g, **kw: ops.random_start(x, 0.5, seed=3, offset=5, norm="2", **kw)),
] + [(f"mask_apply {m}", (lambda m: lambda x, g, **kw: ops.mask_apply(
    x, 0.3, seed=7, offset=2, mode=m, fill=0.25, **kw))(m)) for m in MODES]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name,fn", OUT_CASES, ids=[c[0] for c in OUT_CASES])
def test_out_variants_equal_the_functional_op(backend, dtype, name, fn):
    x = rand((3, 2, 6, 5), dtype)
    g = with_special(randn(x.shape, dtype, seed=1))
    want = fn(x, g)
    out = torch.full_like(x, 9.0)
    assert fn(x, g, out=out) is out
    same(out, want)
    # non-contiguous out, and out = x itself (in place)
    wide = torch.full((3, 2, 6, 10), 9.0, dtype=dtype)
    nc = wide[..., ::2]
    fn(x, g, out=nc)
    same(nc, want)
    assert (wide[..., 1::2] == 9.0).all()  # nothing written between the strided elements
    y = x.clone()
    fn(y, g, out=y)
    same(y, want)


def test_out_overlapping_grad_goes_through_a_temporary(backend):
    x = rand((2, 3, 4, 4))
    g = randn(x.shape, seed=1)
    want = ops.fgsm(x, g, 0.1)
    ops.fgsm(x, g, 0.1, out=g)  # out is the gradient: read before written
    same(g, want)


def test_out_bad_arguments(backend):
    x = rand((2, 3, 4, 4))
    g = randn(x.shape, seed=1)
    with pytest.raises(ValueError, match=r"out must have the shape of x \(2, 3, 4, 4\), got \(3,\)"):
        ops.fgsm(x, g, 0.1, out=torch.empty(3))
    with pytest.raises(ValueError, match="out must have the dtype of x"):
        ops.random_start(x, 0.1, seed=1, out=torch.empty(x.shape, dtype=torch.float64))
    with pytest.raises(TypeError, match="out must be a torch.Tensor or None, got list"):
        ops.mask_apply(x, 0.3, seed=1, out=[])
    with pytest.raises(ValueError, match="out has internally overlapping memory"):
        ops.mask_apply(x, 0.3, seed=1, out=torch.zeros(1, 1, 1, 1).expand(2, 3, 4, 4))
    with pytest.raises(ValueError, match="out= does not support autograd"):
        ops.mask_apply(x.clone().requires_grad_(), 0.3, seed=1, out=torch.empty_like(x))
    with torch.no_grad():  # allowed without a graph
        ops.mask_apply(x.clone().requires_grad_(), 0.3, seed=1, out=torch.empty_like(x))


@needs_ext
def test_out_ops_check_their_arguments_in_cpp():
    x = rand((2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"out must have the shape of x \[2, 3, 4, 4\], got \[3\]"):
        torch.ops.fastmask.fgsm_out(x, x, 0.1, 0.0, 1.0, torch.empty(3))
    with pytest.raises(ValueError, match="ratio must be in"):
        torch.ops.fastmask.mask_apply_out(x, 1.5, 1, 0, "pixel", "sample", "shared", 0.0, x.clone())


@needs_ext
def test_opcheck_out_ops():
    fm = torch.ops.fastmask
    x = rand((2, 3, 5, 4))
    g = randn(x.shape, seed=1)
    cases = [(fm.fgsm_out.default, (x, g, 0.1, 0.0, 1.0, torch.empty_like(x))),
             (fm.random_start_out.default, (x, 0.1, 1, 2, "2", 0.0, 1.0, torch.empty_like(x)))]
    cases += [(fm.mask_apply_out.default, (x, 0.4, 3, 4, m, "sample", "shared", 0.5, torch.empty_like(x)))
              for m in MODES]
    for op, args in cases:
        torch.library.opcheck(op, args)
