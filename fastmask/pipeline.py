"""The paper's protocol end to end: `run_reproduce(config)`.

Rows (same architecture, optimizer, learning rate, batch size and epochs):
baseline; random masking 10/30/50 %; fixed masking 30 %; random 30 % with
gradient manipulation; gradient manipulation only (optional extra row:
fast FGSM adversarial training). Each row is trained (or resumed from its
checkpoint when the checkpoint's config and data hash match), then evaluated
on the test set: clean metrics, FGSM for every eps of the sweep (whole test
set), PGD (a fixed subset: the first `pgd_n` test images) and, for masked
rows, the same with the paper's consistent test mask M_test.

The "paper eps" (Table I) is the eps of the sweep where the baseline's FGSM
accuracy on the VALIDATION set is closest to 60 % (the paper's baseline
figure); the test set is never used for a choice.
"""
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import _checks as C
from . import data as D
from . import distributed
from . import models as M
from .train import TrainConfig, train

TRAIN_PRESETS = {  # training and protocol sizes (`reproduce --preset`); attack sizes: honest.ATTACK_PRESETS
    # smoke: a few hundred images, one epoch; seconds. Checks the plumbing only.
    "smoke": dict(epochs=1, batch_size=50, subset={"train": 300, "val": 100, "test": 100},
                  pgd_n=50, pgd_steps=5, pgd_alpha=None, train_acc_n=300, eps_list=(0.1, 0.2, 0.3)),
    # default: full MNIST, sized to finish in <= 5 minutes on a 2-core CPU (MLP).
    "default": dict(epochs=6, batch_size=128, subset=None, pgd_n=500, pgd_steps=40, pgd_alpha=0.01, train_acc_n=10000,
                    eps_list=(0.05, 0.1, 0.15, 0.2, 0.25, 0.3)),
    # full: more epochs, PGD on the whole test set.
    "full": dict(epochs=20, batch_size=128, subset=None, pgd_n=None, pgd_steps=40, pgd_alpha=0.01, train_acc_n=None,
                 eps_list=(0.05, 0.1, 0.15, 0.2, 0.25, 0.3)),
}
GRAD_MANIP = {"max_norm": 1.0, "noise_std": 0.001}  # clip by global norm + Gaussian noise
ROWS = {  # name -> (label, mask ratio, pattern, grad manipulation, adversarial training)
    "baseline": ("baseline", None, None, None, None),
    "random10": ("masked 10% random", 0.1, "random", None, None),
    "random30": ("masked 30% random", 0.3, "random", None, None),
    "random50": ("masked 50% random", 0.5, "random", None, None),
    "fixed30": ("masked 30% fixed", 0.3, "fixed", None, None),
    "random30_gm": ("masked 30% random + grad manip.", 0.3, "random", GRAD_MANIP, None),
    "gm": ("grad manip. only", None, None, GRAD_MANIP, None),
    "fast_at": ("FGSM adv. training (fast AT)", None, None, None, "fgsm"),
    "fast_at_random10": ("fast AT + masked 10% random", 0.1, "random", None, "fgsm"),
    "fast_at_random30": ("fast AT + masked 30% random", 0.3, "random", None, "fgsm"),
    # the rest of the paper's masking menu (section IV); MASK_MENU says how each masks
    "block30": ("masked 30% block (region to 0, eq. 1)", 0.3, "random", None, None),
    "blur30": ("masked 30% blur (3x3 mean, eq. 2)", 0.3, "random", None, None),
    "dropout30": ("dropout-style 30% (x/(1-p), eq. 3 variant)", 0.3, "random", None, None),
    "learned_l1e-3": ("learned soft mask, lambda 1e-3 (eq. 17)", None, "learned", None, None),
    "learned_l1e-2": ("learned soft mask, lambda 1e-2 (eq. 17)", None, "learned", None, None),
    "random30_k2": ("masked 30% random, redrawn every 2 epochs", 0.3, "every 2 epochs", None, None),
    # the mask chosen on the validation split by `fastmask tune` (eq. 20): ReproduceConfig.tuned
    "tuned": ("tuned mask (fastmask tune, eq. 20)", None, "tuned", None, None),
}
# How the rows beyond pixel masks mask (absent: a pixel mask, cfg.mask_mode). mode: the FeatureMask mode
# (block: one rectangle of 30 % of the pixels per image set to 0; blur: 30 % of the pixels replaced by their
# 3x3 mean); rescale: inverted dropout, kept pixels times 1/(1-p) (the paper's eq. 3 has no rescale: a
# stated variant); l1: a LearnedMask with lambda = l1; redraw_epochs: k, one mask for every image redrawn
# every k epochs (the variability between epochs of eq. 20; random masking redraws every step and image,
# fixed masking never).
MASK_MENU = {
    "block30": {"mode": "block"}, "blur30": {"mode": "blur"}, "dropout30": {"rescale": True},
    "learned_l1e-3": {"l1": 1e-3}, "learned_l1e-2": {"l1": 1e-2}, "random30_k2": {"redraw_epochs": 2},
}
DEFAULT_ROWS = ("baseline", "random10", "random30", "random50", "fixed30", "random30_gm", "gm")
# --rows paper-all: every masking row of the paper's menu, gradient manipulation included (not the
# fast-AT rows, which are not in the paper: name them with --rows)
ROW_GROUPS = {"paper-all": DEFAULT_ROWS + tuple(MASK_MENU)}
PAPER_TABLE = {  # Table I of the paper: train acc, test acc, acc under FGSM, training time increase
    "baseline": (0.99, 0.98, 0.60, 0.00), "random10": (0.98, 0.96, 0.75, 0.05),
    "random30": (0.97, 0.94, 0.80, 0.10), "random50": (0.95, 0.92, 0.85, 0.15),
    "fixed30": (0.97, 0.93, 0.78, 0.07),
}
TARGET_BASELINE_FGSM = 0.60


