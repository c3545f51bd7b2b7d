"""Robust accuracy under AutoAttack-standard against training CPU minutes (issue 15's curve).

Each checkpoint (a run's final DIR/model.pt, or the DIR/epochs/epoch_K.pt snapshots that
`fastmask train --save-epochs` writes) is attacked by fastmask's AutoAttack-standard cascade
on MNIST test images start..start+n-1 at L-inf eps; its x value is the CPU time of the
training loop that produced it (the checkpoint's extra["train_cpu_time"]). One result per
(checkpoint sha256, n, start, eps, seed) is kept in the --db JSON, written after each
checkpoint, so a killed run resumes where it stopped and adding a checkpoint costs only
that checkpoint. `--add-compare JSON` takes the fastmask side of a finished
`benchmarks.compare_autoattack --models CHECKPOINT` run (the same cascade) instead of
attacking again; only full-length runs (100 steps, 5000 queries) are taken. --figure
draws every run in the db (one line per run folder; `--label RUN=NAME` renames one) and
--table prints the Markdown table.

    .venv/bin/python scripts/aa_curve.py runs/trades3_b6_e13_s0/epochs/*.pt --n 200 \\
        --db docs/measured/aa_curve.json
    .venv/bin/python scripts/aa_curve.py --db docs/measured/aa_curve.json \\
        --figure docs/figures/aa_vs_cpu_minutes.png --table
"""
import argparse
import fcntl
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

from fastmask import autoattack as AA, data as D, models as M, stats
from fastmask.data import atomic_write_bytes


KEY = ("sha256", "n", "start", "eps", "seed")  # one result per checkpoint, images, eps and seed


def run_name(path):
    """The run folder a checkpoint belongs to (DIR for DIR/model.pt and DIR/epochs/epoch_K.pt)."""
    p = Path(path).resolve()
    return p.parent.parent.name if p.parent.name == "epochs" else p.parent.name


