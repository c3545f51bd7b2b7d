import pytest
import torch
from torch import nn

from fastmask import attacks, evaluate as E, honest, report
from fastmask.nn import FeatureMask


def _blobs(n=256, seed=0, classes=4):
    """4 well separated prototypes in [0.2, 0.8]^16 plus noise: a linear model gets ~100 %."""
    g = torch.Generator().manual_seed(seed)
    proto = 0.2 + 0.6 * torch.rand(classes, 1, 4, 4, generator=torch.Generator().manual_seed(123))
    y = torch.randint(0, classes, (n,), generator=g)
    x = (proto[y] + 0.05 * torch.randn(n, 1, 4, 4, generator=g)).clamp(0, 1)
    return x, y


def _train(model, x, y, steps=60):
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def _linear(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 4))


@pytest.fixture(scope="module")
def toy():
    x, y = _blobs()
    model = _train(_linear(0), x, y)
    surrogate = _train(_linear(1), *_blobs(seed=1))
    xt, yt = _blobs(96, seed=2)
    return model, surrogate, xt, yt


class _Quantize(nn.Module):
    """x -> round(x * 4) / 4: torch.round has a zero gradient, so every input gradient vanishes."""

    def forward(self, x):
        return torch.round(x * 4) / 4


class _PickLabel(nn.Module):
    """Predicts the class written in x[:, 0] (logits = 10 * one-hot)."""

    def __init__(self, k):
        super().__init__()
        self.k = k
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return 10 * nn.functional.one_hot(x[:, 0].long(), self.k).float() + 0 * self.dummy


# ----------------------------------------------------------------------------- evaluate

def test_evaluate_metrics_on_known_predictions():
    y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    pred = torch.tensor([0, 0, 1, 1, 2, 2, 2, 0])
    r = E.evaluate(_PickLabel(3), pred[:, None].float(), y, batch_size=3)
    assert r["confusion"] == [[2, 1, 0], [0, 1, 1], [1, 0, 2]]
    assert r["accuracy"] == 5 / 8 and r["correct"].tolist() == (pred == y).tolist()
    prec = [2 / 3, 1 / 2, 2 / 3]
    rec = [2 / 3, 1 / 2, 2 / 3]
    assert r["per_class"]["precision"] == pytest.approx(prec)
    assert r["precision"] == pytest.approx(sum(prec) / 3)
    assert r["recall"] == pytest.approx(sum(rec) / 3)
    assert r["f1"] == pytest.approx(sum(2 * p * q / (p + q) for p, q in zip(prec, rec)) / 3)
    assert r["loss"] == pytest.approx(nn.functional.cross_entropy(
        10 * nn.functional.one_hot(pred, 3).float(), y).item())
    assert r["inference_time_s"] >= 0 and r["model_size_bytes"] == 4


def test_evaluate_macro_skips_absent_classes_and_sizes():
    # class 3 of 4 never appears (true or predicted): macro averages over 0..2 only
    y = torch.tensor([0, 1, 2, 2])
    r = E.evaluate(_PickLabel(4), y[:, None].float(), y)
    assert r["precision"] == r["recall"] == r["f1"] == r["accuracy"] == 1.0
    lin = nn.Linear(10, 3)
    lin.register_buffer("b", torch.zeros(5, dtype=torch.float64))
    assert E.model_size_bytes(lin) == 33 * 4 + 5 * 8
    with pytest.raises(ValueError, match="labels"):
        E.evaluate(_PickLabel(3), y[:, None].float(), torch.tensor([0, 1, 2, 7]))


# ----------------------------------------------------------------------------- robustness and checks

def test_robustness_on_a_plain_model_raises_no_flags(toy):
    model, surrogate, x, y = toy
    r = E.robustness(model, x, y, eps_list=[0.0, 0.05, 0.1, 0.3, 1.0], attacks=("fgsm", "pgd", "transfer"),
                     pgd_steps=10, pgd_alpha=None, batch_size=40, surrogate=surrogate)
    clean = E.evaluate(model, x, y)["accuracy"]
    assert r["clean_accuracy"] == clean > 0.9
    for name in ("fgsm", "pgd"):
        assert r["accuracy"][name][0] == clean and r["correct"][name].shape == (5, len(y))
    assert r["accuracy"]["pgd"][-1] == 0.0  # eps = 1 reaches any image
    for i in range(5):
        assert r["robust_accuracy"][i] <= min(a[i] for a in r["accuracy"].values())
        both = r["correct"]["fgsm"][i] & r["correct"]["pgd"][i] & r["correct"]["transfer"][i] & r["clean_correct"]
        assert torch.equal(r["robust_correct"][i], both)
    assert r["grad"]["zero_frac"] == 0 and r["grad"]["nan_frac"] == 0
    assert E.sanity_checks(r) == []