@dataclass
class ReproduceConfig:
    out: str = "results"
    model: str = "mlp"
    dataset: str = "mnist"
    preset: str = "default"
    seed: int = 0
    data_dir: str = None
    download: bool = False
    threads: int = 1                # torch threads; None: torch's default (see cli.py)
    quiet: bool = False
    progress: bool = False          # tqdm bars (the CLI turns them on for a tty)
    rows: tuple = DEFAULT_ROWS
    eps_list: tuple = None          # None: the preset's
    lr: float = 1e-3
    optimizer: str = "adam"
    fused_optimizer: bool = True    # torch's fused Adam/SGD; False: its per-op loop (the bits before session 7)
    epochs: int = None              # None: the preset's
    batch_size: int = None
    pgd_n: int = None               # None: the preset's (0 in a preset entry means the whole test set)
    pgd_steps: int = None
    pgd_alpha: float = None         # None: the preset's (a preset's None: 2.5 eps / steps)
    mask_mode: str = "pixel"
    adv_eps: float = 0.1            # fast_at rows only
    lr_schedule: str = "constant"   # every row; "cyclic": Wong et al.'s 0 -> lr -> 0 per step
    n_val: int = None               # None: 10,000 (data.load's default)
    tuned: str = None               # row "tuned": the tuned.json of `fastmask tune`

    def __post_init__(self):
        C.field(C.choice, "preset", self.preset, tuple(TRAIN_PRESETS))
        C.field(C.choice, "model", self.model, M.MODELS)
        C.field(C.choice, "dataset", self.dataset, D.DATASETS)
        self.rows = expand_rows(self.rows)
        if "tuned" in self.rows and not self.tuned:
            raise ValueError("rows: 'tuned' needs tuned=<the tuned.json of fastmask tune> (--tuned FILE)")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise ValueError(f"out={self.out!r} is a file, not a folder")
        if self.threads is not None:
            C.field(C.positive_int, "threads", self.threads)
        p = TRAIN_PRESETS[self.preset]
        for k in ("epochs", "batch_size", "pgd_n", "pgd_steps", "pgd_alpha", "eps_list"):
            if getattr(self, k) is None:
                setattr(self, k, p[k])
        if not self.eps_list or any(not 0 < e <= 1 for e in self.eps_list):
            raise ValueError(f"eps_list={list(self.eps_list)!r} must be non-empty values in (0, 1]")
        self.rows, self.eps_list = tuple(self.rows), tuple(float(e) for e in self.eps_list)


def expand_rows(rows):
    """Row names with the groups of ROW_GROUPS expanded (in order, no repeats); one-line errors."""
    if isinstance(rows, str):
        rows = tuple(r.strip() for r in rows.split(",") if r.strip())
    out = []
    for r in rows:
        for name in ROW_GROUPS.get(r, (r,)):
            if name not in ROWS:
                raise ValueError(f"rows={list(rows)!r}: unknown row {name!r}; the rows are {', '.join(ROWS)} "
                                 f"and the groups {', '.join(ROW_GROUPS)}")
            if name not in out:
                out.append(name)
    if "baseline" not in out:
        raise ValueError(f"rows={list(rows)!r}: 'baseline' is needed (it fixes the paper eps)")
    return tuple(out)


