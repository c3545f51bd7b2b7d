"""The honest robustness evaluation of many models, with its cache.

- honest_report(models, x, y): per model, clean metrics and accuracy vs eps under
  FGSM, PGD, PGD with restarts, transfer and (masked at test time) EOT-PGD and
  frozen-mask PGD; "robust" is the per-sample worst case over all of them; the
  gradient-masking checks (evaluate.sanity_checks) flag a row; McNemar of each
  row's robust correctness against the baseline (stats.versus_baseline).
- evaluate_models(models, x, y, out, ...): honest_report row by row, every row
  cached in out/honest_cache/ and reused on a rerun when the model, data and
  settings match (resumable); with HonestSettings.attacks="autoattack" also
  AutoAttack per row and eps (honest_autoattack: standard, or rand on rows masked
  at test time; each piece cached on its own); writes honest.md, honest.json and
  honest_accuracy_vs_eps.png (report.write_honest, atomically).
- run_honest(cfg, seeds): `fastmask reproduce --honest`: seeds.reproduce_seeds,
  then the evaluation of the first seed's models; the transfer surrogate is the
  baseline of the next seed (trained separately).
`fastmask evaluate` (cli.py) calls evaluate_models on checkpoints and --model-def models (usermodel).

The attacks and their settings come from the registry (attacks.REGISTRY);
HonestSettings sizes them (ATTACK_PRESETS: check, standard, thorough) and
attack_opts {name: {key: value}} sets any setting of one attack on top.

A masked model gives up to three rows: "<row>" (no mask at test time), "<row>
[test mask]" (a fresh random mask at every forward: a randomized defence, so
EOT-PGD and frozen-mask PGD are added) and "<row> [M_test]" (the paper's
consistent test mask; deterministic, the attacks see it).
"""
import dataclasses
import hashlib
import io
from pathlib import Path

import torch

from . import _checks as C
from . import attacks as A
from . import data as D
from . import distributed
from . import evaluate as E
from . import honest_autoattack as AA
from . import models as M
from . import report, stats

__all__ = ["ATTACK_PRESETS", "PRESET_ALIASES", "HonestSettings", "honest_report", "evaluate_models",
           "load_models", "run_honest", "FILES"]

FILES = report.HONEST_FILES
ATTACK_PRESETS = {  # attack sizes; n: the first n test images; pgd_alpha None: 2.5 eps / steps;
    # aa_*: AutoAttack's APGD/FAB steps, Square queries, targets, scoring draws of "rand" (its EOT: eot_samples);
    # "check" is a quick look (a run in seconds), standard and thorough the original's sizes
    "check": dict(n=40, eps_list=(0.0, 0.1, 0.3, 1.0), pgd_steps=5, restarts=2, eot_samples=2,
                  aa_steps=10, aa_queries=50, aa_targets=3, aa_draws=5),
    "standard": dict(n=500, eps_list=E.HONEST_EPS, pgd_steps=40, restarts=5, eot_samples=10),
    "thorough": dict(n=1000, eps_list=E.HONEST_EPS, pgd_steps=50, restarts=10, eot_samples=20, aa_draws=10),
}
# the old names (they were the training presets' names too); `fastmask evaluate` takes them with a note,
# and `reproduce --honest --preset P` sizes its attacks with PRESET_ALIASES[P]
PRESET_ALIASES = {"smoke": "check", "default": "standard", "full": "thorough"}


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
    attack_opts: dict = dataclasses.field(default_factory=dict)  # {attack: {key: value}}, on top of the above
    attacks: str = "pgd"    # "pgd": FGSM, PGD, restarts, transfer, EOT, frozen; "autoattack": also AutoAttack
    aa_steps: int = 100
    aa_queries: int = 5000
    aa_targets: int = 9
    aa_draws: int = 5

    @classmethod
    def preset(cls, name, **over):
        name = PRESET_ALIASES.get(name, name)
        if name not in ATTACK_PRESETS:
            raise ValueError(f"preset={name!r} is not one of {tuple(ATTACK_PRESETS)}")
        return cls(**dict(ATTACK_PRESETS[name], **{k: v for k, v in over.items() if v is not None}))

    def __post_init__(self):
        for k in ("n", "pgd_steps", "restarts", "eot_samples", "batch_size", "aa_steps", "aa_queries",
                  "aa_targets", "aa_draws"):
            C.field(C.positive_int, k, getattr(self, k))
        C.field(C.choice, "attacks", self.attacks, AA.SUITES)
        aa_opts = self.attack_opts.get("autoattack", {})
        if aa_opts and self.attacks != "autoattack":
            raise ValueError(f"attack_opts autoattack={aa_opts!r} needs attacks='autoattack', got {self.attacks!r}")
        if "version" in aa_opts:
            raise ValueError(f"autoattack.version={aa_opts['version']!r}: the honest evaluation picks the version "
                             "per row (standard; rand on rows masked at test time)")
        self.eps_list = tuple(float(e) for e in self.eps_list)
        if not self.eps_list or any(not 0 <= e <= 1 for e in self.eps_list):
            raise ValueError(f"eps_list={list(self.eps_list)!r} must be non-empty values in [0, 1]")
        if self.pgd_alpha is not None and not self.pgd_alpha > 0:
            raise ValueError(f"pgd_alpha={self.pgd_alpha!r} must be > 0 (or None for 2.5 eps / steps)")
        for name, opts in self.attack_opts.items():
            A.get(name).options(opts)  # an unknown attack or setting, or a bad value: the error names it

    def to_dict(self):
        """What honest.json records: attack_opts only when given, attacks and the aa_* sizes only with
        AutoAttack (so a PGD-only evaluation records what it did before AutoAttack existed)."""
        d = dataclasses.asdict(self)
        if not d["attack_opts"]:
            del d["attack_opts"]
        if self.attacks != "autoattack":
            for k in AA_FIELDS + ("attacks",):
                del d[k]
        return d

    def row_key(self):
        """The settings a row's PGD suite depends on (its cache key): the AutoAttack ones left out, so
        adding AutoAttack to an evaluation reuses its cached PGD rows."""
        d = {k: v for k, v in self.to_dict().items() if k not in AA_FIELDS and k != "attacks"}
        opts = {k: v for k, v in d.get("attack_opts", {}).items() if k != "autoattack"}
        d.pop("attack_opts", None)
        return dict(d, attack_opts=opts) if opts else d


