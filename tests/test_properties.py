"""Property-based tests (hypothesis) of every op: the C++ kernels (through fastmask.ops)
against the pure-PyTorch reference, over random shapes (empty, 1-element, odd sizes),
layouts (contiguous, transposed, sliced with gaps, expanded, channels_last), dtypes
(float16, bfloat16, float32, float64) and values (NaN, +-Inf, -0, denormals, the
largest finite value), plus seeds/offsets anywhere in [0, 2^64) and ratios at the edges.

Bit for bit where docs/ops.md says so (NaN == NaN, -0 != +0); allclose for the L2 ops
and the Gaussian noise. The hypothesis profile is fixed (derandomize=True, no example
database, a stated max_examples per test), so CI runs the same cases every time.
FASTMASK_PROPERTY_EXAMPLES scales the number of examples (default below); the count
actually run is written to $FASTMASK_PROPERTY_REPORT (JSON) when that is set.

Without the extension (FASTMASK_DISABLE_EXT=1 or not built) the comparisons with the
reference are skipped; the invariant properties (mask_apply = where(mask_generate, ...),
eps-ball, bounds) still run through the fallback.
"""
import collections
import json
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastmask import ops
from fastmask import reference as ref

EXAMPLES = int(os.environ.get("FASTMASK_PROPERTY_EXAMPLES", "100"))
PROFILE = settings(derandomize=True, database=None, deadline=None, max_examples=EXAMPLES,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                   print_blob=True)
COUNTS = collections.Counter()  # examples run, per test
needs_ext = pytest.mark.skipif(not ops._ext_available,
                               reason="fastmask._C is not built or FASTMASK_DISABLE_EXT=1")
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
U64 = (1 << 64) - 1


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    total = sum(COUNTS.values())
    path = os.environ.get("FASTMASK_PROPERTY_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump({"examples_per_test": EXAMPLES, "total": total, "per_test": dict(COUNTS)},
                      f, indent=1)
    print(f"\n[test_properties] {total} hypothesis examples in {len(COUNTS)} tests")


@pytest.fixture(autouse=True)
def _ext_on():
    """Every test starts on the extension when it is built (monkeypatching could leak)."""
    old = ops._use_ext
    ops._use_ext = ops._ext_available
    yield
    ops._use_ext = old


def count(name):
    COUNTS[name] += 1


# ----------------------------------------------------------------------------- strategies

def specials(dtype):
    fi = torch.finfo(dtype)
    return [math.nan, math.inf, -math.inf, -0.0, 0.0, fi.tiny / 4, -fi.tiny / 4, fi.max,
            -fi.max, fi.tiny, 1.0, -1.0]


u64s = st.one_of(st.integers(0, U64), st.sampled_from([0, 1, 2 ** 32 - 1, 2 ** 32, 2 ** 63 - 1,
                                                        2 ** 63, U64]))
ratios = st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, 1.0, 2.0 ** -24, 0.5, 1 - 2.0 ** -24,
                                                         5e-324, 0.3]))
LAYOUTS = ["contiguous", "transposed", "sliced", "expanded", "channels_last"]