def row_mask(name, cfg, n_train):
    """The mask config of row `name` (None: no mask)."""
    label, ratio, pattern, grad, adv = ROWS[name]
    if name == "tuned":
        from .tune import point_mask, read_tuned
        return point_mask(read_tuned(cfg.tuned), cfg.seed, n_train, cfg.batch_size)
    menu = MASK_MENU.get(name, {})
    if "l1" in menu:
        return M.learned_mask_config(menu["l1"])
    if ratio is None:
        return None
    redraw = None
    if "redraw_epochs" in menu:  # k epochs in steps of this run's batch size
        redraw = C.positive_int("redraw_epochs", menu["redraw_epochs"]) * -(-n_train // cfg.batch_size)
    return M.mask_config(ratio, menu.get("mode", cfg.mask_mode), "fixed" if pattern == "fixed" else "sample",
                         cfg.seed, redraw_steps=redraw, rescale=menu.get("rescale", False))


def row_configs(cfg, data):
    """{row: (mask_cfg or None, TrainConfig, checkpoint config)}."""
    out = {}
    for name in ["baseline"] + [r for r in cfg.rows if r != "baseline"]:  # baseline first: it fixes the paper eps
        label, ratio, pattern, grad, adv = ROWS[name]
        mask = row_mask(name, cfg, len(data.y_train))
        tcfg = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, optimizer=cfg.optimizer,
                           fused=cfg.fused_optimizer, seed=cfg.seed, grad=dict(grad or {}), adv_train=adv,
                           adv_eps=cfg.adv_eps, lr_schedule=cfg.lr_schedule,
                           adv_check=adv is not None)  # early stop: fast AT rows
        ck = {"row": name, "model": cfg.model, "dataset": cfg.dataset, "subset": data.subset,
              "split_seed": data.split_seed, "n_val": len(data.y_val), "mask": mask, "train": tcfg.to_dict()}
        out[name] = (mask, tcfg, ck)
    return out


def train_or_resume(name, mask, tcfg, ck, data, cfg, log):
    path = Path(cfg.out) / "checkpoints" / f"{name}.pt"
    resumed = None
    if path.is_file() and distributed.is_main():  # under torchrun rank 0 decides and sends the model
        try:
            model, blob = M.load(path, with_meta=True)
            if blob["config"] == ck and blob["data_hash"] == data.sha256 and blob.get("extra"):
                log(f"[{name}] resumed from {path}")
                resumed = (model, blob["extra"])
            else:
                log(f"[{name}] checkpoint {path} is for another config or data: retraining")
        except M.CheckpointError as e:
            log(f"[{name}] {e}: retraining")
    resumed = distributed.broadcast(resumed)
    if resumed is not None:
        return resumed[0], resumed[1], True
    log(f"[{name}] training ({ROWS[name][0]})")
    model = M.build(cfg.model, mask, seed=cfg.seed).to(distributed.device())  # cpu unless torchrun + GPUs
    info = train(model, data, tcfg, progress=cfg.progress, log=None if cfg.quiet else log)
    if distributed.is_main():
        M.save(path, model, ck, data.sha256, extra=info)
    return model, info, False


def fgsm_accuracy(model, x, y, eps, batch_size=1000):
    from .attacks import fgsm
    from .evaluate import predict
    x_adv = fgsm(model, x, y, eps, batch_size=batch_size)
    return (predict(model, x_adv, batch_size=batch_size) == y).double().mean().item()


def choose_paper_eps(model, x_val, y_val, eps_list):
    """The eps whose baseline FGSM accuracy on the validation set is closest to 60 % (smaller eps on ties)."""
    acc = {e: fgsm_accuracy(model, x_val, y_val, e) for e in eps_list}
    best = min(eps_list, key=lambda e: (abs(acc[e] - TARGET_BASELINE_FGSM), e))
    return best, acc


def _without_tensors(r):
    """A robustness() result without its per-sample tensors."""
    return {k: v for k, v in r.items() if k not in ("correct", "clean_correct", "robust_correct")}


