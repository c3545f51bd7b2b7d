"""The learned soft mask x * sigmoid(logits).

learned_mask_apply (the mask as one fused op): the kernel against the reference bit for bit
(forward and both gradients, ragged shapes, every dtype, 1 and 2 threads), the reference against
plain autograd, gradcheck, opcheck and the argument checks. (Not LearnedMask's forward: it did not
make the training step cheaper, benchmarks/RESULTS.md.)

LearnedMask.linear (the mask fused with the MLP's first Linear layer, what fastmask.models.Net
runs): the same function as the composition, its gradients, and when Net falls back to composing."""
import pytest
import torch

from fastmask import ops, reference

needs_ext = pytest.mark.skipif(not ops._ext_available, reason="fastmask._C is not built")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# (x shape): 28x28 MNIST batches, ragged sample shapes, more features than one 256-feature block
# with a ragged last block, one feature, an empty batch
SHAPES = ((128, 1, 28, 28), (3, 1, 5, 7), (2, 300), (7, 1), (5,), (0, 4), (4, 2, 3, 600))


def sample(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=torch.float64).to(dtype)
    logits = (4 * torch.randn(shape[1:], generator=g, dtype=torch.float64)).to(dtype)
    grad = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return x, logits, grad


def run(x, logits, grad):
    """(y, d/dx, d/dlogits) through ops.learned_mask_apply and autograd."""
    x, logits = x.clone().requires_grad_(), logits.clone().requires_grad_()
    y = ops.learned_mask_apply(x, logits)
    y.backward(grad)
    return y.detach(), x.grad, logits.grad


def expected(x, logits, grad):
    return (reference.learned_mask_apply(x, logits), reference.learned_mask_apply(grad, logits),
            reference.learned_mask_apply_backward(grad, x, logits))


@pytest.mark.parametrize("threads", (1, 2))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_the_reference_bit_for_bit(backend, shape, dtype, threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = run(*sample(shape, dtype))
    finally:
        torch.set_num_threads(old)
    for name, a, b in zip(("y", "x grad", "logits grad"), got, expected(*sample(shape, dtype))):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), f"{name}: {(a.double() - b.double()).abs().max()}"


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_reference_is_the_math(shape):
    """y = x * sigmoid(l); d/dx = grad * sigmoid(l); d/dl = sum_n grad * x * s (1 - s): plain autograd, float64."""
    x, logits, grad = sample(shape, torch.float64)
    xr, lr = x.clone().requires_grad_(), logits.clone().requires_grad_()
    y = xr * torch.sigmoid(lr)
    y.backward(grad)
    got = expected(x, logits, grad)
    torch.testing.assert_close(got[0], y.detach(), rtol=1e-15, atol=0)
    torch.testing.assert_close(got[1], xr.grad, rtol=1e-15, atol=0)
    torch.testing.assert_close(got[2], lr.grad, rtol=1e-12, atol=1e-300)


def test_gradcheck(backend):
    x, logits, _ = sample((3, 2, 5), torch.float64)
    assert torch.autograd.gradcheck(ops.learned_mask_apply, (x.requires_grad_(), logits.requires_grad_()))


def test_only_the_needed_gradient(backend):
    x, logits, grad = sample((4, 6), torch.float32)
    lg = logits.clone().requires_grad_()
    ops.learned_mask_apply(x, lg).backward(grad)  # training: x needs no gradient
    assert torch.equal(lg.grad, reference.learned_mask_apply_backward(grad, x, logits))
    xg = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(ops.learned_mask_apply(xg, logits), xg, grad)  # an attack: logits frozen
    assert torch.equal(gx, reference.learned_mask_apply(grad, logits))


@needs_ext
def test_double_backward_through_the_logits_is_refused():
    x, logits, grad = sample((2, 3), torch.float64)
    lg = logits.clone().requires_grad_()
    y = ops.learned_mask_apply(x, lg)
    with pytest.raises(RuntimeError, match="double backward through the logits is not implemented"):
        torch.autograd.grad(y, lg, grad, create_graph=True)


@needs_ext
def test_opcheck():
    fm = torch.ops.fastmask
    for shape in ((3, 1, 5, 7), (2, 300), (0, 4)):
        x, logits, grad = sample(shape, torch.float64)
        torch.library.opcheck(fm.learned_mask_apply.default, (x.requires_grad_(), logits.requires_grad_()))
        torch.library.opcheck(fm.learned_mask_apply.default, (x.detach(), logits.detach().requires_grad_()))
        torch.library.opcheck(fm.learned_mask_apply_backward.default, (grad, x.detach(), logits.detach()))


