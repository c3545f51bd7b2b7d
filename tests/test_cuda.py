"""CUDA kernels against the CPU kernels (docs/ops.md). Needs a GPU: skipped without one.

Bit for bit where the contract says so (philox, masks in every mode/scope/channels,
fgsm, pgd L-inf, random_start L-inf, blur forward and backward); allclose for the
float64 norms (pgd L2, random_start L2, grad_clip_noise_) and sums (project_linf). Also: odd shapes that
cross tiles and Philox blocks, misaligned and non-contiguous inputs, > 2^31-element
tensors (64-bit indexing), opcheck, torch.compile, no host-device synchronisation
inside the ops, and a deterministic norm in grad_clip_noise_.
"""
import copy

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

import fastmask  # noqa: E402
import fastmask.ops  # noqa: E402,F401  (fake kernels and autograd of the ops)
from fastmask import reference  # noqa: E402

try:
    import fastmask._C as _C  # noqa: E402
except ImportError:
    _C = None
if _C is None or not _C.cuda_compiled():
    pytest.skip("fastmask was built without its CUDA kernels", allow_module_level=True)

pytestmark = pytest.mark.cuda
F = torch.ops.fastmask
DEV = torch.device("cuda")
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
MODES = ["pixel", "blur", "block"]
SCOPES = ["sample", "fixed"]
CHANNELS = ["shared", "separate"]
# odd sizes (H*W % 4 != 0), H*W % 4 == 0 but % 8 != 0, one tile, several 32x32 tiles
# (ragged, and H*W % 16 == 0), 1x1, a column; one channel (per-sample masks take the
# kernels' identity-index path then, with groups across planes when H*W % 4 != 0)
SHAPES = [(3, 2, 5, 7), (3, 2, 6, 2), (4, 3, 28, 28), (2, 3, 70, 45), (2, 2, 64, 48),
          (5, 1, 1, 1), (2, 4, 33, 1), (6, 1, 28, 28), (3, 1, 5, 7)]
BIG_SEED = 2**64 - 12345  # >= 2^63: crosses the schema as a negative int64


def i64(v):
    """A uint64 seed/offset as the schema's int64 (two's complement)."""
    return v - 2**64 if v >= 2**63 else v


def same(a, b):
    """Bit-for-bit equality (NaN == NaN), device and layout aside."""
    torch.testing.assert_close(a.cpu(), b.cpu(), rtol=0, atol=0, equal_nan=True)


def close(a, b, dtype):
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(a.cpu(), b.cpu(), rtol=tol, atol=tol, equal_nan=True)


def rand(shape, dtype, seed=0, lo=-1.0, hi=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g, dtype=torch.float64) * (hi - lo) + lo).to(dtype)


def with_specials(t):
    """Zeros, a NaN and infinities in the first few elements (sign(0) = sign(NaN) = 0)."""
    t = t.clone()
    flat = t.view(-1)
    for i, v in enumerate([0.0, -0.0, float("nan"), float("inf"), -float("inf")][: flat.numel()]):
        flat[i] = v
    return t


# ----------------------------------------------------------------------------- philox, masks

@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 1000003])
@pytest.mark.parametrize("seed,offset", [(0, 0), (123, 7), (BIG_SEED, 2**63 + 5)])
def test_philox(n, seed, offset):
    gpu = F.philox(i64(seed), i64(offset), n, device=DEV)
    assert gpu.device.type == "cuda" and gpu.dtype == torch.int64
    same(gpu, F.philox(i64(seed), i64(offset), n, device="cpu"))
    if n >= 4 and seed == 0 and offset == 0:
        assert [hex(w) for w in gpu[:4].tolist()] == ["0x6627e8d5", "0xe169c58d", "0xbc57ac4c", "0x9b00dbd8"]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("channels", CHANNELS)
