"""The benchmark harness on tiny sizes: JSON schema, interleaving, and that the
correctness checks the benchmarks run before timing do catch wrong results.
No timing assertions: speed targets are ratios reported by `python -m benchmarks`."""
import json
import os
import sys
import types

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import bench_attacks, bench_ops, harness  # noqa: E402


def test_compare_interleaves_and_reports_stats():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    t = harness.compare(fns, repeats=4, warmup=1, target_s=1e-9)
    assert set(t) == {"a", "b"}
    for s in t.values():
        assert s["min_s"] <= s["median_s"] <= s["max_s"] and s["repeats"] == 4 and s["inner"] >= 1
    timed = calls[4:]  # after 1 warm-up + 1 calibration call each
    assert timed == ["a", "b", "b", "a", "a", "b", "b", "a"]  # rotated order, never all-A-then-all-B


def test_compare_rejects_bad_arguments():
    with pytest.raises(ValueError, match="repeats=0"):
        harness.compare({"a": lambda: None}, repeats=0)


def test_check_directions():
    assert harness.check("x", 3.5, 3.0)["met"] is True
    assert harness.check("x", 2.5, 3.0)["met"] is False
    assert harness.check("x", 0.01, 0.02, higher_is_better=False)["met"] is True
    assert harness.check("x", None, 1.0)["met"] is None


def test_parse_args_rejects_unknown_bench():
    with pytest.raises(SystemExit, match="nope"):
        harness.parse_args(["--only", "ops,nope"])


