"""fastmask.nn: FeatureMask (train/eval, scopes, the counter in state_dict, compile),
LearnedMask (eqs. 15-17) and GradManipulator (stream, smoothing state, resume)."""
import copy

import pytest
import torch

from fastmask import nn as fnn
from fastmask import ops
from fastmask import reference as ref


def images(n=4, c=1, h=8, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, c, h, w), generator=g)


def test_feature_mask_training_stream(backend):
    m = fnn.FeatureMask(0.3, mode="pixel", seed=7)
    x = images()
    ys = [m(x) for _ in range(3)]
    assert int(m.step) == 3
    for k, y in enumerate(ys):  # call k uses offset k
        assert torch.equal(y, ref.mask_apply(x, 0.3, 7, k, "pixel", "sample", "shared", 0.0))
    assert not torch.equal(ys[0], ys[1])
    assert not torch.equal(ys[0][0], ys[0][1])  # different samples, different masks


def test_feature_mask_fixed_scope(backend):
    m = fnn.FeatureMask(0.5, mode="block", scope="fixed", fill=0.5, seed=2)
    x = images(seed=1)
    y0, y1 = m(x), m(x)
    keep0 = y0 != 0.5
    assert torch.equal(y0, y1)  # the same mask every call
    assert torch.equal(keep0, keep0[0:1].expand_as(keep0))  # and every sample
    assert torch.equal(y0, ops.mask_apply(x, 0.5, seed=2, offset=fnn.FIXED_OFFSET,
                                          mode="block", scope="fixed", fill=0.5))


def test_feature_mask_eval(backend):
    x = images(seed=3)
    off = fnn.FeatureMask(0.4).eval()
    assert torch.equal(off(x), x)
    cons = fnn.FeatureMask(0.4, mode="blur", seed=5, eval_mask="consistent").eval()
    y = cons(x)
    assert torch.equal(y, cons(x)) and int(cons.step) == 0  # eval does not advance
    expect = ref.mask_apply(x, 0.4, 5, fnn.FIXED_OFFSET, "blur", "fixed", "shared", 0.0)
    assert torch.equal(y, expect)
    # the test mask of a model trained with fixed masking is its training mask
    fixed = fnn.FeatureMask(0.4, mode="blur", scope="fixed", seed=5, eval_mask="consistent")
    assert torch.equal(fixed(x), y)


def test_feature_mask_state_dict_resume(backend):
    model = torch.nn.Sequential(fnn.FeatureMask(0.3, seed=1), torch.nn.Flatten())
    x = images()
    for _ in range(5):
        model(x)
    sd = copy.deepcopy(model.state_dict())
    assert int(sd["0.step"]) == 5
    expect = model(x)
    resumed = torch.nn.Sequential(fnn.FeatureMask(0.3, seed=1), torch.nn.Flatten())
    resumed.load_state_dict(sd)
    assert torch.equal(resumed(x), expect)


def test_feature_mask_gradient(backend):
    m = fnn.FeatureMask(0.5, mode="pixel", seed=3)
    x = images(seed=4).requires_grad_()
    y = m(x)
    y.sum().backward()
    keep = ops.mask_generate(x.shape, 0.5, seed=3, offset=0)
    assert torch.equal(x.grad, keep.float())


def test_feature_mask_bad_args():
    with pytest.raises(ValueError, match="ratio"):
        fnn.FeatureMask(1.2)
    with pytest.raises(ValueError, match="mode"):
        fnn.FeatureMask(0.2, mode="noise")
    with pytest.raises(ValueError, match="eval_mask"):
        fnn.FeatureMask(0.2, eval_mask="random")
    with pytest.raises(ValueError, match="seed"):
        fnn.FeatureMask(0.2, seed=-3)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mask = fnn.FeatureMask(0.3, mode="blur", seed=1)
        self.fc = torch.nn.Linear(64, 3)

    def forward(self, x):
        return self.fc(self.mask(x).flatten(1))


