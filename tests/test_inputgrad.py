"""fastmask.inputgrad: the graph-free attack gradient equals autograd's bit for bit (on CPU: on
the model in channels-last layout, the layout of its convolutions there), its forward the
model's, it declines what it cannot do, and its CPU micro-batches change no value."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmask import attacks, inputgrad, models


def _autograd(model, x, y, targeted=False, channels_last=True):
    # autograd on the model in the layout inputgrad runs its convolutions in on CPU
    if channels_last and inputgrad.CPU_CHANNELS_LAST and x.device.type == "cpu":
        model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(model(x), y, reduction="sum")
    return torch.autograd.grad(-loss if targeted else loss, x)[0]


def _frozen(model):
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _data(n, shape=(1, 28, 28), seed=3, classes=10, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n,) + shape, generator=g, dtype=dtype), torch.randint(0, classes, (n,), generator=g)


def _odd_cnn():
    """Stride, padding, dilation, a padded ceil-mode pool, a bias-free Linear, in-place ReLU, nesting."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 5, 3, stride=2, padding=1), nn.ReLU(inplace=True),
        nn.Sequential(nn.Conv2d(5, 4, (3, 2), padding=(2, 1), dilation=(1, 2), bias=False), nn.Identity()),
        nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 7 * 5, 16, bias=False), nn.ReLU(), nn.Linear(16, 7))


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("targeted", [False, True])
def test_paper_models_equal_autograd_bit_for_bit(name, targeted):
    model = _frozen(models.build(name, seed=1))
    x, y = _data(37)
    layers = inputgrad.plan(model)
    assert layers is not None and len(layers) == (6 if name == "mlp" else 10)
    g = inputgrad.loss_grad(model, layers, x, y, targeted)
    assert torch.equal(g, _autograd(model, x, y, targeted))
    assert torch.equal(attacks._loss_grad(model, x, y, targeted), g)


def test_channels_last_is_the_layout_not_the_function(monkeypatch):
    # the same function: logits equal model(x) to rounding and bit for bit the channels-last
    # model's; off, the gradient is autograd's on the model as it is, bit for bit
    model = _frozen(models.build("cnn", seed=1))
    x, y = _data(37)
    layers = inputgrad.plan(model)
    z = inputgrad.logits(model, layers, x)
    with torch.no_grad():
        torch.testing.assert_close(z, model(x), rtol=1e-5, atol=1e-5)
        assert torch.equal(z, copy.deepcopy(model).to(memory_format=torch.channels_last)(x))
        assert torch.equal(attacks._logits(model, x), z)
    g = inputgrad.loss_grad(model, layers, x, y)
    assert g.is_contiguous() and torch.equal(g, _autograd(model, x, y))
    monkeypatch.setattr(inputgrad, "CPU_CHANNELS_LAST", False)
    nchw = inputgrad.loss_grad(model, layers, x, y)
    assert torch.equal(nchw, _autograd(model, x, y, channels_last=False))
    with torch.no_grad():
        assert torch.equal(inputgrad.logits(model, layers, x), model(x))
    assert (nchw - g).abs().max() < 1e-3 * g.abs().max() or (nchw != g).float().mean() < 0.05


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_odd_layer_settings_equal_autograd(dtype):
    model = _frozen(_odd_cnn().to(dtype))
    x, y = _data(9, shape=(2, 19, 17), classes=7, dtype=dtype)
    g = inputgrad.loss_grad(model, inputgrad.plan(model), x, y)
    assert torch.equal(g, _autograd(model, x, y))
    assert g.abs().sum() > 0


def test_gradient_does_not_need_frozen_parameters_or_eval_mode():
    model = models.build("cnn", seed=2).train()
    x, y = _data(5)
    g = inputgrad.loss_grad(model, inputgrad.plan(model), x, y)
    assert torch.equal(g, _autograd(model, x, y))
    assert all(p.grad is None for p in model.parameters())


class _Sub(nn.ReLU):
    pass


