"""The C++ CPU kernels, called directly as torch.ops.fastmask.* (not via fastmask.ops).

Hand-computed cases, statistics, bit-for-bit agreement with fastmask.reference where
docs/ops.md says so (allclose where it allows), thread-count independence of the
float64 reductions, non-contiguous and empty inputs, and every argument check.
"""
import math
import os

import pytest
import torch

try:
    import fastmask._C  # noqa: F401  (registers torch.ops.fastmask.*)
except ImportError:
    if os.environ.get("FASTMASK_REQUIRE_EXT") == "1":
        raise
    pytest.skip("fastmask._C is not built", allow_module_level=True)

import isa as isa_paths  # tests/isa.py
from fastmask import reference as ref

ops = torch.ops.fastmask
U64 = (1 << 64) - 1
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
MODES = ["pixel", "blur", "block"]
SCOPES = ["sample", "fixed"]
CHANNELS = ["shared", "separate"]


def i64(v):
    """A seed/offset in [0, 2^64) as the int64 the schema carries (two's complement)."""
    return v - (1 << 64) if v >= 1 << 63 else v


def rand(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g, dtype=torch.float64).to(dtype)


def randn(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


class threads:
    """Run a block with torch.set_num_threads(n), restoring the old count."""

    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


# ----------------------------------------------------------------------------- Philox

def test_philox_known_answer():
    words = ops.philox(0, 0, 4, None)
    assert words.dtype == torch.int64 and words.shape == (4,)
    assert words.tolist() == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


def test_reference_philox_random123_answers():
    # Random123 kat_vectors for philox4x32_10 (ctr, key) -> out: anchors the oracle.
    def block(ctr, key):
        seed, offset = key[0] | key[1] << 32, ctr[2] | ctr[3] << 32
        b = torch.tensor([i64(ctr[0] | ctr[1] << 32)])
        return ref.philox_blocks(seed, offset, b)[0].tolist()

    f = 0xFFFFFFFF
    assert block([f] * 4, [f, f]) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert block([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0]) == [
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


@pytest.mark.parametrize("seed", [0, 1, 2**32 + 5, 2**63 + 11, U64])
@pytest.mark.parametrize("offset", [0, 7, 2**32, 2**63])
def test_philox_matches_reference(seed, offset):
    got = ops.philox(i64(seed), i64(offset), 1037, None)
    assert torch.equal(got, ref.philox(seed, offset, 1037))
    assert got.min() >= 0 and got.max() < 2**32


def test_philox_meta_and_empty():
    assert ops.philox(1, 2, 5, torch.device("meta")).shape == (5,)
    assert ops.philox(1, 2, 0, None).shape == (0,)


# ----------------------------------------------------------------------------- masks

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_mask_ops_match_reference_bitwise(mode, scope, channels, dtype):
    x = randn((3, 2, 5, 7), dtype, seed=1)
    g = randn((3, 2, 5, 7), dtype, seed=2)
    args = (0.4, 123, i64(2**63 + 9), mode, scope, channels)
    mask = ops.mask_generate([3, 2, 5, 7], *args, None)
    assert torch.equal(mask, ref.mask_generate((3, 2, 5, 7), 0.4, 123, 2**63 + 9, mode, scope, channels))
    y = ops.mask_apply(x, *args, 0.25)
    assert y.dtype == dtype
    assert torch.equal(y, ref.mask_apply(x, 0.4, 123, 2**63 + 9, mode, scope, channels, 0.25))
    gx = ops.mask_apply_backward(g, *args)
    assert torch.equal(gx, ref.mask_apply_backward(g, 0.4, 123, 2**63 + 9, mode, scope, channels))
    # mask_apply(x) == where(mask, x, fill) / where(mask, x, blur(x))
    assert torch.equal(y[mask], x[mask])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape,channels", [((2, 1, 100, 90), "separate"), ((5, 3, 61, 59), "shared")])
def test_mask_ops_large_planes_match_reference(mode, shape, channels):
    # planes of 9000 / 3599 elements: the kernels cut them into pieces (and threads) mid-row;
    # shared channels: one word per pixel applied to the 3 channel planes, pieces that start
    # inside a plane and inside a Philox block with 2 and 3 threads
    x = randn(shape, seed=5)
    a = (0.3, 2, 3, mode, "sample", channels)
    want, want_b = ref.mask_apply(x, *a, -1.0), ref.mask_apply_backward(x, *a)
    for threads_n in (1, 2, 3):
        with threads(threads_n):
            assert torch.equal(ops.mask_apply(x, *a, -1.0), want)
            assert torch.equal(ops.mask_apply_backward(x, *a), want_b)
            z = x.clone()
            ops.mask_apply_out(z, *a, -1.0, z)
            assert torch.equal(z, want)


def test_pixel_mask_statistics():
    mask = ops.mask_generate([4, 3, 64, 64], 0.3, 5, 0, "pixel", "sample", "separate", None)
    assert abs(mask.double().mean().item() - 0.7) < 0.01  # 5 sd of a 49152-sample mean
    # separate channels and samples: different masks
    assert not torch.equal(mask[0, 0], mask[0, 1]) and not torch.equal(mask[0, 0], mask[1, 0])
    shared = ops.mask_generate([4, 3, 64, 64], 0.3, 5, 0, "pixel", "sample", "shared", None)
    assert torch.equal(shared[:, 0], shared[:, 1]) and torch.equal(shared[:, 0], shared[:, 2])
    fixed = ops.mask_generate([4, 3, 64, 64], 0.3, 5, 0, "pixel", "fixed", "separate", None)
    assert all(torch.equal(fixed[0], fixed[n]) for n in range(4))
    # mask index of sample/shared element (n, h, w) is (n*H + h)*W + w
    words = ops.philox(5, 0, 4 * 64 * 64, None).reshape(4, 64, 64)
    assert torch.equal(shared[:, 0], (words >> 8) >= math.ceil(0.3 * 2**24))
    # other seeds and offsets give other masks
    assert not torch.equal(mask, ops.mask_generate([4, 3, 64, 64], 0.3, 6, 0, "pixel", "sample", "separate", None))
    assert not torch.equal(mask, ops.mask_generate([4, 3, 64, 64], 0.3, 5, 1, "pixel", "sample", "separate", None))


def test_keep_threshold_edges():
    x = rand((2, 3, 8, 8))
    for mode in MODES:
        y0 = ops.mask_apply(x, 0.0, 1, 2, mode, "sample", "separate", -1.0)
        assert torch.equal(y0, x) and y0.data_ptr() != x.data_ptr()
        assert ops.mask_generate([2, 3, 8, 8], 0.0, 1, 2, mode, "sample", "shared", None).all()
    for mode in ("pixel", "block"):
        assert not ops.mask_generate([2, 3, 8, 8], 1.0, 1, 2, mode, "sample", "shared", None).any()
        assert (ops.mask_apply(x, 1.0, 1, 2, mode, "sample", "shared", -1.0) == -1).all()


def test_block_rectangle_by_hand():
    # seed 0, offset 0: block 0 = 6627e8d5 e169c58d bc57ac4c (w0, w1, w2).
    # H=6, W=8, ratio 0.25: A = floor(12 + 0.5) = 12; hmin = ceil(12/8) = 2, hmax = 6;
    # h = 2 + 0x6627e8d5 % 5 = 3; wd = min(8, floor(27/6)) = 4;
    # top = 0xe169c58d % 4 = 1; left = 0xbc57ac4c % 5 = 3.
    mask = ops.mask_generate([1, 1, 6, 8], 0.25, 0, 0, "block", "sample", "shared", None)
    expected = torch.ones(6, 8, dtype=torch.bool)
    expected[1:4, 3:7] = False
    assert torch.equal(mask[0, 0], expected)


def test_block_area_and_shape():
    H, W = 28, 28
    for ratio in (0.05, 0.2, 0.5, 0.9):
        mask = ops.mask_generate([16, 2, H, W], ratio, 3, 4, "block", "sample", "separate", None)
        A = math.floor(ratio * H * W + 0.5)
        for plane in (~mask).reshape(-1, H, W):
            rows, cols = plane.any(1).nonzero(), plane.any(0).nonzero()
            h, w = len(rows), len(cols)
            assert plane.sum() == h * w  # one solid rectangle
            assert rows.max() - rows.min() + 1 == h and cols.max() - cols.min() + 1 == w
            assert abs(h * w - A) <= h / 2 + 1e-9 or w == W  # wd = round(A/h), capped at W


def test_blur_by_hand():
    x = torch.arange(9, dtype=torch.float32).reshape(1, 1, 3, 3)
    y = ops.mask_apply(x, 1.0, 0, 0, "blur", "sample", "shared", 0.0)
    expected = torch.tensor([[8 / 4, 15 / 6, 12 / 4], [21 / 6, 36 / 9, 27 / 6], [20 / 4, 33 / 6, 24 / 4]])
    assert torch.equal(y[0, 0], expected)
    one = torch.tensor([[[[5.0]]]])
    assert torch.equal(ops.mask_apply(one, 1.0, 0, 0, "blur", "sample", "shared", 0.0), one)


@pytest.mark.parametrize("mode", MODES)
def test_backward_is_the_adjoint(mode):
    x, g = randn((2, 3, 9, 6), torch.float64, 3), randn((2, 3, 9, 6), torch.float64, 4)
    args = (0.45, 77, 3, mode, "sample", "separate")
    y = ops.mask_apply(x, *args, 0.0)  # linear in x for fill = 0
    gx = ops.mask_apply_backward(g, *args)
    assert torch.allclose((y * g).sum(), (x * gx).sum(), rtol=1e-12, atol=1e-12)
    if mode != "blur":
        mask = ops.mask_generate(list(x.shape), *args, None)
        assert torch.equal(gx, torch.where(mask, g, torch.zeros(())))


def test_mask_noncontiguous_and_empty():
    x = randn((2, 3, 7, 5), seed=8).transpose(2, 3)  # 2 x 3 x 5 x 7, not contiguous
    for mode in MODES:
        a = (0.3, 1, 1, mode, "sample", "separate")
        assert torch.equal(ops.mask_apply(x, *a, 0.5), ops.mask_apply(x.contiguous(), *a, 0.5))
        assert torch.equal(ops.mask_apply_backward(x, *a), ops.mask_apply_backward(x.contiguous(), *a))
        for shape in ((0, 3, 4, 4), (2, 3, 0, 4), (2, 0, 4, 4)):
            e = torch.zeros(shape)
            assert ops.mask_apply(e, *a, 0.5).shape == shape
            assert ops.mask_apply_backward(e, *a).shape == shape
            assert ops.mask_generate(list(shape), *a, None).shape == shape


def test_module_runs_on_torch_threads():
    """at::parallel_for in this module splits the work (it is compiled with the OpenMP
    torch uses) and follows torch.set_num_threads; without OpenMP it silently runs serial."""
    from fastmask import _C
    assert _C.build_info()["openmp"]
    for n in (1, 2, 3):
        with threads(n):
            assert _C._parallel_threads(1 << 16, 1) == n


def test_ops_thread_count_independent_at_odd_piece_boundaries():
    """Three threads cut 7x3x61x43 = 55083 elements (and the 7x61x43 mask index space)
    at positions that are not multiples of 4: pieces start inside a Philox block."""
    shape = (7, 3, 61, 43)
    x, g, xn = rand(shape, seed=1), randn(shape, seed=2), rand(shape, seed=3)
    calls = [lambda: ops.philox(5, 6, 55083, None)]
    for mode in MODES:
        for scope in SCOPES:
            for ch in CHANNELS:
                a = (0.3, 11, 12, mode, scope, ch)
                calls += [lambda a=a: ops.mask_apply(x, *a, 0.0), lambda a=a: ops.mask_apply_backward(g, *a)]
    for norm in ("inf", "2"):
        calls += [lambda norm=norm: ops.random_start(x, 0.3, 3, 4, norm, 0.0, 1.0),
                  lambda norm=norm: ops.pgd_step(x, xn, g, 0.01, 0.3, 0.0, 1.0, norm)]
    calls += [lambda: ops.fgsm(x, g, 0.3, 0.0, 1.0)]
    with threads(1):
        one = [c() for c in calls]
    with threads(3):
        three = [c() for c in calls]
    assert all(torch.equal(a, b) for a, b in zip(one, three))


def test_mask_thread_count_independent():
    x = randn((8, 3, 40, 40), seed=9)
    for mode in MODES:
        a = (0.3, 11, 12, mode, "sample", "separate")
        with threads(1):
            y1, g1 = ops.mask_apply(x, *a, 0.0), ops.mask_apply_backward(x, *a)
        with threads(2):
            y2, g2 = ops.mask_apply(x, *a, 0.0), ops.mask_apply_backward(x, *a)
        assert torch.equal(y1, y2) and torch.equal(g1, g2)


# ----------------------------------------------------------------------------- attacks

def test_fgsm_by_hand():
    x = torch.tensor([0.5, 0.5, 0.0, 0.95, 0.2, 0.3])
    g = torch.tensor([1.0, -2.0, 0.0, 3.0, float("nan"), -0.0])
    y = ops.fgsm(x, g, 0.1, 0.0, 1.0)
    f = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    expected = torch.stack([f(0.5) + f(0.1), f(0.5) - f(0.1), f(0.0), f(1.0), f(0.2), f(0.3)])
    assert torch.equal(y, expected)


def test_pgd_inf_by_hand():
    x_nat = torch.tensor([0.5, 0.5, 0.5, 0.0])
    x_adv = torch.tensor([0.55, 0.45, 0.5, 0.0])
    g = torch.tensor([1.0, -1.0, 0.0, -1.0])
    y = ops.pgd_step(x_adv, x_nat, g, 0.1, 0.08, 0.0, 1.0, "inf")
    f = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    # 0.65 -> capped at 0.58; 0.35 -> 0.42; no step; -0.1 -> clamp at lo = 0
    expected = torch.stack([f(0.5) + f(0.08), f(0.5) - f(0.08), f(0.5), f(0.0)])
    assert torch.equal(y, expected)


def test_pgd_l2_by_hand():
    x_nat = torch.zeros(2, 2, dtype=torch.float64)
    g = torch.tensor([[3.0, 4.0], [0.0, -2.0]], dtype=torch.float64)
    y = ops.pgd_step(x_nat.clone(), x_nat, g, 1.0, 0.5, -1.0, 1.0, "2")
    # sample 0: step (0.6, 0.8), norm 1 > eps -> (0.3, 0.4); sample 1: (0, -1) -> (0, -0.5)
    assert torch.allclose(y, torch.tensor([[0.3, 0.4], [0.0, -0.5]], dtype=torch.float64))
    y = ops.pgd_step(x_nat.clone(), x_nat, g, 0.2, 0.5, -1.0, 1.0, "2")  # inside the ball
    assert torch.allclose(y, torch.tensor([[0.12, 0.16], [0.0, -0.2]], dtype=torch.float64))


@pytest.mark.parametrize("dtype", DTYPES)
def test_attacks_match_reference(dtype):
    x_nat = rand((4, 3, 6, 5), dtype, 1)
    x_adv = (x_nat.double() + 0.05 * randn((4, 3, 6, 5), torch.float64, 2)).to(dtype)
    g = randn((4, 3, 6, 5), dtype, 3)
    g.view(-1)[::7] = 0.0
    g.view(-1)[3] = float("nan")
    assert torch.equal(ops.fgsm(x_nat, g, 0.03, 0.0, 1.0), ref.fgsm(x_nat, g, 0.03, 0.0, 1.0))
    a = (0.01, 0.03, 0.0, 1.0)
    assert torch.equal(ops.pgd_step(x_adv, x_nat, g, *a, "inf"), ref.pgd_step(x_adv, x_nat, g, *a, "inf"))
    y = ops.random_start(x_nat, 0.3, 9, i64(2**64 - 3), "inf", 0.0, 1.0)
    assert torch.equal(y, ref.random_start(x_nat, 0.3, 9, 2**64 - 3, "inf", 0.0, 1.0))
    g = randn((4, 3, 6, 5), dtype, 4)  # L2: no NaN (it would spread over the sample)
    # the float64 norms differ in summation order only (~1e-16 relative), so the scales can
    # differ by one opmath ulp: float32 results by a few ulps, float16/bfloat16 by one ulp
    # of theirs after rounding; float64 to 1e-12. Values are O(1) (|x| < 2), the step 0.1.
    ulp = torch.finfo(dtype).eps
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else \
        dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2 * ulp, atol=2 * ulp)
    b = (0.1, 0.5, -10.0, 10.0)
    assert torch.allclose(ops.pgd_step(x_adv, x_nat, g, *b, "2").double(),
                          ref.pgd_step(x_adv, x_nat, g, *b, "2").double(), **tol)
    assert torch.allclose(ops.random_start(x_nat, 0.5, 9, 4, "2", -10.0, 10.0).double(),
                          ref.random_start(x_nat, 0.5, 9, 4, "2", -10.0, 10.0).double(), **tol)


def test_pgd_step_inplace_and_noncontiguous():
    x_nat = rand((6, 10), seed=1)
    g = randn((6, 10), seed=2)
    for norm in ("inf", "2"):
        base = (x_nat + 0.01).t().contiguous()
        x_adv = base.t()  # 6 x 10 view, not contiguous
        expected = ops.pgd_step(x_adv.contiguous(), x_nat, g, 0.05, 0.1, 0.0, 1.0, norm)
        assert torch.equal(ops.pgd_step(x_adv, x_nat.t().contiguous().t(), g, 0.05, 0.1, 0.0, 1.0, norm), expected)
        assert ops.pgd_step_(x_adv, x_nat, g, 0.05, 0.1, 0.0, 1.0, norm) is None
        assert torch.equal(x_adv, expected) and torch.equal(base.t(), expected)
        x = x_nat + 0.01
        ptr = x.data_ptr()
        ops.pgd_step_(x, x_nat, g, 0.05, 0.1, 0.0, 1.0, norm)
        assert torch.equal(x, expected) and x.data_ptr() == ptr
    gt = g.t().contiguous().t()
    assert torch.equal(ops.fgsm(x_nat, gt, 0.1, 0.0, 1.0), ops.fgsm(x_nat, g, 0.1, 0.0, 1.0))


def test_random_start_balls():
    x = torch.full((64, 1, 8, 8), 0.5, dtype=torch.float64)
    y = ops.random_start(x, 0.1, 1, 2, "inf", 0.0, 1.0)
    d = y - x
    assert d.abs().max() <= 0.1 and d.min() < -0.09 and d.max() > 0.09
    assert abs(d.mean().item()) < 0.005  # uniform on [-0.1, 0.1): sd of mean 0.0009
    y2 = ops.random_start(x, 0.1, 1, 2, "2", -10.0, 10.0)
    r = (y2 - x).flatten(1).norm(dim=1)
    assert (r <= 0.1 + 1e-12).all()
    # radius ~ eps * u^(1/64): almost all mass near the sphere
    assert r.median() > 0.095
    assert not torch.equal(y, ops.random_start(x, 0.1, 1, 3, "inf", 0.0, 1.0))


def test_attack_empty_inputs():
    e = torch.zeros(0, 3)
    assert ops.fgsm(e, e, 0.1, 0.0, 1.0).shape == (0, 3)
    for norm in ("inf", "2"):
        assert ops.pgd_step(e, e, e, 0.1, 0.1, 0.0, 1.0, norm).shape == (0, 3)
        assert ops.random_start(e, 0.1, 0, 0, norm, 0.0, 1.0).shape == (0, 3)
        z = torch.zeros(2, 0)
        assert ops.pgd_step(z, z, z, 0.1, 0.1, 0.0, 1.0, norm).shape == (2, 0)
        assert ops.random_start(z, 0.1, 0, 0, norm, 0.0, 1.0).shape == (2, 0)


def test_l2_norms_thread_count_independent():
    x_nat = rand((3, 50000), torch.float32, 1)
    x_adv = x_nat + 0.01
    g = randn((3, 50000), torch.float32, 2)
    out = []
    for n in (1, 2):
        with threads(n):
            out.append((ops.pgd_step(x_adv, x_nat, g, 0.5, 1.0, -5.0, 5.0, "2"),
                        ops.random_start(x_nat, 1.0, 3, 4, "2", -5.0, 5.0)))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


# ----------------------------------------------------------------------------- gradients

def make_grads(dtype=torch.float32):
    shapes = [(300, 200), (10,), (0,), (64, 3, 5, 5), (1,)]
    return [randn(s, dtype, i) for i, s in enumerate(shapes)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("max_norm,noise,clip,beta", [
    (None, 0.0, None, None), (1.0, 0.0, None, None), (1e6, 0.0, None, None),
    (None, 0.0, 0.5, None), (None, 0.3, None, None), (2.0, 0.1, 0.05, 0.9)])
def test_grad_clip_noise_matches_reference(dtype, max_norm, noise, clip, beta):
    grads, expect = make_grads(dtype), make_grads(dtype)
    state = [0.1 * randn(t.shape, dtype, 50 + i) for i, t in enumerate(grads)] if beta is not None else []
    state_ref = [s.clone() for s in state]
    norm = ops.grad_clip_noise_(grads, max_norm, noise, 5, i64(2**63), clip, beta, state)
    norm_ref = ref.grad_clip_noise_(expect, max_norm, noise, 5, 2**63, clip, beta, state_ref)
    assert norm.shape == () and norm.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.allclose(norm, norm_ref, rtol=1e-6)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype != torch.bfloat16 else dict(rtol=1e-2, atol=1e-2)
    for a, b in zip(grads + state, expect + state_ref):
        assert torch.allclose(a.double(), b.double(), **tol)
    if max_norm == 1.0:
        assert torch.linalg.vector_norm(torch.cat([t.double().flatten() for t in grads])) <= 1.0 + 1e-5


def test_grad_norm_value_and_empty_list():
    grads = [torch.tensor([3.0]), torch.tensor([[4.0]])]
    assert ops.grad_clip_noise_(grads, None, 0.0, 0, 0, None, None, []).item() == 5.0
    assert grads[0].item() == 3.0  # nothing to do: untouched
    norm = ops.grad_clip_noise_([], None, 0.0, 0, 0, None, None, [])
    assert norm.item() == 0.0 and norm.dtype == torch.float32


def test_grad_norm_thread_count_independent():
    out = []
    for n in (1, 2):
        grads = make_grads() + [randn((70000,), seed=9)]
        with threads(n):
            norm = ops.grad_clip_noise_(grads, 1.0, 0.01, 1, 2, 0.001, None, [])
        out.append((norm, grads))
    assert torch.equal(out[0][0], out[1][0])
    assert all(torch.equal(a, b) for a, b in zip(out[0][1], out[1][1]))


def test_grad_clip_noise_noncontiguous():
    w = randn((30, 20), seed=1)
    grads = [w.t(), randn((5,), seed=2)]  # the first is a non-contiguous view
    expect = [w.t().contiguous(), grads[1].clone()]
    n1 = ops.grad_clip_noise_(grads, 0.5, 0.2, 3, 4, 0.1, None, [])
    n2 = ops.grad_clip_noise_(expect, 0.5, 0.2, 3, 4, 0.1, None, [])
    assert torch.equal(n1, n2)
    assert torch.equal(grads[0], expect[0]) and torch.equal(w.t(), expect[0])


def test_gaussian_bit_for_bit_with_reference():
    """float32 Box-Muller (docs/ops.md): the kernel's z equals the reference's bit for bit."""
    n = 50001  # odd: the last element uses lanes 0, 1 of its block
    for seed, offset, start in [(0, 0, 0), (2**64 - 1, 2**63 + 7, 3), (12345, 2**32 - 1, 1001)]:
        grads = [torch.zeros(start), torch.zeros(n)]  # noise on zeros: g = float32(1.0 * z)
        ops.grad_clip_noise_(grads, None, 1.0, i64(seed), i64(offset), None, None, [])
        z = ref.normal(seed, offset, n, start=start).float()
        assert torch.equal(grads[1].view(torch.int32), z.view(torch.int32))
    x = torch.rand(10**6) * 60  # the reference's sqrt is IEEE's (numpy's) too
    assert torch.equal(ref.sqrt_rn(x), torch.from_numpy(x.numpy() ** 0.5))
    assert abs(grads[1].double().mean().item()) < 0.02 and abs(grads[1].double().std().item() - 1) < 0.02


def test_gaussian_float32_math_accuracy():
    """logf and cos2pi of the reference (= the kernels) against float64 math, over every
    16th of the 2^24 inputs each (u1 in (0, 1], 2 pi u2 in [0, 2 pi)) plus the ends."""
    k = torch.cat([torch.arange(1, 2**24 + 1, 16), torch.tensor([2, 3, 2**24 - 1, 2**24])])
    got = ref.logf(k.to(torch.float32) * 2.0**-24).double()
    want = torch.log(k.double() * 2.0**-24)
    assert got[-1] == 0.0  # ln 1
    assert ((got - want).abs() / want.abs())[:-1].max() <= 1e-7
    j = torch.cat([torch.arange(0, 2**24, 16), torch.tensor([1, 2**21, 2**22 - 1, 2**22 + 1, 2**24 - 1])])
    got = ref.cos2pi_q24(j.to(torch.int32)).double()
    q, r = j >> 22, (j & (2**22 - 1)).double() * (math.pi / 2 / 2**22)  # exact quadrant split
    want = torch.stack([r.cos(), -r.sin(), -r.cos(), r.sin()]).gather(0, q[None])[0]
    zero = (j % 2**22) == 0
    assert torch.equal(got[zero], want[zero].round())  # exact 0 and +-1 at quarter turns
    assert ((got - want).abs() / want.abs())[~zero].max() <= 2e-7


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_philox_simd_paths_match_reference(isa):
    """Every SIMD Philox path (FASTMASK_CPU_ISA caps the run-time choice) gives the words
    of the scalar reference at unaligned starts and odd lengths, for every scope, and the
    fused float32 kernels (pixel masks, random_start) the reference's values. Skipped where
    the CPU lacks the ISA; the subprocess asserts the ISA that ran (tests/isa.py)."""
    code = """
import torch, fastmask._C
from fastmask import reference as ref
ops = torch.ops.fastmask
def i64(v): return v - (1 << 64) if v >= 1 << 63 else v
for seed, offset, n in [(0, 0, 4099), (2**64 - 1, 2**63 + 5, 1000), (7, 2**32 - 1, 333)]:
    assert torch.equal(ops.philox(i64(seed), i64(offset), n, None), ref.philox(seed, offset, n)), (seed, offset, n)
x = torch.rand(5, 3, 37, 29)
for scope in ("sample", "fixed"):
    y = ops.mask_apply(x, 0.4, 3, i64(2**64 - 2), "pixel", scope, "separate", -1.0)
    assert torch.equal(y, ref.mask_apply(x, 0.4, 3, 2**64 - 2, "pixel", scope, "separate", -1.0))
z = x.clone()  # in place, shared channels, and the backward (fill 0)
ops.mask_apply_out(z, 0.4, 3, 5, "pixel", "sample", "shared", 0.5, z)
assert torch.equal(z, ref.mask_apply(x, 0.4, 3, 5, "pixel", "sample", "shared", 0.5))
gb = ops.mask_apply_backward(x, 0.4, 3, 5, "pixel", "sample", "shared")
assert torch.equal(gb, ref.mask_apply_backward(x, 0.4, 3, 5, "pixel", "sample", "shared"))
for start in (4 * (2**32 - 37) + 2, 4 * (2**33 - 5), 4 * (2**32 - 70)):  # the block counter carries
    got = torch.tensor(fastmask._C._philox_words(2**64 - 3, 5, start, 401), dtype=torch.int64)
    assert torch.equal(got, ref.philox(2**64 - 3, 5, 401, start=start)), start
xs = x.clone()  # random_start: NaN / +-Inf entries, lengths around the 64-word groups, in place
xs.view(-1)[::97], xs.view(-1)[5::101], xs.view(-1)[7::103] = float("nan"), float("inf"), -float("inf")
for n in (16095, 1000, 191, 127, 64, 3):
    xn = xs.view(-1)[:n].reshape(1, n)
    for lo, hi in ((0.0, 1.0), (-2.0, 2.0)):
        want = ref.random_start(xn, 0.3, 11, 2**63 + 1, "inf", lo, hi)
        y = ops.random_start(xn, 0.3, 11, i64(2**63 + 1), "inf", lo, hi)
        assert torch.equal(y.isnan(), want.isnan()) and torch.equal(y.nan_to_num(), want.nan_to_num()), (n, lo)
        z = xn.clone()
        ops.random_start_out(z, 0.3, 11, i64(2**63 + 1), "inf", lo, hi, z)
        assert torch.equal(z.nan_to_num(), want.nan_to_num()), (n, lo)
g = [torch.zeros(100003)]
ops.grad_clip_noise_(g, None, 1.0, 9, 2**40, None, None, [])
assert torch.equal(g[0], ref.normal(9, 2**40, g[0].numel()).float())
print("ok")
"""
    isa_paths.run_on(isa, code)


KEEP_BOUNDARY_CODE = """
import torch, fastmask._C
ops = torch.ops.fastmask
N, C, H, W = 3, 2, 37, 29  # index spaces of 6438 / 3219 / 2146 / 1073 words: whole SIMD groups and ragged ends
x = torch.rand(N, C, H, W)
n_, h_, w_ = torch.meshgrid(torch.arange(N), torch.arange(H), torch.arange(W), indexing="ij")
for scope, channels in (("sample", "separate"), ("sample", "shared"), ("fixed", "separate"), ("fixed", "shared")):
    units = (N if scope == "sample" else 1) * (C if channels == "separate" else 1)
    words = ops.philox(5, 7, units * H * W, None)  # the Philox words are checked against Random123 elsewhere
    idx = torch.empty(N, C, H, W, dtype=torch.long)  # docs/ops.md's mask index table
    for c in range(C):
        u = (n_ * (C if channels == "separate" else 1) + (c if channels == "separate" else 0)) if scope == "sample" \
            else (torch.full_like(n_, c) if channels == "separate" else torch.zeros_like(n_))
        idx[:, c] = (u * H + h_) * W + w_
    for k in (0, 37, len(words) // 2 + 3, len(words) - 1):  # ratio = u(word k) exactly: word k is kept
        t = int(words[k]) >> 8
        ratio = t * 2.0 ** -24
        keep = ((words >> 8) >= t)[idx]
        m = ops.mask_generate([N, C, H, W], ratio, 5, 7, "pixel", scope, channels, None)
        assert torch.equal(m, keep), (scope, channels, k)
        y = ops.mask_apply(x, ratio, 5, 7, "pixel", scope, channels, float("nan"))
        assert torch.equal(y.isnan(), ~keep) and torch.equal(y[keep], x[keep]), (scope, channels, k)
        z = x.clone()
        ops.mask_apply_out(z, ratio, 5, 7, "pixel", scope, channels, -1.0, z)
        assert torch.equal(z, torch.where(keep, x, torch.tensor(-1.0))), (scope, channels, k)
        gb = ops.mask_apply_backward(x, ratio, 5, 7, "pixel", scope, channels)
        assert torch.equal(gb, torch.where(keep, x, torch.tensor(0.0))), (scope, channels, k)
print("ok")
"""


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_keep_boundary_on_every_isa(isa):
    """keep(w, ratio) is (w >> 8) >= T(ratio): with ratio = u(word k) exactly, word k is kept
    (u > ratio would drop it; the boundary is hit with probability 2^-24 per element in the
    random tests). float32 pixel masks through every CPU path: fused SIMD groups, ragged ends,
    per-pixel shared channels, fixed scope, in place and the backward."""
    isa_paths.run_on(isa, KEEP_BOUNDARY_CODE)


def _cpu_has(isa):
    flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
    return isa == "scalar" or {"avx2": "avx2", "avx512": "avx512f"}[isa] in flags


def _isa_prelude(isa):
    """The first lines of an every-ISA subprocess check: the ops, the assertion that the
    extension picked `isa`, and the helpers the checks compare with."""
    return f"""import torch, fastmask._C
from fastmask import ops as fops, reference as ref
ops = torch.ops.fastmask
assert fops.build_info()["cpu_isa"] == {isa!r}, fops.build_info()
def i64(v): return v - (1 << 64) if v >= 1 << 63 else v
def same(a, b): return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
"""


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_every_isa_fused_paths_bitwise_at_1_2_3_threads(isa):
    """Under each FASTMASK_CPU_ISA cap (which must then be the path in use: build_info
    says so, for the Philox kernels and the element loops alike) the fused float32 paths
    equal the reference bit for bit: pixel masks (one and three shared channels, separate
    channels, in place) and L-inf random_start over ragged lengths around the 32- and
    64-word groups, NaN / +-Inf inputs, fgsm / pgd_step_ (element loops), and the
    Gaussian noise of grad_clip_noise_ over ragged lengths; at 1, 2 and 3 threads, with
    pieces large enough that every thread gets a part."""
    import subprocess
    import sys
    if not _cpu_has(isa):
        pytest.skip(f"this CPU has no {isa}")
    code = _isa_prelude(isa) + f"""
g = torch.Generator().manual_seed(1)
def special(x):
    f = x.view(-1)
    f[::89], f[3::97], f[8::101] = float("nan"), float("inf"), -float("inf")
    return x
for t in (1, 2, 3):
    torch.set_num_threads(t)
    # ragged planes: every start modulo 64, lengths around the groups; big ones split over threads
    for shape in ((3, 1, 1, 131), (2, 1, 5, 13), (7, 1, 9, 31), (40, 1, 33, 31), (9, 3, 37, 29), (1, 1, 1, 255)):
        x = special(torch.rand(shape, generator=g))
        for scope in ("sample", "fixed"):
            for ch in ("shared", "separate"):
                want = ref.mask_apply(x, 0.37, 5, 2**64 - 9, "pixel", scope, ch, -2.5)
                y = ops.mask_apply(x, 0.37, 5, i64(2**64 - 9), "pixel", scope, ch, -2.5)
                assert same(y, want), (t, shape, scope, ch)
                z = x.clone()
                ops.mask_apply_out(z, 0.37, 5, i64(2**64 - 9), "pixel", scope, ch, -2.5, z)
                assert same(z, want), (t, shape, scope, ch, "in place")
        for r in (0.0, 1.0):
            assert same(ops.mask_apply(x, r, 5, 3, "pixel", "sample", "shared", 0.0),
                        ref.mask_apply(x, r, 5, 3, "pixel", "sample", "shared", 0.0)), (t, shape, r)
        xs = x.reshape(shape[0], -1)
        for lo, hi in ((0.0, 1.0), (-3.0, 3.0)):
            want = ref.random_start(xs, 0.25, 13, 2**63 + 3, "inf", lo, hi)
            assert same(ops.random_start(xs, 0.25, 13, i64(2**63 + 3), "inf", lo, hi), want), (t, shape, lo)
            z = xs.clone()
            ops.random_start_out(z, 0.25, 13, i64(2**63 + 3), "inf", lo, hi, z)
            assert same(z, want), (t, shape, lo, "in place")
        gr = special(torch.randn(shape, generator=g))
        xa = x.clone()
        assert same(ops.fgsm(x, gr, 0.1, 0.0, 1.0), ref.fgsm(x, gr, 0.1, 0.0, 1.0)), (t, shape)
        want = ref.pgd_step(xa, x.nan_to_num(), gr, 0.01, 0.03, 0.0, 1.0, "inf")
        ops.pgd_step_(xa, x.nan_to_num(), gr, 0.01, 0.03, 0.0, 1.0, "inf")
        assert same(xa, want), (t, shape)
    for n in (1, 7, 31, 33, 1023, 1025, 40001):
        gs = [torch.zeros(n), torch.zeros(n + 3)]
        ops.grad_clip_noise_(gs, None, 1.0, 9, 2**40 + 1, None, None, [])
        z = ref.normal(9, 2**40 + 1, 2 * n + 3).float()
        assert torch.equal(torch.cat(gs), z), (t, n)
print("ok")
"""
    env = dict(os.environ, FASTMASK_CPU_ISA=isa)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_blur_forward_planes_bitwise(isa):
    """The blur forward (whole planes, zero-padded, a row loop per ISA) equals the
    reference bit for bit: ragged W, H < 3, W == 1, one pixel, C > 1 with shared and
    separate channels, both scopes, float32 (NaN / +-Inf entries too) / float64 / half /
    bfloat16, at 1, 2 and 3 threads with enough planes that every thread gets some, and
    through mask_apply_out in place."""
    import subprocess
    import sys
    if not _cpu_has(isa):
        pytest.skip(f"this CPU has no {isa}")
    code = _isa_prelude(isa) + f"""
g = torch.Generator().manual_seed(4)
shapes = ((3, 1, 5, 13), (2, 3, 2, 7), (2, 2, 1, 9), (3, 2, 6, 1), (1, 1, 1, 1), (4, 3, 9, 31),
          (2, 1, 2, 2), (70, 1, 28, 28), (5, 3, 17, 33))
for t in (1, 2, 3):
    torch.set_num_threads(t)
    for shape in shapes:
        for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
            if dtype == torch.float32:
                f = x.view(-1)
                f[::89], f[3::97], f[8::101] = float("nan"), float("inf"), -float("inf")
            for scope in ("sample", "fixed"):
                for ch in ("shared", "separate"):
                    for r in (0.45, 1.0):
                        a = (r, 7, 2**64 - 5, "blur", scope, ch)
                        want = ref.mask_apply(x, *a, 0.0)
                        y = ops.mask_apply(x, r, 7, i64(2**64 - 5), "blur", scope, ch, 0.0)
                        assert y.dtype == dtype and same(y, want), (t, shape, dtype, scope, ch, r)
                        z = x.clone()
                        ops.mask_apply_out(z, r, 7, i64(2**64 - 5), "blur", scope, ch, 0.0, z)
                        assert same(z, want), (t, shape, dtype, scope, ch, r, "in place")
print("ok")
"""
    env = dict(os.environ, FASTMASK_CPU_ISA=isa)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


# ----------------------------------------------------------------------------- errors

X4 = torch.zeros(2, 1, 3, 3)
V = torch.zeros(4)
MA = ("pixel", "sample", "shared")
CPU_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)

ERRORS = [
    (lambda: ops.mask_apply(X4, -0.1, 0, 0, *MA, 0.0), ValueError, "ratio must be in [0, 1], got -0.1"),
    (lambda: ops.mask_apply(X4, 1.5, 0, 0, *MA, 0.0), ValueError, "ratio must be in [0, 1], got 1.5"),
    (lambda: ops.mask_apply(X4, float("nan"), 0, 0, *MA, 0.0), ValueError, "ratio"),
    (lambda: ops.mask_generate([2, 1, 3, 3], 2.0, 0, 0, *MA, None), ValueError, "ratio"),
    (lambda: ops.mask_apply_backward(X4, -1.0, 0, 0, *MA), ValueError, "ratio"),
    (lambda: ops.mask_apply(torch.zeros(1, 3, 3), 0.5, 0, 0, *MA, 0.0), ValueError, "x must be 4-D"),
    (lambda: ops.mask_apply_backward(torch.zeros(3, 3), 0.5, 0, 0, *MA), ValueError, "grad must be 4-D"),
    (lambda: ops.mask_apply(X4, 0.5, 0, 0, "foo", "sample", "shared", 0.0), ValueError, "mode must be 'pixel', 'blur' or 'block', got 'foo'"),
    (lambda: ops.mask_apply(X4, 0.5, 0, 0, "pixel", "bar", "shared", 0.0), ValueError, "scope must be 'sample' or 'fixed', got 'bar'"),
    (lambda: ops.mask_apply(X4, 0.5, 0, 0, "pixel", "sample", "baz", 0.0), ValueError, "channels must be 'shared' or 'separate', got 'baz'"),
    (lambda: ops.mask_generate([2, 3, 3], 0.5, 0, 0, *MA, None), ValueError, "shape must have 4 entries"),
    (lambda: ops.mask_generate([2, -1, 3, 3], 0.5, 0, 0, *MA, None), ValueError, "shape must be non-negative"),
    (lambda: ops.mask_apply(X4.long(), 0.5, 0, 0, *MA, 0.0), TypeError, "x must be a floating tensor"),
    (lambda: ops.philox(0, 0, -1, None), ValueError, "n must be >= 0, got -1"),
    (lambda: ops.fgsm(V, V, -0.1, 0.0, 1.0), ValueError, "eps must be >= 0, got -0.1"),
    (lambda: ops.fgsm(V, V, 0.1, 1.0, 0.0), ValueError, "lo must be <= hi, got lo=1, hi=0"),
    (lambda: ops.fgsm(V, torch.zeros(5), 0.1, 0.0, 1.0), ValueError, "grad must have the shape of x"),
    (lambda: ops.fgsm(V, V.double(), 0.1, 0.0, 1.0), TypeError, "grad must have the dtype of x"),
    (lambda: ops.fgsm(V.int(), V.int(), 0.1, 0.0, 1.0), TypeError, "x must be a floating tensor"),
    (lambda: ops.pgd_step(V, V, V, 0.0, 0.1, 0.0, 1.0, "inf"), ValueError, "alpha must be > 0, got 0"),
    (lambda: ops.pgd_step(V, V, V, 0.1, -1.0, 0.0, 1.0, "inf"), ValueError, "eps must be >= 0, got -1"),
    (lambda: ops.pgd_step(V, V, V, 0.1, 0.1, 2.0, 1.0, "inf"), ValueError, "lo must be <= hi"),
    (lambda: ops.pgd_step(V, V, V, 0.1, 0.1, 0.0, 1.0, "1"), ValueError, "norm must be 'inf' or '2', got '1'"),
    (lambda: ops.pgd_step(V, V[:3], V, 0.1, 0.1, 0.0, 1.0, "inf"), ValueError, "x_nat must have the shape of x_adv"),
    (lambda: ops.pgd_step(V, V.double(), V, 0.1, 0.1, 0.0, 1.0, "inf"), TypeError, "x_nat must have the dtype of x_adv"),
    (lambda: ops.pgd_step(V, V, V.half(), 0.1, 0.1, 0.0, 1.0, "inf"), TypeError, "grad must have the dtype of x_adv"),
    (lambda: ops.pgd_step(*[torch.tensor(1.0)] * 3, 0.1, 0.1, 0.0, 1.0, "2"), ValueError, "x_adv must have a batch dimension"),
    (lambda: ops.random_start(torch.tensor(1.0), 0.1, 0, 0, "2", 0.0, 1.0), ValueError, "x must have a batch dimension"),
    (lambda: ops.pgd_step_(V, V, V, -0.1, 0.1, 0.0, 1.0, "inf"), ValueError, "alpha must be > 0"),
    (lambda: ops.random_start(V, -0.5, 0, 0, "inf", 0.0, 1.0), ValueError, "eps must be >= 0, got -0.5"),
    (lambda: ops.random_start(V, 0.5, 0, 0, "l1", 0.0, 1.0), ValueError, "norm must be 'inf' or '2', got 'l1'"),
    (lambda: ops.random_start(V, 0.5, 0, 0, "inf", 1.0, -1.0), ValueError, "lo must be <= hi"),
    (lambda: ops.grad_clip_noise_([V], 0.0, 0.0, 0, 0, None, None, []), ValueError, "max_norm must be > 0, got 0"),
    (lambda: ops.grad_clip_noise_([V], None, -1.0, 0, 0, None, None, []), ValueError, "noise_std must be >= 0, got -1"),
    (lambda: ops.grad_clip_noise_([V], None, 0.0, 0, 0, 0.0, None, []), ValueError, "clip_value must be > 0, got 0"),
    (lambda: ops.grad_clip_noise_([V], None, 0.0, 0, 0, None, 1.0, [V]), ValueError, "smoothing must be in [0, 1), got 1"),
    (lambda: ops.grad_clip_noise_([V], None, 0.0, 0, 0, None, 0.5, []), ValueError, "state must hold one tensor per grad (1), got 0"),
    (lambda: ops.grad_clip_noise_([V], None, 0.0, 0, 0, None, None, [V]), ValueError, "state must be empty"),
    (lambda: ops.grad_clip_noise_([V], None, 0.0, 0, 0, None, 0.5, [V[:2]]), ValueError, "state[0] must have the shape of grads[0]"),
    (lambda: ops.grad_clip_noise_([V, V.long()], None, 0.0, 0, 0, None, None, []), TypeError, "grads[1] must be a floating tensor"),
    # device mismatches reach the CPU kernel only when dispatched to it explicitly
    # (a meta tensor otherwise sends the call to the fake kernel)
    (lambda: ops.fgsm.default.redispatch(CPU_KEYS, V, V.to("meta"), 0.1, 0.0, 1.0), ValueError,
     "grad must be on the device of x (cpu), got meta"),
    (lambda: ops.pgd_step.default.redispatch(CPU_KEYS, V, V.to("meta"), V, 0.1, 0.1, 0.0, 1.0, "inf"),
     ValueError, "x_nat must be on the device of x_adv"),
    (lambda: ops.grad_clip_noise_.default.redispatch(CPU_KEYS, [V, V.to("meta")], None, 0.0, 0, 0, None, None, []),
     ValueError, "grads[1] must be on the device of grads[0] (cpu), got meta"),
]


@pytest.mark.parametrize("call,exc,message", ERRORS, ids=[e[2][:40] for e in ERRORS])
def test_argument_errors(call, exc, message):
    with pytest.raises(exc) as info:
        call()
    assert message in str(info.value)
