"""AutoAttack in the honest evaluation (fastmask.honest_autoattack via honest.evaluate_models):
standard on rows without test-time masks, rand on "[test mask]" rows, in the robust worst case,
per-attack columns and flags in honest.md / honest.json, and each piece cached so that an
interrupted run resumes to the same figures."""
import json

import pytest
import torch
from torch import nn

from fastmask import attacks as A, autoattack as AAmod, honest, honest_autoattack as AA, models as M

SIZES = dict(n=16, eps_list=(0.0, 0.01, 0.02), pgd_steps=2, restarts=1, eot_samples=2, aa_steps=3, aa_queries=10,
             aa_targets=2, aa_draws=5)
QUIET = dict(log=lambda *a: None)
ALONE = dict(QUIET, baseline=None)


def _data():
    torch.manual_seed(0)
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = M.build("mlp", seed=0).eval()(x).argmax(1)  # the baseline right on every clean input
    return x, y


def _models():
    base = M.build("mlp", seed=0).eval()
    return {"baseline": base, "masked": M.build("mlp", M.mask_config(0.3), seed=1).eval(),
            "soft": nn.Sequential(M.build("mlp", seed=0), nn.Softmax(1)).eval()}


def strip_seconds(o):
    """Everything but the timings (measured, so they differ between two runs)."""
    if isinstance(o, dict):
        return {k: strip_seconds(v) for k, v in o.items() if k not in ("seconds", "inference_time_s")}
    if isinstance(o, list):
        return [strip_seconds(v) for v in o]
    return o


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """PGD suite alone, then the same folder with AutoAttack beside it."""
    out = tmp_path_factory.mktemp("aa")
    x, y = _data()
    torch.set_num_threads(1)
    pgd = honest.evaluate_models(_models(), x, y, out, settings=honest.HonestSettings(**SIZES), **QUIET)
    pgd = json.loads((out / "honest.json").read_text())
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "honest_cache").iterdir()}
    s = honest.HonestSettings(**SIZES, attacks="autoattack")
    rep = honest.evaluate_models(_models(), x, y, out, settings=s, **QUIET)
    return out, x, y, pgd, mtimes, rep


def test_versions_per_row_and_the_worst_case_includes_autoattack(run):
    out, x, y, pgd, _, rep = run
    assert set(rep["rows"]) == {"baseline", "masked", "masked [test mask]", "masked [M_test]", "soft"}
    for row, r in rep["rows"].items():
        aa, rob = r["autoattack"], r["robustness"]
        rand = row.endswith("[test mask]")
        assert aa["version"] == ("rand" if rand else "standard"), row
        names = [a["name"] for a in aa["per_eps"][0]["attacks"]]
        assert names == list(AAmod.RAND if rand else AAmod.STANDARD), row
        assert [p["eps"] for p in aa["per_eps"]] == [0.01, 0.02]  # eps 0 is the clean input: no cascade
        assert aa["per_eps"][0]["draws"] == (5 if rand else 1)
        c = rob["correct"]["autoattack"]
        assert torch.equal(c[0], rob["clean_correct"])
        for j, p in enumerate(aa["per_eps"], 1):  # the per-sample figure: right in every scoring draw
            assert c[j].double().mean().item() == p["robust"]["all_draws"] == rob["accuracy"]["autoattack"][j]
        assert torch.equal(rob["robust_correct"], rob["robust_correct"] & c)
        for i in range(3):
            assert rob["robust_accuracy"][i] <= min(a[i] for a in rob["accuracy"].values())
    # the deterministic baseline row: exactly the cascade called directly with the preset's sizes
    b = rep["rows"]["baseline"]["robustness"]
    for j, e in enumerate((0.01, 0.02), 1):
        _, direct = AAmod.autoattack(M.build("mlp", seed=0).eval(), x, y, e, steps=3, queries=10, targets=2,
                                     seed=0, batch_size=500)
        assert torch.equal(b["correct"]["autoattack"][j], direct["correct"][:, 0].cpu())
    # AutoAttack lowers the untrained baseline below the PGD suite's worst case at eps 0.01
    assert b["robust_accuracy"][1] < pgd["rows"]["baseline"]["robustness"]["robust_accuracy"][1]