def _compile_and_train(backend_name):
    torch.manual_seed(0)
    model = Net()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend=backend_name)
    x = images()
    torch._dynamo.utils.counters.clear()
    for _ in range(3):
        out = compiled(x)
        out.sum().backward()
        eo = eager(x)
        eo.sum().backward()
        torch.testing.assert_close(out, eo)
    torch.testing.assert_close(model.fc.weight.grad, eager.fc.weight.grad)
    assert int(model.mask.step) == 3
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # no recompiles


def test_compile_fullgraph_feature_mask(backend):
    torch._dynamo.reset()
    _compile_and_train("aot_eager")


@pytest.mark.slow
def test_compile_fullgraph_feature_mask_inductor(backend):
    torch._dynamo.reset()
    _compile_and_train("inductor")


def test_learned_mask():
    lm = fnn.LearnedMask((1, 4, 4), l1=0.01)
    x = images(2, 1, 4, 4)
    torch.testing.assert_close(lm(x), x * torch.sigmoid(torch.full((1, 4, 4), 3.0)))
    torch.testing.assert_close(lm.penalty(), 0.01 * 16 * torch.sigmoid(torch.tensor(3.0)))
    # the penalty alone drives the mask towards 0 (sparsity)
    opt = torch.optim.SGD(lm.parameters(), lr=100.0)
    before = lm.mask().sum().item()
    for _ in range(5):
        opt.zero_grad()
        lm.penalty().backward()
        opt.step()
    assert lm.mask().sum().item() < before
    with pytest.raises(ValueError, match="l1"):
        fnn.LearnedMask((4,), l1=-1.0)
    assert repr(lm) == "LearnedMask(shape=(1, 4, 4), l1=0.01)"  # what print(model) shows


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(5)),
          torch.nn.Parameter(torch.zeros(2))]
    for p in ps[:2]:
        p.grad = torch.randn(p.shape, generator=g)
    return ps  # the last one has no gradient


def test_grad_manipulator_stream(backend):
    ps = _params()
    manip = fnn.GradManipulator(ps, max_norm=1.0, noise_std=0.1, seed=9)
    grads = [p.grad.clone() for p in ps[:2]]
    norm = manip.step()
    expect = [g.clone() for g in grads]
    n = ref.grad_clip_noise_(expect, 1.0, 0.1, 9, 0)
    torch.testing.assert_close(norm, n)
    for p, e in zip(ps, expect):
        torch.testing.assert_close(p.grad, e)
    assert ps[2].grad is None
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    manip.step()  # offset 1: different noise
    assert not torch.allclose(ps[0].grad, expect[0])


def test_grad_manipulator_smoothing_resume(backend):
    def run(manip, ps, steps, seed):
        out = []
        for k in range(steps):
            g = torch.Generator().manual_seed(seed + k)
            for p in ps[:2]:
                p.grad = torch.randn(p.shape, generator=g)
            manip.step()
            out.append([p.grad.clone() for p in ps[:2]])
        return out

    ps = _params()
    manip = fnn.GradManipulator(ps, noise_std=0.01, smoothing=0.5, seed=1)
    first = run(manip, ps, 1, 100)
    # the state starts at the first step's (noised) gradient
    g = torch.Generator().manual_seed(100)
    raw = [torch.randn(p.shape, generator=g) for p in ps[:2]]
    ref.grad_clip_noise_(raw, None, 0.01, 1, 0)
    for a, b in zip(first[0], raw):
        torch.testing.assert_close(a, b)
    second = run(manip, ps, 1, 101)
    g = torch.Generator().manual_seed(101)
    raw2 = [torch.randn(p.shape, generator=g) for p in ps[:2]]
    ref.grad_clip_noise_(raw2, None, 0.01, 1, 1)
    for a, b, c in zip(second[0], first[0], raw2):
        torch.testing.assert_close(a, 0.5 * b + 0.5 * c)
    # resume: a fresh manipulator loaded from state_dict continues identically
    sd = manip.state_dict()
    cont = run(manip, ps, 2, 200)
    ps2 = _params()
    manip2 = fnn.GradManipulator(ps2, noise_std=0.01, smoothing=0.5, seed=1)
    manip2.load_state_dict(sd)
    cont2 = run(manip2, ps2, 2, 200)
    for a, b in zip(cont, cont2):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_grad_manipulator_bad_args():
    with pytest.raises(ValueError, match="max_norm"):
        fnn.GradManipulator([], max_norm=-1.0)
    with pytest.raises(ValueError, match="smoothing"):
        fnn.GradManipulator([], smoothing=1.5)


