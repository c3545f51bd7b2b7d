"""The honest robustness evaluation and the statistics over seeds.

- evaluate_models(models, x, y, out, ...): per model, accuracy vs eps under FGSM,
  PGD, PGD with restarts, transfer and (masked at test time) EOT-PGD and
  frozen-mask PGD; "robust" is the per-sample worst case over all of them; the
  gradient-masking checks flag a row; McNemar of each row's robust correctness
  against the baseline. Writes honest.md, honest.json and honest_accuracy_vs_eps.png
  (atomically); every row is cached in out/honest_cache/ and reused on a rerun
  when the model, data and settings match (resumable).
- reproduce_seeds(cfg, seeds): the reproduce protocol (pipeline.run_reproduce) for
  seeds cfg.seed .. cfg.seed + seeds - 1 in out/seed_<s>/, then table.md and
  results.json in out: mean +- std and 95 % CIs of every Table I number, paired
  t-tests across seeds and McNemar (first seed) against the baseline.
- run_honest(cfg, seeds): both; the models of the first seed are evaluated, the
  transfer surrogate is the baseline of the next seed (trained separately).

A masked model gives up to three rows: "<row>" (no mask at test time), "<row>
[test mask]" (a fresh random mask at every forward: a randomized defence, so
EOT-PGD and frozen-mask PGD are added) and "<row> [M_test]" (the paper's
consistent test mask; deterministic, the attacks see it).
"""
import dataclasses
import hashlib
import io
import json
import math
from pathlib import Path

import torch

from . import attacks as A
from . import data as D
from . import distributed
from . import evaluate as E
from . import models as M
from . import stats

__all__ = ["HONEST_PRESETS", "HonestSettings", "evaluate_models", "load_models", "aggregate_seeds",
           "reproduce_seeds", "run_honest", "FILES"]

FILES = ("honest.md", "honest.json", "honest_accuracy_vs_eps.png")
HONEST_PRESETS = {  # n: the first n test images; pgd_alpha None: 2.5 eps / steps
    "smoke": dict(n=40, eps_list=(0.0, 0.1, 0.3, 1.0), pgd_steps=5, restarts=2, eot_samples=2),
    "default": dict(n=500, eps_list=E.HONEST_EPS, pgd_steps=40, restarts=5, eot_samples=10),
    "full": dict(n=1000, eps_list=E.HONEST_EPS, pgd_steps=50, restarts=10, eot_samples=20),
}


@dataclasses.dataclass
class HonestSettings:
    n: int = 500
    eps_list: tuple = E.HONEST_EPS
    pgd_steps: int = 40
    pgd_alpha: float = None
    restarts: int = 5
    eot_samples: int = 10
    batch_size: int = 500
    seed: int = 0
    mtest: bool = True      # also the "[M_test]" row of masked models

    @classmethod
    def preset(cls, name, **over):
        if name not in HONEST_PRESETS:
            raise ValueError(f"preset={name!r} is not one of {tuple(HONEST_PRESETS)}")
        return cls(**dict(HONEST_PRESETS[name], **{k: v for k, v in over.items() if v is not None}))

    def __post_init__(self):
        for k in ("n", "pgd_steps", "restarts", "eot_samples", "batch_size"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{k}={v!r} must be an integer >= 1")
        self.eps_list = tuple(float(e) for e in self.eps_list)
        if not self.eps_list or any(not 0 <= e <= 1 for e in self.eps_list):
            raise ValueError(f"eps_list={list(self.eps_list)!r} must be non-empty values in [0, 1]")
        if self.pgd_alpha is not None and not self.pgd_alpha > 0:
            raise ValueError(f"pgd_alpha={self.pgd_alpha!r} must be > 0 (or None for 2.5 eps / steps)")


# ---------------------------------------------------------------- helpers
def _hash_tensors(*tensors):
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_hash(model):
    sd = model.state_dict()
    return hashlib.sha256((repr(type(model)) + repr(getattr(model, "mask_cfg", None)) + "".join(
        k + _hash_tensors(v) for k, v in sorted(sd.items()))).encode()).hexdigest()


def _slug(row):
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in row)


def _atomic_torch(path, obj):
    if not distributed.is_main():  # under torchrun rank 0 writes
        return
    buf = io.BytesIO()
    torch.save(obj, buf)
    D.atomic_write_bytes(path, buf.getvalue())


