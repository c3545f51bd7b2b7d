"""scripts/aa_curve.py: AutoAttack robust accuracy against training CPU minutes, cached per
checkpoint so that a killed or extended run never redoes a finished point."""
import importlib.util
import json
from pathlib import Path

import pytest

from fastmask import models as M

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("aa_curve", ROOT / "scripts" / "aa_curve.py")
aa_curve = importlib.util.module_from_spec(spec)
spec.loader.exec_module(aa_curve)


def snapshot(path, cpu_s, epoch, seed=0):
    model = M.build("cnn", seed=seed)
    M.save(path, model, {"model": "cnn"}, "no-data", extra={"history": [], "train_cpu_time": cpu_s, "epoch": epoch})
    return path


def test_curve_points_are_measured_once_and_drawn(tmp_path, mnist, monkeypatch):
    a = snapshot(tmp_path / "runA" / "epochs" / "epoch_001.pt", 90.0, 1)
    b = snapshot(tmp_path / "runA" / "model.pt", 180.0, 2, seed=1)
    db = tmp_path / "curve.json"
    rows = aa_curve.main([str(a), str(b), "--n", "6", "--db", str(db)])
    assert len(rows) == 2 and json.loads(db.read_text()) == rows
    r = {row["checkpoint"]: row for row in rows}
    assert r[str(a)]["run"] == r[str(b)]["run"] == "runA"
    assert r[str(a)]["train_cpu_min"] == 1.5 and r[str(b)]["train_cpu_min"] == 3.0
    for row in rows:
        assert 0 <= row["robust"] <= row["clean"] and row["n"] == 6 and row["eps"] == 0.3
        assert list(row["stages"]) == ["apgd-ce", "apgd-t", "fab-t", "square"]

    def no_attack(*args, **kwargs):
        raise AssertionError("a point already in the db was attacked again")
    monkeypatch.setattr(aa_curve, "measure", no_attack)
    assert aa_curve.main([str(a), str(b), "--n", "6", "--db", str(db)]) == rows
    with pytest.raises(AssertionError, match="attacked again"):  # other images: a new point
        aa_curve.main([str(a), "--n", "6", "--start", "6", "--db", str(db)])
    monkeypatch.undo()

    fig = tmp_path / "curve.png"
    aa_curve.main(["--db", str(db), "--figure", str(fig), "--label", "runA=TRADES"])
    assert fig.stat().st_size > 0
    assert "| TRADES | 1 | 1.5 | 6 |" in aa_curve.table(rows, {"runA": "TRADES"})


def test_a_checkpoint_without_training_time_is_refused(tmp_path, mnist):
    path = tmp_path / "plain.pt"
    M.save(path, M.build("cnn"), {"model": "cnn"}, "no-data")
    with pytest.raises(SystemExit, match="records no train_cpu_time"):
        aa_curve.main([str(path), "--n", "2", "--db", str(tmp_path / "c.json")])
    with pytest.raises(SystemExit):
        aa_curve.main(["--n", "0", "--db", str(tmp_path / "c.json")])


def test_a_finished_compare_run_is_taken_not_attacked_again(tmp_path, mnist, monkeypatch):
    ck = snapshot(tmp_path / "runB" / "model.pt", 600.0, 9)
    row = {"model": str(ck), "eps": 0.3, "n": 500, "start": 0, "seed": 0, "steps": 100, "queries": 5000,
           "clean": 0.98, "fastmask_cpu_s": 900.0,
           "stages": [{"attack": a, "fastmask": v} for a, v in
                      (("apgd-ce", 0.9), ("apgd-t", 0.89), ("fab-t", 0.89), ("square", 0.85))]}
    (tmp_path / "cmp.json").write_text(json.dumps([row]))
    monkeypatch.setattr(aa_curve, "measure", None)  # no attack may run
    db = tmp_path / "curve.json"
    for _ in range(2):  # the second time adds nothing
        rows = aa_curve.main(["--db", str(db), "--add-compare", str(tmp_path / "cmp.json")])
    assert len(rows) == 1
    r = rows[0]
    assert (r["run"], r["train_cpu_min"], r["robust"], r["n"], r["epoch"]) == ("runB", 10.0, 0.85, 500, 9)
    assert r["stages"]["apgd-t"] == 0.89
    assert r["flags"] == ["square stronger than the white-box attacks: robust 85.00% after it, 89.00% before "
                          "(gradient masking?)"]
    (tmp_path / "short.json").write_text(json.dumps([{**row, "steps": 10}]))
    with pytest.raises(SystemExit, match="not AutoAttack-standard"):
        aa_curve.main(["--db", str(db), "--add-compare", str(tmp_path / "short.json")])