@st.composite
def tensors(draw, shape, dtype, layouts=LAYOUTS, special=True, scale=None):
    """A tensor of `shape`/`dtype` in a drawn layout, filled from a drawn seed, with up to 6
    special values at drawn positions. Returns (strided view, contiguous copy, layout)."""
    seed = draw(st.integers(0, 2 ** 31 - 1))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([1.0, 1e-3, 100.0])) if scale is None else scale
    vals = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    layout = draw(st.sampled_from(layouts))
    if layout == "expanded" and len(shape) == 0:
        layout = "contiguous"
    if layout == "expanded":
        vals = vals.narrow(0, 0, min(1, shape[0])).expand(shape)
    flat = vals.contiguous().reshape(-1)
    if special and flat.numel():
        for _ in range(draw(st.integers(0, 6))):
            i = draw(st.integers(0, flat.numel() - 1))
            flat[i] = draw(st.sampled_from(specials(dtype)))
        if layout == "expanded":  # keep the values constant along the expanded dim 0
            flat = flat.reshape(shape).narrow(0, 0, min(1, shape[0])).expand(shape).reshape(-1)
    vals = flat.reshape(shape).clone()
    if layout == "transposed" and len(shape) >= 2:
        base = torch.empty(shape[:-2] + (shape[-1], shape[-2]), dtype=dtype)
        view = base.transpose(-1, -2)
    elif layout == "sliced" and len(shape) >= 1:
        # every other element of a NaN-filled buffer, starting one row in: a kernel that
        # ignores the strides reads NaN gaps
        big = (shape[0] + 1,) + shape[1:-1] + (2 * shape[-1] + 1,) if len(shape) > 1 \
            else (2 * shape[0] + 2,)
        base = torch.full(big, math.nan, dtype=dtype)
        view = base[1:, ..., 1::2] if len(shape) > 1 else base[1::2][:shape[0]]
    elif layout == "expanded":
        view = vals.narrow(0, 0, min(1, shape[0])).clone().expand(shape)
        return view, vals, layout
    elif layout == "channels_last" and len(shape) == 4:
        view = torch.empty(shape, dtype=dtype).contiguous(memory_format=torch.channels_last)
    else:
        view, layout = torch.empty(shape, dtype=dtype), "contiguous"
    view.copy_(vals)
    assert view.shape == tuple(shape)
    return view, vals, layout


shapes4 = st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 7), st.integers(0, 7))
shapes_any = st.lists(st.integers(0, 6), min_size=0, max_size=4).map(tuple)
shapes_batched = st.lists(st.integers(0, 6), min_size=1, max_size=4).map(tuple)
dtypes = st.sampled_from(DTYPES)
# finite scalars in opmath range and beyond (1e300 becomes inf in float32 opmath)
magnitudes = st.one_of(st.floats(0.0, 10.0), st.sampled_from([0.0, 5e-324, 1e-30, 1e30, 1e300]))


@st.composite
def bounds(draw):
    lo = draw(st.one_of(st.floats(-2.0, 1.0), st.sampled_from([-math.inf, -1e300, 0.0])))
    hi = draw(st.one_of(st.floats(lo, lo + 3.0) if math.isfinite(lo) else st.floats(-2.0, 2.0),
                        st.sampled_from([math.inf, 1e300])))
    return lo, max(lo, hi)


# ----------------------------------------------------------------------------- comparisons

def same(a, b, what="", zero_sign=True):
    """Bit-for-bit equality (NaN == NaN whatever the payload), dtype and shape. -0 != +0
    unless zero_sign=False: min/max/clamp of +0 and -0 may give either zero (docs/ops.md)."""
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
    if not a.is_floating_point():
        assert torch.equal(a, b), what
        return
    a, b = a.contiguous(), b.contiguous()
    nan = torch.isnan(a) & torch.isnan(b)
    bits = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
            torch.bfloat16: torch.int16}[a.dtype]
    eq = (a.view(bits) == b.view(bits)) | nan
    if not zero_sign:
        eq = eq | ((a == 0) & (b == 0))
    if not bool(eq.all()):
        i = int((~eq).reshape(-1).nonzero()[0])
        raise AssertionError(f"{what}: {int((~eq).sum())} of {a.numel()} elements differ, first at "
                             f"{i}: {a.reshape(-1)[i].item()!r} vs {b.reshape(-1)[i].item()!r}")


