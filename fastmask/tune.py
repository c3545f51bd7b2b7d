"""`fastmask tune`: the paper's mask tuning, M = Tune(p, pattern, variability) (eq. 20).

A grid over (ratio, pattern, mode, variability): each point is a FeatureMask row
trained with the reproduce preset's sizes (same architecture, optimizer, learning
rate, batch size and epochs as Table I) and scored on the VALIDATION split only:

    score = clean accuracy (whole validation split, no mask)
          + robust accuracy under `attack` (an entry of fastmask.attacks.REGISTRY, at eps,
            with `attack_opts` over its defaults) on the first `n_robust` validation images.

The default attack is PGD-10 (L-inf, alpha 2.5 eps / steps, one random start): every
grid point pays for it, so it is shorter than the registry's PGD-40; `--attack apgd`
or `--attack autoattack` score with the stronger attacks at their registry defaults.

The test set is never read. The point with the highest score is chosen (ties: the
smaller ratio, then the grid order) and written to OUT/tuned.json, which
`fastmask reproduce --rows baseline,tuned --tuned OUT/tuned.json` trains and tests.
variability: None = a fresh mask per image and step (random masking), k = one mask
for every image redrawn every k epochs (FeatureMask redraw_steps); pattern "fixed"
never redraws, so its points have variability None only.

Every finished point is one JSON file under OUT/points/ (atomic writes), named by
the hash of everything that decides its figures; a run killed mid-search and started
again skips them. OUT/search.json, written before the first point, holds those
settings (the attack and all its settings included): a run into a folder whose
search.json differs is refused, naming the setting, so one folder never mixes two
scorings (the grid itself may grow: new points are scored, finished ones kept).
"""
import hashlib
import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import _checks as C
from . import attacks as A
from . import data as D
from . import models as M
from .report import write_text

PATTERNS = ("random", "fixed")
# the tune's own defaults over the registry's: PGD-10, not PGD-40 (each grid point pays for it)
ATTACK_DEFAULTS = {"pgd": {"steps": 10}}


@dataclass
class TuneConfig:
    out: str = "tune"
    model: str = "mlp"
    dataset: str = "mnist"
    preset: str = "default"          # the training sizes: pipeline.TRAIN_PRESETS
    seed: int = 0
    data_dir: str = None
    ratios: tuple = (0.1, 0.3, 0.5)
    patterns: tuple = ("random", "fixed")
    modes: tuple = ("pixel",)
    variability: tuple = (None,)     # None: every step; k >= 1: one mask redrawn every k epochs
    eps: float = 0.1
    n_robust: int = 500
    attack: str = "pgd"              # an entry of attacks.REGISTRY (not transfer: it needs a surrogate)
    attack_opts: dict = None         # {setting: value} over ATTACK_DEFAULTS and the registry defaults
    threads: int = 1
    quiet: bool = False

    def __post_init__(self):
        from .pipeline import TRAIN_PRESETS
        C.field(C.choice, "preset", self.preset, tuple(TRAIN_PRESETS))
        C.field(C.choice, "model", self.model, M.MODELS)
        C.field(C.choice, "dataset", self.dataset, D.DATASETS)
        for name in ("ratios", "patterns", "modes", "variability"):
            values = tuple(getattr(self, name))
            if not values:
                raise ValueError(f"{name}=() is empty: the tuning grid has no point")
            setattr(self, name, values)
        for r in self.ratios:
            C.field(C.ratio, "ratio", r)
        for p in self.patterns:
            C.field(C.choice, "pattern", p, PATTERNS)
        for m in self.modes:
            C.field(C.choice, "mode", m, C.MODES)
        for k in self.variability:
            if k is not None:
                C.field(C.positive_int, "variability", k)
        C.field(C.positive, "eps", self.eps)
        C.field(C.positive_int, "n_robust", self.n_robust)
        C.field(C.choice, "attack", self.attack, A.ATTACKS)
        self.attack_opts = dict(self.attack_opts or {})
        self.attack_settings()  # checks the settings (unknown key, bad value: one line naming it)
        if not self.points():
            raise ValueError(f"the tuning grid is empty: ratios={list(self.ratios)}, patterns={list(self.patterns)}, "
                             f"modes={list(self.modes)}, variability={list(self.variability)}")

    def attack_settings(self):
        """Every setting of the scoring attack: the registry's defaults, the tune's, the user's."""
        return A.get(self.attack).options({**ATTACK_DEFAULTS.get(self.attack, {}), **self.attack_opts})

    def attack_label(self):
        opts = ", ".join(f"{k}={v}" for k, v in self.attack_settings().items())
        return f"{self.attack}({opts}) at eps {self.eps:g}" if opts else f"{self.attack} at eps {self.eps:g}"

    def points(self):
        """The grid, in order: dicts of ratio, pattern, mode, variability."""
        out = []
        for r, p, m, k in itertools.product(self.ratios, self.patterns, self.modes, self.variability):
            if p == "fixed" and k is not None:
                continue  # a fixed mask is never redrawn
            out.append({"ratio": float(r), "pattern": p, "mode": m, "variability": k})
        return out