@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.BatchNorm1d(10)),   # other layer
    lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 10), _Sub()),             # subclass of a leaf
    lambda: nn.Sequential(nn.Conv2d(1, 2, 3, padding="same"), nn.Flatten(), nn.Linear(2 * 784, 10)),
    lambda: nn.Sequential(nn.Conv2d(1, 2, 3, padding_mode="reflect"), nn.Flatten(), nn.Linear(2 * 676, 10)),
    lambda: models.build("mlp", {"ratio": 0.3, "seed": 0}),                           # a FeatureMask
    lambda: nn.Sequential(nn.Flatten(), nn.ReLU()),                                   # no parameters
])
def test_other_models_are_declined(make):
    assert inputgrad.plan(make()) is None


def test_hooks_are_declined_and_still_run_through_autograd():
    model = _frozen(models.build("mlp", seed=0))
    seen = []
    h = model.net[2].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    try:
        assert inputgrad.plan(model) is None
        x, y = _data(4)
        assert torch.equal(attacks._loss_grad(model, x, y, False), _autograd(model, x, y))
        assert seen
    finally:
        h.remove()
    assert inputgrad.plan(model) is not None
    h = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        assert inputgrad.plan(model) is None
    finally:
        h.remove()


def test_inputs_it_cannot_handle_fall_back_to_autograd():
    lin = _frozen(nn.Sequential(nn.Linear(6, 3)))  # a 3-D input reaches Linear: matmul, not addmm
    x, y = torch.rand(4, 6), torch.tensor([0, 1, 2, 0])
    assert inputgrad.loss_grad(lin, inputgrad.plan(lin), x.unsqueeze(1).expand(4, 2, 6), y) is None
    model = _frozen(models.build("mlp", seed=0))
    xd, yd = _data(3, dtype=torch.float64)  # dtype other than the parameters'
    assert inputgrad.loss_grad(model, inputgrad.plan(model), xd, yd) is None
    with pytest.raises(RuntimeError):  # ... and autograd then says what is wrong, as before
        attacks._loss_grad(model, xd, yd, False)


def test_micro_batches_split_evenly_and_keep_the_values(monkeypatch):
    model = _frozen(models.build("cnn", seed=0))
    x, y = _data(150)
    layers = inputgrad.plan(model)
    whole = inputgrad.loss_grad(model, layers, x, y)
    per_sample = 32 * 26 * 26 * 4  # conv1's output: the largest activation of one image
    monkeypatch.setattr(inputgrad, "CPU_CHUNK_BYTES", 40 * per_sample)
    assert inputgrad.pieces(model, layers, x) == 4            # 150 / 40 -> 4 pieces
    assert inputgrad.pieces(model, layers, x[:100]) == 3      # at least MIN_PIECE = 32 rows: 3, not 4
    assert inputgrad.pieces(model, layers, x[:63]) == 1       # too few rows to split
    calls = []
    real = inputgrad._one
    monkeypatch.setattr(inputgrad, "_one", lambda *a: calls.append(a[1].shape[0]) or real(*a))
    chunked = inputgrad.loss_grad(model, layers, x, y)
    assert calls == [38, 38, 37, 37]
    # the same kernels on fewer rows: equal to rounding in general, bit for bit on this hardware
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-8)
    assert (chunked != whole).float().mean() < 1e-3
    monkeypatch.setattr(inputgrad, "CPU_CHUNK_BYTES", 0)
    assert inputgrad.pieces(model, layers, x) == 1


def test_attacks_through_the_fast_path_equal_the_eager_loop():
    model = _frozen(models.build("cnn", seed=0))
    x, y = _data(6)
    x_adv = attacks.pgd(model, x, y, 0.3, alpha=0.05, steps=5, random_start=False)
    ref = x.clone()
    for _ in range(5):
        g = _autograd(model, ref, y)
        ref = torch.min(torch.max(ref + 0.05 * g.sign(), x - 0.3), x + 0.3).clamp(0, 1)
    assert torch.equal(x_adv, ref)