def close(a, b, what="", ulps=4, floor=0.0):
    """Equal up to rounding, compared by class: the same NaN positions, the same
    infinities (sign included), and each finite element within `ulps` ulps of the dtype of
    its own magnitude max(|b|, floor). floor (a scalar or a tensor like b) is the size of
    the terms that element is a sum of, where cancellation can leave a result smaller
    than its rounding error (e.g. eps for x + d with ||d|| <= eps); never the largest
    input of the whole tensor, which would let a huge planted value accept anything."""
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
    a64, b64 = a.double(), b.double()
    nan_a, nan_b = a64.isnan(), b64.isnan()
    assert torch.equal(nan_a, nan_b), f"{what}: NaN at {int((nan_a != nan_b).sum())} other positions"
    inf = b64.isinf()
    assert torch.equal(a64.isinf(), inf) and torch.equal(a64[inf], b64[inf]), f"{what}: infinities differ"
    fi = torch.finfo(a.dtype)
    floor = torch.as_tensor(floor, dtype=torch.float64).expand_as(b64)
    tol = ulps * (fi.eps * torch.maximum(b64.abs(), floor.nan_to_num(posinf=0.0)) + fi.tiny)
    fin = torch.isfinite(b64)
    err = (a64 - b64).abs()
    bad = fin & ~(err <= tol)
    if bool(bad.any()):
        i = int(bad.reshape(-1).nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {a.numel()} elements differ by more than {ulps} "
                             f"ulps, first at {i}: {a64.reshape(-1)[i].item()!r} vs {b64.reshape(-1)[i].item()!r} "
                             f"(tolerance {tol.reshape(-1)[i].item():.3g})")


def test_close_is_tight_beside_extreme_values():
    """close() compares each element at its own magnitude: a 1e-4 relative error beside a
    planted finfo.max (which the old tolerance, scaled by the largest input, accepted),
    a moved NaN or a flipped infinity are refused; 1-ulp differences are accepted."""
    for dtype in (torch.float32, torch.float64):
        fi = torch.finfo(dtype)
        b = torch.tensor([1.0, 0.5, fi.max, -fi.max, math.nan, math.inf, -3.0, 0.0], dtype=dtype)
        ok = torch.nextafter(b, torch.full_like(b, math.inf))
        ok[2:6] = b[2:6]
        close(ok, b)
        for i, v in ((1, 0.5 * (1 + 1e-4)), (4, 0.0), (5, -math.inf), (7, 1e3 * fi.eps)):
            bad = b.clone()
            bad[i] = v
            with pytest.raises(AssertionError):
                close(bad, b)
        moved = b.clone()
        moved[0] = math.nan
        with pytest.raises(AssertionError):
            close(moved, b)


# ----------------------------------------------------------------------------- philox

@needs_ext
@PROFILE
@given(seed=u64s, offset=u64s, n=st.integers(0, 70))
def test_philox(seed, offset, n):
    count("philox")
    same(ops.philox(seed, offset, n), ref.philox(seed, offset, n), "philox")


# ----------------------------------------------------------------------------- masks

@needs_ext
@PROFILE
@given(data=st.data(), shape=shapes4, ratio=ratios, seed=u64s, offset=u64s,
       mode=st.sampled_from(ops.MODES), scope=st.sampled_from(ops.SCOPES),
       channels=st.sampled_from(ops.CHANNELS))
def test_mask_generate(data, shape, ratio, seed, offset, mode, scope, channels):
    count("mask_generate")
    same(ops.mask_generate(shape, ratio, seed=seed, offset=offset, mode=mode, scope=scope,
                           channels=channels),
         ref.mask_generate(shape, ratio, seed, offset, mode, scope, channels), "mask_generate")


@needs_ext
@PROFILE
@given(data=st.data(), shape=shapes4, dtype=dtypes, ratio=ratios, seed=u64s, offset=u64s,
       mode=st.sampled_from(ops.MODES), scope=st.sampled_from(ops.SCOPES),
       channels=st.sampled_from(ops.CHANNELS),
       fill=st.one_of(st.floats(-2, 2), st.sampled_from([0.0, -0.0, math.nan, math.inf, 1e300])))