def test_mask_generate(shape, mode, scope, channels):
    for ratio in (0.0, 0.3, 1.0):
        args = (list(shape), ratio, i64(BIG_SEED), 11, mode, scope, channels)
        gpu = F.mask_generate(*args, device=DEV)
        assert gpu.device.type == "cuda" and gpu.dtype == torch.bool
        same(gpu, F.mask_generate(*args, device="cpu"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("channels", CHANNELS)
def test_mask_apply_and_backward(dtype, mode, scope, channels):
    for i, shape in enumerate(SHAPES):
        x = rand(shape, dtype, seed=i)
        for ratio in (0.0, 0.4, 1.0):
            args = (ratio, 5 + i, 3, mode, scope, channels)
            y = F.mask_apply(x.to(DEV), *args, 0.25)
            assert y.device.type == "cuda" and y.dtype == dtype
            same(y, F.mask_apply(x, *args, 0.25))
            gx = F.mask_apply_backward(x.to(DEV), *args)
            same(gx, F.mask_apply_backward(x, *args))


def test_mask_apply_matches_generate():
    x = rand((3, 3, 40, 37), torch.float32).to(DEV)
    for mode in ("pixel", "block"):
        keep = F.mask_generate(list(x.shape), 0.5, 9, 1, mode, "sample", "separate", device=DEV)
        same(F.mask_apply(x, 0.5, 9, 1, mode, "sample", "separate", -1.0), torch.where(keep, x, -1.0))


# ----------------------------------------------------------------------------- attack steps

@pytest.mark.parametrize("dtype", DTYPES)
def test_fgsm(dtype):
    for n in (1, 7, 4096 + 13):
        x, g = rand((n,), dtype, 1), with_specials(rand((n,), dtype, 2, -1, 1))
        same(F.fgsm(x.to(DEV), g.to(DEV), 0.1, 0.0, 1.0), F.fgsm(x, g, 0.1, 0.0, 1.0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", ["inf", "2"])
def test_pgd_step(dtype, norm):
    check = same if norm == "inf" else (lambda a, b: close(a, b, dtype))
    for shape in [(1, 5), (3, 1, 7, 9), (16, 3, 32, 32), (2, 70001)]:
        xn = rand(shape, dtype, 3, 0, 1)
        xa = (xn.double() + rand(shape, torch.float64, 4, -0.05, 0.05)).to(dtype)
        g = rand(shape, dtype, 5, -1, 1)
        if norm == "inf":
            g = with_specials(g)
        args = (0.01, 0.03, 0.0, 1.0, norm)
        ref = F.pgd_step(xa, xn, g, *args)
        check(F.pgd_step(xa.to(DEV), xn.to(DEV), g.to(DEV), *args), ref)
        inplace = xa.to(DEV)
        assert F.pgd_step_(inplace, xn.to(DEV), g.to(DEV), *args) is None
        check(inplace, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", ["inf", "2"])
def test_random_start(dtype, norm):
    check = same if norm == "inf" else (lambda a, b: close(a, b, dtype))
    for shape in [(1, 3), (3, 1, 7, 9), (8, 3, 32, 32), (2, 70001), (5, 1)]:
        x = rand(shape, dtype, 6, 0, 1)
        args = (0.3, i64(BIG_SEED), 17, norm, 0.0, 1.0)
        check(F.random_start(x.to(DEV), *args), F.random_start(x, *args))


# ----------------------------------------------------------------------------- grad_clip_noise_

def grad_list(dtype, seed=0):
    """Odd sizes, a tensor of several chunks, a non-contiguous one, and 60 tiny ones
    (more tensors than one launch carries)."""
    shapes = [(3, 5), (1,), (100003,), (7, 11, 13), (400, 300)] + [(2, 3)] * 60
    gs = [rand(s, dtype, seed + i, -2, 2) for i, s in enumerate(shapes)]
    gs[3] = gs[3].transpose(0, 2)  # non-contiguous
    return gs


CONFIGS = [
    dict(max_norm=None, noise_std=0.0, clip_value=None, smoothing=None),
    dict(max_norm=1.0, noise_std=0.0, clip_value=None, smoothing=None),
    dict(max_norm=1e9, noise_std=0.1, clip_value=0.5, smoothing=None),
    dict(max_norm=0.5, noise_std=0.01, clip_value=0.05, smoothing=0.9),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", CONFIGS)
def test_grad_clip_noise(dtype, cfg):
    cpu = grad_list(dtype)
    gpu = [g.to(DEV) for g in cpu]  # .to keeps the strides
    assert not gpu[3].is_contiguous()
    state_cpu = [rand(g.shape, dtype, 99 + i) for i, g in enumerate(cpu)] if cfg["smoothing"] else []
    state_gpu = [s.to(DEV) for s in state_cpu]
    args = (cfg["max_norm"], cfg["noise_std"], 3, i64(BIG_SEED), cfg["clip_value"], cfg["smoothing"])
    n_cpu = F.grad_clip_noise_(cpu, *args, state_cpu)
    n_gpu = F.grad_clip_noise_(gpu, *args, state_gpu)
    assert n_gpu.device.type == "cuda" and n_gpu.dim() == 0
    assert n_gpu.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(n_gpu.cpu(), n_cpu, rtol=1e-6 if dtype != torch.float64 else 1e-12, atol=0)
    for a, b in zip(gpu + state_gpu, cpu + state_cpu):
        close(a, b, dtype)


def test_grad_clip_noise_mixed_dtypes_and_many_chunks():
    shapes = [(5_300_001,), (17,), (300, 301)]  # > 320 chunks of 16384: several launches
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    cpu = [rand(s, d, i, -1, 1) for i, (s, d) in enumerate(zip(shapes, dtypes))]
    gpu = [g.to(DEV) for g in cpu]
    n_cpu = F.grad_clip_noise_(cpu, 10.0, 0.05, 1, 2, None, None, [])
    n_gpu = F.grad_clip_noise_(gpu, 10.0, 0.05, 1, 2, None, None, [])
    torch.testing.assert_close(n_gpu.cpu(), n_cpu, rtol=1e-6, atol=0)
    for a, b in zip(gpu, cpu):
        close(a, b, a.dtype)


def test_grad_clip_noise_norm_is_deterministic():
    base = [g.to(DEV) for g in grad_list(torch.float32, seed=7)] + [torch.randn(3_000_001, device=DEV)]
    norms, outs = [], []
    for _ in range(3):
        gs = [g.clone() for g in base]
        norms.append(F.grad_clip_noise_(gs, 1.0, 0.1, 5, 6, None, None, []).cpu())
        outs.append([g.cpu() for g in gs])
    for n, o in zip(norms[1:], outs[1:]):
        assert torch.equal(n, norms[0])
        for a, b in zip(o, outs[0]):
            assert torch.equal(a, b)


# ----------------------------------------------------------------------------- layouts

def misaligned(t):
    """A copy of t whose data starts one element past a 16-byte boundary."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = buf[1:].view(t.shape)
    view.copy_(t)
    assert view.data_ptr() % 16 != 0
    return view


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["misaligned", "noncontiguous"])
def test_layouts(dtype, layout):
    shape = (4, 3, 29, 31)
    x, g, xn = rand(shape, dtype, 1, 0, 1), rand(shape, dtype, 2, -1, 1), rand(shape, dtype, 3, 0, 1)

    def dev(t):
        if layout == "misaligned":
            return misaligned(t.to(DEV))
        out = t.to(DEV).transpose(2, 3).contiguous().transpose(2, 3)
        assert not out.is_contiguous()
        return out

    for mode in MODES:
        same(F.mask_apply(dev(x), 0.3, 1, 2, mode, "sample", "shared", 0.5),
             F.mask_apply(x, 0.3, 1, 2, mode, "sample", "shared", 0.5))
        same(F.mask_apply_backward(dev(g), 0.3, 1, 2, mode, "fixed", "separate"),
             F.mask_apply_backward(g, 0.3, 1, 2, mode, "fixed", "separate"))
    same(F.fgsm(dev(x), dev(g), 0.1, 0.0, 1.0), F.fgsm(x, g, 0.1, 0.0, 1.0))
    same(F.random_start(dev(x), 0.1, 3, 4, "inf", 0.0, 1.0), F.random_start(x, 0.1, 3, 4, "inf", 0.0, 1.0))
    for norm in ("inf", "2"):
        args = (0.01, 0.03, 0.0, 1.0, norm)
        ref = F.pgd_step(x, xn, g, *args)
        check = same if norm == "inf" else (lambda a, b: close(a, b, dtype))
        check(F.pgd_step(dev(x), dev(xn), dev(g), *args), ref)
        xa = dev(x)
        F.pgd_step_(xa, dev(xn), dev(g), *args)
        check(xa, ref)
    gs = [dev(g), dev(x)]
    n = F.grad_clip_noise_(gs, 0.5, 0.1, 1, 2, 0.2, None, [])
    cpu = [g.clone(), x.clone()]
    torch.testing.assert_close(n.cpu(), F.grad_clip_noise_(cpu, 0.5, 0.1, 1, 2, 0.2, None, []), rtol=1e-6, atol=0)
    for a, b in zip(gs, cpu):
        close(a, b, dtype)


# ----------------------------------------------------------------------------- > 2^31 elements

BIG = 1031 * 1000 * 2083  # 2_147_573_000 > 2^31; x has period 1031, grad period 1000


def big(period, seed):
    """A float16 tensor of BIG elements repeating a random pattern of `period` (returned too)."""
    if torch.cuda.mem_get_info()[1] < 40 * 2**30:
        pytest.skip("needs a GPU with >= 40 GiB")
    pattern = rand((period,), torch.float16, seed, -1, 1)
    t = torch.empty(BIG, dtype=torch.float16, device=DEV)
    t.view(-1, period).copy_(pattern.to(DEV).expand(BIG // period, period))
    return t, pattern


def slices():
    """Index ranges to check: the start, around 2^31, and the ragged end."""
    return [(0, 5000), (2**31 - 3000, 2**31 + 3000), (BIG - 4099, BIG)]


def expand(pattern, a, b):
    return pattern[torch.arange(a, b) % pattern.numel()]


def test_big_fgsm_and_pgd():
    x, px = big(1031, 1)
    g, pg = big(1000, 2)
    y = F.fgsm(x, g, 0.1, 0.0, 1.0)
    for a, b in slices():
        same(y[a:b], F.fgsm(expand(px, a, b), expand(pg, a, b), 0.1, 0.0, 1.0))
    del y
    xn = x.clone()
    xa = x  # in place; x_nat = x, so the step stays within eps of it
    F.pgd_step_(xa, xn, g, 0.01, 0.03, 0.0, 1.0, "inf")
    for a, b in slices():
        xs = expand(px, a, b)
        same(xa[a:b], F.pgd_step(xs, xs, expand(pg, a, b), 0.01, 0.03, 0.0, 1.0, "inf"))


@pytest.mark.parametrize("shape,channels", [
    ((500, 2, 2083, 1031), "shared"),  # H*W odd: groups straddle planes
    ((2083, 1, 1031, 1000), "separate"),  # H*W % 8 == 0: whole Philox blocks per group
])
def test_big_mask_apply(shape, channels):
    x, px = big(1031, 1)
    N, C, H, W = shape
    ratio, seed, offset, fill = 0.5, 77, 3, -1.0
    y = F.mask_apply(x.view(N, C, H, W), ratio, seed, offset, "pixel", "sample", channels, fill).view(-1)
    thr = reference.keep_threshold(ratio)
    for a, b in slices():
        e = torch.arange(a, b)
        n, hw = e // (C * H * W), e % (H * W)
        m = n * (H * W) + hw if channels == "shared" else e  # mask index (docs/ops.md)
        words = reference.philox_blocks(seed, offset, m // 4).gather(1, (m % 4)[:, None])[:, 0]
        keep = (words >> 8) >= thr
        same(y[a:b], torch.where(keep, expand(px, a, b), torch.tensor(fill, dtype=torch.float16)))


# ----------------------------------------------------------------------------- no sync, opcheck, compile

def test_no_host_device_sync():
    x = torch.rand(4, 3, 30, 30, device=DEV)
    g, xn = torch.randn_like(x), x.clone()
    gs = [torch.randn(1000, device=DEV), torch.randn(10, 10, device=DEV)]
    st = [torch.zeros_like(t) for t in gs]

    def run_all():
        F.philox(1, 2, 1000, device=DEV)
        for mode in MODES:
            F.mask_generate(list(x.shape), 0.3, 1, 2, mode, "sample", "shared", device=DEV)
            F.mask_apply(x, 0.3, 1, 2, mode, "sample", "separate", 0.0)
            F.mask_apply_backward(g, 0.3, 1, 2, mode, "fixed", "shared")
        F.fgsm(x, g, 0.1, 0.0, 1.0)
        for norm in ("inf", "2"):
            F.pgd_step(x, xn, g, 0.01, 0.03, 0.0, 1.0, norm)
            F.pgd_step_(x.clone(), xn, g, 0.01, 0.03, 0.0, 1.0, norm)
            F.random_start(x, 0.1, 1, 2, norm, 0.0, 1.0)
        F.grad_clip_noise_(gs, 1.0, 0.1, 1, 2, 0.5, 0.9, st)

    run_all()  # warm up (lazy CUDA initialisation may synchronise)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run_all()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_opcheck():
    x = torch.rand(2, 3, 9, 11, device=DEV)
    g, xn = torch.randn_like(x), torch.rand_like(x)
    cases = [
        (F.fgsm.default, (x, g, 0.1, 0.0, 1.0)),
        (F.pgd_step.default, (x, xn, g, 0.01, 0.03, 0.0, 1.0, "2")),
        (F.pgd_step_.default, (x.clone(), xn, g, 0.01, 0.03, 0.0, 1.0, "inf")),
        (F.random_start.default, (x, 0.1, 1, 2, "2", 0.0, 1.0)),
        (F.grad_clip_noise_.default, ([g.clone(), xn.clone()], 1.0, 0.1, 1, 2, None, 0.9,
                                      [torch.zeros_like(g), torch.zeros_like(xn)])),
        (F.mask_apply_backward.default, (g, 0.3, 1, 2, "blur", "sample", "shared")),
    ]
    for mode in MODES:
        cases.append((F.mask_apply.default,
                      (x.clone().requires_grad_(), 0.3, 1, 2, mode, "sample", "separate", 0.0)))
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_torch_compile_feature_mask():
    from fastmask.nn import FeatureMask

    torch.manual_seed(0)
    model = torch.nn.Sequential(FeatureMask(ratio=0.3), torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 14 * 14, 10)).to(DEV)
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin)
    x = torch.rand(4, 3, 16, 16, device=DEV)
    for _ in range(2):  # the mask state advances the same way in both
        ye, yc = model(x), compiled(x)
        torch.testing.assert_close(yc, ye, rtol=1e-4, atol=1e-5)
        ye.sum().backward()
        yc.sum().backward()
    for a, b in zip(twin.parameters(), model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


def test_out_variants_and_autograd_on_cuda():
    x = rand((3, 2, 9, 7), torch.float32)
    g = rand(x.shape, torch.float32, 1, -1, 1)
    xd, gd = x.to(DEV), g.to(DEV)
    out = torch.empty_like(xd)
    F.fgsm_out(xd, gd, 0.1, 0.0, 1.0, out)
    same(out, F.fgsm(x, g, 0.1, 0.0, 1.0))
    F.random_start_out(xd, 0.1, 3, 4, "inf", 0.0, 1.0, out)
    same(out, F.random_start(x, 0.1, 3, 4, "inf", 0.0, 1.0))
    for mode in MODES:
        F.mask_apply_out(xd, 0.4, 5, 6, mode, "sample", "shared", 0.5, out)
        same(out, F.mask_apply(x, 0.4, 5, 6, mode, "sample", "shared", 0.5))
        # C++ autograd on CUDA: backward regenerates the mask, same as on the CPU
        xc, xg = x.clone().requires_grad_(), xd.clone().requires_grad_()
        F.mask_apply(xc, 0.4, 5, 6, mode, "sample", "shared", 0.5).backward(g)
        F.mask_apply(xg, 0.4, 5, 6, mode, "sample", "shared", 0.5).backward(gd)
        same(xg.grad, xc.grad)


def test_cpp_errors_on_cuda_reach_python():
    """A bad argument that reaches the C++ op raises ValueError on CUDA tensors too. Run in
    a subprocess: on one GPU image (torch 2.11 cu130, GCC 13.3, Ubuntu 24.04) any C++
    exception thrown from the extension killed the process with SIGSEGV (see
    benchmarks/RESULTS.md, "Known defect"); this keeps the rest of the suite running."""
    import subprocess
    import sys
    code = """
import torch, fastmask.ops
x = torch.rand(2, 3, 4, 4, device="cuda", requires_grad=True)
try:
    torch.ops.fastmask.mask_apply(x, -0.1, 1, 0, "pixel", "sample", "shared", 0.0)
except ValueError as e:
    assert "ratio must be in" in str(e), e
    print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", (out.returncode, out.stderr[-1500:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_project_linf_matches_cpu(dtype):
    # FAB-like rows (many t on the box faces, some w = 0, both signs of c, some rows out of
    # reach) and an odd D: the CUDA kernel runs the CPU's row function, so the same steps up
    # to the float64 sums' rounding; an empty batch (C++ errors: the subprocess test above)
    g = torch.Generator().manual_seed(3)
    t = torch.rand(257, 785, generator=g, dtype=dtype)
    t[torch.rand(257, 785, generator=g) < 0.4] = 0.0
    w = torch.randn(257, 785, generator=g, dtype=dtype) * (torch.rand(257, 785, generator=g) > 0.1)
    b = (w * t).sum(1) + torch.randn(257, generator=g, dtype=dtype) * torch.logspace(-3, 2.5, 257, dtype=dtype)
    cpu = F.project_linf(t, w, b, 0.0, 1.0)
    gpu = F.project_linf(t.to(DEV), w.to(DEV), b.to(DEV), 0.0, 1.0)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-6)
    assert F.project_linf(t[:0].to(DEV), w[:0].to(DEV), b[:0].to(DEV), 0.0, 1.0).shape == (0, 785)