X = torch.rand(4, 1, 5, 5)
BAD = [
    (lambda: ops.learned_mask_apply(X, torch.zeros(5, 5)), ValueError, "logits must have the shape of one sample"),
    (lambda: ops.learned_mask_apply(X, torch.zeros(1, 5, 5, dtype=torch.float64)), ValueError,
     "logits must have the dtype of x"),
    (lambda: ops.learned_mask_apply(X, torch.zeros(1, 5, 5, device="meta")), ValueError, "logits must be on the device"),
    (lambda: ops.learned_mask_apply(X, [0.0]), TypeError, "logits must be a torch.Tensor"),
    (lambda: ops.learned_mask_apply(X.long(), torch.zeros(1, 5, 5)), TypeError, "x must have a floating dtype"),
    (lambda: ops.learned_mask_apply(torch.tensor(1.0), torch.tensor(1.0)), ValueError, "x must have a batch dimension"),
]


@pytest.mark.parametrize("call,exc,needle", BAD, ids=[b[2] for b in BAD])
def test_bad_arguments(backend, call, exc, needle):
    with pytest.raises(exc, match=needle):
        call()


@needs_ext
def test_the_kernels_check_their_arguments_too():
    fm = torch.ops.fastmask
    with pytest.raises(ValueError, match=r"logits must have the shape of one sample of x \[1, 5, 5\], got \[5, 5\]"):
        fm.learned_mask_apply(X, torch.zeros(5, 5))
    with pytest.raises(TypeError, match="logits must have the dtype of x"):
        fm.learned_mask_apply(X, torch.zeros(1, 5, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="grad must have the shape of x"):
        fm.learned_mask_apply_backward(X[:2], X, torch.zeros(1, 5, 5))


@pytest.mark.skipif(not (ops._ext_available and torch.cuda.is_available() and ops.build_info().get("cuda")),
                    reason="needs the CUDA kernels and a GPU")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cuda_matches_the_reference(shape, dtype):
    """On CUDA: y and d/dx bit for bit (the device's own sigmoid in both); d/dlogits close (the
    reference's CUDA cumsum is a parallel scan, the kernel adds in batch order)."""
    args = [t.cuda() for t in sample(shape, dtype)]
    got, want = run(*args), expected(*args)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    torch.testing.assert_close(got[2], want[2])
    torch.library.opcheck(torch.ops.fastmask.learned_mask_apply.default,
                          (args[0].requires_grad_(), args[1].requires_grad_()))


# --------------------------------------------- LearnedMask fused with the first Linear (the MLP)

def _net_and_batch(seed=0, dtype=torch.float32):
    from fastmask import models
    net = models.build("mlp", models.learned_mask_config(0.05), seed=seed).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a mask far from its uniform start, so every gradient term matters
        net.mask.logits.copy_(3 * torch.randn(net.mask.logits.shape, generator=g, dtype=torch.float64))
    x = torch.rand((16, 1, 28, 28), generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, 10, (16,), generator=g)
    return net, x, y


def _grad_fn_names(t):
    seen, todo = set(), [t.grad_fn]
    while todo:
        f = todo.pop()
        if f is not None and f not in seen:
            seen.add(f)
            todo.extend(n for n, _ in f.next_functions)
    return {type(f).__name__ for f in seen}


def _step(net, x, y, compose):
    """(logits, d/dx, d/dlogits, d/dW1, d/db1) of CE + penalty, fused or composed."""
    import copy
    net = copy.deepcopy(net)
    if compose:
        net._mask_fuses = lambda: False
    x = x.clone().requires_grad_()
    out = net(x)
    (torch.nn.functional.cross_entropy(out, y) + net.mask.penalty()).backward()
    return out, x.grad, net.mask.logits.grad, net.net[1].weight.grad, net.net[1].bias.grad


def test_the_mlp_runs_the_mask_fused_with_its_first_linear():
    """Same logits and input gradient bit for bit as the composition x * M -> Flatten -> Linear (so
    attacks see the same model); the weight's and logits' gradients equal up to float rounding."""
    net, x, y = _net_and_batch()
    fused, composed = _step(net, x, y, False), _step(net, x, y, True)
    assert "_MaskedLinearBackward" in _grad_fn_names(fused[0])
    assert "_MaskedLinearBackward" not in _grad_fn_names(composed[0])
    for name, a, b in zip(("logits", "x grad", "mask logits grad", "W1 grad", "b1 grad"), fused, composed):
        if name in ("logits", "x grad", "b1 grad"):
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
    assert fused[2].abs().max() > 1e-4  # a real gradient, not zeros on both sides


def test_masked_linear_gradcheck_and_only_the_needed_gradients():
    from fastmask.nn import LearnedMask
    m = LearnedMask((1, 3, 4), l1=0.1).double()
    with torch.no_grad():
        m.logits.copy_(torch.randn(1, 3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    layer = torch.nn.Linear(12, 5).double()
    x = torch.rand(6, 12, dtype=torch.float64, requires_grad=True)
    f = lambda x, lg, w, b: _With(lg).linear(x, _Layer(w, b))  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, m.logits, layer.weight, layer.bias))
    # training: x needs no gradient and gets none; an attack with a frozen model: only x's
    out = m.linear(x.detach(), layer)
    out.sum().backward()
    assert m.logits.grad is not None and layer.weight.grad is not None
    frozen = _Layer(layer.weight.detach(), layer.bias.detach())
    (gx,) = torch.autograd.grad(_With(m.logits.detach()).linear(x, frozen).sum(), x)
    expected = torch.ones(6, 5, dtype=torch.float64).mm(layer.weight.detach()) * torch.sigmoid(m.logits.detach()).reshape(-1)
    assert torch.equal(gx, expected)


class _Layer:
    """A Linear layer's parameters, as LearnedMask.linear reads them."""

    def __init__(self, weight, bias):
        self.weight, self.bias = weight, bias


class _With:
    """A LearnedMask around the given logits tensor (for gradcheck of LearnedMask.linear)."""

    def __init__(self, logits):
        self.logits = logits

    def linear(self, x, layer):
        from fastmask.nn import LearnedMask
        return LearnedMask.linear(self, x, layer)


def test_the_fused_path_steps_aside_for_hooks_and_other_bodies():
    """A hook on a module the fused path skips (the mask, Flatten, the first Linear) would not run:
    then the model composes, and the hook sees its call; the CNN (a conv first) always composes."""
    from fastmask import models
    net, x, y = _net_and_batch()
    seen = []
    h = net.mask.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    out = net(x)
    h.remove()
    assert seen == [x.shape] and "_MaskedLinearBackward" not in _grad_fn_names(out)
    assert "_MaskedLinearBackward" in _grad_fn_names(net(x))
    h = net.net[1].register_forward_pre_hook(lambda mod, args: seen.append("linear"))
    net(x)
    h.remove()
    assert seen[-1] == "linear"
    cnn = models.build("cnn", models.learned_mask_config(0.05), seed=0)
    assert "_MaskedLinearBackward" not in _grad_fn_names(cnn(x))


def test_masked_linear_rejects_features_that_do_not_match_the_mask():
    from fastmask.nn import LearnedMask
    m, layer = LearnedMask((1, 3, 4)), torch.nn.Linear(12, 2)
    with pytest.raises(ValueError, match=r"x must be N x 12 \(the mask's features, flattened\), got shape \(2, 1, 3, 4\)"):
        m.linear(torch.rand(2, 1, 3, 4), layer)
    with pytest.raises(ValueError, match=r"got shape \(2, 11\)"):
        m.linear(torch.rand(2, 11), layer)


@pytest.mark.parametrize("l1", [0.0, 1e-3, 0.05])
def test_penalty_is_the_composition_bit_for_bit(l1):
    """LearnedMask.penalty (one autograd node) against l1 * sigmoid(logits).abs().sum() in autograd:
    the same value and the same logits gradient, saturated logits included."""
    from fastmask.nn import LearnedMask
    m = LearnedMask((1, 6, 7), l1=l1)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        m.logits.copy_(6 * torch.randn(m.logits.shape, generator=g))
        m.logits[0, 0, :3] = torch.tensor([-200.0, 200.0, 0.0])
    lg = m.logits.detach().clone().requires_grad_()
    expected = l1 * torch.sigmoid(lg).abs().sum()
    (2.5 * expected).backward()
    got = m.penalty()
    (2.5 * got).backward()
    assert got.shape == () and torch.equal(got.detach(), expected.detach())
    assert torch.equal(m.logits.grad, lg.grad)
