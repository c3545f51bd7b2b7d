"""fastmask.losses: the attack losses against hand-computed values, their closed-form logit
gradients against autograd, and the graph-free input gradient of each loss."""
import pytest
import torch
import torch.nn.functional as F

from fastmask import attacks, inputgrad, losses, models

# sorted descending: z1 = 4 > z4 = 3 > z2 = 2 > z0 = 1 > z3 = 0
Z = torch.tensor([[1.0, 4.0, 2.0, 0.0, 3.0]], dtype=torch.float64)


@pytest.mark.parametrize("name, y, t, value, grad", [
    # margin max_{i!=y} z_i - z_y
    ("cw", 0, None, 3.0, [-1, 1, 0, 0, 0]),
    ("cw", 1, None, -1.0, [0, -1, 0, 0, 1]),
    # -(z_y - max_{i!=y} z_i) / (z_pi1 - z_pi3): (4 - 1) / (4 - 2); d/dz1 = (z0 - z2) / 4, d/dz2 = 3 / 4
    ("dlr", 0, None, 1.5, [-0.5, -0.25, 0.75, 0, 0]),
    # y on top: -(4 - 3) / (4 - 2)
    ("dlr", 1, None, -0.5, [0, -0.5 + 0.25, -0.25, 0, 0.5]),
    # -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2) = -(1 - 0) / (4 - 1.5)
    ("dlr-targeted", 0, 3, -0.4, [-0.48, 0.16, -0.08, 0.4, 0]),
    # z_t - z_y
    ("logit-diff", 0, 3, -1.0, [-1, 0, 0, 1, 0]),
])
def test_hand_computed_values_and_gradients(name, y, t, value, grad):
    yy = torch.tensor([y])
    tt = None if t is None else torch.tensor([t])
    v, g = losses.value_and_grad(name, Z, yy, tt)
    assert v.item() == pytest.approx(value, abs=1e-9)
    assert losses.value(name, Z, yy, tt).item() == pytest.approx(value, abs=1e-9)
    assert g[0].tolist() == pytest.approx(grad, abs=1e-9)


@pytest.mark.parametrize("name", losses.LOSSES)
def test_closed_form_gradient_equals_autograd(name):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 10, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (64,), generator=g)
    t = (y + 1 + torch.randint(0, 9, (64,), generator=g)) % 10
    zz = z.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(losses.value(name, zz, y, t).sum(), zz)
    v, closed = losses.value_and_grad(name, z, y, t)
    assert torch.allclose(closed, auto, atol=1e-12, rtol=1e-10)
    assert torch.allclose(v, losses.value(name, z, y, t), atol=1e-12)


def test_ce_gradient_is_autograds_bit_for_bit():
    z = torch.randn(33, 10, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (33,), generator=torch.Generator().manual_seed(2))
    zz = z.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(F.cross_entropy(zz, y, reduction="sum"), zz)
    assert torch.equal(losses.grad("ce", z, y), auto)


def _close(a, b):  # float32 rounding, relative to the largest entry (DLR's denominator can be small)
    return (a - b).abs().max() <= 1e-5 * b.abs().max()


@pytest.mark.parametrize("name", ["cw", "dlr", "dlr-targeted", "logit-diff"])
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_graph_free_input_gradient_of_each_loss_equals_autograd(name, arch):
    model = models.build(arch, seed=1).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(70, 1, 28, 28, generator=g)  # 70 rows: micro-batches on the CNN
    y = torch.randint(0, 10, (70,), generator=g)
    t = (y + 3) % 10
    assert inputgrad.plan(model) is not None
    gx, v, z = attacks._loss_value_grad(model, x, y, name, t)
    xx = x.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(losses.value(name, model(xx), y, t).sum(), xx)
    assert _close(gx, auto)
    assert torch.allclose(v, losses.value(name, model(x), y, t), atol=1e-5)
    assert torch.allclose(z, model(x), atol=1e-5)
    # the autograd fallback (a model plan() declines) gives the same
    wrapped = torch.nn.Sequential(model, torch.nn.Identity(), torch.nn.BatchNorm1d(10).eval())
    wrapped[2].weight.requires_grad_(False)
    wrapped[2].bias.requires_grad_(False)
    assert inputgrad.plan(wrapped) is None
    gw = attacks._loss_value_grad(wrapped, x, y, name, t)[0]
    xx = x.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(losses.value(name, wrapped(xx), y, t).sum(), xx)
    assert _close(gw, auto)


def test_check():
    assert losses.check("dlr", 10) == "dlr"
    with pytest.raises(ValueError, match="loss must be one of .* got 'hinge'"):
        losses.check("hinge")
    with pytest.raises(ValueError, match="loss='dlr-targeted' needs at least 4 classes, the model gives 3"):
        losses.check("dlr-targeted", 3)


@pytest.mark.parametrize("loss", ["cw", "dlr"])
def test_pgd_with_another_loss_breaks_a_standard_model(loss):
    torch.manual_seed(0)
    model = models.build("mlp", seed=0).eval()
    x = torch.rand(32, 1, 28, 28)
    with torch.no_grad():
        y = model(x).argmax(1)
    xa = attacks.pgd(model, x, y, 0.3, alpha=0.05, steps=10, loss=loss)
    assert (xa - x).abs().max() <= 0.3 + 1e-6
    with torch.no_grad():
        assert (model(xa).argmax(1) == y).float().mean() < 0.2
    with pytest.raises(ValueError, match="loss must be one of .* got 'dlr-targeted'"):
        attacks.pgd(model, x, y, 0.3, alpha=0.05, steps=10, loss="dlr-targeted")
