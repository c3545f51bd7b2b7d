"""fastmask.evaluate's rules written out: every sanity-check flag with its exact wording and
threshold, the Markdown report, the clean metrics of known logits, and the argument
errors. Written against the surviving mutants of the mutation job (docs/reliability.md)."""
import math
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmask import attacks as A
from fastmask import evaluate as E
from fastmask import honest, report
from fastmask.nn import FeatureMask

RESULTS = {"eps": [0.0, 0.1, 1.0], "grad": {"zero_frac": 0.1, "nan_frac": 0.02},
           "robust_accuracy": [0.9, 0.3, 0.35],
           "accuracy": {"fgsm": [0.9, 0.5, 0.3], "pgd": [0.9, 0.6, 0.2], "pgd_restarts": [0.9, 0.45, 0.2],
                        "eot": [0.9, 0.4, 0.25], "frozen": [0.9, 0.52, 0.2], "transfer": [0.9, 0.3, 0.1]}}

FLAGS = [
    ("zero_gradients", "10.0% of samples have an all-zero input gradient"),
    ("nan_gradients", "2.0% of samples have a NaN input gradient"),
    ("iterative_weaker_than_single_step", "eps=0.1: pgd accuracy 0.600 > fgsm 0.500"),
    ("iterative_weaker_than_single_step", "eps=0.1: frozen accuracy 0.520 > fgsm 0.500"),
    ("white_box_weaker_than_transfer", "eps=0.1: best white-box accuracy 0.400 > transfer 0.300"),
    ("eot_stronger_than_pgd",
     "eps=0.1: EOT accuracy 0.400 < plain PGD 0.600: randomness hides the gradient from plain PGD"),
    ("white_box_weaker_than_transfer", "eps=1: best white-box accuracy 0.200 > transfer 0.100"),
    ("eot_weaker_than_pgd", "eps=1: EOT accuracy 0.250 > plain PGD 0.200"),
    ("not_broken_at_large_eps", "eps=1: accuracy under the best white-box attack 0.200 > 0.1"),
    ("accuracy_rises_with_eps", "robust: accuracy 0.300 at eps=0.1 < 0.350 at eps=1"),
]


def test_sanity_checks_every_flag_worded_exactly():
    got = [(f["flag"], f["detail"]) for f in E.sanity_checks(RESULTS)]
    assert got == FLAGS
    assert [(f["flag"], f["detail"]) for f in E.sanity_checks({"robustness": RESULTS})] == FLAGS


def test_sanity_check_thresholds():
    names = lambda **kw: [f["flag"] for f in E.sanity_checks(RESULTS, **kw)]  # noqa: E731
    assert "zero_gradients" not in names(zero_grad_frac=0.1)  # > the fraction, not >=
    assert "zero_gradients" in names(zero_grad_frac=0.099)
    assert "not_broken_at_large_eps" not in names(max_acc_at_large_eps=0.2)
    assert "not_broken_at_large_eps" in names(max_acc_at_large_eps=0.199)
    # tol is the margin of every ordering: 0.1 hides pgd > fgsm (by 0.1) but not transfer (by 0.1 + 0.1)
    wide = E.sanity_checks(RESULTS, tol=0.1 + 1e-9)
    assert [f["detail"] for f in wide if f["flag"] == "iterative_weaker_than_single_step"] == []
    assert [f["detail"] for f in wide if f["flag"] == "eot_stronger_than_pgd"] == [FLAGS[5][1]]
    assert "accuracy_rises_with_eps" not in [f["flag"] for f in wide]
    # nothing wrong: no flag; eps >= 1 without white-box attacks falls back to the robust accuracy
    clean = {"eps": [0.0, 1.0], "grad": {"zero_frac": 0.0, "nan_frac": 0.0}, "robust_accuracy": [0.9, 0.0],
             "accuracy": {"fgsm": [0.9, 0.0], "pgd": [0.9, 0.0]}}
    assert E.sanity_checks(clean) == []
    only_transfer = {"eps": [1.0], "robust_accuracy": [0.5], "accuracy": {"transfer": [0.5]}}
    assert [(f["flag"], f["detail"]) for f in E.sanity_checks(only_transfer)] == [
        ("not_broken_at_large_eps", "eps=1: accuracy under the best white-box attack 0.500 > 0.1")]
    # the eps order, not the list order, decides what "rises" means; equal eps never rise
    shuffled = {"eps": [1.0, 0.1], "robust_accuracy": [0.0, 0.5], "accuracy": {"pgd": [0.0, 0.5]}}
    assert E.sanity_checks(shuffled) == []
    same_eps = {"eps": [0.1, 0.1], "robust_accuracy": [0.2, 0.5], "accuracy": {}}
    assert E.sanity_checks(same_eps) == []
    # an attack's own rise is flagged with its name, after the robust series
    rising = {"eps": [0.1, 0.2], "robust_accuracy": [0.2, 0.1], "accuracy": {"pgd": [0.2, 0.4]}}
    assert [(f["flag"], f["detail"]) for f in E.sanity_checks(rising)] == [
        ("accuracy_rises_with_eps", "pgd: accuracy 0.200 at eps=0.1 < 0.400 at eps=0.2")]