def test_feature_mask_counter_stays_on_cpu():
    m = torch.nn.Sequential(fnn.FeatureMask(0.3), torch.nn.Linear(2, 2)).to(torch.float64)
    m.to("meta")  # any device move: the counter stays a CPU int64 tensor
    assert m[0].step.device.type == "cpu" and m[0].step.dtype == torch.int64
    assert m[1].weight.device.type == "meta"


ONE_CALL_CASES = [
    dict(ratio=0.3),
    dict(ratio=0.3, mode="block", fill=0.5),
    dict(ratio=0.3, mode="blur", channels="separate"),
    dict(ratio=0.3, rescale=True),
    dict(ratio=0.4, scope="fixed", mode="pixel"),
    dict(ratio=0.3, redraw_steps=2),
    dict(ratio=0.0),
    dict(ratio=1.0, fill=0.25),
]


@pytest.mark.parametrize("kw", ONE_CALL_CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_feature_mask_one_call_equals_composed(kw, dtype):
    """The extension's one-call training draw (ops._mask_step: counter, op, scale) gives the
    composed path's values and counter, call after call, at any stream."""
    if not ops._ext_available:
        pytest.skip("the one-call path is the extension's")
    x = images(n=3, c=2, seed=9).to(dtype)
    for stream in (0, 3):
        fast, slow = fnn.FeatureMask(seed=11, **kw), fnn.FeatureMask(seed=11, **kw)
        fast.stream = slow.stream = stream
        fast.step.fill_(5)
        slow.step.fill_(5)
        for _ in range(4):
            v = fast.step._version
            got, want = fast(x), slow._separate_calls(x)  # the counter, the op, the scale apart
            assert got.dtype == dtype and torch.equal(got, want)
            assert int(fast.step) == int(slow.step) and fast.step._version > v


def test_feature_mask_one_call_gradient_and_errors():
    if not ops._ext_available:
        pytest.skip("the one-call path is the extension's")
    m = fnn.FeatureMask(0.5, rescale=True, seed=3)
    x = images(seed=4).requires_grad_()
    m(x).sum().backward()
    keep = ops.mask_generate(x.shape, 0.5, seed=3, offset=0)
    assert torch.equal(x.grad, keep.float() * 2.0)
    # a counter that cannot give an offset: a clear error, and the counter is left as it was
    m.step.fill_(-1)
    with pytest.raises(ValueError, match="step counter.*-1"):
        m(images())
    assert int(m.step) == -1
    # so is a bad input (checked in Python) or a bad argument set after __init__ (checked by the op)
    m.step.fill_(0)
    with pytest.raises(ValueError, match="4-D"):
        m(torch.rand(2, 3, 4, 5, 6))
    m.ratio = 1.5
    with pytest.raises(ValueError, match="ratio"):
        m(images())
    m.ratio, m.stream = 0.5, 1 << 24  # a stream whose offsets would wrap past 2^64
    with pytest.raises(ValueError, match="stream"):
        m(images())
    assert int(m.step) == 0


def test_feature_mask_one_call_respects_torch_function_modes():
    """A torch function mode (a tracer, a profiler's hook) sees the op: the one-call path,
    which Python's __torch_function__ machinery would not see, steps aside for it."""
    from torch.overrides import TorchFunctionMode

    seen = []

    class Log(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    m = fnn.FeatureMask(0.3, seed=2)
    x = images()
    with Log():
        y = m(x)
    assert any("fastmask.mask_apply" in s for s in seen), seen
    assert torch.equal(y, ref.mask_apply(x, 0.3, 2, 0, "pixel", "sample", "shared", 0.0))
    assert int(m.step) == 1
