"""Every bad input to the command line fails fast with exit code 2 and ONE line on stderr
that names the argument (or file) and the bad value, without a traceback."""
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastmask import cli, models as M

from idx_data import idx_bytes, write_idx
from test_reliability import Boom

ROOT = Path(__file__).resolve().parents[1]


def fails(argv, capsys, *needles):
    rc = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, (argv, rc, err)
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert str(n) in err, (argv, n, err)
    return err


ARG_CASES = [
    (["train", "--out", "o", "--mask-ratio", "1.5"], "--mask-ratio", "1.5"),
    (["train", "--out", "o", "--mask-ratio", "-0.1"], "--mask-ratio", "-0.1"),
    (["train", "--out", "o", "--mask-ratio", "nan"], "--mask-ratio", "nan"),
    (["train", "--out", "o", "--lr", "-1"], "--lr", "-1"),
    (["train", "--out", "o", "--lr", "0"], "--lr", "0"),
    (["train", "--out", "o", "--lr", "inf"], "--lr", "inf"),
    (["train", "--out", "o", "--max-norm", "-2"], "--max-norm", "-2"),
    (["train", "--out", "o", "--noise-std", "-0.5"], "--noise-std", "-0.5"),
    (["train", "--out", "o", "--adv-eps", "-0.1"], "--adv-eps", "-0.1"),
    (["train", "--out", "o", "--epochs", "0"], "--epochs", "0"),
    (["train", "--out", "o", "--batch-size", "x"], "--batch-size", "x"),
    (["train", "--out", "o", "--mask-mode", "dots"], "--mask-mode", "dots"),
    (["train", "--out", "o", "--mask-scope", "batch"], "--mask-scope", "batch"),
    (["train", "--out", "o", "--optimizer", "lbfgs"], "--optimizer", "lbfgs"),
    (["train", "--out", "o", "--adv-train", "free"], "--adv-train", "free"),
    (["train", "--out", "o", "--adv-train", "pgd", "--adv-steps", "0"], "--adv-steps", "0"),
    (["train", "--out", "o", "--adv-train", "fgsm", "--adv-steps", "3"], "--adv-steps", "3"),
    (["reproduce", "--eps", "-0.1"], "--eps", "-0.1"),
    (["reproduce", "--eps", "0.1,1.5"], "--eps", "1.5"),
    (["reproduce", "--model", "resnet"], "--model", "resnet"),
    (["reproduce", "--dataset", "cifar"], "--dataset", "cifar"),
    (["reproduce", "--preset", "huge"], "--preset", "huge"),
    (["reproduce", "--seed", "-1"], "--seed", "-1"),
    (["reproduce", "--threads", "0"], "--threads", "0"),
    (["reproduce", "--rows", "baseline,nope"], "rows", "nope"),
    (["attack", "--checkpoint", "x.pt", "--pgd-alpha", "0"], "--pgd-alpha", "0"),
    (["attack", "--checkpoint", "x.pt", "--n", "-3"], "--n", "-3"),
    (["attack", "--checkpoint", "x.pt", "--eps", "0"], "--eps", "0"),
    (["frobnicate"], "invalid choice", "frobnicate"),
]


@pytest.mark.parametrize("argv, arg, value", ARG_CASES, ids=[" ".join(c[0][-2:]) for c in ARG_CASES])
def test_bad_arguments(argv, arg, value, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fails(argv, capsys, arg, value)
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_out_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "results"
    f.write_text("not a folder")
    for cmd in ("reproduce", "train"):
        fails([cmd, "--out", f], capsys, "--out", str(f), "is a file")
    assert f.read_text() == "not a folder"


def test_checkpoints(tmp_path, capsys):
    fails(["attack", "--checkpoint", tmp_path / "none.pt"], capsys, tmp_path / "none.pt", "does not exist")
    (tmp_path / "garbage.pt").write_bytes(b"\x80\x04garbage")
    fails(["attack", "--checkpoint", tmp_path / "garbage.pt"], capsys, tmp_path / "garbage.pt", "unreadable")
    (tmp_path / "dir.pt").mkdir()
    fails(["attack", "--checkpoint", tmp_path / "dir.pt"], capsys, tmp_path / "dir.pt", "folder")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    fails(["attack", "--checkpoint", tmp_path / "foreign.pt"], capsys, tmp_path / "foreign.pt",
          "not a fastmask checkpoint")
    M.save(tmp_path / "mlp.pt", M.build("mlp", seed=0), {"dataset": "mnist"}, "h")
    blob = torch.load(tmp_path / "mlp.pt", weights_only=True)
    blob["model"] = "cnn"  # a checkpoint for another model
    torch.save(blob, tmp_path / "other.pt")
    fails(["attack", "--checkpoint", tmp_path / "other.pt"], capsys, tmp_path / "other.pt", "does not fit")
    marker = tmp_path / "code-ran"
    b = Boom()
    b.marker = str(marker)
    torch.save({"kind": M.CHECKPOINT_KIND, "version": M.CHECKPOINT_VERSION, "payload": b},
               tmp_path / "evil.pt")
    fails(["attack", "--checkpoint", tmp_path / "evil.pt"], capsys, tmp_path / "evil.pt", "unreadable")
    assert not marker.exists()
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"kind": M.CHECKPOINT_KIND}))
    fails(["attack", "--checkpoint", tmp_path / "plain.pkl"], capsys, tmp_path / "plain.pkl")


def test_damaged_data_names_the_file(tmp_path, capsys):
    data = write_idx(tmp_path / "data", 60, 12)
    bad = data / "t10k-labels-idx1-ubyte"
    bad.write_bytes(bad.read_bytes()[:-3])
    fails(["train", "--out", tmp_path / "o", "--data-dir", data, "--epochs", "1"], capsys, bad, "truncated")
    bad.write_bytes(idx_bytes([1] * 12, images=True)[:16])
    fails(["train", "--out", tmp_path / "o", "--data-dir", data], capsys, bad, "magic")
    assert not (tmp_path / "o").exists()


def test_entry_point_one_line_no_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    f = tmp_path / "file"
    f.write_text("x")
    for argv in (["reproduce", "--out", str(f)], ["train", "--out", "o", "--lr", "-1"]):
        r = subprocess.run([sys.executable, "-m", "fastmask"] + argv, capture_output=True, text=True,
                           env=env, timeout=300, cwd=tmp_path)
        assert r.returncode == 2 and r.stdout == "", r
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
