"""Every Markdown table and figure: `fastmask reproduce` (results.json, table.md, table.csv,
figures), the seeds statistics (table.md over seeds) and the honest evaluation (honest.md,
honest.json, honest_accuracy_vs_eps.png).

Every file is written atomically (temp file, fsync, rename). Figures use
matplotlib's Agg backend and are skipped, with a note in the summary, when
matplotlib is not installed.

    fig1_training_curves.png   training loss, train and validation accuracy per epoch
    fig2_adversarial.png       original vs FGSM images (baseline, paper eps) with predictions
    fig3_clean_vs_adversarial.png  clean, FGSM and PGD accuracy per row (paper eps)
    fig4_precision_recall_f1.png   validation macro precision / recall / F1 per epoch
    fig5_confusion.png         test confusion matrices (baseline and the first masked row)
    fig6_accuracy_vs_eps.png   FGSM and PGD accuracy vs eps, every row
    fig7_learned_masks.png     heat map of each learned soft mask M (learned rows only)
    fig8_mask_modes.png        one test digit under every mask mode (when a row of the masking menu runs)
"""
import csv
import io
import json
import math

import numpy as np
import torch

from pathlib import Path

from . import distributed
from .data import atomic_write_bytes

FIGURES = ("fig1_training_curves.png", "fig2_adversarial.png", "fig3_clean_vs_adversarial.png",
           "fig4_precision_recall_f1.png", "fig5_confusion.png", "fig6_accuracy_vs_eps.png")


def _pct(v):
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}%"


def table_rows(results):
    """One dict per row of Table I (fractions; None where not applicable)."""
    k = results["protocol"]["eps_list"].index(results["protocol"]["paper_eps"])
    out = []
    for name, r in results["rows"].items():
        tm = r.get("test_mask")
        paper = results["paper_table"].get(name, {})
        out.append({
            "row": name, "label": r["label"],
            "ratio": r["ratio"], "pattern": r["pattern"] or "–",
            "train_acc": r["train_acc"], "test_acc": r["clean"]["accuracy"],
            "fgsm_acc": r["fgsm"][k], "pgd_acc": r["pgd"][k],
            "train_time_increase": r["train_time_increase"],
            "mtest_test_acc": tm["clean"]["accuracy"] if tm else None,
            "mtest_fgsm_acc": tm["fgsm"][k] if tm else None,
            "mtest_pgd_acc": tm["pgd"][k] if tm else None,
            "paper_train_acc": paper.get("train_acc"), "paper_test_acc": paper.get("test_acc"),
            "paper_fgsm_acc": paper.get("fgsm_acc"), "paper_time_increase": paper.get("time_increase"),
        })
    return out


