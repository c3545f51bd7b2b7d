"""fastmask.distributed: the single-process no-ops, the sharding arithmetic, and real torchrun
runs with two CPU processes (gloo): DDP training on the smoke preset, identical replicas, the
same accuracy as one process for the same global batch, a sharded evaluation equal to the
one-process evaluation, and a failing rank that brings the job down with a clear message."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastmask import distributed as dist
from fastmask import models as M
from fastmask.nn import FeatureMask

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
ROWS = "baseline,random30_gm"


def fastmask(*args, procs=1, timeout=300):
    cmd = (TORCHRUN if procs == 2 else [sys.executable]) + ["-m", "fastmask", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def ok(r):
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    return r


# ---------------------------------------------------------------- one process: no-ops
def test_single_process_helpers_are_noops():
    assert not dist.enabled() and (dist.rank(), dist.world_size(), dist.is_main()) == (0, 1, True)
    t = torch.arange(7)
    assert torch.equal(dist.chunk(t), t)
    assert dist.shard_map(lambda i: i * i, 5) == [0, 1, 4, 9, 16]
    assert dist.broadcast({"a": 1}) == {"a": 1} and dist.all_gather(3) == [3]
    assert dist.all_reduce_sum([1, 2.5]) == [1.0, 2.5]
    assert dist.stream_offset(11) == 11 and dist.device() == torch.device("cpu")
    model = M.build("mlp", None, seed=0)
    assert dist.wrap(model) is model and dist.replica_hashes(model) == [dist.state_hash(model)]
    with dist.launched():  # WORLD_SIZE unset: nothing happens
        assert not dist.enabled()


def test_chunks_of_a_global_batch_partition_it(monkeypatch):
    for w in (1, 2, 3, 8):
        for n in (0, 1, 7, 50, 128):
            parts = []
            for r in range(w):
                monkeypatch.setattr(dist, "rank", lambda r=r: r)
                monkeypatch.setattr(dist, "world_size", lambda w=w: w)
                parts.append(dist.chunk(torch.arange(n)))
            assert torch.equal(torch.cat(parts), torch.arange(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_shard_map_items_per_rank(monkeypatch):
    """Rank r computes items r, r+W, ...; the gather puts every item back in order."""
    w, n = 3, 8
    monkeypatch.setattr(dist, "enabled", lambda: True)
    monkeypatch.setattr(dist, "world_size", lambda: w)
    for r in range(w):
        calls = []
        monkeypatch.setattr(dist, "rank", lambda r=r: r)
        others = {i: 10 * i for i in range(n) if i % w != r}  # what the other ranks would send
        monkeypatch.setattr(dist, "all_gather", lambda mine, o=others: [mine, o])
        assert dist.shard_map(lambda i: calls.append(i) or 10 * i, n) == [10 * i for i in range(n)]
        assert calls == list(range(r, n, w))


def test_mask_streams_rank_distinct_and_rank0_unchanged(monkeypatch):
    x = torch.rand(4, 1, 28, 28)

    def draw(rank):
        fm = FeatureMask(0.5, seed=3).train()
        monkeypatch.setattr(dist, "rank", lambda: rank)
        dist.mask_streams(fm)
        return [fm(x) for _ in range(2)]
    plain = FeatureMask(0.5, seed=3).train()
    base = [plain(x) for _ in range(2)]
    r0, r1, r2 = draw(0), draw(1), draw(2)
    assert all(torch.equal(a, b) for a, b in zip(base, r0))  # rank 0 = single process
    for a, b in [(r0, r1), (r0, r2), (r1, r2)]:
        assert not torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])
    fixed = FeatureMask(0.5, scope="fixed", seed=3).train()  # fixed masks: the same on every rank
    f0 = fixed(x)
    monkeypatch.setattr(dist, "rank", lambda: 1)
    assert torch.equal(dist.mask_streams(fixed)(x), f0)


def test_bad_timeout_names_the_variable(monkeypatch):
    monkeypatch.setenv("FASTMASK_DIST_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="FASTMASK_DIST_TIMEOUT='soon'"):
        dist.timeout_s()


# ---------------------------------------------------------------- torchrun, two CPU processes
@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke preset (two rows, one masked with gradient manipulation) with 1 and 2 processes."""
    out = tmp_path_factory.mktemp("dist")
    runs = {}
    for procs in (2, 1):
        d = out / f"p{procs}"
        r = ok(fastmask("reproduce", "--preset", "smoke", "--rows", ROWS, "--out", d, "--quiet", procs=procs))
        runs[procs] = (d, json.loads((d / "results.json").read_text()), r)
    return runs


def test_torchrun_smoke_reproduce_identical_replicas(smoke):
    d, res, r = smoke[2]
    assert res["world_size"] == 2 and smoke[1][1]["world_size"] == 1
    for row in ROWS.split(","):
        blob = M.read_checkpoint(d / "checkpoints" / f"{row}.pt")
        h = blob["extra"]["replica_sha256"]
        assert blob["extra"]["world_size"] == 2 and len(h) == 2 and h[0] == h[1], (row, h)
        model = M.load(d / "checkpoints" / f"{row}.pt")
        assert h[0] == dist.state_hash(model)  # what rank 0 wrote is the replica both ranks hold
    assert "replicas differ" not in r.stderr