def _plain(o):
    """JSON-ready copy: per-sample tensors dropped, other tensors as lists."""
    if isinstance(o, dict):
        return {k: _plain(v) for k, v in o.items() if k not in ("correct", "clean_correct", "robust_correct")
                or not isinstance(v, (torch.Tensor, dict))}
    if isinstance(o, (list, tuple)):
        return [_plain(v) for v in o]
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def variants(name, model, mtest=True):
    """(row, model, test_mask) for every way `model` is deployed."""
    out = [(name, model, False)]
    if A.feature_masks(model):
        out.append((f"{name} [test mask]", model, True))
        if mtest and getattr(model, "mask_cfg", None):
            out.append((f"{name} [M_test]", M.with_eval_mask(model, "consistent").eval(), False))
    return out


def load_models(specs):
    """{name: model} from {name: checkpoint path}."""
    return {name: M.load(path) for name, path in specs.items()}


# ---------------------------------------------------------------- the evaluation
def evaluate_models(models, x, y, out, *, settings=None, surrogate=None, baseline="baseline", about=None,
                    log=print):
    """The honest evaluation of {name: model} on (x, y); files under `out`. Returns the report dict.

    surrogate: a model (the transfer attack's examples are PGD on it, crafted once)
    or None (no transfer attack). baseline: the row every other row is tested
    against (McNemar on robust correctness per eps; None: no tests). about: extra
    JSON-ready facts recorded in honest.json (data source, surrogate path...).
    """
    s = settings or HonestSettings()
    if isinstance(s, dict):
        s = HonestSettings(**s)
    if baseline is not None and baseline not in models:
        raise ValueError(f"baseline={baseline!r} is not one of the models {list(models)}")
    out = Path(out)
    (out / "honest_cache").mkdir(parents=True, exist_ok=True)
    x, y = x[:s.n], y[:s.n]
    cfg = dataclasses.asdict(s)
    data_key = _hash_tensors(x, y)
    transfer_x, sur_key = None, None
    if surrogate is not None:
        sur_key = model_hash(surrogate)
        path = out / "honest_cache" / "transfer.pt"
        key = {"surrogate": sur_key, "data": data_key, "settings": cfg}
        blob = _load_cache(path, key)
        if blob is None:
            log(f"[transfer] crafting PGD-{s.pgd_steps} examples on the surrogate")
            transfer_x = {e: (x if e == 0 else A.make_attack("pgd", e, steps=s.pgd_steps, alpha=s.pgd_alpha,
                                                             seed=s.seed, batch_size=s.batch_size)(surrogate, x, y))
                          for e in s.eps_list}
            _atomic_torch(path, {"key": key, "value": {str(e): v for e, v in transfer_x.items()}})
        else:
            transfer_x = {float(e): v for e, v in blob["value"].items()}
    rows = {}
    for name, model in models.items():
        for row, m, tm in variants(name, model, s.mtest):
            path = out / "honest_cache" / f"{_slug(row)}.pt"
            key = {"model": model_hash(m), "test_mask": tm, "data": data_key, "surrogate": sur_key, "settings": cfg}
            blob = _load_cache(path, key)
            if blob is not None:
                log(f"[{row}] resumed from {path}")
                rows[row] = blob["value"]
                continue
            log(f"[{row}] attacking {len(y)} images (masks at test time: {'random' if tm else 'model'})")
            rep = E.honest_report({row: m}, x, y, eps_list=s.eps_list, surrogate=transfer_x,
                                  pgd_steps=s.pgd_steps, pgd_alpha=s.pgd_alpha, restarts=s.restarts,
                                  eot_samples=s.eot_samples, test_mask=tm, batch_size=s.batch_size, seed=s.seed)
            rows[row] = rep["rows"][row]
            rows[row]["clean"].pop("correct", None)
            _atomic_torch(path, {"key": key, "value": rows[row]})
    report = {"eps": list(s.eps_list), "baseline": baseline, "settings": cfg, "about": about or {},
              "surrogate": sur_key is not None, "rows": rows}
    if baseline is not None:
        base = rows[baseline]["robustness"]["robust_correct"]
        for row, r in rows.items():
            if row != baseline:
                r["vs_baseline"] = [stats.compare(c, b) for c, b in zip(r["robustness"]["robust_correct"], base)]
    write_report(report, out)
    return report


def _load_cache(path, key):
    if distributed.enabled():  # rank 0 reads; every rank gets its answer (no shared folder needed)
        return distributed.broadcast(_read_cache(path, key) if distributed.is_main() else None)
    return _read_cache(path, key)


def _read_cache(path, key):
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    return blob if isinstance(blob, dict) and blob.get("key") == key else None


def _pct(v):
    return "–" if v is None else f"{100 * v:.1f}"


def headline_eps(eps):
    """The eps the summary compares at: 0.3 if swept, else the largest eps below 1."""
    below = [e for e in eps if 0 < e < 1]
    return 0.3 if 0.3 in eps else (max(below) if below else max(eps))