def test_mask_apply_and_backward(data, shape, dtype, ratio, seed, offset, mode, scope, channels,
                                 fill):
    count("mask_apply+backward")
    x, xc, layout = data.draw(tensors(shape, dtype), label="x")
    kw = dict(seed=seed, offset=offset, mode=mode, scope=scope, channels=channels)
    y = ops.mask_apply(x, ratio, fill=fill, **kw)
    same(y, ref.mask_apply(xc, ratio, seed, offset, mode, scope, channels, fill),
         f"mask_apply {layout}")
    g, gc, glayout = data.draw(tensors(shape, dtype), label="grad")
    gx = torch.ops.fastmask.mask_apply_backward(g, ratio, ops._u64("seed", seed),
                                                ops._u64("offset", offset), mode, scope, channels)
    same(gx, ref.mask_apply_backward(gc, ratio, seed, offset, mode, scope, channels),
         f"mask_apply_backward {glayout}")
    # the autograd path regenerates the same mask
    xr = xc.clone().requires_grad_(True)
    ops.mask_apply(xr, ratio, fill=fill, **kw).backward(gc)
    same(xr.grad, gx, "autograd backward")


@PROFILE
@given(data=st.data(), shape=shapes4, dtype=dtypes, ratio=ratios, seed=u64s, offset=u64s,
       mode=st.sampled_from(["pixel", "block"]), scope=st.sampled_from(ops.SCOPES),
       channels=st.sampled_from(ops.CHANNELS), fill=st.floats(allow_nan=True),
       use_ext=st.booleans())
def test_mask_apply_is_where_of_mask_generate(data, shape, dtype, ratio, seed, offset, mode, scope,
                                              channels, fill, use_ext):
    """docs/ops.md: mask_apply(x) == where(mask_generate, x, fill) bit for bit, both backends."""
    count("mask_apply==where(mask)")
    ops._use_ext = use_ext and ops._ext_available
    x, xc, _ = data.draw(tensors(shape, dtype), label="x")
    kw = dict(seed=seed, offset=offset, mode=mode, scope=scope, channels=channels)
    keep = ops.mask_generate(shape, ratio, **kw)
    expect = torch.where(keep, xc, torch.tensor(fill, dtype=ref.opmath_dtype(dtype)).to(dtype))
    same(ops.mask_apply(x, ratio, fill=fill, **kw), expect, "where")
    if ratio == 0:
        assert bool(keep.all())
    if ratio == 1 and mode == "pixel":
        assert not bool(keep.any())


# ----------------------------------------------------------------------------- attacks

@st.composite
def like(draw, shape, dtype, n):
    return [draw(tensors(shape, dtype)) for _ in range(n)]


@needs_ext
@PROFILE
@given(data=st.data(), shape=shapes_any, dtype=dtypes, eps=magnitudes, lohi=bounds())
def test_fgsm(data, shape, dtype, eps, lohi):
    count("fgsm")
    (x, xc, lx), (g, gc, lg) = data.draw(like(shape, dtype, 2))
    lo, hi = lohi
    same(ops.fgsm(x, g, eps, lo, hi), ref.fgsm(xc, gc, eps, lo, hi), f"fgsm {lx}/{lg}",
         zero_sign=False)


@needs_ext
@PROFILE
@given(data=st.data(), shape=shapes_any, dtype=dtypes, alpha=magnitudes.filter(lambda a: a > 0),
       eps=magnitudes, lohi=bounds(), inplace=st.booleans())
def test_pgd_step_inf(data, shape, dtype, alpha, eps, lohi, inplace):
    count("pgd_step inf")
    layouts = [l for l in LAYOUTS if l != "expanded"] if inplace else LAYOUTS
    xa, xac, la = data.draw(tensors(shape, dtype, layouts=layouts), label="x_adv")
    (xn, xnc, ln), (g, gc, lg) = data.draw(like(shape, dtype, 2))
    lo, hi = lohi
    expect = ref.pgd_step(xac, xnc, gc, alpha, eps, lo, hi, "inf")
    if inplace:
        before = xa.data_ptr(), xa.stride()
        assert ops.pgd_step_(xa, xn, g, alpha, eps, lo, hi, "inf") is xa
        assert (xa.data_ptr(), xa.stride()) == before
        same(xa, expect, f"pgd_step_ inf {la}/{ln}/{lg}", zero_sign=False)
    else:
        same(ops.pgd_step(xa, xn, g, alpha, eps, lo, hi, "inf"), expect, f"pgd_step {la}/{ln}/{lg}",
             zero_sign=False)