def evaluate_row(model, data, cfg, x_test, x_train_eval, y_train_eval):
    from .evaluate import evaluate, robustness
    y_test = data.y_test
    clean = evaluate(model, x_test, y_test)
    n_pgd = len(y_test) if not cfg.pgd_n else min(cfg.pgd_n, len(y_test))
    # pgd_steps / pgd_alpha do not reach FGSM: these are the values results.json has always recorded for
    # the FGSM sweep (fgsm_detail.config), kept so that results.json compares across versions
    fg = robustness(model, x_test, y_test, eps_list=cfg.eps_list, attacks=("fgsm",), pgd_steps=40, pgd_alpha=0.01)
    pg = robustness(model, x_test[:n_pgd], y_test[:n_pgd], eps_list=cfg.eps_list, attacks=("pgd",),
                    pgd_steps=cfg.pgd_steps, pgd_alpha=cfg.pgd_alpha, seed=cfg.seed)
    res = {"train_acc": evaluate(model, x_train_eval, y_train_eval)["accuracy"],
           "clean": {k: v for k, v in clean.items() if k != "correct"},
           "fgsm": fg["accuracy"]["fgsm"], "pgd": pg["accuracy"]["pgd"],
           "fgsm_detail": _without_tensors(fg), "pgd_detail": _without_tensors(pg), "pgd_n": n_pgd}
    correct = {"clean": clean["correct"], "fgsm": fg["correct"]["fgsm"], "pgd": pg["correct"]["pgd"]}
    return res, correct


def config_dict(cfg):
    """asdict(cfg) without the fields a run did not use (`tuned`), so results.json of runs without
    them stays what it always was."""
    d = asdict(cfg)
    if d.get("tuned") is None:
        d.pop("tuned", None)
    return d


def versions():
    from . import ops
    try:
        from importlib.metadata import version
        fm = version("fastmask")
    except Exception:
        fm = "unknown"
    return {"fastmask": fm, "torch": torch.__version__, "numpy": np.__version__,
            "python": sys.version.split()[0], "platform": platform.platform(),
            "threads": torch.get_num_threads(), "extension_loaded": bool(ops.extension_loaded())}