def test_pgd_rows_stay_as_they_were_and_are_reused(run):
    out, _, _, pgd, mtimes, rep = run
    # a PGD-only evaluation records its settings as before AutoAttack existed (scripts/results_check.sh digests)
    assert not {"attacks", "aa_steps", "aa_queries", "aa_targets", "aa_draws"} & set(pgd["settings"])
    for row, r in rep["rows"].items():
        for name, acc in pgd["rows"][row]["robustness"]["accuracy"].items():
            assert r["robustness"]["accuracy"][name] == acc, (row, name)
    assert all((out / "honest_cache" / name).stat().st_mtime_ns == t for name, t in mtimes.items())
    assert len(list((out / "honest_cache").glob("*.autoattack_*.pt"))) == 5 * 2  # 5 rows x 2 eps > 0


def test_files_show_every_component_and_the_flags(run):
    out, *_ = run
    js = json.loads((out / "honest.json").read_text())
    assert js["settings"]["attacks"] == "autoattack" and js["settings"]["aa_queries"] == 10
    entry = js["rows"]["masked [test mask]"]["autoattack"]["per_eps"][1]["attacks"][0]
    assert {"name", "attacked", "removed", "robust", "seconds"} <= set(entry)
    assert {"mean", "worst", "all_draws"} <= set(entry["robust"])
    assert "autoattack" in js["rows"]["baseline"]["robustness"]["accuracy"]
    flags = {f["flag"] for f in js["rows"]["soft"]["flags"]}
    assert "autoattack_softmax_output" in flags
    assert not any(f["flag"].startswith("autoattack") for f in js["rows"]["baseline"]["flags"])
    md = (out / "honest.md").read_text()
    assert "## AutoAttack, per row and eps" in md and "### masked [test mask]: AutoAttack-rand" in md
    assert "| eps | clean | apgd-ce | apgd-t | fab-t | square | robust | flags |" in md
    assert "| eps | clean | apgd-ce | apgd-dlr | robust | flags |" in md
    soft = next(l for l in md.splitlines() if l.startswith("| soft |"))
    assert "**FLAG:" in soft and "autoattack_softmax_output" in soft
    assert "| autoattack |" in md  # its line in the row's every-attack table


def test_interrupted_run_resumes_to_the_same_figures(tmp_path, monkeypatch):
    """Killed (KeyboardInterrupt, as SIGINT/SIGTERM in the CLI) while the [test mask] row's second
    AutoAttack piece runs: the rerun computes only that piece, and honest.json is the uninterrupted one."""
    x, y = _data()
    s = honest.HonestSettings(**SIZES, attacks="autoattack", mtest=False)
    fresh = lambda: {"masked": M.build("mlp", M.mask_config(0.3), seed=1).eval()}  # noqa: E731 (a new process)
    honest.evaluate_models(fresh(), x, y, tmp_path / "whole", settings=s, **ALONE)
    real, calls = AA.piece, []

    def interrupted(*a, **k):
        calls.append(a[3])
        if len(calls) == 4:  # masked: 2 pieces; masked [test mask]: the first cached, the second killed
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(AA, "piece", interrupted)
    with pytest.raises(KeyboardInterrupt):
        honest.evaluate_models(fresh(), x, y, tmp_path / "resumed", settings=s, **ALONE)
    assert not (tmp_path / "resumed" / "honest.json").exists()
    calls.clear()
    honest.evaluate_models(fresh(), x, y, tmp_path / "resumed", settings=s, **ALONE)
    assert calls == [0.02]  # the one missing piece
    whole, resumed = (json.loads((tmp_path / d / "honest.json").read_text()) for d in ("whole", "resumed"))
    assert strip_seconds(resumed) == strip_seconds(whole)