@needs_ext
@PROFILE
@given(data=st.data(), shape=shapes_batched, dtype=dtypes, alpha=st.floats(1e-3, 2.0),
       eps=st.floats(0.0, 2.0), inplace=st.booleans(), special=st.booleans(),
       lohi=st.one_of(st.just((-math.inf, math.inf)), bounds()))
def test_pgd_step_l2(data, shape, dtype, alpha, eps, inplace, special, lohi):
    """allclose: the per-sample norms are float64 sums in an implementation-defined order.
    Special values (NaN/Inf/huge) are drawn for half of the examples; they must give the same
    NaN/Inf pattern and, where finite, the same values."""
    count("pgd_step l2")
    layouts = [l for l in LAYOUTS if l != "expanded"] if inplace else LAYOUTS
    xa, xac, _ = data.draw(tensors(shape, dtype, layouts=layouts, special=special), label="x_adv")
    xn, xnc, _ = data.draw(tensors(shape, dtype, special=special), label="x_nat")
    g, gc, _ = data.draw(tensors(shape, dtype, special=special), label="grad")
    lo, hi = lohi  # half of the examples clamp (the clamp comes after the projection)
    expect = ref.pgd_step(xac, xnc, gc, alpha, eps, lo, hi, "2")
    if inplace:
        ops.pgd_step_(xa, xn, g, alpha, eps, lo, hi, "2")
        got = xa
    else:
        got = ops.pgd_step(xa, xn, g, alpha, eps, lo, hi, "2")
    close(got, expect, "pgd_step l2", floor=alpha + eps)  # |d| <= eps after the projection
    if not special and xa.numel() and lo == -math.inf and hi == math.inf:  # in the eps-ball, up to rounding
        d = (got.double() - xnc.double()).reshape(shape[0], -1).norm(dim=1)
        slack = 2 * torch.finfo(dtype).eps * (xnc.double().abs().max() + eps) * math.sqrt(xa[0].numel())
        assert bool((d <= eps * (1 + 1e-3) + slack).all()), (d, eps, slack)


@needs_ext
@PROFILE
@given(data=st.data(), shape=shapes_any, dtype=dtypes, eps=magnitudes, seed=u64s, offset=u64s,
       lohi=bounds())
def test_random_start_inf(data, shape, dtype, eps, seed, offset, lohi):
    count("random_start inf")
    x, xc, lx = data.draw(tensors(shape, dtype), label="x")
    lo, hi = lohi
    same(ops.random_start(x, eps, seed=seed, offset=offset, norm="inf", lo=lo, hi=hi),
         ref.random_start(xc, eps, seed, offset, "inf", lo, hi), f"random_start inf {lx}",
         zero_sign=False)


@needs_ext
@PROFILE
@given(data=st.data(), shape=shapes_batched, dtype=dtypes, eps=st.floats(0.0, 3.0), seed=u64s,
       offset=u64s, special=st.booleans())
def test_random_start_l2(data, shape, dtype, eps, seed, offset, special):
    count("random_start l2")
    x, xc, _ = data.draw(tensors(shape, dtype, special=special), label="x")
    got = ops.random_start(x, eps, seed=seed, offset=offset, norm="2", lo=-math.inf, hi=math.inf)
    close(got, ref.random_start(xc, eps, seed, offset, "2", -math.inf, math.inf), "random_start l2",
          floor=eps)  # |z_k r / ||z||| <= eps
    if not special and x.numel():  # a point of the eps-ball around x (up to rounding of x + d)
        d = (got.double() - xc.double()).reshape(shape[0], -1).norm(dim=1)
        assert bool((d <= eps + 4 * torch.finfo(dtype).eps * (1 + xc.double().abs().max())
                     * math.sqrt(xc[0].numel())).all())


