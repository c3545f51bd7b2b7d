"""fastmask.train: metrics, the training loop (masking, gradient manipulation, fast AT), determinism."""
import pytest
import torch

from fastmask import data as D
from fastmask import models as M
from fastmask.evaluate import classification_metrics, confusion_matrix
from fastmask.train import TrainConfig, fgsm_example, train, validate

MASK = {"ratio": 0.3, "mode": "pixel", "scope": "sample", "channels": "shared", "fill": 0.0, "seed": 1,
        "eval_mask": "off"}


def toy_data(n_train=320, n_val=80, n_test=80, seed=0):
    """Three easy classes: a bright 10x10 square in one of three places, plus noise (uint8)."""
    g = torch.Generator().manual_seed(seed)

    def make(n):
        y = torch.randint(0, 3, (n,), generator=g)
        x = torch.randint(0, 60, (n, 1, 28, 28), generator=g).to(torch.uint8)
        for c, (r, q) in enumerate([(2, 2), (2, 16), (16, 9)]):
            x[y == c, :, r:r + 10, q:q + 10] = 230
        return x, y
    (xt, yt), (xv, yv), (xs, ys) = make(n_train), make(n_val), make(n_test)
    return D.Data("toy", xt, yt, xv, yv, xs, ys, source="toy", sha256="0", split_seed=0, subset={})


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def test_metrics_by_hand():
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    p = torch.tensor([0, 1, 1, 1, 0, 0])
    cm = confusion_matrix(p, y, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [2, 0, 0]]
    m = classification_metrics(p, y, 3)
    # precision: class0 1/3, class1 2/3, class2 0 (never predicted); recall: 1/2, 1, 0
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["precision"] == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    assert m["recall"] == pytest.approx((0.5 + 1 + 0) / 3)
    f1 = [2 * (1 / 3) * 0.5 / (1 / 3 + 0.5), 2 * (2 / 3) / (2 / 3 + 1), 0]
    assert m["f1"] == pytest.approx(sum(f1) / 3)
    assert m["confusion"] == cm.tolist()
    # the macro average runs over the classes present (here 0..2 of 10), as scikit-learn
    assert classification_metrics(p, y, 10)["f1"] == pytest.approx(m["f1"])


def test_config_errors():
    with pytest.raises(ValueError, match="epochs=0"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="optimizer='rmsprop'"):
        TrainConfig(optimizer="rmsprop")
    with pytest.raises(ValueError, match="adv_train='free'"):
        TrainConfig(adv_train="free")
    with pytest.raises(ValueError, match="adv_steps=3 needs adv_train='pgd'"):
        TrainConfig(adv_train="fgsm", adv_steps=3)
    with pytest.raises(ValueError, match="adv_steps=0"):
        TrainConfig(adv_train="pgd", adv_steps=0)
    with pytest.raises(ValueError, match="lr=0"):
        TrainConfig(lr=0)
    with pytest.raises(ValueError, match="unknown keys"):
        TrainConfig(grad={"maxnorm": 1.0})
    with pytest.raises(ValueError, match="fused='yes' must be True or False"):
        TrainConfig(fused="yes")


@pytest.mark.parametrize("optimizer, lr", [("adam", 1e-3), ("sgd", 0.05)])
def test_fused_optimizer_is_the_default_and_the_same_arithmetic(optimizer, lr):
    """TrainConfig(fused=True), the default, trains with torch's fused kernel; fused=False with
    its per-op loop (runs before session 7). The same update up to rounding: the same model
    trained both ways stays within float32 noise (test_deterministic: each repeats bit for bit)."""
    from fastmask.train import make_optimizer
    d = toy_data(n_train=128)
    assert TrainConfig().fused is True
    out = {}
    for fused in (True, False):
        model = M.build("mlp", seed=3)
        cfg = TrainConfig(epochs=2, batch_size=32, seed=3, optimizer=optimizer, lr=lr, fused=fused)
        assert bool(make_optimizer(model, cfg).defaults["fused"]) is fused
        train(model, d, cfg)
        out[fused] = weights(model)
    for a, b in zip(out[True], out[False]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (a - b).abs().max()


def test_learns_and_history():
    d = toy_data()
    model = M.build("mlp", seed=0)
    info = train(model, d, TrainConfig(epochs=3, batch_size=32, seed=0))
    h = info["history"]
    assert [r["epoch"] for r in h] == [1, 2, 3] and info["steps"] == 3 * 10
    assert h[-1]["loss"] < h[0]["loss"]
    assert h[-1]["val_acc"] > 0.95 and h[-1]["val_f1"] > 0.95
    assert all(r["time"] > 0 for r in h) and info["train_time"] == pytest.approx(sum(r["time"] for r in h))
    assert validate(model, d.x_test, d.y_test)["accuracy"] > 0.95


@pytest.mark.parametrize("extra", [{}, {"grad": {"max_norm": 0.5, "noise_std": 0.01}}, {"adv_train": "fgsm"},
                                   {"optimizer": "sgd", "lr": 0.05}])
def test_deterministic(extra):
    d = toy_data(n_train=128)
    runs = []
    for _ in range(2):
        model = M.build("mlp", MASK, seed=3)
        info = train(model, d, TrainConfig(epochs=2, batch_size=32, seed=3, **extra))
        runs.append((weights(model), [(r["loss"], r["val_acc"]) for r in info["history"]]))
    assert runs[0][1] == runs[1][1]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0]))
    other = M.build("mlp", MASK, seed=3)
    train(other, d, TrainConfig(epochs=2, batch_size=32, seed=4, **extra))  # another shuffle and mask draws
    assert not all(torch.equal(a, b) for a, b in zip(runs[0][0], weights(other)))