def test_sanity_checks_fire_on_a_gradient_masked_model(toy):
    model, surrogate, x, y = toy
    masked = nn.Sequential(_Quantize(), model)
    r = E.robustness(masked, x, y, eps_list=[0.0, 0.1, 1.0], attacks=("fgsm", "pgd", "transfer"),
                     pgd_steps=5, pgd_alpha=None, surrogate=surrogate)
    assert r["grad"]["zero_frac"] == 1.0
    assert r["accuracy"]["fgsm"][-1] == r["clean_accuracy"] > 0.5  # a zero gradient cannot move FGSM
    names = {f["flag"] for f in E.sanity_checks(r)}
    assert {"zero_gradients", "not_broken_at_large_eps", "white_box_weaker_than_transfer"} <= names


def test_sanity_check_orderings_on_hand_made_results():
    base = {"eps": [0.0, 0.1, 0.2], "grad": {"zero_frac": 0.0, "nan_frac": 0.01},
            "robust_accuracy": [0.9, 0.5, 0.6],
            "accuracy": {"fgsm": [0.9, 0.5, 0.4], "pgd": [0.9, 0.7, 0.3], "eot": [0.9, 0.2, 0.31]}}
    flags = E.sanity_checks(base)
    names = [f["flag"] for f in flags]
    assert "nan_gradients" in names
    assert any(f["flag"] == "iterative_weaker_than_single_step" and "eps=0.1: pgd" in f["detail"] for f in flags)
    assert any(f["flag"] == "eot_stronger_than_pgd" and "eps=0.1" in f["detail"] for f in flags)
    assert any(f["flag"] == "accuracy_rises_with_eps" and f["detail"].startswith("robust") for f in flags)
    assert not any(f["flag"] == "eot_weaker_than_pgd" for f in flags)  # 0.31 vs 0.30 is within tol
    assert "eot_weaker_than_pgd" in [f["flag"] for f in E.sanity_checks(base, tol=0.001)]
    # an honest_report row is accepted too
    assert E.sanity_checks({"robustness": base}) == flags


def test_robustness_with_random_test_masks_is_reproducible_and_restores_offsets(toy):
    model, _, x, y = toy
    net = nn.Sequential(FeatureMask(ratio=0.2, seed=4), model).eval()
    before = [b.clone() for b in net[0].buffers()]
    kw = dict(eps_list=[0.0, 0.2], attacks=("fgsm", "pgd", "eot", "frozen"), pgd_steps=4, pgd_alpha=None,
              eot_samples=3, test_mask=True, batch_size=50)
    r1 = E.robustness(net, x, y, **kw)
    assert all(torch.equal(a, b) for a, b in zip(net[0].buffers(), before)) and not net.training
    r2 = E.robustness(net, x, y, **kw)
    for name in kw["attacks"]:
        assert torch.equal(r1["correct"][name], r2["correct"][name])
    assert r1["masks"] == "random" and r1["accuracy"]["eot"][1] < r1["clean_accuracy"]


def test_robustness_argument_errors(toy):
    model, _, x, y = toy
    with pytest.raises(ValueError, match="eps_list"):
        E.robustness(model, x, y, eps_list=[-0.1])
    with pytest.raises(ValueError, match="unknown attack"):
        E.robustness(model, x, y, eps_list=[0.1], attacks=("deepfool",))
    with pytest.raises(ValueError, match="surrogate"):
        E.robustness(model, x, y, eps_list=[0.1], attacks=("transfer",))


def test_custom_attack_entries(toy):
    model, _, x, y = toy
    custom = ("pgd5", lambda m, xb, yb, e: attacks.pgd(m, xb, yb, e, alpha=e / 2, steps=5, random_start=False))
    r = E.robustness(model, x, y, eps_list=[0.1], attacks=("pgd", custom), pgd_steps=5, pgd_alpha=0.05)
    ref = attacks.pgd(model, x, y, 0.1, alpha=0.05, steps=5, random_start=False)
    assert r["correct"]["pgd5"][0].tolist() == (E.predict(model, ref) == y).tolist()


def test_honest_report_rows_flags_and_baseline(toy):
    model, surrogate, x, y = toy
    masked = nn.Sequential(FeatureMask(ratio=0.3, seed=1), model).eval()
    rep = honest.honest_report({"base": model, "masked": masked}, x[:48], y[:48], eps_list=[0.0, 0.1, 1.0],
                          surrogate=surrogate, baseline="base", pgd_steps=4, restarts=2, eot_samples=2)
    assert list(rep["rows"]) == ["base", "masked", "masked [test mask]"]
    assert set(rep["rows"]["base"]["robustness"]["accuracy"]) == {"fgsm", "pgd", "pgd_restarts", "transfer"}
    assert set(rep["rows"]["masked [test mask]"]["robustness"]["accuracy"]) == {
        "fgsm", "pgd", "pgd_restarts", "eot", "frozen", "transfer"}
    assert "vs_baseline" not in rep["rows"]["base"]
    vs = rep["rows"]["masked"]["vs_baseline"]
    assert len(vs) == 3 and all(c["verdict"] in ("more robust", "less robust", "no significant difference")
                                for c in vs)
    text = report.format_report(rep)
    assert "### masked [test mask]" in text and "| eot |" in text and "robust (worst case)" in text
    with pytest.raises(ValueError, match="baseline"):
        honest.honest_report(model, x[:8], y[:8], eps_list=[0.1], baseline="nope", pgd_steps=1, restarts=1)