def test_format_report_text():
    rob = {"n": 10, "masks": "model", "accuracy": {"fgsm": [0.9, 0.5]}, "robust_accuracy": [0.9, 0.25]}
    rep = {"eps": [0.0, 0.1], "baseline": "base", "rows": {
        "base": {"clean": {"accuracy": 0.9}, "robustness": rob, "flags": []},
        "other": {"clean": {"accuracy": 0.8}, "robustness": dict(rob, masks="random"),
                  "flags": [{"flag": "zero_gradients", "detail": "all zero"}],
                  "vs_baseline": [{"delta": 0.0, "p_value": 1.0, "verdict": "no significant difference"},
                                  {"delta": -0.125, "p_value": 0.0312, "verdict": "less robust"}]}}}
    assert report.format_report(rep) == "\n".join([
        "### base", "", "clean accuracy 0.9000 (n=10, masks at test time: model)", "",
        "| attack | eps=0 | eps=0.1 |", "|---|---|---|",
        "| fgsm | 0.9000 | 0.5000 |", "| robust (worst case) | 0.9000 | 0.2500 |",
        "", "- no gradient-masking flags", "",
        "### other", "", "clean accuracy 0.8000 (n=10, masks at test time: random)", "",
        "| attack | eps=0 | eps=0.1 |", "|---|---|---|",
        "| fgsm | 0.9000 | 0.5000 |", "| robust (worst case) | 0.9000 | 0.2500 |",
        "| vs base (McNemar) | +0.0000 p=1 no significant difference | -0.1250 p=0.031 less robust |",
        "", "- FLAG zero_gradients: all zero", ""])