def table_markdown(results):
    p = results["protocol"]
    eps, n_pgd = p["paper_eps"], p["pgd"]["n"]
    lines = [f"# Table I (measured), {results['config']['model'].upper()} on {results['data']['dataset']}, "
             f"eps = {eps:g}", "",
             f"FGSM on the {results['data']['sizes']['test']} test images, PGD-{p['pgd']['steps']} "
             f"(alpha {p['pgd']['alpha']}, random start) on the first {n_pgd}. eps chosen on the validation set: "
             f"{p['paper_eps_rule']}. M_test: the paper's consistent test mask. Paper: Table I of the paper "
             "(its eps is not stated).", "",
             "| model | ratio | pattern | train acc | test acc | acc. FGSM | acc. PGD | train time + (CPU) "
             "| M_test: test | M_test: FGSM | M_test: PGD | paper train | paper test | paper FGSM | paper time + |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in table_rows(results):
        lines.append("| " + " | ".join([
            t["label"], "–" if t["ratio"] is None else f"{100 * t['ratio']:.0f}%", t["pattern"],
            _pct(t["train_acc"]), _pct(t["test_acc"]), _pct(t["fgsm_acc"]), _pct(t["pgd_acc"]),
            f"{100 * t['train_time_increase']:+.0f}%", _pct(t["mtest_test_acc"]), _pct(t["mtest_fgsm_acc"]),
            _pct(t["mtest_pgd_acc"]), _pct(t["paper_train_acc"]), _pct(t["paper_test_acc"]),
            _pct(t["paper_fgsm_acc"]), _pct(t["paper_time_increase"])]) + " |")
    lines += ["", "## Accuracy vs eps", "",
              "| model | attack | " + " | ".join(f"{e:g}" for e in p["eps_list"]) + " |",
              "|---|---|" + "---|" * len(p["eps_list"])]
    for r in results["rows"].values():
        for att in ("fgsm", "pgd"):
            lines.append(f"| {r['label']} | {att.upper()} | " + " | ".join(_pct(a) for a in r[att]) + " |")
            if r.get("test_mask"):
                lines.append(f"| {r['label']} | {att.upper()} + M_test | "
                             + " | ".join(_pct(a) for a in r["test_mask"][att]) + " |")
    lines += ["", "## Against the baseline (McNemar, same test images, paper eps)", "",
              "| model | clean | FGSM | PGD |", "|---|---|---|---|"]
    for r in results["rows"].values():
        if "vs_baseline" in r:
            v = r["vs_baseline"]
            lines.append(f"| {r['label']} | " + " | ".join(
                f"{100 * v[a]['delta']:+.1f} pts, p={v[a]['p_value']:.2g} ({v[a]['verdict']})"
                for a in ("clean", "fgsm", "pgd")) + " |")
    return "\n".join(lines) + "\n"


def table_csv(results):
    rows = table_rows(results)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    for t in rows:
        w.writerow({k: ("" if v is None else v) for k, v in t.items()})
    return buf.getvalue()


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_text(path, text):
    atomic_write_bytes(path, text.encode())


def write_all(results, out, example=None):
    """results.json, table.md, table.csv and the figures under `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results["figures"] = write_figures(results, out, example)
    write_text(out / "table.md", table_markdown(results))
    write_text(out / "table.csv", table_csv(results))
    write_text(out / "results.json", json.dumps(results, indent=1, default=_json_default, allow_nan=True) + "\n")


# ---------------------------------------------------------------- figures
def _save(fig, path):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def write_figures(results, out, example=None):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {"skipped": "matplotlib is not installed"}
    rows = results["rows"]
    p = results["protocol"]
    eps, k = p["eps_list"], p["eps_list"].index(p["paper_eps"])
    written = []

    def done(fig, name):
        _save(fig, out / name)
        plt.close(fig)
        written.append(name)

    # Fig. 1: training curves
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for r in rows.values():
        ep = [h["epoch"] for h in r["history"]]
        ax[0].plot(ep, [h["loss"] for h in r["history"]], marker="o", label=r["label"])
        ax[1].plot(ep, [h["train_acc"] for h in r["history"]], marker="o", label=r["label"])
        ax[2].plot(ep, [h["val_acc"] for h in r["history"]], marker="o", label=r["label"])
    for a, t in zip(ax, ("training loss", "train accuracy (masked batches)", "validation accuracy (no mask)")):
        a.set_title(t)
        a.set_xlabel("epoch")
    ax[2].legend(fontsize=7)
    done(fig, FIGURES[0])

    # Fig. 2: original vs adversarial
    if example is not None:
        n = len(example["y"])
        fig, ax = plt.subplots(2, n, figsize=(1.6 * n, 3.6))
        for i in range(n):
            for j, (key, pk) in enumerate((("x", "pred"), ("x_adv", "pred_adv"))):
                ax[j, i].imshow(example[key][i, 0], cmap="gray", vmin=0, vmax=1)
                ax[j, i].set_title(f"pred {int(example[pk][i])}", fontsize=8,
                                   color="black" if example[pk][i] == example["y"][i] else "red")
                ax[j, i].axis("off")
        fig.suptitle(f"baseline: original (top) vs FGSM eps={example['eps']:g} (bottom)")
        done(fig, FIGURES[1])

    # Fig. 3: clean vs adversarial accuracy per row
    names = list(rows)
    fig, ax = plt.subplots(figsize=(max(8, 1.4 * len(names)), 4))
    w = 0.27
    for j, (lab, vals) in enumerate((("clean", [rows[n]["clean"]["accuracy"] for n in names]),
                                     (f"FGSM eps={p['paper_eps']:g}", [rows[n]["fgsm"][k] for n in names]),
                                     (f"PGD eps={p['paper_eps']:g}", [rows[n]["pgd"][k] for n in names]))):
        ax.bar([i + (j - 1) * w for i in range(len(names))], vals, w, label=lab)
    ax.set_xticks(range(len(names)), [rows[n]["label"] for n in names], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.legend()
    done(fig, FIGURES[2])

    # Fig. 4: precision / recall / F1 over epochs
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for r in rows.values():
        ep = [h["epoch"] for h in r["history"]]
        for a, key in zip(ax, ("val_precision", "val_recall", "val_f1")):
            a.plot(ep, [h[key] for h in r["history"]], marker="o", label=r["label"])
    for a, t in zip(ax, ("precision", "recall", "F1")):
        a.set_title(f"validation macro {t}")
        a.set_xlabel("epoch")
    ax[2].legend(fontsize=7)
    done(fig, FIGURES[3])

    # Fig. 5: confusion matrices
    shown = ["baseline"] + [n for n in names if rows[n]["ratio"] is not None][:1]
    fig, ax = plt.subplots(1, len(shown), figsize=(5 * len(shown), 4.5), squeeze=False)
    for a, n in zip(ax[0], shown):
        cm = rows[n]["clean"]["confusion"]
        a.imshow(cm, cmap="Blues")
        for i, line in enumerate(cm):
            for j, v in enumerate(line):
                a.text(j, i, str(v), ha="center", va="center", fontsize=6)
        a.set_title(f"{rows[n]['label']} (test)")
        a.set_xlabel("predicted")
        a.set_ylabel("true")
    done(fig, FIGURES[4])

    # Fig. 6: accuracy vs eps
    fig, ax = plt.subplots(1, 2, figsize=(12, 4))
    for a, att in zip(ax, ("fgsm", "pgd")):
        for r in rows.values():
            line, = a.plot(eps, r[att], marker="o", label=r["label"])
            if r.get("test_mask"):
                a.plot(eps, r["test_mask"][att], ls="--", color=line.get_color())
        a.set_title(f"{att.upper()} accuracy vs eps (dashed: with M_test)")
        a.set_xlabel("eps (L-inf)")
        a.set_ylim(0, 1)
    ax[1].legend(fontsize=7)
    done(fig, FIGURES[5])

    learned = [n for n in names if rows[n].get("learned_mask") is not None]
    if learned:  # Fig. 7: the learned soft masks
        fig, ax = plt.subplots(1, len(learned), figsize=(3.4 * len(learned), 3.2), squeeze=False)
        for a, n in zip(ax[0], learned):
            im = a.imshow(np.asarray(rows[n]["learned_mask"])[0], cmap="viridis", vmin=0, vmax=1)
            a.set_title(rows[n]["label"], fontsize=8)
            a.axis("off")
        fig.colorbar(im, ax=ax[0].tolist(), shrink=0.8, label="M = sigmoid(logits)")
        done(fig, "fig7_learned_masks.png")
    if example is not None and any(rows[n].get("menu") for n in names):  # Fig. 8
        fig = mask_modes_figure(example["x"][:1], {n: rows[n]["learned_mask"] for n in learned}, plt)
        done(fig, "fig8_mask_modes.png")
    return written


def mask_modes_figure(x, learned=None, plt=None, ratio=0.3, seed=1):
    """One digit (x: 1 x 1 x H x W in [0, 1]) under every mask mode at `ratio`: the paper's masking
    illustrations. learned: {label: mask} (1 x H x W) of learned soft masks, shown as x * M."""
    from . import ops
    if plt is None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    x = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    pct = f"{ratio:.0%}"
    panels = [("original", x),
              (f"random pixels {pct}", ops.mask_apply(x, ratio, seed=seed, offset=0, mode="pixel")),
              (f"block {pct} (eq. 1)", ops.mask_apply(x, ratio, seed=seed, offset=0, mode="block")),
              (f"blur {pct} (eq. 2)", ops.mask_apply(x, ratio, seed=seed, offset=0, mode="blur")),
              (f"dropout {pct}, x/(1-p) (eq. 3)", ops.mask_apply(x, ratio, seed=seed, offset=0) / (1 - ratio))]
    for label, m in (learned or {}).items():
        panels.append((f"learned M ({label})", x * torch.as_tensor(np.asarray(m), dtype=torch.float32)))
    fig, ax = plt.subplots(1, len(panels), figsize=(1.9 * len(panels), 2.3))
    for a, (t, img) in zip(ax, panels):
        a.imshow(img[0, 0].numpy(), cmap="gray", vmin=0, vmax=1)
        a.set_title(t, fontsize=7)
        a.axis("off")
    return fig


# ---------------------------------------------------------------- summary
def summary(results):
    """One screen: Table I and where the files are."""
    p = results["protocol"]
    lines = [f"fastmask reproduce: {results['config']['model']} on {results['data']['dataset']} "
             f"({results['data']['sizes']}), preset {results['config']['preset']}, seed {results['seed']}",
             f"paper eps = {p['paper_eps']:g} (baseline FGSM on validation closest to 60%)", "",
             f"{'model':34s} {'train':>6s} {'test':>6s} {'FGSM':>6s} {'PGD':>6s} {'time+':>6s}"
             f" {'Mt:test':>7s} {'Mt:FGSM':>7s} | paper: test FGSM"]
    for t in table_rows(results):
        lines.append(f"{t['label'][:34]:34s} {_pct(t['train_acc']):>6s} {_pct(t['test_acc']):>6s} "
                     f"{_pct(t['fgsm_acc']):>6s} {_pct(t['pgd_acc']):>6s} "
                     f"{100 * t['train_time_increase']:+5.0f}% {_pct(t['mtest_test_acc']):>7s} "
                     f"{_pct(t['mtest_fgsm_acc']):>7s} | {_pct(t['paper_test_acc'])} {_pct(t['paper_fgsm_acc'])}")
    out = results["config"]["out"]
    figs = results.get("figures")
    lines += ["", f"wrote {out}/results.json, table.md, table.csv"
              + (f", {len(figs)} figures" if isinstance(figs, list) else f" (figures skipped: {figs})"),
              f"total wall time {results['wall_time_s']:.0f} s (process CPU time "
              f"{results.get('cpu_time_s', float('nan')):.0f} s); time+ = training CPU time vs the baseline"]
    return "\n".join(lines)


# ---------------------------------------------------------------- the honest evaluation
HONEST_FILES = ("honest.md", "honest.json", "honest_accuracy_vs_eps.png")


def json_ready(o):
    """JSON-ready copy: per-sample tensors dropped, other tensors as lists, non-finite floats None."""
    if isinstance(o, dict):
        return {k: json_ready(v) for k, v in o.items() if k not in ("correct", "clean_correct", "robust_correct")
                or not isinstance(v, (torch.Tensor, dict))}
    if isinstance(o, (list, tuple)):
        return [json_ready(v) for v in o]
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def _pct1(v):
    return "–" if v is None else f"{100 * v:.1f}"


def headline_eps(eps):
    """The eps the summary compares at: 0.3 if swept, else the largest eps below 1."""
    below = [e for e in eps if 0 < e < 1]
    return 0.3 if 0.3 in eps else (max(below) if below else max(eps))


def honest_markdown(report):
    s, eps = report["settings"], report["eps"]
    k = eps.index(headline_eps(eps))
    alpha = "2.5 eps / steps" if s["pgd_alpha"] is None else f"{s['pgd_alpha']:g}"
    lines = ["# Honest robustness evaluation", "",
             f"The first {s['n']} test images; L-inf attacks, inputs in [0, 1]. FGSM; PGD-{s['pgd_steps']} "
             f"(step {alpha}, random start); PGD with {s['restarts']} restarts (per sample, any restart that "
             f"breaks it counts); transfer (PGD crafted on a separately trained surrogate"
             f"{'' if report['surrogate'] else ': not run, no surrogate'}); for rows masked at test time also "
             f"EOT-PGD ({s['eot_samples']} mask draws per step) and PGD against one frozen mask draw. "
             "Robust accuracy: per sample, right on the clean input and under every attack (rows masked at "
             "test time score every attack with a fresh mask draw, so their worst case also holds the "
             "defence's own randomness). "
             "eps = 1 holds every image, so every row must fall to ~0 there (a sanity check)."
             + _autoattack_intro(s), "",
             "## Robust accuracy (%) vs eps", "",
             "| row | clean | " + " | ".join(f"eps {e:g}" for e in eps)
             + f" | vs baseline at eps {eps[k]:g} (McNemar) | sanity checks |",
             "|---|---|" + "---|" * len(eps) + "---|---|"]
    for row, r in report["rows"].items():
        rob = r["robustness"]
        vs = r.get("vs_baseline")
        test = "–" if vs is None else (f"{100 * vs[k]['delta']:+.1f} pts, p={vs[k]['p_value']:.2g}: "
                                       f"{vs[k]['verdict']}")
        flags = sorted({f["flag"] for f in r["flags"]})
        lines.append(f"| {row} | {_pct1(rob['clean_accuracy'])} | "
                     + " | ".join(_pct1(a) for a in rob["robust_accuracy"]) + f" | {test} | "
                     + ("**FLAG: " + ", ".join(flags) + "**" if flags else "ok") + " |")
    if report["baseline"] is not None:
        lines += ["", f"## Against `{report['baseline']}`: robust accuracy difference (points), McNemar p, "
                  "at every eps (**bold**: p < 0.05; a row is 'more robust' only there)", "",
                  "| row | " + " | ".join(f"eps {e:g}" for e in eps) + " |", "|---" * (len(eps) + 1) + "|"]
        for row, r in report["rows"].items():
            if "vs_baseline" in r:
                cells = []
                for c in r["vs_baseline"]:
                    t = f"{100 * c['delta']:+.1f} (p={c['p_value']:.2g})"
                    cells.append(f"**{t}**" if c["significant"] else t)
                lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines += autoattack_markdown(report)
    lines += ["", "## Every attack, per row", "", format_report(report)]
    about = report.get("about") or {}
    if about:
        lines += ["## Set-up", ""] + [f"- {k}: {v}" for k, v in about.items()]
    return "\n".join(lines) + "\n"


def _autoattack_intro(s):
    if s.get("attacks") != "autoattack":
        return ""
    return (f" AutoAttack (Croce & Hein 2020), each attack on the points still robust: standard (APGD-CE, "
            f"APGD-T and FAB-T with {s['aa_targets']} targets, {s['aa_steps']} steps; Square, {s['aa_queries']} "
            f"queries) on rows without test-time masks, rand (APGD-CE and APGD-DLR, EOT over "
            f"{s['eot_samples']} mask draws per step, every result scored over {s['aa_draws']} draws; a point "
            "counts as robust only when right in every draw) on rows masked at test time; the robust worst "
            "case includes it.")


def autoattack_markdown(report):
    """The AutoAttack section of honest.md: per row and eps, robust accuracy (%) after each component
    (rand: mean / worst draw), the points it removed and its seconds; the cascade's flags."""
    rows = {r: v["autoattack"] for r, v in report["rows"].items() if v.get("autoattack")}
    if not rows:
        return []
    lines = ["", "## AutoAttack, per row and eps", "",
             "Each cell: robust accuracy (%) after the attack (rand: mean / worst of the scoring draws), "
             "points it removed, seconds. robust: after the cascade (rand: also right in every draw, the "
             "figure the worst case counts).", ""]
    for row, aa in rows.items():
        per = aa["per_eps"]
        names = [a["name"] for a in per[0]["attacks"]] if per else []
        lines += [f"### {row}: AutoAttack-{aa['version']}", "",
                  "| eps | clean | " + " | ".join(names) + " | robust | flags |", "|---" * (len(names) + 4) + "|"]

        def acc(r):
            return _pct1(r["mean"]) + ("" if aa["version"] != "rand" else f" / {_pct1(r['worst'])}")
        for p in per:
            cells = [f"{acc(a['robust'])} (−{a['removed']}, {a['seconds']:.1f} s)" for a in p["attacks"]]
            lines.append(f"| {p['eps']:g} | {acc(p['clean'])} | " + " | ".join(cells)
                         + f" | {acc(p['robust'])}"
                         + ("" if aa["version"] != "rand" else f"; every draw {_pct1(p['robust']['all_draws'])}")
                         + " | " + ("; ".join(p["flags"]) or "ok") + " |")
        lines.append("")
    return lines


def write_honest(report, out):
    if not distributed.is_main():  # under torchrun rank 0 writes
        return
    out = Path(out)
    atomic_write_bytes(out / "honest.md", honest_markdown(report).encode())
    atomic_write_bytes(out / "honest.json", (json.dumps(json_ready(report), indent=1) + "\n").encode())
    _honest_figure(report, out / "honest_accuracy_vs_eps.png")


def _honest_figure(report, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    eps = report["eps"]
    fig, ax = plt.subplots(1, 2, figsize=(13, 4.5))
    for row, r in report["rows"].items():
        rob = r["robustness"]
        ax[0].plot(eps, rob["robust_accuracy"], marker="o", label=row)
        best = "pgd_restarts" if "pgd_restarts" in rob["accuracy"] else "pgd"
        ax[1].plot(eps, rob["accuracy"][best], marker="o", label=row)
    ax[0].set_title("robust accuracy (worst case over every attack)")
    ax[1].set_title("PGD with restarts")
    for a in ax:
        a.set_xlabel("eps (L-inf)")
        a.set_ylim(0, 1)
    ax[0].set_ylabel("accuracy")
    ax[1].legend(fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def format_report(report):
    """The honest report as Markdown: one accuracy-vs-eps table per row, then its flags."""
    eps, lines = report["eps"], []
    for row, r in report["rows"].items():
        rob = r["robustness"]
        lines += [f"### {row}", "", f"clean accuracy {r['clean']['accuracy']:.4f} (n={rob['n']}, "
                  f"masks at test time: {rob['masks']})", "",
                  "| attack | " + " | ".join(f"eps={e:g}" for e in eps) + " |",
                  "|---" * (len(eps) + 1) + "|"]
        for name, accs in list(rob["accuracy"].items()) + [("robust (worst case)", rob["robust_accuracy"])]:
            lines.append(f"| {name} | " + " | ".join(f"{a:.4f}" for a in accs) + " |")
        if "vs_baseline" in r:
            lines.append(f"| vs {report['baseline']} (McNemar) | " + " | ".join(
                f"{c['delta']:+.4f} p={c['p_value']:.2g} {c['verdict']}" for c in r["vs_baseline"]) + " |")
        lines += [""] + ([f"- FLAG {f['flag']}: {f['detail']}" for f in r["flags"]] or ["- no gradient-masking flags"])
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------- statistics over seeds
def _ms(e, scale=100):
    if e is None:
        return "–"
    hw = e["half_width"]
    ci = "" if math.isnan(hw) else f" [{scale * e['ci_low']:.1f}, {scale * e['ci_high']:.1f}]"
    sd = "" if math.isnan(e["std"]) else f" ± {scale * e['std']:.1f}"
    return f"{scale * e['mean']:.1f}{sd}{ci}"


def seeds_markdown(agg, cfg):
    """table.md of `reproduce --seeds N`: the aggregate of seeds.aggregate_seeds."""
    from .seeds import METRICS
    eps, n = agg["paper_eps"], agg["n_seeds"]
    lines = [f"# Table I over {n} seeds ({', '.join(map(str, agg['seeds']))}), {cfg['model'].upper()} on "
             f"{cfg['dataset']}, preset {cfg['preset']}, eps = {eps:g}", "",
             "Each cell: mean ± sample std [95 % t confidence interval] in %, over the seeds (each seed: its own "
             "train/validation split, initial weights and masks; the same test set). eps: the first seed's "
             "paper eps. Per-seed files: seed_<s>/.", "",
             "| model | " + " | ".join(m[1] for m in METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for r in agg["rows"].values():
        lines.append(f"| {r['label']} | " + " | ".join(_ms(r.get(m[0])) for m in METRICS) + " |")
    lines += ["", f"## Against the baseline ({agg['tests']})", "",
              "| model | metric | difference (pts) | paired t p | McNemar p (first seed) | verdict |",
              "|---|---|---|---|---|---|"]
    for name, r in agg["rows"].items():
        if name == "baseline":
            continue
        for key, label, _, _ in METRICS:
            e = r.get(key)
            if not e or ("vs_baseline_paired_t" not in e and "vs_baseline_mcnemar_first_seed" not in e):
                continue
            t = e.get("vs_baseline_paired_t")
            mc = e.get("vs_baseline_mcnemar_first_seed")
            verdict, delta = e["verdict"], t["delta"] if t else mc["delta"]
            pt = "–" if not t else f"{t['p_value']:.2g}"
            pm = "–" if not mc else f"{mc['p_value']:.2g}"
            lines.append(f"| {r['label']} | {label} | {100 * delta:+.1f} | {pt} | {pm} | {verdict} |")
    return "\n".join(lines) + "\n"