AA_FIELDS = ("aa_steps", "aa_queries", "aa_targets", "aa_draws")


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


def robust_correct(row):
    """A row's per-sample robust correctness, eps x n: what the tests against the baseline compare."""
    return row["robustness"]["robust_correct"]


def craft_transfer(surrogate, x, y, eps_list, *, steps, alpha, seed, batch_size, options=None):
    """{eps: x_adv}: PGD on the surrogate (model in eval mode), crafted once for every row; eps 0 is x."""
    return {e: (x if e == 0 else A.make_attack("pgd", e, steps=steps, alpha=alpha, seed=seed, batch_size=batch_size,
                                               **(options or {}))(surrogate, x, y)) for e in eps_list}


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
def honest_report(models, x, y, *, eps_list=E.HONEST_EPS, surrogate=None, baseline=None, pgd_steps=40,
                  pgd_alpha=None, restarts=5, eot_samples=20, test_mask="auto", batch_size=500, seed=0,
                  options=None):
    """Per model: clean metrics, accuracy vs eps under every relevant attack, flags, tests vs baseline.

    models: {name: model} (or one model). Attacks: every registry entry with honest="always"
    (FGSM, PGD, transfer: PGD on `surrogate`, crafted once per eps), PGD with `restarts`
    random restarts and, for rows masked at test time, those with honest="test_mask"
    (EOT-PGD, `eot_samples` draws per step; frozen-mask PGD). surrogate: a model, or
    precomputed examples {eps: x_adv}, or None (no transfer). test_mask:
    False, True or "auto" (both rows for models with FeatureMask modules: "<name>"
    unmasked and "<name> [test mask]" randomized).
    baseline: a row name; every other row gets McNemar tests of its robust
    correctness against it, per eps ("more robust" only when p < 0.05).
    options: {attack: {key: value}} on top (attacks.REGISTRY; "pgd" options also reach
    pgd_restarts, the same PGD with `restarts` restarts; "transfer" options the surrogate's PGD).
    Returns {"rows": {row: {...}}, "eps": [...], "config": {...}}.
    """
    if isinstance(models, torch.nn.Module):
        models = {"model": models}
    if test_mask not in (False, True, "auto"):
        raise ValueError(f"test_mask must be False, True or 'auto', got {test_mask!r}")
    eps_list = [float(e) for e in eps_list]
    cfg = dict(pgd_steps=pgd_steps, pgd_alpha=pgd_alpha, restarts=restarts, eot_samples=eot_samples,
               batch_size=batch_size, seed=seed)
    options = {k: dict(v) for k, v in (options or {}).items()}
    transfer_x = surrogate if isinstance(surrogate, dict) else None  # precomputed {eps: x_adv}
    if surrogate is not None and transfer_x is None:  # the same transfer examples for every row
        transfer_x = craft_transfer(surrogate, x, y, eps_list, steps=pgd_steps, alpha=pgd_alpha, seed=seed,
                                    batch_size=batch_size, options=options.get("transfer"))
    knobs = dict(pgd_steps=pgd_steps, pgd_alpha=pgd_alpha, restarts=restarts, eot_samples=eot_samples)
    restart_opts = dict(E.attack_options("pgd", knobs, options), restarts=restarts)

    def pgd_restarts(m, xb, yb, e, masks):
        return A.make_attack("pgd", e, seed=seed, masks=masks, batch_size=batch_size, **restart_opts)(m, xb, yb)
    rows = {}
    for name, model in models.items():
        settings = {"auto": [False, True] if A.feature_masks(model) else [False], False: [False], True: [True]}[test_mask]
        for tm in settings:
            masks = "random" if tm else "model"
            atk = []
            for name_, entry in A.REGISTRY.items():  # the registry's order; "pgd" is followed by pgd_restarts
                if entry.honest == "always" or (entry.honest == "test_mask" and tm):
                    if name_ != "transfer" or transfer_x is not None:
                        atk.append(name_)
                if name_ == "pgd" and restarts > 1:
                    atk.append(("pgd_restarts", lambda m, xb, yb, e, _m=masks: pgd_restarts(m, xb, yb, e, _m)))
            names = [a if isinstance(a, str) else a[0] for a in atk]
            rob = E.robustness(model, x, y, eps_list=eps_list, attacks=atk, pgd_steps=pgd_steps,
                               pgd_alpha=pgd_alpha, restarts=1, test_mask=tm, batch_size=batch_size, seed=seed,
                               eot_samples=eot_samples, surrogate=transfer_x,
                               options={k: v for k, v in options.items() if k in names and k != "transfer"})
            row = f"{name} [test mask]" if tm and test_mask == "auto" else name
            rows[row] = {"model": name, "test_mask": tm, "clean": E.evaluate(model, x, y, batch_size=batch_size,
                                                                               masks=masks),
                         "robustness": rob, "flags": E.sanity_checks(rob)}
    if baseline is not None:
        if baseline not in rows:
            raise ValueError(f"baseline {baseline!r} is not a row; rows are {list(rows)}")
        for row, vs in stats.versus_baseline(rows, baseline, robust_correct).items():
            rows[row]["vs_baseline"] = vs
    return {"rows": rows, "eps": eps_list, "baseline": baseline, "config": cfg}


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
    cfg = s.to_dict()
    data_key = _hash_tensors(x, y)
    transfer_x, sur_key = None, None
    if surrogate is not None:
        sur_key = model_hash(surrogate)
        path = out / "honest_cache" / "transfer.pt"
        key = {"surrogate": sur_key, "data": data_key, "settings": cfg}
        blob = _load_cache(path, key)
        if blob is None:
            log(f"[transfer] crafting PGD-{s.pgd_steps} examples on the surrogate")
            transfer_x = craft_transfer(surrogate, x, y, s.eps_list, steps=s.pgd_steps, alpha=s.pgd_alpha, seed=s.seed,
                                        batch_size=s.batch_size, options=s.attack_opts.get("transfer"))
            _atomic_torch(path, {"key": key, "value": {str(e): v for e, v in transfer_x.items()}})
        else:
            transfer_x = {float(e): v for e, v in blob["value"].items()}
    rows = {}
    row_cfg = s.row_key()
    for name, model in models.items():
        for row, m, tm in variants(name, model, s.mtest):
            path = out / "honest_cache" / f"{_slug(row)}.pt"
            key = {"model": model_hash(m), "test_mask": tm, "data": data_key, "surrogate": sur_key,
                   "settings": row_cfg}
            blob = _load_cache(path, key)
            if blob is not None:
                log(f"[{row}] resumed from {path}")
                rows[row] = blob["value"]
            else:
                log(f"[{row}] attacking {len(y)} images (masks at test time: {'random' if tm else 'model'})")
                one = honest_report({row: m}, x, y, eps_list=s.eps_list, surrogate=transfer_x,
                                    pgd_steps=s.pgd_steps, pgd_alpha=s.pgd_alpha, restarts=s.restarts,
                                    eot_samples=s.eot_samples, test_mask=tm, batch_size=s.batch_size, seed=s.seed,
                                    options={k: v for k, v in s.attack_opts.items() if k != "autoattack"})
                rows[row] = one["rows"][row]
                rows[row]["clean"].pop("correct", None)
                _atomic_torch(path, {"key": key, "value": rows[row]})
            if s.attacks == "autoattack":
                _autoattack_row(rows[row], row, m, tm, x, y, s, {k: key[k] for k in ("model", "test_mask", "data")},
                                out, log)
    rep = {"eps": list(s.eps_list), "baseline": baseline, "settings": cfg, "about": about or {},
           "surrogate": sur_key is not None, "rows": rows}
    if baseline is not None:
        for row, vs in stats.versus_baseline(rows, baseline, robust_correct).items():
            rows[row]["vs_baseline"] = vs
    report.write_honest(rep, out)
    return rep