def report_markdown(report):
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
             "eps = 1 holds every image, so every row must fall to ~0 there (a sanity check).", "",
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
        lines.append(f"| {row} | {_pct(rob['clean_accuracy'])} | "
                     + " | ".join(_pct(a) for a in rob["robust_accuracy"]) + f" | {test} | "
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
    lines += ["", "## Every attack, per row", "", E.format_report(report)]
    about = report.get("about") or {}
    if about:
        lines += ["## Set-up", ""] + [f"- {k}: {v}" for k, v in about.items()]
    return "\n".join(lines) + "\n"


def write_report(report, out):
    if not distributed.is_main():  # under torchrun rank 0 writes
        return
    out = Path(out)
    D.atomic_write_bytes(out / "honest.md", report_markdown(report).encode())
    D.atomic_write_bytes(out / "honest.json", (json.dumps(_plain(report), indent=1) + "\n").encode())
    _figure(report, out / "honest_accuracy_vs_eps.png")


def _figure(report, path):
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
    D.atomic_write_bytes(path, buf.getvalue())


# ---------------------------------------------------------------- statistics over seeds
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


def _ms(e, scale=100):
    if e is None:
        return "–"
    hw = e["half_width"]
    ci = "" if math.isnan(hw) else f" [{scale * e['ci_low']:.1f}, {scale * e['ci_high']:.1f}]"
    sd = "" if math.isnan(e["std"]) else f" ± {scale * e['std']:.1f}"
    return f"{scale * e['mean']:.1f}{sd}{ci}"


def seeds_markdown(agg, cfg):
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


def reproduce_seeds(cfg, seeds=3, log=print):
    """run_reproduce for `seeds` consecutive seeds (out/seed_<s>/), then the aggregate table.md and
    results.json in cfg.out. Returns (aggregate results, [per-seed results])."""
    from .pipeline import ReproduceConfig, run_reproduce
    if isinstance(cfg, dict):
        cfg = ReproduceConfig(**cfg)
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds={seeds!r} must be an integer >= 1")
    if cfg.quiet:
        log = lambda *a, **k: None  # noqa: E731
    per_seed = []
    for s in range(cfg.seed, cfg.seed + seeds):
        log(f"== seed {s} ==")
        per_seed.append(run_reproduce(dataclasses.replace(cfg, seed=s, out=str(Path(cfg.out) / f"seed_{s}")),
                                      log=log))
    agg = aggregate_seeds(per_seed)
    c = dataclasses.asdict(cfg)
    out = {"config": c, "seeds": agg["seeds"], "aggregate": agg,
           "per_seed": {r["seed"]: {"out": str(Path(cfg.out) / f"seed_{r['seed']}"),
                                    "paper_eps": r["protocol"]["paper_eps"]} for r in per_seed}}
    if distributed.is_main():  # under torchrun rank 0 writes
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        D.atomic_write_bytes(Path(cfg.out) / "table.md", seeds_markdown(agg, c).encode())
        D.atomic_write_bytes(Path(cfg.out) / "results.json", (json.dumps(_plain(out), indent=1) + "\n").encode())
    log(f"wrote {cfg.out}/table.md and results.json ({seeds} seeds)")
    return out, per_seed


def run_honest(cfg, seeds=3, settings=None, log=print):
    """reproduce_seeds, then the honest evaluation of the first seed's models (surrogate: the next
    seed's baseline, trained here if seeds == 1). Returns (seeds aggregate, honest report)."""
    from .pipeline import PRESETS, ReproduceConfig, run_reproduce
    if isinstance(cfg, dict):
        cfg = ReproduceConfig(**cfg)
    if cfg.quiet:
        log = lambda *a, **k: None  # noqa: E731
    agg, per_seed = reproduce_seeds(cfg, seeds, log=log)
    settings = settings or HonestSettings.preset(cfg.preset, seed=cfg.seed)
    first = Path(cfg.out) / f"seed_{cfg.seed}"
    models = load_models({r: first / "checkpoints" / f"{r}.pt" for r in cfg.rows})
    sur_dir = Path(cfg.out) / f"seed_{cfg.seed + 1}"
    if seeds == 1:  # the surrogate: a baseline of the next seed, trained for this purpose only
        sur_dir = Path(cfg.out) / f"surrogate_seed_{cfg.seed + 1}"
        log(f"== surrogate: baseline, seed {cfg.seed + 1} ==")
        run_reproduce(dataclasses.replace(cfg, seed=cfg.seed + 1, out=str(sur_dir), rows=("baseline",)), log=log)
    surrogate = M.load(sur_dir / "checkpoints" / "baseline.pt")
    data = D.load(cfg.dataset, cfg.data_dir, n_val=cfg.n_val, split_seed=cfg.seed, download=cfg.download)
    if PRESETS[cfg.preset]["subset"]:
        data = data.take(**PRESETS[cfg.preset]["subset"])
    x, y = D.to_float(data.x_test), data.y_test
    about = {"data": f"{cfg.dataset} test set ({data.source}, sha256 {data.sha256[:12]}), the first "
                     f"{min(settings.n, len(y))} images",
             "models": f"{first}/checkpoints/<row>.pt (seed {cfg.seed})",
             "surrogate": f"{sur_dir}/checkpoints/baseline.pt (baseline, seed {cfg.seed + 1})",
             "seeds": f"Table I statistics over {seeds} seed(s): table.md"}
    report = evaluate_models(models, x, y, cfg.out, settings=settings, surrogate=surrogate, baseline="baseline",
                             about=about, log=log)
    log(f"wrote {cfg.out}/{', '.join(FILES)}")
    return agg, report


# ---------------------------------------------------------------- command line (fastmask evaluate)
def parse_checkpoints(specs, from_dir=None):
    """{name: path} from NAME=PATH strings and/or the checkpoints/*.pt of a reproduce folder."""
    out = {}
    if from_dir is not None:
        folder = Path(from_dir) / "checkpoints"
        if not folder.is_dir():
            raise ValueError(f"--from {str(from_dir)!r}: no checkpoints/ folder in it")
        out.update({p.stem: p for p in sorted(folder.glob("*.pt"))})
    for spec in specs or ():
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).stem, spec
        if not name or not path:
            raise ValueError(f"--checkpoint {spec!r}: expected NAME=PATH or PATH")
        out[name] = Path(path)
    if not out:
        raise ValueError("no models: give --checkpoint NAME=PATH (repeatable) or --from DIR")
    if "baseline" in out:  # first in every table
        out = {"baseline": out.pop("baseline"), **out}
    return out