class _Logits(nn.Module):
    """Returns its input: x are the logits (one parameter, so the model has a device and a size)."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(3))
        self.register_buffer("b", torch.zeros(2, dtype=torch.float64))

    def forward(self, x):
        return x + 0 * self.p.sum()


def test_evaluate_metrics_of_known_logits():
    # predictions 0 0 1 2 2 2 for labels 0 1 1 2 2 0 (class 3 absent from both)
    y = torch.tensor([0, 1, 1, 2, 2, 0])
    pred = torch.tensor([0, 0, 1, 2, 2, 2])
    logits = F.one_hot(pred, 4).float() * 3.0
    r = E.evaluate(_Logits(), logits, y, batch_size=4)
    assert r["n"] == 6 and r["accuracy"] == 4 / 6
    assert r["confusion"] == [[1, 0, 1, 0], [1, 1, 0, 0], [0, 0, 2, 0], [0, 0, 0, 0]]
    prec, rec = [1 / 2, 1.0, 2 / 3, 0.0], [1 / 2, 1 / 2, 1.0, 0.0]
    f1 = [2 * p * q / (p + q) if p + q else 0.0 for p, q in zip(prec, rec)]
    assert r["per_class"] == {"precision": pytest.approx(prec), "recall": pytest.approx(rec), "f1": pytest.approx(f1)}
    assert r["precision"] == pytest.approx(sum(prec[:3]) / 3)  # macro over the classes present
    assert r["recall"] == pytest.approx(sum(rec[:3]) / 3) and r["f1"] == pytest.approx(sum(f1[:3]) / 3)
    assert r["loss"] == pytest.approx(F.cross_entropy(logits, y).item())
    assert r["correct"].tolist() == [True, False, True, True, True, False]
    assert r["model_size_bytes"] == 3 * 4 + 2 * 8 and r["model_size_mb"] == 28 / 1e6
    assert r["inference_time_s"] >= 0
    assert E.model_size_bytes(_Logits()) == 28
    assert E.predict(_Logits(), logits, batch_size=5).tolist() == pred.tolist()
    with pytest.raises(ValueError, match=r"^labels must be in \[0, 4\), got min 0 max 4$"):
        E.evaluate(_Logits(), logits, torch.tensor([0, 1, 1, 2, 2, 4]))
    with pytest.raises(ValueError, match=r"^labels must be in \[0, 3\), got min 0 max 3$"):
        E.evaluate(_Logits(), logits[:, :3], torch.tensor([0, 1, 1, 2, 2, 3]))
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        E.predict(_Logits(), logits, batch_size=0)


def test_robustness_argument_errors_are_exact():
    model, x, y = _Logits(), torch.rand(4, 3), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match=r"^eps_list must be a non-empty list of eps >= 0, got \[\]$"):
        E.robustness(model, x, y, eps_list=[])
    with pytest.raises(ValueError, match=r"^eps_list must be a non-empty list of eps >= 0, got \[nan\]$"):
        E.robustness(model, x, y, eps_list=[math.nan])
    with pytest.raises(ValueError, match=r"^attack labels must be unique, got \['pgd', 'pgd'\]$"):
        E.robustness(model, x, y, eps_list=[0.1], attacks=("pgd", ("pgd", lambda m, a, b, e: a)))
    with pytest.raises(ValueError, match=r"^unknown attack 'cw': use one of \("):
        E.robustness(model, x, y, eps_list=[0.1], attacks=("cw",))
    with pytest.raises(ValueError, match=r"^attack 'transfer' needs surrogate= \(a model or \{eps: x_adv\}\)$"):
        E.robustness(model, x, y, eps_list=[0.1], attacks=("transfer",))
    with pytest.raises(ValueError, match=r"^test_mask must be False, True or 'auto', got 'yes'$"):
        honest.honest_report(model, x, y, test_mask="yes")


def test_robustness_result_fields():
    """eps 0 is the clean input (no attack run), the config is reported, and a custom attack
    and precomputed transfer examples are scored as given."""
    model = _Logits()
    x, y = torch.eye(3)[[0, 1, 2, 0]] * 2, torch.tensor([0, 1, 2, 1])
    flip = lambda m, xb, yb, e: xb.flip(1)  # noqa: E731  (predictions 2 1 0 2)
    r = E.robustness(model, x, y, eps_list=[0.0, 0.5], attacks=(("flip", flip), "transfer"), pgd_steps=3,
                     pgd_alpha=0.1, restarts=2, eot_samples=4, seed=7, batch_size=3,
                     surrogate={0.0: x, 0.5: x.flip(1)})
    assert r["config"] == {"pgd_steps": 3, "pgd_alpha": 0.1, "restarts": 2, "eot_samples": 4, "seed": 7,
                           "batch_size": 3}
    assert r["eps"] == [0.0, 0.5] and r["n"] == 4 and r["masks"] == "model" and r["attacks"] == ["flip", "transfer"]
    assert r["clean_correct"].tolist() == [True, True, True, False] and r["clean_accuracy"] == 0.75
    assert r["correct"]["flip"].tolist() == [[True, True, True, False], [False, True, False, False]]
    assert r["accuracy"]["flip"] == [0.75, 0.25] and r["accuracy"]["transfer"] == [0.75, 0.25]
    assert r["robust_correct"].tolist() == [[True, True, True, False], [False, True, False, False]]
    assert r["robust_accuracy"] == [0.75, 0.25]
    assert r["grad"]["zero_frac"] == 0.0 and r["grad"]["nan_frac"] == 0.0 and r["grad"]["mean_abs"] > 0


def test_honest_report_defaults_and_one_model():
    model, x, y = _Logits(), torch.eye(3)[[0, 1, 2, 0]] * 2, torch.tensor([0, 1, 2, 1])
    rep = honest.honest_report(model, x, y, eps_list=[0.0])
    assert rep["config"] == {"pgd_steps": 40, "pgd_alpha": None, "restarts": 5, "eot_samples": 20,
                             "batch_size": 500, "seed": 0}
    assert list(rep["rows"]) == ["model"] and rep["baseline"] is None and rep["eps"] == [0.0]
    row = rep["rows"]["model"]
    assert row["model"] == "model" and row["test_mask"] is False
    assert row["robustness"]["attacks"] == ["fgsm", "pgd", "pgd_restarts"]
    assert row["robustness"]["config"]["batch_size"] == 500 and row["robustness"]["config"]["seed"] == 0
    for tm in (False, True):
        r = honest.honest_report({"m": model}, x, y, eps_list=[0.0], test_mask=tm, restarts=1)
        assert list(r["rows"]) == ["m"] and r["rows"]["m"]["test_mask"] is tm
        assert r["rows"]["m"]["robustness"]["attacks"] == (["fgsm", "pgd", "eot", "frozen"] if tm else ["fgsm", "pgd"])


def test_honest_report_passes_its_settings():
    model, x, y = _Logits(), torch.eye(3)[[0, 1, 2, 0]] * 2, torch.tensor([0, 1, 2, 1])
    rep = honest.honest_report(model, x, y, eps_list=[0.0, 0.5], pgd_steps=2, pgd_alpha=0.05, restarts=1,
                          eot_samples=3, batch_size=2, seed=4, surrogate={0.0: x, 0.5: x.flip(1)})
    assert rep["config"] == {"pgd_steps": 2, "pgd_alpha": 0.05, "restarts": 1, "eot_samples": 3,
                             "batch_size": 2, "seed": 4}
    rob = rep["rows"]["model"]["robustness"]
    assert rob["attacks"] == ["fgsm", "pgd", "transfer"]  # precomputed transfer examples are used as given
    assert rob["accuracy"]["transfer"] == [0.75, 0.25]


def test_sanity_check_kinds_boundaries_and_eps_order():
    """The attacks compared are the registry's L-inf kinds ("<name>_restarts" is its attack's, L2
    and custom labels are left out; FGSM is white-box too); a difference of exactly tol is
    tolerated (dyadic values: the sums are exact); "rises" follows the eps order."""
    def flags(acc, eps=(0.1,), robust=(0.0,), **kw):
        r = {"eps": list(eps), "robust_accuracy": list(robust), "accuracy": acc}
        return [(f["flag"], f["detail"]) for f in E.sanity_checks(r, **kw)]
    assert flags({"fgsm": [0.5], "pgd_restarts": [0.75], "pgd_l2": [0.75], "mine": [0.75]}) == [
        ("iterative_weaker_than_single_step", "eps=0.1: pgd_restarts accuracy 0.750 > fgsm 0.500")]
    assert flags({"fgsm": [0.0625], "pgd": [0.5], "transfer": [0.25]}) == [
        ("iterative_weaker_than_single_step", "eps=0.1: pgd accuracy 0.500 > fgsm 0.062")]
    for acc in ({"fgsm": [0.5], "pgd": [0.75]}, {"pgd": [0.75], "transfer": [0.5]}, {"eot": [0.5], "pgd": [0.75]},
                {"eot": [1.0], "pgd": [0.75]}):
        assert flags(acc, tol=0.25) == [], acc
    assert flags({}, eps=(0.1, 0.2), robust=(0.5, 0.75), tol=0.25) == []
    assert flags({}, eps=(0.3, 0.1), robust=(0.5, 0.25)) == [
        ("accuracy_rises_with_eps", "robust: accuracy 0.250 at eps=0.1 < 0.500 at eps=0.3")]


def _masked_linear(n=300):
    torch.manual_seed(0)
    model = nn.Sequential(FeatureMask(ratio=0.5, seed=1), nn.Flatten(), nn.Linear(16, 3)).eval()
    x = torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def test_robustness_with_test_masks_is_the_calls_it_makes():
    """test_mask=True rebuilt from the public calls, in robustness's order, under one outer
    model_state("random") (the draws continue from call to call): the clean predictions, the
    gradient statistics, each attack with its seed, batch size and masks, and the scoring, all
    in batches of batch_size; a custom attack crafts under the same random masks."""
    model, x, y = _masked_linear()
    seen = []

    def custom(m, xb, yb, eps):
        seen.append(m[0].training)  # the FeatureMask draws (training mode) while it crafts
        return xb
    r = E.robustness(model, x, y, eps_list=[0.1], attacks=("pgd", ("custom", custom)), pgd_steps=2, seed=3,
                     batch_size=7, test_mask=True)
    with A.model_state(model, "random"):
        clean = E.predict(model, x, batch_size=7, masks="random") == y
        g = A.input_grad(model, x, y, masks="random", batch_size=7)
        adv = A.make_attack("pgd", 0.1, steps=2, seed=3, batch_size=7, masks="random")(model, x, y)
        pgd = E.predict(model, adv, batch_size=7, masks="random") == y
        mine = E.predict(model, x, batch_size=7, masks="random") == y
    assert seen == [True] and r["masks"] == "random"
    assert torch.equal(r["clean_correct"], clean) and r["grad"]["mean_abs"] == g.abs().mean().item()
    assert torch.equal(r["correct"]["pgd"][0], pgd) and torch.equal(r["correct"]["custom"][0], mine)
    # the data tell the settings apart: one batch, the model's own masks or another seed differ
    assert not torch.equal(E.predict(model, x, masks="random") == y, clean)
    assert not torch.equal(E.predict(model, x, batch_size=7) == y, clean)
    assert A.input_grad(model, x, y, batch_size=7).abs().mean().item() != r["grad"]["mean_abs"]
    other = A.make_attack("pgd", 0.1, steps=2, seed=0, batch_size=7, masks="random")(model, x, y)
    assert not torch.equal(other, adv)


class _Rows(nn.Module):
    """A linear model whose input gradient is zero for samples with x[0] < 0.25 and NaN for
    those with x[0] > 0.75 (the rows' logits are scaled by 0 and by NaN)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        s = torch.where(x[:, :1] < 0.25, 0.0, torch.where(x[:, :1] > 0.75, math.nan, 1.0))
        return self.lin(x) * s


def test_gradient_statistics_count_samples():
    torch.manual_seed(0)
    x = torch.rand(40, 4, generator=torch.Generator().manual_seed(1))
    y = torch.zeros(40, dtype=torch.long)
    r = E.robustness(_Rows(), x, y, eps_list=[0.0])
    zero, nan = (x[:, 0] < 0.25).double().mean().item(), (x[:, 0] > 0.75).double().mean().item()
    assert 0 < zero < 1 and 0 < nan < 1
    assert r["grad"]["zero_frac"] == zero and r["grad"]["nan_frac"] == nan


def test_defaults_and_masks_of_the_clean_calls():
    """robustness's documented defaults (its config), the 10 classes of the metrics, and
    masks= of logits / predict / evaluate; evaluate's batch_size check and its timer."""
    model, x, y = _masked_linear(60)
    r = E.robustness(model, x, y, eps_list=[0.0])
    assert r["config"] == {"pgd_steps": 40, "pgd_alpha": None, "restarts": 1, "eot_samples": 20, "seed": 0,
                           "batch_size": 500}
    assert r["attacks"] == ["fgsm", "pgd"] and r["masks"] == "model"
    m = E.classification_metrics(y, y)
    assert len(m["per_class"]["f1"]) == 10 and E.confusion_matrix(y, y).shape == (10, 10)
    plain = E.predict(model, x)
    assert torch.equal(plain, E.logits(model, x).argmax(1)) and torch.equal(plain, y)
    rand = E.predict(model, x, masks="random")
    assert torch.equal(rand, E.logits(model, x, masks="random").argmax(1)) and not torch.equal(rand, plain)
    t0 = time.perf_counter()
    ev = E.evaluate(model, x, y, masks="random")
    assert torch.equal(ev["correct"], rand == y) and 0 <= ev["inference_time_s"] <= time.perf_counter() - t0
    with pytest.raises(ValueError, match=r"^batch_size must be >= 1, got 0$"):
        E.evaluate(model, x, y, batch_size=0)


def test_macro_average_counts_a_class_seen_once():
    """A class predicted once but absent from y, or in y once but never predicted, is one of the
    classes the macro average runs over (with precision / recall 0)."""
    m = E.classification_metrics(torch.tensor([0, 0, 2]), torch.tensor([0, 0, 0]), 3)
    assert m["precision"] == pytest.approx((1 + 0) / 2) and m["recall"] == pytest.approx((2 / 3 + 0) / 2)
    m = E.classification_metrics(torch.tensor([0, 0, 0]), torch.tensor([0, 0, 1]), 3)
    assert m["precision"] == pytest.approx((2 / 3 + 0) / 2) and m["recall"] == pytest.approx((1 + 0) / 2)


def test_default_batches_of_1000_set_the_random_draws():
    """logits / predict / evaluate run 1000 samples per forward by default: with random masks the
    draws of 1001 samples are those of a batch of 1000 and then one of 1 (the draws continue)."""
    model, x, y = _masked_linear(1001)
    with A.model_state(model, "random"):
        want = torch.cat([E.logits(model, x[:1000], masks="random"), E.logits(model, x[1000:], masks="random")])
    assert torch.equal(E.logits(model, x, masks="random"), want)
    assert not torch.equal(E.logits(model, x, masks="random", batch_size=1001), want)
    assert torch.equal(E.predict(model, x, masks="random"), want.argmax(1))
    assert torch.equal(E.evaluate(model, x, y, masks="random")["correct"], want.argmax(1) == y)