def _autoattack_row(value, row, model, tm, x, y, s, key, out, log):
    """AutoAttack on one row (honest_autoattack), every (row, eps) piece cached on its own and written
    as soon as it is done; under torchrun the missing pieces are shared out over the ranks."""
    kw = AA.options(s, tm, classes=E.logits(model, x[:1], masks="random" if tm else "model").shape[1])
    paths = [out / "honest_cache" / f"{_slug(row)}.autoattack_{j}.pt" for j in range(len(s.eps_list))]
    keys = [dict(key, eps=e, autoattack=kw, seed=s.seed, batch_size=s.batch_size) for e in s.eps_list]
    pieces = [None if e == 0 else _load_cache(p, k) for e, p, k in zip(s.eps_list, paths, keys)]
    todo = [j for j, e in enumerate(s.eps_list) if e != 0 and pieces[j] is None]
    if len(todo) < sum(e != 0 for e in s.eps_list):
        log(f"[{row}] AutoAttack-{kw['version']}: {sum(e != 0 for e in s.eps_list) - len(todo)} eps resumed")

    def run(i):
        j = todo[i]
        log(f"[{row}] AutoAttack-{kw['version']} at eps {s.eps_list[j]:g}")
        blob = {"key": keys[j], "value": AA.piece(model, x, y, s.eps_list[j], j, kw, seed=s.seed,
                                                   batch_size=s.batch_size)}
        _atomic_torch(paths[j], blob)
        return blob
    for j, blob in zip(todo, distributed.shard_map(run, len(todo))):
        if distributed.enabled():  # the other ranks' pieces (rank 0 wrote its own in run)
            _atomic_torch(paths[j], blob)
        pieces[j] = blob
    AA.merge(value, [None if p is None else p["value"] for p in pieces], s.eps_list, kw)


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