def checkpoint_facts(path):
    """(model in eval mode, {run, checkpoint, epoch, train_cpu_min, sha256}) of a fastmask train checkpoint."""
    model, blob = M.load(path, with_meta=True)
    extra = blob.get("extra") or {}
    if "train_cpu_time" not in extra:
        raise SystemExit(f"aa_curve: {path} records no train_cpu_time (not written by fastmask train)")
    return model.eval(), {"run": run_name(path), "checkpoint": str(path),
                          "epoch": extra.get("epoch", len(extra.get("history") or [])),
                          "train_cpu_min": extra["train_cpu_time"] / 60,
                          "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest()}


def measure(model, facts, x, y, eps, seed):
    """One db row: the AutoAttack-standard cascade on (x, y) for the checkpoint checkpoint_facts read."""
    c0 = time.process_time()
    _, rep = AA.autoattack(model, x, y, eps, version="standard", seed=seed)
    return {**facts, "clean": rep["clean"]["mean"], "robust": rep["robust"]["mean"],
            "stages": {e["name"]: e["robust"]["mean"] for e in rep["attacks"]},
            "flags": rep.get("flags", []), "attack_cpu_s": time.process_time() - c0}


def from_compare(path):
    """db rows from the JSON of a benchmarks.compare_autoattack run on fastmask checkpoints."""
    out = []
    for r in json.loads(Path(path).read_text()):
        if (r.get("steps", 100), r.get("queries", 5000)) != (100, 5000):
            raise SystemExit(f"aa_curve: {path} ran {r.get('steps')} steps / {r.get('queries')} queries, "
                             "not AutoAttack-standard's 100 / 5000")
        ck = Path(r["model"])
        if not ck.is_file():
            raise SystemExit(f"aa_curve: {path} names {r['model']!r}, not a checkpoint file here")
        stages = {s["attack"]: s["fastmask"] for s in r["stages"]}
        out.append({**checkpoint_facts(ck)[1], "clean": r["clean"], "robust": r["stages"][-1]["fastmask"],
                    "stages": stages, "flags": [f for f in [AA.square_flag(stages)] if f],
                    "attack_cpu_s": r.get("fastmask_cpu_s"), "n": r["n"], "start": r.get("start", 0),
                    "eps": r["eps"], "seed": r.get("seed", 0)})
    return out


def extend_db(db, new):
    """Add the rows of `new` whose KEY the db does not hold yet; returns the whole db. Locked and
    re-read, since two processes (one per core) may extend the same db."""
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = json.loads(db.read_text()) if db.exists() else []
        keys = [{k: r.get(k) for k in KEY} for r in rows]
        rows += [r for r in new if {k: r[k] for k in KEY} not in keys]
        atomic_write_bytes(db, (json.dumps(rows, indent=1) + "\n").encode())
    return rows


def table(rows, labels=None):
    labels = labels or {}
    lines = ["| run | epoch | training CPU min | n | clean | after APGD-CE / APGD-T / FAB-T / Square | "
             "robust (95 % Wilson) | Square below the white-box attacks |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["run"], r["train_cpu_min"])):
        lo, hi = stats.wilson(round(r["robust"] * r["n"]), r["n"])
        st = r["stages"]
        white = min(v for k, v in st.items() if k != "square")
        lines.append(f"| {labels.get(r['run'], r['run'])} | {r['epoch']} | {r['train_cpu_min']:.1f} | {r['n']} | "
                     f"{r['clean']:.1%} | {' / '.join(f'{v:.1%}' for v in st.values())} | "
                     f"{r['robust']:.1%} ({lo:.1%}–{hi:.1%}) | {100 * (white - st.get('square', white)):.1f} points |")
    return "\n".join(lines)


def figure(rows, path, labels):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.0, 5.0))
    for run in sorted({r["run"] for r in rows}):
        pts = sorted((r for r in rows if r["run"] == run), key=lambda r: r["train_cpu_min"])
        ci = [stats.wilson(round(r["robust"] * r["n"]), r["n"]) for r in pts]
        y = [100 * r["robust"] for r in pts]
        ax.errorbar([r["train_cpu_min"] for r in pts], y, yerr=[[v - 100 * lo for v, (lo, _) in zip(y, ci)],
                                                                [100 * hi - v for v, (_, hi) in zip(y, ci)]],
                    fmt="o-", ms=5, capsize=3, label=labels.get(run, run) + f" (n {pts[-1]['n']})")
    ax.axhline(89, color="grey", ls="--", lw=1)
    ax.axhline(88.5, color="grey", ls=":", lw=1)
    ax.axvline(30, color="grey", ls="--", lw=1)
    side = ax.get_yaxis_transform()  # x in axes fraction, y in data
    ax.text(0.01, 89.15, "issue 15's target 89 %", fontsize=8, color="grey", transform=side)
    ax.text(0.01, 88.0, "Madry et al. 88.5 %", fontsize=8, color="grey", transform=side)
    ax.set_xlabel("training loop CPU minutes (2-core machine)")
    ax.set_ylabel("AutoAttack-standard robust accuracy (%)")
    ax.set_ylim(top=max(90.5, ax.get_ylim()[1]))
    ax.text(29.6, ax.get_ylim()[0] + 0.5, "30 CPU min", fontsize=8, color="grey", ha="right")
    ax.set_title("Paper's CNN, MNIST, L-inf eps 0.3, first n test images (95 % intervals)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoints", nargs="*")
    ap.add_argument("--db", required=True, help="JSON file of results (read, extended, rewritten)")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--eps", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--add-compare", action="append", default=[], metavar="JSON",
                    help="rows from a benchmarks.compare_autoattack JSON (its fastmask side)")
    ap.add_argument("--figure")
    ap.add_argument("--label", action="append", default=[], metavar="RUN=NAME")
    ap.add_argument("--table", action="store_true")
    a = ap.parse_args(argv)
    if a.n < 1 or a.start < 0 or a.eps < 0:
        ap.error(f"--n must be >= 1, --start >= 0 and --eps >= 0, got {a.n}, {a.start}, {a.eps}")
    torch.set_num_threads(a.threads)
    db = Path(a.db)
    rows = json.loads(db.read_text()) if db.exists() else []
    if a.checkpoints:
        d = D.load("mnist")
        x, y = D.to_float(d.x_test[a.start:a.start + a.n]), d.y_test[a.start:a.start + a.n]
    for path in a.checkpoints:
        model, facts = checkpoint_facts(path)
        key = dict(zip(KEY, (facts["sha256"], a.n, a.start, a.eps, a.seed)))
        if any(all(r.get(k) == v for k, v in key.items()) for r in rows):
            continue
        r = {**measure(model, facts, x, y, a.eps, a.seed), **key}
        print(json.dumps(r), flush=True)
        rows = extend_db(db, [r])
    for path in a.add_compare:
        rows = extend_db(db, from_compare(path))
    labels = dict(s.split("=", 1) for s in a.label)
    if a.table:
        print(table(rows, labels))
    if a.figure:
        figure(rows, a.figure, labels)
    return rows


if __name__ == "__main__":
    sys.exit(main() and 0)