def test_validation_is_unmasked():
    d = toy_data(n_train=96)
    model = M.build("mlp", MASK, seed=0)
    info = train(model, d, TrainConfig(epochs=1, batch_size=32))
    plain = M.build("mlp")
    plain.net.load_state_dict(model.net.state_dict())
    assert info["history"][0]["val_acc"] == validate(plain, d.x_val, d.y_val)["accuracy"]
    assert info["history"][0]["val_loss"] == validate(plain, d.x_val, d.y_val)["loss"]


def test_gradient_manipulation_is_applied():
    d = toy_data(n_train=96)
    start = M.build("mlp", seed=0)
    w0 = weights(start)
    # SGD with gradients clipped to a global norm of 1e-6: the weights barely move
    clipped = M.build("mlp", seed=0)
    train(clipped, d, TrainConfig(epochs=1, batch_size=32, optimizer="sgd", lr=0.1, momentum=0.0,
                                  grad={"max_norm": 1e-6}))
    moved = sum((a - b).pow(2).sum() for a, b in zip(weights(clipped), w0)).sqrt()
    assert 0 < moved <= 3 * 0.1 * 1e-6 * 1.001  # 3 steps of lr * at most max_norm
    free = M.build("mlp", seed=0)
    train(free, d, TrainConfig(epochs=1, batch_size=32, optimizer="sgd", lr=0.1, momentum=0.0))
    assert sum((a - b).pow(2).sum() for a, b in zip(weights(free), w0)).sqrt() > 1e-3
    # noise alone changes the trajectory
    noisy = M.build("mlp", seed=0)
    train(noisy, d, TrainConfig(epochs=1, batch_size=32, optimizer="sgd", lr=0.1, momentum=0.0,
                                grad={"noise_std": 0.01}))
    assert not all(torch.equal(a, b) for a, b in zip(weights(noisy), weights(free)))


def test_fgsm_example_stays_in_the_ball():
    d = toy_data(n_train=32)
    model = M.build("mlp", MASK, seed=0).train()
    x, y = D.to_float(d.x_train), d.y_train
    before = weights(model)
    eps = 0.1
    adv = fgsm_example(model, x, y, eps, seed=9, step=0)
    assert adv.shape == x.shape and adv.min() >= 0 and adv.max() <= 1
    assert (adv - x).abs().max() <= eps + 1e-6
    assert (adv - x).abs().max() > 0.9 * eps  # alpha = 1.25 eps pushes most pixels to the boundary
    assert all(p.grad is None for p in model.parameters())  # only the input gradient was taken
    assert all(torch.equal(a, b) for a, b in zip(before, weights(model)))


def test_pgd_training_example_is_k_projected_steps():
    """adv_steps=k: the random start, then k signed steps of alpha, each projected (by hand here)."""
    import torch.nn.functional as F
    from fastmask import ops
    d = toy_data(n_train=32)
    model = M.build("mlp", seed=0).train()
    x, y = D.to_float(d.x_train), d.y_train
    eps, alpha = 0.1, 0.03
    adv = fgsm_example(model, x, y, eps, seed=9, step=4, alpha=alpha, steps=3)
    ref = ops.random_start(x, eps, seed=9, offset=4)
    for _ in range(3):
        ref.requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(ref), y), ref)
        ref = torch.min(torch.max(ref.detach() + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
    assert torch.equal(adv, ref)
    assert (adv - x).abs().max() <= eps + 1e-6
    assert all(p.grad is None for p in model.parameters())
    one = fgsm_example(model, x, y, eps, seed=9, step=4, alpha=alpha, steps=1)
    assert not torch.equal(one, adv)


def test_adv_training_changes_the_model():
    d = toy_data(n_train=96)
    a, b = M.build("mlp", seed=0), M.build("mlp", seed=0)
    train(a, d, TrainConfig(epochs=1, batch_size=32))
    train(b, d, TrainConfig(epochs=1, batch_size=32, adv_train="fgsm", adv_eps=0.2))
    assert not all(torch.equal(p, q) for p, q in zip(weights(a), weights(b)))
    c = M.build("mlp", seed=0)
    train(c, d, TrainConfig(epochs=1, batch_size=32, adv_train="pgd", adv_steps=2, adv_eps=0.2))
    assert not all(torch.equal(p, q) for p, q in zip(weights(b), weights(c)))


@pytest.mark.slow
def test_baseline_converges_on_real_mnist(mnist):
    """The default reproduce config: the baseline MLP reaches >= 97 % test accuracy
    and FGSM at eps = 0.3 brings it below 50 %."""
    from fastmask.attacks import fgsm
    from fastmask.pipeline import TRAIN_PRESETS as PRESETS
    d = mnist
    p = PRESETS["default"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as `fastmask reproduce` runs by default
    try:
        model = M.build("mlp", seed=0)
        train(model, d, TrainConfig(epochs=p["epochs"], batch_size=p["batch_size"], seed=0))
        x = D.to_float(d.x_test)
        assert validate(model, x, d.y_test)["accuracy"] >= 0.97
        adv = fgsm(model, x, d.y_test, 0.3, batch_size=1000)
        assert validate(model, adv, d.y_test)["accuracy"] < 0.5
    finally:
        torch.set_num_threads(threads)