def run_reproduce(cfg, log=print):
    """Train and evaluate every row, write results.json, table.md/csv and the figures under cfg.out.
    Returns the results dict."""
    if isinstance(cfg, dict):
        cfg = ReproduceConfig(**cfg)
    if cfg.quiet:
        log = lambda *a, **k: None  # noqa: E731
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_start, c_start = time.perf_counter(), time.process_time()
    for stale in sorted(Path(cfg.out).glob(".*.tmp")) + sorted(Path(cfg.out).glob("checkpoints/.*.tmp")):
        if distributed.is_main():
            stale.unlink(missing_ok=True)  # half-written by a run that was killed (SIGKILL)
    data = D.load(cfg.dataset, cfg.data_dir, n_val=cfg.n_val, split_seed=cfg.seed, download=cfg.download)
    if TRAIN_PRESETS[cfg.preset]["subset"]:
        data = data.take(**TRAIN_PRESETS[cfg.preset]["subset"])
    log(f"data: {cfg.dataset} {data.sizes()} from {data.source} (sha256 {data.sha256[:12]})")
    x_test = D.to_float(data.x_test)
    n_tr = TRAIN_PRESETS[cfg.preset]["train_acc_n"] or len(data.y_train)
    x_tr, y_tr = D.to_float(data.x_train[:n_tr]), data.y_train[:n_tr]
    x_val = D.to_float(data.x_val)

    rows, correct, paper_eps, val_fgsm, example = {}, {}, None, None, None
    from .cli import stop_requested  # a SIGTERM / SIGINT that library code swallowed stops before the next row
    for name, (mask, tcfg, ck) in row_configs(cfg, data).items():
        stop_requested()
        model, info, resumed = train_or_resume(name, mask, tcfg, ck, data, cfg, log)
        if name == "baseline":
            paper_eps, val_fgsm = choose_paper_eps(model, x_val, data.y_val, cfg.eps_list)
            log(f"paper eps = {paper_eps:g} (baseline FGSM accuracy on validation closest to "
                f"{TARGET_BASELINE_FGSM:.0%}: {val_fgsm[paper_eps]:.3f})")
            example = adversarial_examples(model, x_test, data.y_test, paper_eps)
        t0 = time.perf_counter()
        res, corr = evaluate_row(model, data, cfg, x_test, x_tr, y_tr)
        if M.has_test_mask(mask):  # the paper's consistent test mask M_test
            mt = M.with_eval_mask(model, "consistent").eval()
            res["test_mask"], corr_mt = evaluate_row(mt, data, cfg, x_test, x_tr, y_tr)
            corr["test_mask"] = corr_mt
        label, ratio, pattern, grad, adv = ROWS[name]
        if name == "tuned":  # what the tuning chose
            from .tune import point_label, read_tuned
            point = read_tuned(cfg.tuned)
            label, ratio, pattern = f"tuned: {point_label(point)}", point["ratio"], point["pattern"]
        rows[name] = {"label": label, "ratio": ratio, "pattern": pattern, "grad_manipulation": grad,
                      "adv_train": adv, "mask": mask, "train_config": tcfg.to_dict(), "resumed": resumed,
                      "history": info["history"], "train_time_s": info["train_time"],
                      "train_cpu_time_s": info["train_cpu_time"],
                      "eval_time_s": time.perf_counter() - t0, **res}
        if name in MASK_MENU:  # keys only the menu's rows have, so the other rows' results stay as they were
            rows[name]["menu"] = dict(MASK_MENU[name])
            if M.is_learned(mask):
                rows[name]["learned_mask"] = model.mask.mask().detach().cpu().tolist()
        correct[name] = corr
        log(f"[{name}] test acc {res['clean']['accuracy']:.4f}  FGSM@{paper_eps:g} "
            f"{res['fgsm'][cfg.eps_list.index(paper_eps)]:.4f}  PGD@{paper_eps:g} "
            f"{res['pgd'][cfg.eps_list.index(paper_eps)]:.4f}")

    k = cfg.eps_list.index(paper_eps)
    base_time = rows["baseline"]["train_cpu_time_s"]
    from .stats import versus_baseline
    vs = versus_baseline(correct, "baseline", lambda c: {"clean": c["clean"], "fgsm": c["fgsm"][k], "pgd": c["pgd"][k]},
                         keys=("delta", "p_value", "verdict"))  # McNemar on the same test images, at the paper eps
    for name, r in rows.items():
        r["train_time_increase"] = r["train_cpu_time_s"] / base_time - 1.0
        if name != "baseline":
            r["vs_baseline"] = vs[name]
    results = {
        "paper": "Ingle and Pawale, Enhancing Adversarial Defense ... Feature Masking and Gradient Manipulation",
        "config": config_dict(cfg), "versions": versions(), "seed": cfg.seed,
        "data": {"dataset": cfg.dataset, "source": data.source, "sha256": data.sha256, "sizes": data.sizes(),
                 "split_seed": data.split_seed, "subset": data.subset},
        "protocol": {
            "eps_list": list(cfg.eps_list), "paper_eps": paper_eps,
            "paper_eps_rule": f"eps of the sweep where the baseline's FGSM accuracy on the validation set is "
                              f"closest to {TARGET_BASELINE_FGSM:.0%} (the paper's baseline figure)",
            "baseline_val_fgsm": {f"{e:g}": a for e, a in val_fgsm.items()},
            "fgsm": "whole test set, model in eval mode",
            "pgd": {"n": rows["baseline"]["pgd_n"], "subset": "the first pgd_n images of the test set",
                    "steps": cfg.pgd_steps, "alpha": "2.5 * eps / steps" if cfg.pgd_alpha is None else cfg.pgd_alpha,
                    "random_start": True, "restarts": 1, "norm": "inf"},
            "train_acc": f"clean accuracy of the final model on the first {n_tr} images of the training split",
            "test_mask": "masked rows are also evaluated with the consistent test mask M_test "
                         "(FeatureMask eval_mask='consistent'); the attack sees the same mask",
            "training_time_increase": "train_cpu_time_s / baseline train_cpu_time_s - 1: process CPU time of "
                                      "the training loop (validation excluded) with cfg.threads torch threads; "
                                      "CPU time rather than wall time because other processes on a shared "
                                      "machine distort wall time (train_time_s has it)",
            "grad_manipulation": GRAD_MANIP, "mask_mode": cfg.mask_mode,
        },
        "rows": rows, "paper_table": {k2: dict(zip(("train_acc", "test_acc", "fgsm_acc", "time_increase"), v))
                                      for k2, v in PAPER_TABLE.items()},
    }
    from . import report
    results["wall_time_s"] = time.perf_counter() - t_start
    results["cpu_time_s"] = time.process_time() - c_start
    results["world_size"] = distributed.world_size()  # torchrun processes (cpu_time_s: rank 0's)
    if distributed.is_main():
        report.write_all(results, cfg.out, example)
    log(report.summary(results))
    return results


def adversarial_examples(model, x, y, eps, n=8):
    """n test images, their FGSM versions at eps and the baseline's predictions (for Fig. 2)."""
    from .attacks import fgsm
    from .evaluate import predict
    xs, ys = x[:n], y[:n]
    adv = fgsm(model, xs, ys, eps)
    return {"x": xs.numpy(), "x_adv": adv.numpy(), "y": ys.numpy(), "eps": eps,
            "pred": predict(model, xs).numpy(), "pred_adv": predict(model, adv).numpy()}
