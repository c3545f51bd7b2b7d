"""fastmask.train's TRADES and MART objectives (adv_train="trades", "mart") and the held-out PGD check (adv_val)."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastmask import cli, data as D, models as M, ops, reference
from fastmask.train import TrainConfig, mart_loss, trades_example, trades_loss, train, val_pgd_acc

from idx_data import write_idx
from test_train import toy_data, weights

# the hand cases of the TRADES and MART losses: two points, three classes
NAT = [[2.0, -1.0, 0.5], [0.0, 0.3, -0.2]]
ADV = [[0.5, 0.2, 0.1], [1.0, -0.5, 0.4]]
Y = [0, 2]
BETA = 6.0


def softmax(z):
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def test_trades_loss_by_hand():
    """CE(f(x), y) + beta * sum_i KL(p_i || q_i) / batch, p = softmax(f(x)), q = softmax(f(x'))."""
    nat, adv, y, beta = NAT, ADV, Y, BETA
    ce = sum(-math.log(softmax(z)[t]) for z, t in zip(nat, y)) / 2
    kl = sum(pi * math.log(pi / qi) for zn, za in zip(nat, adv)
             for pi, qi in zip(softmax(zn), softmax(za))) / 2
    got = trades_loss(torch.tensor(nat, dtype=torch.float64), torch.tensor(adv, dtype=torch.float64),
                      torch.tensor(y), beta)
    assert got.item() == pytest.approx(ce + beta * kl, rel=1e-13)
    assert trades_loss(torch.tensor(nat, dtype=torch.float64), torch.tensor(adv, dtype=torch.float64),
                       torch.tensor(y), 0.0).item() == pytest.approx(ce, rel=1e-13)


class Recorder(torch.nn.Module):
    """An MLP that records the training flag of every forward."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 32), torch.nn.ReLU(),
                                       torch.nn.Linear(32, 3))
        self.modes = []

    def forward(self, x):
        self.modes.append(self.training)
        return self.net(x)


def kl_sum(model, x, x_adv):
    with torch.no_grad():
        return F.kl_div(F.log_softmax(model(x_adv), 1), F.softmax(model(x), 1), reduction="sum").item()


def test_trades_example_maximises_the_kl_in_the_ball():
    d = toy_data(n_train=32)
    model = Recorder().train()
    x = D.to_float(d.x_train)
    eps, alpha, steps = 0.1, 0.03, 4
    adv = trades_example(model, x, eps, seed=9, step=5, alpha=alpha, steps=steps)
    assert model.training and model.modes == [False] * (steps + 1)  # the inner loop runs in eval mode
    assert all(p.grad is None for p in model.parameters())  # only the input gradient was taken
    assert adv.min() >= 0 and adv.max() <= 1 and (adv - x).abs().max() <= eps + 1e-6
    # the start: x + 0.001 z, z the Gaussians of the Philox stream (9, 5) (reference.normal)
    z = reference.normal(9, 5, x.numel()).reshape(x.shape).float()
    start = x + 0.001 * z
    model.eval()
    kl0 = kl_sum(model, x, start)
    assert kl_sum(model, x, adv) > 100 * kl0 > 0
    # by hand: signed steps up the KL's gradient, each projected to the ball and [0, 1]
    s = torch.zeros_like(x)
    ops.grad_clip_noise_([s], noise_std=0.001, seed=9, offset=5)
    assert torch.allclose(s, 0.001 * z, rtol=1e-6, atol=1e-9)
    ref, p = (x + s), F.softmax(model(x), 1).detach()
    for _ in range(steps):
        ref.requires_grad_(True)
        (g,) = torch.autograd.grad(F.kl_div(F.log_softmax(model(ref), 1), p, reduction="sum"), ref)
        ref = torch.min(torch.max(ref.detach() + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
    assert torch.equal(adv, ref)
    assert not torch.equal(trades_example(model, x, eps, seed=9, step=6, alpha=alpha, steps=steps), adv)


@pytest.mark.parametrize("objective", ["trades", "mart"])
def test_training_step_is_the_loss(objective):
    """One step of train(): SGD on trades_loss (mart_loss) of f(x), f(x'), the model in training mode."""
    d = toy_data(n_train=32)
    cfg = TrainConfig(epochs=1, batch_size=32, optimizer="sgd", lr=0.1, momentum=0.0, seed=2,
                      adv_train=objective, adv_eps=0.2, adv_steps=2, adv_alpha=0.1, trades_beta=3.0)
    model, ref = Recorder(), Recorder()
    train(model, d, cfg)
    inner = [False] * (3 if objective == "trades" else 2)  # (p(x) and) 2 steps in eval mode
    assert model.modes[:len(inner) + 2] == inner + [True, True]  # then f(x), f(x') to train
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(2))
    x, y = D.to_float(d.x_train[perm]), d.y_train[perm]
    ref.train()
    x_adv = trades_example(ref, x, 0.2, seed=5, step=0, alpha=0.1, steps=2, y=y if objective == "mart" else None)
    loss = (mart_loss if objective == "mart" else trades_loss)(ref(x), ref(x_adv), y, 3.0)
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    expect = [p.detach() - 0.1 * g for p, g in zip(ref.parameters(), grads)]
    assert all(torch.allclose(a, b, rtol=0, atol=1e-7) for a, b in zip(weights(model), expect))


def test_trades_deterministic():
    d = toy_data(n_train=64)
    cfg = dict(epochs=1, batch_size=32, adv_train="trades", adv_eps=0.3, adv_steps=3, trades_beta=6.0)
    runs = []
    for _ in range(2):
        model = M.build("mlp", seed=3)
        info = train(model, d, TrainConfig(seed=3, **cfg))
        assert info["steps"] == 2
        runs.append((weights(model), [r["loss"] for r in info["history"]]))
    assert runs[0][1] == runs[1][1]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0]))
    other = M.build("mlp", seed=3)
    train(other, d, TrainConfig(seed=4, **cfg))
    assert not all(torch.equal(a, b) for a, b in zip(runs[0][0], weights(other)))
    pgd = M.build("mlp", seed=3)
    train(pgd, d, TrainConfig(seed=3, **{**cfg, "adv_train": "pgd", "trades_beta": 6.0}))
    assert not all(torch.equal(a, b) for a, b in zip(runs[0][0], weights(pgd)))