def point_mask(point, seed, n_train, batch_size):
    """The FeatureMask config of a grid point (the reproduce rows' mask_config)."""
    redraw = None if point["variability"] is None else point["variability"] * -(-n_train // batch_size)
    return M.mask_config(point["ratio"], point["mode"], "fixed" if point["pattern"] == "fixed" else "sample",
                         seed, redraw_steps=redraw)


def point_label(point):
    k = point["variability"]
    how = "fixed" if point["pattern"] == "fixed" else ("random" if k is None else f"redrawn every {k} ep.")
    return f"{point['ratio']:.0%} {point['mode']} {how}"


def score_point(point, data, cfg, train_cfg):
    """Train the point's model on the training split, score it on the validation split."""
    from .evaluate import evaluate
    from .train import train
    mask = point_mask(point, cfg.seed, len(data.y_train), train_cfg.batch_size)
    model = M.build(cfg.model, mask, seed=cfg.seed)
    info = train(model, data, train_cfg)
    x_val = D.to_float(data.x_val)
    clean = evaluate(model, x_val, data.y_val)["accuracy"]
    n = min(cfg.n_robust, len(data.y_val))
    attack = A.get(cfg.attack).bind(cfg.eps, cfg.attack_settings(), seed=cfg.seed)
    x_adv = attack(model, x_val[:n], data.y_val[:n])
    robust = evaluate(model, x_adv, data.y_val[:n])["accuracy"]
    return {"point": point, "label": point_label(point), "mask": mask, "val_clean_acc": clean,
            "val_robust_acc": robust, "score": clean + robust, "train_cpu_time_s": info["train_cpu_time"]}


def run_tune(cfg, log=print):
    """Score every grid point (skipping finished ones), write tune.md, tune.json and tuned.json."""
    from .pipeline import TRAIN_PRESETS
    from .train import TrainConfig
    if isinstance(cfg, dict):
        cfg = TuneConfig(**cfg)
    if cfg.quiet:
        log = lambda *a, **k: None  # noqa: E731
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    preset = TRAIN_PRESETS[cfg.preset]
    data = D.load(cfg.dataset, cfg.data_dir, split_seed=cfg.seed)
    if preset["subset"]:  # the training and validation sizes of the preset; the test split is not read
        data = data.take(**{k: v for k, v in preset["subset"].items() if k != "test"})
    train_cfg = TrainConfig(epochs=preset["epochs"], batch_size=preset["batch_size"], seed=cfg.seed)
    out = Path(cfg.out)
    for stale in sorted(out.glob(".*.tmp")) + sorted(out.glob("points/.*.tmp")):
        stale.unlink(missing_ok=True)  # half-written by a search that was killed (SIGKILL)
    settings = {"model": cfg.model, "dataset": cfg.dataset, "data_sha256": data.sha256, "subset": data.subset,
                "train": train_cfg.to_dict(), "eps": cfg.eps, "n_robust": cfg.n_robust, "attack": cfg.attack,
                "attack_settings": cfg.attack_settings(), "seed": cfg.seed}
    claim_folder(out, settings)
    log(f"scoring: validation clean accuracy + validation robust accuracy under {cfg.attack_label()} "
        f"on the first {min(cfg.n_robust, len(data.y_val))} validation images")
    results = []
    for point in cfg.points():
        key = hashlib.sha256(json.dumps([settings, point], sort_keys=True).encode()).hexdigest()[:16]
        path = out / "points" / f"{key}.json"
        res = None
        if path.is_file():
            try:
                res = json.loads(path.read_text())
                log(f"[{point_label(point)}] done before: {path}")
            except ValueError:
                res = None  # unreadable: score it again
        if res is None:
            log(f"[{point_label(point)}] training and scoring on the validation split")
            res = score_point(point, data, cfg, train_cfg)
            write_text(path, json.dumps(res, indent=1) + "\n")
        results.append(res)
    best = max(results, key=lambda r: (r["score"], -r["point"]["ratio"], -results.index(r)))
    chosen = {"kind": "fastmask-tuned-mask", "point": best["point"], "label": best["label"], "score": best["score"],
              "rule": f"max over the grid of validation clean accuracy + validation robust accuracy under "
                      f"{cfg.attack_label()} (ties: smaller ratio, then grid order); the test set is not used",
              "attack": {"name": cfg.attack, "eps": cfg.eps, "settings": cfg.attack_settings()},
              "settings": settings, "config": asdict(cfg)}
    write_text(out / "tuned.json", json.dumps(chosen, indent=1) + "\n")
    write_text(out / "tune.json", json.dumps({"points": results, "chosen": chosen}, indent=1) + "\n")
    table = tune_markdown(results, best, cfg)
    write_text(out / "tune.md", table)
    log(table)
    log(f"chosen: {best['label']} (scored with {cfg.attack_label()}); wrote {out / 'tuned.json'} "
        f"(reproduce --rows baseline,tuned --tuned "
        f"{out / 'tuned.json'})")
    return chosen


def claim_folder(out, settings):
    """OUT/search.json: this run's settings, or a one-line refusal if the folder holds another scoring's."""
    path = out / "search.json"
    settings = json.loads(json.dumps(settings))  # as it reads back (tuples become lists)
    if path.is_file():
        try:
            before = json.loads(path.read_text())
        except ValueError:
            before = None  # half-written by a killed run: this run writes it again
        if before is not None and before != settings:
            key = next(k for k in sorted(set(before) | set(settings)) if before.get(k) != settings.get(k))
            raise ValueError(f"out={str(out)!r} holds a search scored with {key}={before.get(key)!r}; this run "
                             f"has {key}={settings.get(key)!r}: use another --out (one folder, one scoring)")
    write_text(path, json.dumps(settings, indent=1, sort_keys=True) + "\n")


def tune_markdown(results, best, cfg):
    lines = [f"# Mask tuning (eq. 20) on the validation split: {cfg.attack_label()} on "
             f"{cfg.n_robust} validation images", "",
             f"| point | val clean acc | val {cfg.attack} acc | score | |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['label']} | {r['val_clean_acc']:.4f} | {r['val_robust_acc']:.4f} | {r['score']:.4f} | "
                     f"{'chosen' if r is best else ''} |")
    return "\n".join(lines) + "\n"


def read_tuned(path):
    """The chosen point of a tuned.json; one-line errors."""
    path = Path(path)
    try:
        blob = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--tuned {str(path)!r}: unreadable ({type(e).__name__})") from None
    if not isinstance(blob, dict) or blob.get("kind") != "fastmask-tuned-mask":
        raise ValueError(f"--tuned {str(path)!r} is not a tuned.json written by fastmask tune")
    return blob["point"]