def evaluate_command(args, log=print):
    """`fastmask evaluate`: the honest evaluation of checkpoints; files under args.out."""
    specs = parse_checkpoints(args.checkpoint, args.from_dir)
    baseline = args.baseline if args.baseline else ("baseline" if "baseline" in specs else None)
    if baseline is not None and baseline not in specs:
        raise ValueError(f"--baseline {baseline!r} is not one of the models {list(specs)}")
    settings = HonestSettings.preset(args.preset, n=args.n, eps_list=args.eps, pgd_steps=args.pgd_steps,
                                     pgd_alpha=args.pgd_alpha, restarts=args.restarts,
                                     eot_samples=args.eot_samples, seed=args.seed)
    settings.mtest = not args.no_mtest
    models = load_models(specs)
    surrogate = M.load(args.surrogate) if args.surrogate else None
    blob = M.read_checkpoint(next(iter(specs.values())))
    cfg = blob.get("config") or {}
    data = D.load(cfg.get("dataset", "mnist"), args.data_dir)
    x, y = D.to_float(data.x_test), data.y_test
    about = {"data": f"{cfg.get('dataset', 'mnist')} test set ({data.source}, sha256 {data.sha256[:12]}), "
                     f"the first {min(settings.n, len(y))} images",
             "models": ", ".join(f"{k}={v}" for k, v in specs.items()),
             "surrogate": str(args.surrogate) if args.surrogate else "none (no transfer attack)"}
    for name, path in specs.items():
        b = M.read_checkpoint(path)
        if b.get("data_hash") != data.sha256:
            log(f"warning: {name}: the checkpoint's data hash differs from {data.source}")
        ex = b.get("extra") or {}
        if "train_cpu_time" in ex:
            about[f"{name} training"] = (f"{ex['train_cpu_time']:.0f} s CPU, {ex['train_time']:.0f} s wall, "
                                         f"{len(ex.get('history', []))} epochs")
    report = evaluate_models(models, x, y, args.out, settings=settings, surrogate=surrogate, baseline=baseline,
                             about=about, log=log)
    eps = report["eps"]
    log(f"robust accuracy (worst case over every attack), first {settings.n} test images:")
    log(f"{'row':34s} " + " ".join(f"{e:>6g}" for e in eps) + "  flags")
    for row, r in report["rows"].items():
        flags = ",".join(sorted({f["flag"] for f in r["flags"]})) or "ok"
        log(f"{row[:34]:34s} " + " ".join(f"{a:6.3f}" for a in r["robustness"]["robust_accuracy"]) + f"  {flags}")
    log(f"wrote {args.out}/{', '.join(FILES)}")
    return report