def test_torchrun_same_global_batch_same_accuracy(smoke):
    """Unmasked and noise-free, two processes differ from one only by the order of float sums."""
    a, b = smoke[2][1]["rows"]["baseline"], smoke[1][1]["rows"]["baseline"]
    assert abs(a["clean"]["accuracy"] - b["clean"]["accuracy"]) <= 0.01
    assert abs(a["history"][-1]["val_acc"] - b["history"][-1]["val_acc"]) <= 0.01
    assert a["history"][-1]["loss"] == pytest.approx(b["history"][-1]["loss"], rel=1e-4)
    assert a["history"][-1]["val_loss"] == pytest.approx(b["history"][-1]["val_loss"], rel=1e-4)
    # the masked row draws other masks (rank-distinct streams) but learns as much
    a, b = smoke[2][1]["rows"]["random30_gm"], smoke[1][1]["rows"]["random30_gm"]
    assert abs(a["history"][-1]["loss"] - b["history"][-1]["loss"]) < 0.05


@pytest.mark.slow
def test_torchrun_masked_training_same_accuracy(tmp_path):
    """Masking + gradient manipulation, 10,000 images, global batch 100: validation accuracy
    (10,000 images) within 1 point of the one-process run."""
    args = ["train", "--train-subset", "10000", "--epochs", "1", "--batch-size", "100", "--mask-ratio", "0.3",
            "--max-norm", "1", "--noise-std", "0.001", "--quiet"]
    ok(fastmask(*args, "--out", tmp_path / "p2", procs=2))
    ok(fastmask(*args, "--out", tmp_path / "p1"))
    a, b = (M.read_checkpoint(tmp_path / p / "model.pt")["extra"] for p in ("p2", "p1"))
    assert a["world_size"] == 2 and "world_size" not in b
    assert abs(a["history"][-1]["val_acc"] - b["history"][-1]["val_acc"]) <= 0.01


def test_torchrun_evaluation_equals_one_process(smoke):
    ck = smoke[1][0] / "checkpoints" / "random30_gm.pt"
    args = ["attack", "--checkpoint", ck, "--json", "--n-test", "200", "--eps", "0.1,0.2,0.3",
            "--pgd-steps", "3", "--test-mask"]
    two, one = ok(fastmask(*args, procs=2)), ok(fastmask(*args))
    assert json.loads(two.stdout) == json.loads(one.stdout)  # every number, bit for bit
    assert two.stdout.count("clean_accuracy") == 1  # rank 0 alone prints


def test_torchrun_autoattack_pieces_shared_out_equal_one_process(smoke, tmp_path):
    """evaluate --attacks autoattack under torchrun: the AutoAttack pieces (one per eps) are shared out
    over the ranks, rank 0 caches every one, and the deterministic row equals the one-process run."""
    ck = smoke[1][0] / "checkpoints" / "baseline.pt"
    args = ["evaluate", "--checkpoint", f"baseline={ck}", "--preset", "check", "--n-test", "20", "--eps",
            "0,0.02,0.05,0.1", "--pgd-steps", "2", "--attacks", "autoattack", "--attack-opt", "autoattack.steps=3",
            "--attack-opt", "autoattack.queries=20", "--quiet"]
    ok(fastmask(*args, "--out", tmp_path / "p2", procs=2))
    ok(fastmask(*args, "--out", tmp_path / "p1"))
    assert len(list((tmp_path / "p2" / "honest_cache").glob("baseline.autoattack_*.pt"))) == 3
    two, one = (json.loads((tmp_path / p / "honest.json").read_text())["rows"]["baseline"] for p in ("p2", "p1"))
    assert two["robustness"]["accuracy"]["autoattack"] == one["robustness"]["accuracy"]["autoattack"]
    assert two["robustness"]["robust_accuracy"] == one["robustness"]["robust_accuracy"]
    assert [p["robust"] for p in two["autoattack"]["per_eps"]] == [p["robust"] for p in one["autoattack"]["per_eps"]]


def test_torchrun_failing_rank_stops_the_job(tmp_path):
    """Rank 0 cannot write its checkpoint (under /proc): it names itself and the job ends, non-zero."""
    t0 = time.perf_counter()
    r = fastmask("train", "--out", "/proc/fastmask-nowhere", "--train-subset", "200", "--epochs", "1",
                 "--batch-size", "50", procs=2, timeout=240)
    assert r.returncode != 0
    assert "fastmask: rank 0 of 2 failed (FileNotFoundError" in r.stderr
    assert "rank 1 of 2 failed" in r.stderr  # the waiting rank learns at once, not at the timeout
    assert time.perf_counter() - t0 < 200


@pytest.mark.slow
def test_torchrun_killed_worker_stops_the_job(tmp_path):
    cmd = TORCHRUN + ["-m", "fastmask", "train", "--out", str(tmp_path), "--train-subset", "20000",
                      "--epochs", "50", "--batch-size", "50"]
    p = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = p.stdout.readline()
        while line and "training mlp" not in line:
            line = p.stdout.readline()
        time.sleep(2)
        kids = [int(c) for c in Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()]
        rank1 = [k for k in kids if b"RANK=1" in Path(f"/proc/{k}/environ").read_bytes().split(b"\0")]
        assert len(rank1) == 1, kids
        os.kill(rank1[0], signal.SIGKILL)
        t0 = time.perf_counter()
        rest, _ = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode != 0 and time.perf_counter() - t0 < 60
    # rank 0 learns of the dead peer either from torchrun's stop or from gloo's broken
    # connection, whichever comes first: either way one line names it (seen both ways)
    assert "SIGKILL" in rest and ("rank 0 of 2 stopped" in rest or "rank 0 of 2 failed" in rest)
    assert not (tmp_path / "model.pt").exists()