def run_honest(cfg, seeds=3, settings=None, log=print):
    """reproduce_seeds, then the honest evaluation of the first seed's models (surrogate: the next
    seed's baseline, trained here if seeds == 1); by default the preset PRESET_ALIASES[cfg.preset]
    with AutoAttack (attacks="autoattack"). Returns (seeds aggregate, honest report)."""
    from .pipeline import TRAIN_PRESETS, ReproduceConfig, run_reproduce
    from .seeds import reproduce_seeds
    if isinstance(cfg, dict):
        cfg = ReproduceConfig(**cfg)
    if cfg.quiet:
        log = lambda *a, **k: None  # noqa: E731
    agg, per_seed = reproduce_seeds(cfg, seeds, log=log)
    settings = settings or HonestSettings.preset(PRESET_ALIASES[cfg.preset], seed=cfg.seed, attacks="autoattack")
    first = Path(cfg.out) / f"seed_{cfg.seed}"
    models = load_models({r: first / "checkpoints" / f"{r}.pt" for r in cfg.rows})
    sur_dir = Path(cfg.out) / f"seed_{cfg.seed + 1}"
    if seeds == 1:  # the surrogate: a baseline of the next seed, trained for this purpose only
        sur_dir = Path(cfg.out) / f"surrogate_seed_{cfg.seed + 1}"
        log(f"== surrogate: baseline, seed {cfg.seed + 1} ==")
        run_reproduce(dataclasses.replace(cfg, seed=cfg.seed + 1, out=str(sur_dir), rows=("baseline",)), log=log)
    surrogate = M.load(sur_dir / "checkpoints" / "baseline.pt")
    data = D.load(cfg.dataset, cfg.data_dir, n_val=cfg.n_val, split_seed=cfg.seed, download=cfg.download)
    if TRAIN_PRESETS[cfg.preset]["subset"]:
        data = data.take(**TRAIN_PRESETS[cfg.preset]["subset"])
    x, y = D.to_float(data.x_test), data.y_test
    about = {"data": f"{cfg.dataset} test set ({data.source}, sha256 {data.sha256[:12]}), the first "
                     f"{min(settings.n, len(y))} images",
             "models": f"{first}/checkpoints/<row>.pt (seed {cfg.seed})",
             "surrogate": f"{sur_dir}/checkpoints/baseline.pt (baseline, seed {cfg.seed + 1})",
             "seeds": f"Table I statistics over {seeds} seed(s): table.md"}
    rep = evaluate_models(models, x, y, cfg.out, settings=settings, surrogate=surrogate, baseline="baseline",
                          about=about, log=log)
    log(f"wrote {cfg.out}/{', '.join(FILES)}")
    return agg, rep