def test_tiny_run_json_schema(tmp_path):
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    try:
        d = harness.run(["--tiny", "--threads", "1", "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    on_disk = json.loads(out.read_text())
    assert on_disk["schema"] == harness.SCHEMA == d["schema"]
    for key in ("command", "date", "machine", "versions", "results", "checks_summary", "notes", "elapsed_s"):
        assert key in on_disk, key
    assert on_disk["machine"]["threads"] == 1 and on_disk["machine"]["cores"] >= 1
    assert on_disk["versions"]["torch"] == torch.__version__
    assert isinstance(on_disk["versions"]["fastmask_extension"], bool)
    assert sorted(on_disk["elapsed_s"]) == sorted(harness.BENCHES)
    benches = {r["bench"] for r in on_disk["results"]}
    assert benches == set(harness.BENCHES)
    for r in on_disk["results"]:
        assert r["case"] and isinstance(r["checks"], list)
        for t in r["timings"].values():
            assert 0 < t["min_s"] <= t["median_s"] <= t["max_s"]
        for c in r["checks"]:
            assert set(c) == {"what", "value", "target", "met"} and c["met"] in (True, False, None)
    ops_results = [r for r in on_disk["results"] if r["bench"] == "ops"]
    assert {r["params"]["op"] for r in ops_results} == {"mask_apply", "fgsm", "pgd_step_", "random_start",
                                                        "grad_clip_noise_"}
    assert all(r["params"]["verified"] for r in ops_results)  # correctness ran before timing
    for r in ops_results:
        assert {"fastmask", "eager", "copy_floor"} <= set(r["timings"])
    attack = [r for r in on_disk["results"] if r["bench"] == "attacks"]
    assert {r["params"]["attack"].split("-")[0] for r in attack} == {"fgsm", "pgd"}
    for r in attack:
        assert "eager" in r["params"]["verified_against_fastmask"]
    train = [r for r in on_disk["results"] if r["bench"] == "train"]
    assert train and all("no mask" in r["timings"] for r in train)
    memory = [r for r in on_disk["results"] if r["bench"] == "memory"]
    assert memory and all(m["peak_MiB"] > 0 for r in memory for m in r["metrics"].values())
    s = on_disk["checks_summary"]
    n_checks = sum(len(r["checks"]) for r in on_disk["results"])
    assert s["met"] + s["missed"] + s["not_measured"] == n_checks > 0


def test_ops_verify_catches_a_wrong_op():
    from fastmask import ops
    x = torch.rand(4, 1, 8, 8)
    g = torch.randn(4, 1, 8, 8)
    x_nat = torch.rand(4, 1, 8, 8)
    assert len(bench_ops.verify(ops, x, g, x_nat)) == 5
    broken = types.SimpleNamespace(**{k: getattr(ops, k) for k in
                                      ("fgsm", "pgd_step_", "mask_apply", "random_start")})
    broken.fgsm = lambda x, g, eps, lo, hi, **kw: ops.fgsm(x, g, eps * 0.5, lo, hi, **kw)
    with pytest.raises(AssertionError, match="fgsm"):
        bench_ops.verify(broken, x, g, x_nat)
    broken = types.SimpleNamespace(**{k: getattr(ops, k) for k in
                                      ("fgsm", "pgd_step_", "mask_apply", "random_start")})
    broken.pgd_step_ = lambda xa, xn, g, a, e, lo, hi, norm: ops.pgd_step_(xa, xn, -g, a, e, lo, hi, norm)
    with pytest.raises(AssertionError, match="pgd_step_"):
        bench_ops.verify(broken, x, g, x_nat)
    broken = types.SimpleNamespace(**{k: getattr(ops, k) for k in
                                      ("fgsm", "pgd_step_", "mask_apply", "random_start")})
    broken.random_start = lambda x, eps, out=None, **kw: (
        ops.random_start(x, eps, **kw) if out is None else out.copy_(x))  # out= ignores the op
    with pytest.raises(AssertionError, match="random_start out="):
        bench_ops.verify(broken, x, g, x_nat)


def test_attack_verify_catches_a_wrong_attack():
    x = torch.rand(8, 1, 28, 28)
    ref = (x + 0.3 * torch.randn_like(x).sign()).clamp(0, 1)
    assert bench_attacks.verify("same", ref.clone(), ref, x, "fgsm")["frac_differ"] == 0
    wrong = (x + 0.3 * torch.randn_like(x).sign()).clamp(0, 1)
    with pytest.raises(AssertionError, match="differs from fastmask"):
        bench_attacks.verify("wrong", wrong, ref, x, "fgsm")
    outside = (x + 0.5).clamp(0, 1)
    with pytest.raises(AssertionError, match="eps-ball"):
        bench_attacks.verify("outside", outside, ref, x, "pgd")
    one_sample = ref.clone()
    one_sample[0] = wrong[0]  # 1 of 8 samples diverged: too many for a library, any is too many for eager
    with pytest.raises(AssertionError, match="differs from fastmask"):
        bench_attacks.verify("torchattacks", one_sample, ref, x, "pgd")
    with pytest.raises(AssertionError, match="differs from fastmask"):
        bench_attacks.verify("eager", one_sample, ref, x, "pgd")


@pytest.mark.parametrize("norm, eps, layout", [("inf", "0.3", "as-given"), ("2", "2.0", "channels-last")])
def test_compare_autoattack_tiny_run(tmp_path, mnist, norm, eps, layout):
    pytest.importorskip("torchattacks")
    from benchmarks import compare_autoattack as C
    out = tmp_path / "aa.md"
    rows = C.main(["--n", "8", "--steps", "2", "--queries", "3", "--models", "cnn_pgd3", "--eps", eps,
                   "--norm", norm, "--torchattacks-layout", layout, "--out", str(out)])
    (row,) = rows
    assert row["norm"] == norm and ("L2," if norm == "2" else "L-inf,") in out.read_text()
    assert row["torchattacks_layout"] == layout and f"torchattacks on the model {layout}" in out.read_text()
    assert [s["attack"] for s in row["stages"]] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert all(0 <= s["fastmask"] <= 1 and s["wilson95"][0] <= s["fastmask"] <= s["wilson95"][1]
               for s in row["stages"])
    assert row["speedup_cpu"] > 0 and f"| cnn_pgd3 | {float(eps)} |" in out.read_text()
    # both sides' model work counted: APGD-CE's first stage makes sample-gradients on both
    first = row["stages"][0]
    assert first["fastmask_cost"]["grads"] > 0 and first["torchattacks_cost"]["grads"] > 0
    assert row["model_work_ratio"] > 0


def test_compare_autoattack_cells_of_a_side_not_run():
    """A --fastmask-only run's table says '–' where torchattacks did not run (not 'nan'), and a
    model-work estimate above the measured seconds leaves no negative 'rest'."""
    from benchmarks import compare_autoattack as C
    assert C._num(float("nan"), ".1f") == "–" and C._num(float("nan"), ".2f", "x") == "–"
    assert C._num(1.234, ".2f", "x") == "1.23x" and C._num(-6.7, ".1f") == "-6.7"
    assert C._num(-6.7, ".1f", nonneg=True) == "–" and C._num(0.0, ".1f", nonneg=True) == "0.0"


def test_mask_step_phases_pairs_and_split():
    """benchmarks.mask_step_phases: pairs alternate their order, the composed variant draws the
    same masks as the one-call one, and each pair lands in the phase of its base block."""
    from benchmarks import mask_step_phases as P
    calls = []
    ps = P.pairs(lambda: calls.append("a"), lambda: calls.append("b"), n=3, block=2)
    assert calls[40:] == ["a", "a", "b", "b", "b", "b", "a", "a", "a", "a", "b", "b"]
    assert len(ps) == 3 and all(a >= 0 and b >= 0 for a, b in ps)
    x = torch.rand(4, 1, 8, 8)
    one = P.B.named_mask("fused random 30%")
    comp = P.composed(P.B.named_mask("fused random 30%"))
    for _ in range(2):
        assert torch.equal(one(x), comp(x))
    assert int(comp.step) == 2 and type(comp) is P.ComposedMask
    fast = [(1e-3, 1.01e-3)] * 10  # base 1 ms: fast, +1 %
    slow = [(3e-3, 3.15e-3)] * 12  # base 3 ms: slow, +5 %
    s = P.summary(fast + slow)
    assert "fast 10 pairs: +1.00 %" in s and "slow 12 pairs: +5.00 %" in s and "all 22 pairs" in s
    assert P.summary(slow).startswith("fast 0 pairs")
