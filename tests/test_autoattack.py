"""fastmask.autoattack: the cascade attacks only still-robust points, never raises robust
accuracy, reports what each attack did, scores randomized models over several draws, and
raises the original's sanity flags."""
import pytest
import torch

from fastmask import attacks, models
from fastmask import autoattack as AA

from attack_points import mlp_points


def _setup(n=40, seed=0, mask=None):
    return mlp_points(n, seed, mask=mask)


def _acc(model, x, y):
    with torch.no_grad():
        return model(x).argmax(1) == y


@pytest.mark.parametrize("norm, eps", [("inf", 0.01), ("2", 0.1)])
def test_cascade_attacks_only_robust_points_and_never_raises_robust_accuracy(monkeypatch, norm, eps):
    model, x, y = _setup()
    seen = []
    real = AA._runner

    def spy(name, *a):
        run = real(name, *a)

        def wrapped(model, xs, ys, st):
            owner = torch.cdist(xs.flatten(1), x.flatten(1), p=float("inf")).argmin(1)
            out = run(model, xs, ys, st)
            seen.append((name, owner, out))
            return out
        return wrapped
    monkeypatch.setattr(AA, "_runner", spy)
    xa, rep = AA.autoattack(model, x, y, eps, norm=norm, steps=10, queries=50)
    assert [e["name"] for e in rep["attacks"]] == list(AA.STANDARD)  # all four in both norms
    robust = _acc(model, x, y)
    assert rep["clean"]["mean"] == pytest.approx(robust.double().mean().item())
    for (name, owner, out), e in zip(seen, rep["attacks"]):
        assert robust[owner].all() and len(owner) == robust.sum() == e["attacked"]  # only the still-robust
        robust = robust.clone()
        robust[owner] = _acc(model, out, y[owner])
        assert e["robust"]["mean"] == pytest.approx(robust.double().mean().item())
        assert e["removed"] == len(owner) - int(robust[owner].sum()) and e["seconds"] >= 0
    assert rep["robust"]["mean"] == pytest.approx(_acc(model, xa, y).double().mean().item())
    assert rep["attacks"][0]["grads"] > 0 and rep["attacks"][-1]["queries"] > 0
    dist = (xa - x).flatten(1).abs().amax(1) if norm == "inf" else (xa - x).flatten(1).norm(dim=1)
    assert (dist <= eps + 1e-5).all() and torch.equal(xa[:4], x[:4])
    assert rep["robust"]["mean"] < rep["clean"]["mean"] and rep["flags"] == []


def test_custom_cascade_is_at_least_as_strong_as_its_first_attack():
    model, x, y = _setup()
    alone = _acc(model, attacks.apgd(model, x, y, 0.01, steps=10), y).double().mean().item()
    xa, rep = AA.autoattack(model, x, y, 0.01, version="custom", attacks=["apgd-ce", "apgd-dlr"], steps=10)
    assert rep["attacks"][0]["robust"]["mean"] == pytest.approx(alone)
    assert rep["robust"]["mean"] <= alone


def test_rand_scores_over_draws_and_flags():
    model, x, y = _setup(n=24, mask={"ratio": 0.5, "seed": 0})
    bufs = [b.clone() for b in model.buffers()]
    xa, rep = AA.autoattack(model, x, y, 0.02, version="rand", steps=3, eot_samples=2, draws=6)
    assert rep["draws"] == 6 and [e["name"] for e in rep["attacks"]] == list(AA.RAND)
    r = rep["robust"]
    means = [rep["clean"]["mean"]] + [e["robust"]["mean"] for e in rep["attacks"]]
    assert means == sorted(means, reverse=True) and means[-1] < means[0]  # never raised
    assert r["all_draws"] <= r["worst"] <= r["mean"] <= rep["clean"]["mean"]
    assert all(torch.equal(a, b) for a, b in zip(bufs, model.buffers()))
    # a model that is random in eval mode, under "custom": flagged as randomized
    noisy = _Noisy(models.build("mlp", seed=0))
    _, rep2 = AA.autoattack(noisy, x, y, 0.02, version="custom", attacks=["apgd-ce"], steps=2)
    assert any(f.startswith("randomized model") for f in rep2["flags"])


class _Noisy(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x + 0.1 * torch.randn_like(x))


def test_softmax_output_and_zero_gradient_flags():
    model, x, y = _setup(n=8)
    soft = torch.nn.Sequential(model, torch.nn.Softmax(dim=1))
    _, rep = AA.autoattack(soft, x, y, 0.01, version="custom", attacks=["apgd-ce"], steps=2)
    assert any(f.startswith("softmax output") for f in rep["flags"])
    dead = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10), torch.nn.ReLU(),
                               torch.nn.Linear(10, 10))
    with torch.no_grad():
        dead[1].bias.fill_(-1e3)
    _, rep = AA.autoattack(dead, x, y, 0.01, version="custom", attacks=["apgd-ce"], steps=2)
    assert any(f.startswith("zero gradients: 100.0%") for f in rep["flags"])


def test_logs_one_line_per_attack():
    model, x, y = _setup(n=8)
    lines = []
    AA.autoattack(model, x, y, 0.01, version="custom", attacks=["apgd-ce", "square"], steps=2, queries=5,
                  log=lines.append)
    assert len(lines) == 3 and lines[1].startswith("apgd-ce: robust") and lines[2].startswith("square: robust")


@pytest.mark.parametrize("kw, match", [
    (dict(version="plus"), r"version must be one of \('standard', 'rand', 'custom'\), got 'plus'"),
    (dict(version="custom", attacks=["fgsm"]), r"attacks must name attacks from .*, got 'fgsm'"),
    (dict(version="custom"), "version='custom' needs attacks="),
    (dict(attacks=["apgd-ce"]), "attacks= is for version='custom'"),
    (dict(version="rand", draws=2), "draws must be >= 5 for version='rand', got 2"),
    (dict(steps=0), "steps must be >= 1, got 0"),
    (dict(targets=10), r"targets must be an integer in \[1, classes - 1 = 9\], got 10"),
    (dict(eps=-1.0), "eps must be a finite number >= 0, got -1.0"),
])
def test_bad_input(kw, match):
    model, x, y = _setup(n=4)
    eps = kw.pop("eps", 0.01)
    with pytest.raises(ValueError, match=match):
        AA.autoattack(model, x, y, eps, queries=2, **{"steps": 2, **kw})


class _Counting(torch.nn.Module):
    """Changes its own state at every forward: a dynamic defence."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.model(x)


def test_dynamic_defence_flag():
    model, x, y = _setup(n=8)
    _, rep = AA.autoattack(_Counting(model), x, y, 0.01, version="custom", attacks=["apgd-ce"], steps=2)
    assert any(f.startswith("dynamic defence") for f in rep["flags"])
    _, rep = AA.autoattack(model, x, y, 0.01, version="custom", attacks=["apgd-ce"], steps=2)
    assert not any(f.startswith("dynamic defence") for f in rep["flags"])


def test_rand_never_reuses_a_mask_draw():
    model, x, y = _setup(n=10, mask={"ratio": 0.5, "seed": 0})
    (fm,) = attacks.feature_masks(model)
    seen = []
    h = fm.register_forward_pre_hook(lambda m, args: seen.append(int(m.step)))
    try:
        AA.autoattack(model, x, y, 0.02, version="rand", steps=2, eot_samples=2, draws=5)
    finally:
        h.remove()
    assert len(seen) > 30 and len(set(seen)) == len(seen)  # every forward of the cascade: a fresh offset