def test_settings_refuse_bad_autoattack_options():
    with pytest.raises(ValueError, match="attacks='aa' must be one of 'pgd', 'autoattack'"):
        honest.HonestSettings(attacks="aa")
    with pytest.raises(ValueError, match="aa_steps=0 must be >= 1"):
        honest.HonestSettings(attacks="autoattack", aa_steps=0)
    with pytest.raises(ValueError, match="needs attacks='autoattack'"):
        honest.HonestSettings(attack_opts={"autoattack": {"steps": 2}})
    with pytest.raises(ValueError, match="autoattack.version='rand': the honest evaluation picks"):
        honest.HonestSettings(attacks="autoattack", attack_opts={"autoattack": {"version": "rand"}})
    with pytest.raises(ValueError, match="autoattack.draws must be >= 1, got 0"):
        honest.HonestSettings(attacks="autoattack", attack_opts={"autoattack": {"draws": 0}})
    # the preset's sizes, then the options on top; a deterministic row scores once, without EOT
    s = honest.HonestSettings.preset("check", attacks="autoattack", attack_opts={"autoattack": {"steps": 7}})
    assert AA.options(s, True) == dict(version="rand", steps=7, queries=50, targets=3, draws=5, eot_samples=2)
    assert AA.options(s, False) == dict(version="standard", steps=7, queries=50, targets=3, draws=None,
                                        eot_samples=1)
    assert AA.options(s, False, classes=4)["targets"] == 3 and AA.options(s, False, classes=10)["targets"] == 3
    s = honest.HonestSettings.preset("standard", attacks="autoattack")
    assert AA.options(s, False, classes=5)["targets"] == 4 and AA.options(s, False, classes=10)["targets"] == 9
    with pytest.raises(ValueError, match="AutoAttack needs a model with >= 4 classes .*, got one with 3"):
        AA.options(s, False, classes=3)


def test_each_piece_draws_from_its_own_offsets(monkeypatch):
    """A [test mask] piece starts its mask draws at step + (j + 1) * 2^32 (not where the row's PGD
    attacks or the previous piece left them), and the model's offsets come back as they were."""
    model = M.build("mlp", M.mask_config(0.3), seed=1).eval()
    fm = A.feature_masks(model)[0]
    fm.step.fill_(7)
    seen = []

    def fake(m, x, y, eps, **kw):
        assert kw == {"version": "rand", "steps": 4, "seed": 0, "batch_size": None}  # the row's options
        seen.append(int(fm.step))
        fm.step.add_(100)  # the cascade's own forwards advance it
        return x, {"correct": torch.ones(len(y), 5, dtype=torch.bool), "flags": []}
    monkeypatch.setattr(AA, "autoattack", fake)
    x, y = _data()
    for j in (1, 2, 1):
        AA.piece(model, x, y, 0.1, j, {"version": "rand", "steps": 4}, seed=0, batch_size=None)
    assert seen == [7 + (2 << 32), 7 + (3 << 32), 7 + (2 << 32)] and int(fm.step) == 7


def test_sigkilled_evaluate_resumes_to_the_same_figures(tmp_path):
    """`fastmask evaluate --attacks autoattack` killed (SIGKILL) once an AutoAttack piece is cached:
    the rerun finishes it, and honest.json equals an uninterrupted run's, figures bit for bit."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path
    from fastmask import cli
    from idx_data import write_idx
    (tmp_path / "killnets.py").write_text("import torch\nfrom torch import nn\n\ndef net():\n"
                                          "    torch.manual_seed(3)\n    return nn.Sequential(nn.Flatten(), "
                                          "nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import killnets
        torch.save(killnets.net().state_dict(), tmp_path / "w.pt")
        write_idx(tmp_path / "data", 60, 40)
        argv = ["evaluate", "--model-def", "killnets:net", "--weights", str(tmp_path / "w.pt"), "--data-dir",
                str(tmp_path / "data"), "--preset", "check", "--n", "32", "--eps", "0,0.005,0.01,0.02,0.03",
                "--pgd-steps", "2", "--attacks", "autoattack", "--attack-opt", "autoattack.queries=400", "--quiet"]
        assert cli.main(argv + ["--out", str(tmp_path / "whole")]) == 0
        out = tmp_path / "killed"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(Path(__file__).resolve().parents[1])]))
        proc = subprocess.Popen([sys.executable, "-m", "fastmask"] + argv + ["--out", str(out)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        t_end = time.monotonic() + 120
        while not list(out.glob("honest_cache/*.autoattack_*.pt")) and proc.poll() is None:
            assert time.monotonic() < t_end, "no AutoAttack piece was cached"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        pieces = len(list(out.glob("honest_cache/*.autoattack_*.pt")))
        assert pieces >= 1 and not [p for p in out.rglob("*.pt") if p.stat().st_size == 0]
        assert cli.main(argv + ["--out", str(out)]) == 0
        whole, resumed = (json.loads((tmp_path / d / "honest.json").read_text()) for d in ("whole", "killed"))
        assert strip_seconds(resumed) == strip_seconds(whole)
        if pieces < 4:  # the kill landed mid-run (under heavy load the run may have finished first)
            assert proc.returncode == -signal.SIGKILL
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("killnets", None)