@pytest.mark.parametrize("kwargs, message", [
    ({"adv_train": "trades", "trades_beta": -1.0}, "trades_beta=-1.0 must be >= 0"),
    ({"adv_train": "trades", "adv_steps": 0}, "adv_steps=0"),
    ({"adv_train": "trades", "adv_val": -1}, "adv_val=-1"),
    ({"adv_train": "trades", "adv_val": 10, "adv_val_steps": 0}, "adv_val_steps=0"),
    ({"adv_val": 10}, "adv_val=10 needs adv_train"),
    ({"adv_train": "fgsm", "adv_steps": 3}, "adv_steps=3 needs adv_train='pgd', 'trades' or 'mart'"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as e:
        TrainConfig(**kwargs)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("argv, needle", [
    (["--adv-train", "trades", "--trades-beta", "-1"], "--trades-beta"),
    (["--adv-train", "trades", "--adv-steps", "0"], "--adv-steps"),
    (["--adv-val", "5"], "--adv-val: 5 needs --adv-train"),
])
def test_cli_errors(tmp_path, capsys, argv, needle):
    rc = cli.main(["train", "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and needle in err, err


def test_cli_trades_flags_reach_the_config(tmp_path):
    write_idx(tmp_path / "data", 300, 60)
    rc = cli.main(["train", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--epochs", "1",
                   "--adv-train", "trades", "--trades-beta", "2.5", "--adv-steps", "2", "--adv-alpha", "0.05",
                   "--adv-eps", "0.1", "--adv-val", "20", "--adv-val-steps", "3", "--quiet"])
    assert rc == 0
    blob = torch.load(tmp_path / "run" / "model.pt", weights_only=False)
    tr = blob["config"]["train"]
    assert (tr["adv_train"], tr["trades_beta"], tr["adv_steps"], tr["adv_alpha"], tr["adv_eps"],
            tr["adv_val"], tr["adv_val_steps"]) == ("trades", 2.5, 2, 0.05, 0.1, 20, 3)
    rc = cli.main(["train", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "mart"), "--epochs", "1",
                   "--adv-train", "mart", "--trades-beta", "4", "--adv-steps", "2", "--quiet"])
    tr = torch.load(tmp_path / "mart" / "model.pt", weights_only=False)["config"]["train"]
    assert rc == 0 and (tr["adv_train"], tr["trades_beta"], tr["adv_steps"]) == ("mart", 4.0, 2)


def test_adv_val_keeps_the_best_epoch():
    d = toy_data(n_train=96, n_val=60)
    model = M.build("mlp", seed=0)
    info = train(model, d, TrainConfig(epochs=4, batch_size=32, lr=5e-2, seed=0, adv_train="fgsm",
                                       adv_eps=0.3, adv_val=40, adv_val_steps=3))
    accs = [r["val_pgd_acc"] for r in info["history"]]
    best = info["best_val_pgd"]
    assert best["val_pgd_acc"] == max(accs) and best["epoch"] == 1 + accs.index(max(accs))
    assert best["n"] == 40 and best["steps"] == 3
    x, y = D.to_float(d.x_val[:40]), d.y_val[:40]
    assert val_pgd_acc(model, x, y, 0.3, 3, 0) == max(accs)  # the restored weights are that epoch's


def test_mart_loss_by_hand():
    """BCE(f(x'), y) + beta * mean_i KL(p_i || q_i) * (1 - p_i[y_i]), with the original's constants."""
    nat, adv, y, beta = NAT, ADV, Y, BETA
    total = 0.0
    for zn, za, t in zip(nat, adv, y):
        p, q = softmax(zn), softmax(za)
        wrong = max((c for c in range(3) if c != t), key=lambda c: q[c])
        bce = -math.log(q[t]) - math.log(1.0001 - q[wrong] + 1e-12)
        kl = sum(pi * (math.log(pi) - math.log(qi + 1e-12)) for pi, qi in zip(p, q))
        total += bce + beta * kl * (1.0000001 - p[t])
    got = mart_loss(torch.tensor(nat, dtype=torch.float64), torch.tensor(adv, dtype=torch.float64),
                    torch.tensor(y), beta)
    assert got.item() == pytest.approx(total / 2, rel=1e-12)


def test_mart_example_climbs_the_cross_entropy():
    d = toy_data(n_train=32)
    model = Recorder().train()
    x, y = D.to_float(d.x_train), d.y_train
    eps, alpha, steps = 0.1, 0.03, 3
    adv = trades_example(model, x, eps, seed=9, step=5, alpha=alpha, steps=steps, y=y)
    assert model.training and model.modes == [False] * steps  # eval mode, no forward of x alone
    s = torch.zeros_like(x)
    ops.grad_clip_noise_([s], noise_std=0.001, seed=9, offset=5)
    ref = x + s
    model.eval()
    for _ in range(steps):
        ref.requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(ref), y), ref)
        ref = torch.min(torch.max(ref.detach() + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
    assert torch.equal(adv, ref)
    with torch.no_grad():
        assert F.cross_entropy(model(adv), y) > F.cross_entropy(model(x + s), y)
    assert not torch.equal(adv, trades_example(model, x, eps, seed=9, step=5, alpha=alpha, steps=steps))


def test_mart_trains_and_is_deterministic():
    d = toy_data(n_train=64)
    cfg = dict(epochs=1, batch_size=32, seed=1, adv_train="mart", adv_eps=0.3, adv_steps=2)
    a, b, t = M.build("mlp", seed=1), M.build("mlp", seed=1), M.build("mlp", seed=1)
    w0 = weights(a)
    train(a, d, TrainConfig(**cfg))
    train(b, d, TrainConfig(**cfg))
    train(t, d, TrainConfig(**{**cfg, "adv_train": "trades"}))
    assert all(torch.equal(p, q) for p, q in zip(weights(a), weights(b)))
    assert not all(torch.equal(p, q) for p, q in zip(weights(a), w0))
    assert not all(torch.equal(p, q) for p, q in zip(weights(a), weights(t)))