# ----------------------------------------------------------------------------- gradients

@needs_ext
@PROFILE
@given(data=st.data(), n=st.integers(0, 3), max_norm=st.one_of(st.none(), st.floats(1e-3, 10.0)),
       noise_std=st.one_of(st.just(0.0), st.floats(0.0, 1.0)),
       clip_value=st.one_of(st.none(), st.floats(1e-3, 10.0)),
       smoothing=st.one_of(st.none(), st.floats(0.0, 0.999)), seed=u64s, offset=u64s,
       special=st.booleans())
def test_grad_clip_noise(data, n, max_norm, noise_std, clip_value, smoothing, seed, offset, special):
    count("grad_clip_noise_")
    grads, expect, state, estate = [], [], [], []
    for i in range(n):
        shape = data.draw(shapes_any, label=f"shape{i}")
        dtype = data.draw(dtypes, label=f"dtype{i}")
        layouts = [l for l in LAYOUTS if l != "expanded"]
        g, gc, _ = data.draw(tensors(shape, dtype, layouts=layouts, special=special), label=f"g{i}")
        grads.append(g)
        expect.append(gc.clone())
        if smoothing is not None:
            s, sc, _ = data.draw(tensors(shape, dtype, layouts=layouts, special=False), label=f"s{i}")
            state.append(s)
            estate.append(sc.clone())
    kw = dict(max_norm=max_norm, noise_std=noise_std, seed=seed, offset=offset,
              clip_value=clip_value, smoothing=smoothing)
    floors = [gc.double().abs() + 10 * noise_std + (estate[i].double().abs() if smoothing is not None else 0.0)
              for i, gc in enumerate(expect)]
    norm = ops.grad_clip_noise_(grads, state=state if smoothing is not None else None, **kw)
    enorm = ref.grad_clip_noise_(expect, max_norm, noise_std, seed, offset, clip_value, smoothing,
                                 estate)
    close(norm, enorm, "norm", ulps=16)
    # element k is a sum of (a scaled and clamped g_k), noise_std z_k and (beta s_k): its terms
    for i, (g, e) in enumerate(zip(grads, expect)):
        close(g, e, f"grads[{i}]", floor=floors[i])
    for i, (s, e) in enumerate(zip(state, estate)):
        close(s, e, f"state[{i}]", floor=floors[i])


# ----------------------------------------------------------------------------- in place on overlap

@PROFILE
@given(use_ext=st.booleans(), n=st.integers(2, 5), which=st.integers(0, 2))
def test_inplace_ops_refuse_overlapping_outputs(use_ext, n, which):
    """An expanded (self-overlapping) tensor cannot be written in place: a clear error naming
    the argument, and nothing is modified (not even the other tensors of a list)."""
    count("in-place overlap refused")
    ops._use_ext = use_ext and ops._ext_available
    ex = torch.rand(1, 3).expand(n, 3)
    other = torch.rand(n, 3)
    before = other.clone()
    if which == 0:
        with pytest.raises(ValueError, match=r"x_adv .*overlap"):
            ops.pgd_step_(ex, torch.rand(n, 3), torch.randn(n, 3), 0.1, 0.2)
    elif which == 1:
        with pytest.raises(ValueError, match=r"grads\[1\] .*overlap"):
            ops.grad_clip_noise_([other, ex], max_norm=0.1, noise_std=0.1, seed=0)
    else:
        with pytest.raises(ValueError, match=r"state\[1\] .*overlap"):
            ops.grad_clip_noise_([other, torch.rand(n, 3)], smoothing=0.5, seed=0,
                                 state=[torch.rand(n, 3), ex])
    same(other, before, "untouched")
