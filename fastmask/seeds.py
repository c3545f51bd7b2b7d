"""Table I over seeds: the reproduce protocol for several seeds, then mean, std, CIs and tests.

- reproduce_seeds(cfg, seeds): pipeline.run_reproduce for seeds cfg.seed ..
  cfg.seed + seeds - 1 in out/seed_<s>/, then table.md and results.json in out.
- aggregate_seeds(results): mean +- std and 95 % CIs of every Table I number,
  paired t-tests across seeds and McNemar (first seed) against the baseline;
  a difference is called only when every test run finds it (_joint_verdict).
Its Markdown is report.seeds_markdown.
"""
import dataclasses
import json
from pathlib import Path

from . import _checks as C
from . import data as D
from . import distributed, report, stats

__all__ = ["METRICS", "aggregate_seeds", "reproduce_seeds"]


METRICS = (  # name, label, value(row result, eps index), robustness metric?
    ("train_acc", "train acc", lambda r, k: r["train_acc"], False),
    ("test_acc", "test acc", lambda r, k: r["clean"]["accuracy"], False),
    ("fgsm_acc", "acc. FGSM", lambda r, k: r["fgsm"][k], True),
    ("pgd_acc", "acc. PGD", lambda r, k: r["pgd"][k], True),
    ("mtest_fgsm_acc", "M_test: FGSM", lambda r, k: r["test_mask"]["fgsm"][k] if r.get("test_mask") else None, True),
    ("train_time_increase", "train time + (CPU)", lambda r, k: r["train_time_increase"], False),
)


def aggregate_seeds(results):
    """Table I over seeds: {eps, seeds, rows: {row: {metric: summary + test vs baseline}}}.

    The eps is the first seed's paper eps (each seed's FGSM/PGD sweeps cover it).
    Tests: paired t across seeds (n >= 2) and McNemar on the first seed's images.
    """
    first = results[0]
    eps = first["protocol"]["paper_eps"]
    seeds = [r["seed"] for r in results]
    rows = {}
    for name in first["rows"]:
        if not all(name in r["rows"] for r in results):
            continue
        rows[name] = {"label": first["rows"][name]["label"]}
        for key, label, get, robust in METRICS:
            vals = [get(r["rows"][name], r["protocol"]["eps_list"].index(eps)) for r in results]
            if any(v is None for v in vals):
                continue
            entry = {"values": vals, **stats.summary(vals)}
            base = [get(r["rows"]["baseline"], r["protocol"]["eps_list"].index(eps)) for r in results]
            if name != "baseline" and len(vals) >= 2 and None not in base:
                c = stats.compare(vals, base, test="paired_t")
                entry["vs_baseline_paired_t"] = {"delta": c["delta"], "p_value": c["p_value"],
                                                 "significant": c["significant"],
                                                 "verdict": _verdict(c, robust)}
            mc = first["rows"][name].get("vs_baseline", {}).get({"test_acc": "clean", "fgsm_acc": "fgsm",
                                                                 "pgd_acc": "pgd"}.get(key, ""), None)
            if mc is not None:
                entry["vs_baseline_mcnemar_first_seed"] = mc
            entry["verdict"] = _joint_verdict(entry.get("vs_baseline_paired_t"), mc, robust)
            rows[name][key] = entry
    return {"paper_eps": eps, "seeds": seeds, "n_seeds": len(seeds), "rows": rows,
            "tests": "paired t-test across seeds (two-sided, alpha 0.05) and McNemar's exact test on the first "
                     "seed's per-sample correctness (same test images); a difference is called (e.g. 'more "
                     "robust') only when every test run has p < 0.05 in the same direction"}


def _joint_verdict(t, mc, robust):
    """A difference is called only when every test run finds it significant, in the same direction."""
    tests = [c for c in (t, mc) if c is not None]
    if not tests or any(c["verdict"] == "no significant difference" for c in tests):
        return "no significant difference"
    if len({c["delta"] > 0 for c in tests}) > 1:
        return "no significant difference (the tests disagree)"
    up = tests[0]["delta"] > 0
    return ("more robust" if up else "less robust") if robust else ("higher" if up else "lower")


def _verdict(c, robust):
    if robust or not c["significant"]:
        return c["verdict"]
    return "higher" if c["delta"] > 0 else "lower"


def reproduce_seeds(cfg, seeds=3, log=print):
    """run_reproduce for `seeds` consecutive seeds (out/seed_<s>/), then the aggregate table.md and
    results.json in cfg.out. Returns (aggregate results, [per-seed results])."""
    from .pipeline import ReproduceConfig, config_dict, run_reproduce
    if isinstance(cfg, dict):
        cfg = ReproduceConfig(**cfg)
    C.field(C.positive_int, "seeds", seeds)
    if cfg.quiet:
        log = lambda *a, **k: None  # noqa: E731
    per_seed = []
    for s in range(cfg.seed, cfg.seed + seeds):
        log(f"== seed {s} ==")
        per_seed.append(run_reproduce(dataclasses.replace(cfg, seed=s, out=str(Path(cfg.out) / f"seed_{s}")),
                                      log=log))
    agg = aggregate_seeds(per_seed)
    c = config_dict(cfg)
    out = {"config": c, "seeds": agg["seeds"], "aggregate": agg,
           "per_seed": {r["seed"]: {"out": str(Path(cfg.out) / f"seed_{r['seed']}"),
                                    "paper_eps": r["protocol"]["paper_eps"]} for r in per_seed}}
    if distributed.is_main():  # under torchrun rank 0 writes
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        D.atomic_write_bytes(Path(cfg.out) / "table.md", report.seeds_markdown(agg, c).encode())
        D.atomic_write_bytes(Path(cfg.out) / "results.json", (json.dumps(report.json_ready(out), indent=1) + "\n").encode())
    log(f"wrote {cfg.out}/table.md and results.json ({seeds} seeds)")
    return out, per_seed
