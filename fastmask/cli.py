"""Command line: fastmask reproduce | train | attack | evaluate | tune | bench.

    fastmask reproduce [--model mlp|cnn] [--preset smoke|default|full] [--out DIR] ...
    fastmask train --out DIR [--mask-ratio R --mask-scope sample|fixed ...] [--adv-train fgsm|pgd|trades [--adv-steps K]]
    fastmask attack --checkpoint PATH [--eps ...] [--json]
    fastmask evaluate --checkpoint NAME=PATH ... [--model-def [NAME=]pkg.mod:factory --weights FILE ...]
                      [--surrogate PATH] [--preset check|standard|thorough] [--attacks pgd|autoattack]
                      [--attack-opt NAME.KEY=VALUE ...] --out DIR   (honest evaluation)
    fastmask reproduce --honest [--seeds N]   (Table I over seeds + honest evaluation)
    fastmask tune [--ratios 0.1,0.3 --patterns random,fixed --modes pixel,block,blur --variability 0,2]
                  [--attack pgd|apgd|autoattack|... --attack-opt NAME.KEY=VALUE] --out DIR
    fastmask reproduce --rows baseline,tuned --tuned DIR/tuned.json

Two preset families, two sets of names: `reproduce --preset` sizes the training
and the protocol (smoke, default, full: pipeline.TRAIN_PRESETS), `evaluate
--preset` the attacks (check, standard, thorough: honest.ATTACK_PRESETS; the old
names smoke/default/full still work there, with a note).

Errors (bad arguments, missing data or checkpoints) print one line on stderr
and exit with code 2, without a traceback.
"""
import argparse
import json
import signal
import sys
from dataclasses import fields
from pathlib import Path

from . import _checks as C


THREADS_HELP = ("torch threads (default 1: the models are small, and on a busy 2-core machine a "
                "second OpenMP thread mostly spins; results are reproducible per thread count)")


class CliError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would print the usage too)
        raise CliError(f"{self.prog}: {message}")


def _eps_values(text, zero):
    try:
        vals = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--eps {text!r}: expected comma-separated numbers") from None
    if not vals or any(not (0 <= v <= 1 if zero else 0 < v <= 1) for v in vals):
        raise argparse.ArgumentTypeError(f"--eps {text!r}: values must be in {'[0, 1]' if zero else '(0, 1]'}")
    return vals


def eps_list(text):
    """The reproduce / attack sweep: eps in (0, 1]."""
    return _eps_values(text, zero=False)


def honest_eps(text):
    """The honest evaluation's sweep: eps in [0, 1] (eps 0 is the clean accuracy, 1 a sanity check)."""
    return _eps_values(text, zero=True)


def _checked(check, value, text):
    """check("", value) as an argparse type: the error names the text ("'0' must be >= 1")."""
    try:
        return check("", value)
    except (C.BadValue, C.BadType) as e:
        raise argparse.ArgumentTypeError(f"{text!r} {e.must}") from None


def _int(text):
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _float(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    return _checked(C.finite, v, text)


def ratio(text):
    v = _float(text)
    try:
        return C.ratio("", v)
    except C.BadValue:
        raise argparse.ArgumentTypeError(f"{text!r} is outside [0, 1]") from None


def positive_int(text):
    return _checked(C.positive_int, _int(text), text)


def positive_float(text):
    return _checked(C.positive, _float(text), text)


def nonneg_float(text):
    return _checked(C.nonneg, _float(text), text)


def nonneg_int(text):
    return _checked(C.nonneg_int, _int(text), text)


def _list(item):
    """A comma-separated list of `item` values (an argparse type); empty lists are refused by the config."""
    def parse(text):
        return tuple(item(v.strip()) for v in text.split(",") if v.strip())
    return parse


def _choice(choices):
    def parse(text):
        if text not in choices:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(choices)}")
        return text
    return parse


def folder_arg(path):
    """An output folder: absent (it is created) or a folder, never a file."""
    if path.exists() and not path.is_dir():
        raise CliError(f"fastmask: argument --out: {str(path)!r} is a file, not a folder")
    return path


def build_parser():
    from .attacks import ATTACKS as A_NAMES
    from .honest import ATTACK_PRESETS, PRESET_ALIASES
    from .honest_autoattack import SUITES
    from .pipeline import DEFAULT_ROWS, ROW_GROUPS, ROWS, TRAIN_PRESETS
    p = Parser(prog="fastmask", description="Feature masking and gradient manipulation against "
               "adversarial examples (Ingle and Pawale), reproduced on MNIST.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    def common(s):
        s.add_argument("--model", choices=("mlp", "cnn"), default="mlp")
        s.add_argument("--dataset", choices=("mnist", "fashion-mnist"), default="mnist")
        s.add_argument("--data-dir", help="folder with IDX files (or torchvision's MNIST/raw layout)")
        s.add_argument("--download", action="store_true", help="allow the online mirrors (checksummed)")
        s.add_argument("--seed", type=nonneg_int, default=0)
        s.add_argument("--threads", type=positive_int, default=1, help=THREADS_HELP)
        s.add_argument("--quiet", action="store_true")

    r = sub.add_parser("reproduce", help="train and evaluate every row of Table I")
    common(r)
    r.add_argument("--preset", choices=tuple(TRAIN_PRESETS), default="default",
                   help="training and protocol sizes (--honest: attacks sized by evaluate's "
                   + ", ".join(f"{k} -> {v}" for k, v in PRESET_ALIASES.items()) + ")")
    r.add_argument("--out", default="results")
    r.add_argument("--epochs", type=positive_int, help="override the preset's epochs")
    r.add_argument("--eps", type=eps_list, help="comma-separated eps sweep (default 0.05,...,0.3)")
    r.add_argument("--rows", help=f"comma-separated rows (default {','.join(DEFAULT_ROWS)}; "
                   f"available: {', '.join(ROWS)}; groups: "
                   + "; ".join(f"{g} = {', '.join(v)}" for g, v in ROW_GROUPS.items())
                   + "; tuned needs --tuned; the masking menu: docs/masking.md)")
    r.add_argument("--seeds", type=positive_int, help="train and evaluate every row for this many seeds "
                   "(--seed, --seed+1, ...; folders seed_<s>/) and write mean, std, 95%% CIs and paired tests "
                   "(default 1; 3 with --honest)")
    r.add_argument("--honest", action="store_true", help="also the honest robustness evaluation of the first "
                   "seed's models (honest.md/json/png; attacks sized by --preset)")
    r.add_argument("--lr", type=positive_float, help="learning rate of every row (default 1e-3)")
    r.add_argument("--lr-schedule", choices=("constant", "cyclic"), help="every row (default constant)")
    r.add_argument("--batch-size", type=positive_int, help="override the preset's batch size")
    r.add_argument("--adv-eps", type=positive_float, help="eps of the fast-AT rows (default 0.1)")
    r.add_argument("--tuned", metavar="FILE", help="the tuned.json of `fastmask tune`, for the row 'tuned'")
    r.add_argument("--no-fused-optimizer", dest="fused_optimizer", action="store_false", default=None,
                   help="torch's per-op optimizer loop instead of its fused kernel (runs before session 7)")

    t = sub.add_parser("train", help="train one model and write its checkpoint")
    common(t)
    t.add_argument("--out", required=True, help="folder; the checkpoint is DIR/model.pt")
    t.add_argument("--epochs", type=positive_int, default=5)
    t.add_argument("--batch-size", type=positive_int, default=128)
    t.add_argument("--lr", type=positive_float, default=1e-3)
    t.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    t.add_argument("--no-fused-optimizer", dest="fused", action="store_false",
                   help="torch's per-op optimizer loop instead of its fused kernel (runs before session 7)")
    t.add_argument("--mask-ratio", type=ratio, default=0.0)
    t.add_argument("--mask-scope", choices=("sample", "fixed"), default="sample",
                   help="sample: a fresh random mask per image and step; fixed: one mask for all")
    t.add_argument("--mask-mode", choices=("pixel", "blur", "block", "learned"), default="pixel",
                   help="learned: the paper's soft mask M = sigmoid(logits), penalty --mask-l1 * sum |M| "
                   "(--mask-ratio unused)")
    t.add_argument("--mask-l1", type=nonneg_float, default=1e-3, help="lambda of the learned mask's penalty")
    t.add_argument("--mask-redraw-epochs", type=positive_int, metavar="K",
                   help="one mask for every image, redrawn every K epochs (variability between epochs)")
    t.add_argument("--mask-rescale", action="store_true", help="inverted dropout: kept pixels times 1/(1-ratio)")
    t.add_argument("--max-norm", type=positive_float, help="clip gradients to this global norm")
    t.add_argument("--noise-std", type=nonneg_float, default=0.0, help="Gaussian noise added to the gradients")
    t.add_argument("--adv-train", choices=("fgsm", "pgd", "trades", "mart"),
                   help="adversarial training: fgsm (fast AT, one step), pgd (--adv-steps steps) or trades "
                   "(Zhang et al. 2019: CE + beta KL, --adv-steps steps maximising the KL) or mart (Wang et al. "
                   "2020)")
    t.add_argument("--adv-eps", type=positive_float, default=0.1)
    t.add_argument("--adv-alpha", type=positive_float,
                   help="step of adversarial training (default 1.25 eps for fgsm, 2.5 eps / steps for pgd)")
    t.add_argument("--adv-steps", type=positive_int, default=1,
                   help="steps per example with --adv-train pgd or trades")
    t.add_argument("--trades-beta", type=nonneg_float, default=6.0, help="weight of the KL term of trades and mart")
    t.add_argument("--adv-val", type=nonneg_int, default=0, metavar="N",
                   help="after each epoch PGD accuracy on the first N validation images; keep the best epoch")
    t.add_argument("--adv-val-steps", type=positive_int, default=10, help="steps of the --adv-val PGD check")
    t.add_argument("--adv-check", action="store_true", help="early stop when the PGD accuracy of a training "
                   "batch collapses (catastrophic overfitting); keeps the best epoch")
    t.add_argument("--lr-schedule", choices=("constant", "cyclic"), default="constant",
                   help="cyclic: per step 0 -> lr at 2/5 of the epochs -> 0 (Wong et al. 2020)")
    t.add_argument("--save-epochs", action="store_true",
                   help="also write DIR/epochs/epoch_K.pt after every epoch (a CPU-time curve)")
    t.add_argument("--train-subset", type=positive_int, help="use only the first N training images")

    e = sub.add_parser("evaluate", help="honest robustness evaluation of checkpoints (every attack, checks, tests)")
    e.add_argument("--checkpoint", action="append", metavar="NAME=PATH", help="a model (repeatable)")
    e.add_argument("--from", dest="from_dir", metavar="DIR", help="every DIR/checkpoints/*.pt (a reproduce folder)")
    e.add_argument("--model-def", action="append", metavar="[NAME=]PKG.MOD:FACTORY", help="any model: FACTORY() "
                   "from the Python path returns a torch.nn.Module, N x C x H x W in [0, 1] -> logits (repeatable, "
                   "each with one --weights)")
    e.add_argument("--weights", action="append", metavar="FILE", help="the state dict of a --model-def "
                   "(torch.load weights_only=True)")
    e.add_argument("--dataset", choices=("mnist", "fashion-mnist"), help="test set (default: the first "
                   "checkpoint's, else mnist)")
    e.add_argument("--attacks", choices=SUITES, default="pgd", help="pgd: FGSM, PGD, PGD with restarts, "
                   "transfer, EOT-PGD, frozen-mask PGD; autoattack: also AutoAttack (standard; rand on rows "
                   "masked at test time; sizes: the preset, then --attack-opt autoattack.KEY=V)")
    e.add_argument("--surrogate", help="checkpoint of a separately trained model for the transfer attack")
    e.add_argument("--baseline", help="the row the others are tested against (default: 'baseline' if given)")
    e.add_argument("--out", required=True, help="folder for honest.md, honest.json, honest_accuracy_vs_eps.png")
    e.add_argument("--preset", choices=tuple(ATTACK_PRESETS) + tuple(PRESET_ALIASES), default="standard",
                   help="attack sizes: check n=40 PGD-5; standard n=500 PGD-40 x5 restarts, EOT 10 draws; "
                   "thorough n=1000 PGD-50 x10 restarts, EOT 20 draws (old names: "
                   + ", ".join(f"{k} = {v}" for k, v in PRESET_ALIASES.items()) + ")")
    e.add_argument("--n", "--n-test", dest="n", type=positive_int, help="first N test images")
    e.add_argument("--eps", type=honest_eps, help="comma-separated eps in [0, 1] (default 0,0.05,...,0.3,1)")
    e.add_argument("--pgd-steps", type=positive_int)
    e.add_argument("--pgd-alpha", type=positive_float, help="PGD step (default 2.5 eps / steps)")
    e.add_argument("--restarts", type=positive_int)
    e.add_argument("--eot-samples", type=positive_int)
    e.add_argument("--attack-opt", action="append", metavar="NAME.KEY=VALUE", default=[],
                   help="any setting of one attack, on top of the preset (repeatable), e.g. pgd.steps=100, "
                   "eot.samples=50, pgd.alpha=0.01; the attacks and their settings: docs/evaluation.md")
    e.add_argument("--no-mtest", action="store_true", help="skip the '[M_test]' rows of masked models")
    e.add_argument("--seed", type=nonneg_int, default=0, help="attack random starts")
    e.add_argument("--data-dir")
    e.add_argument("--threads", type=positive_int, default=1, help=THREADS_HELP)
    e.add_argument("--quiet", action="store_true")

    u = sub.add_parser("tune", help="choose the mask on the validation split (the paper's eq. 20)")
    common(u)
    u.add_argument("--out", default="tune", help="folder: tune.md, tune.json, tuned.json, points/")
    u.add_argument("--preset", choices=tuple(TRAIN_PRESETS), default="default", help="training sizes (as reproduce)")
    u.add_argument("--ratios", type=_list(ratio), default=(0.1, 0.3, 0.5), help="comma-separated, in [0, 1]")
    u.add_argument("--patterns", type=_list(_choice(("random", "fixed"))), default=("random", "fixed"))
    u.add_argument("--modes", type=_list(_choice(("pixel", "block", "blur"))), default=("pixel",))
    u.add_argument("--variability", type=_list(nonneg_int), default=(0,),
                   help="comma-separated k: 0 = a fresh mask per image and step, k >= 1 = one mask redrawn "
                   "every k epochs (default 0)")
    u.add_argument("--eps", type=positive_float, default=0.1, help="eps of the validation attack (default 0.1)")
    u.add_argument("--n-robust", type=positive_int, default=500,
                   help="validation images under the attack (default 500)")
    u.add_argument("--attack", choices=A_NAMES, default="pgd",
                   help="the attack of the robust accuracy (default pgd: PGD-10; the attacks: docs/evaluation.md)")
    u.add_argument("--attack-opt", action="append", metavar="NAME.KEY=VALUE", default=[],
                   help="a setting of the --attack attack (repeatable), e.g. apgd.steps=20")
    u.add_argument("--pgd-steps", type=positive_int, help="--attack-opt pgd.steps=N (default 10)")

    a = sub.add_parser("attack", help="evaluate a checkpoint under FGSM and PGD")
    a.add_argument("--checkpoint", required=True)
    a.add_argument("--eps", type=eps_list, default=(0.05, 0.1, 0.15, 0.2, 0.25, 0.3))
    a.add_argument("--pgd-steps", type=positive_int, default=40)
    a.add_argument("--pgd-alpha", type=positive_float, help="PGD step (default 2.5 eps / steps)")
    a.add_argument("--n", "--n-test", dest="n", type=positive_int, default=1000,
                   help="first N test images (default 1000); under torchrun write --n-test (torchrun's own "
                   "parser takes --n for an abbreviation of its --nnodes/--nproc-per-node)")
    a.add_argument("--test-mask", action="store_true", help="use the consistent test mask M_test")
    a.add_argument("--data-dir")
    a.add_argument("--json", action="store_true", help="print the result as JSON")
    a.add_argument("--threads", type=positive_int, default=1, help=THREADS_HELP)
    # `fastmask bench ARGS...` hands ARGS to `python -m benchmarks` untouched (see main)
    sub.add_parser("bench", help="the benchmarks: python -m benchmarks ARGS (needs a source checkout)", add_help=False)
    return p


def cmd_bench(args):
    """`python -m benchmarks` from the source checkout this package runs from (benchmarks/ is not installed)."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    if not (root / "benchmarks" / "harness.py").is_file():
        raise CliError(f"fastmask: error: fastmask bench needs a source checkout: no benchmarks/ next to {root / 'fastmask'}")
    sys.path.insert(0, str(root))
    import benchmarks
    benchmarks.main(args.bench_args)


def cmd_reproduce(args):
    from .pipeline import ReproduceConfig, run_reproduce
    folder_arg(Path(args.out))
    kw = {f.name: getattr(args, f.name) for f in fields(ReproduceConfig)
          if f.name in vars(args) and getattr(args, f.name) is not None}
    if args.eps:
        kw["eps_list"] = args.eps
    if args.rows:
        kw["rows"] = tuple(r.strip() for r in args.rows.split(",") if r.strip())
    kw.pop("eps", None)
    kw["progress"] = sys.stderr.isatty() and not args.quiet
    seeds = args.seeds or (3 if args.honest else 1)
    if seeds == 1 and not args.honest:
        run_reproduce(ReproduceConfig(**kw))
        return
    if args.honest:
        from .honest import run_honest
        run_honest(ReproduceConfig(**kw), seeds=seeds)
    else:
        from .seeds import reproduce_seeds
        reproduce_seeds(ReproduceConfig(**kw), seeds=seeds)


def cmd_tune(args):
    from . import attacks as A
    from .tune import TuneConfig, run_tune
    folder_arg(Path(args.out))
    variability = tuple(None if k == 0 else k for k in args.variability)
    if len(set(variability)) < len(variability):
        raise CliError(f"fastmask tune: argument --variability: {list(args.variability)} repeats a value")
    opts = A.parse_options(args.attack_opt)
    if args.pgd_steps is not None:
        opts.setdefault("pgd", {})["steps"] = args.pgd_steps
    other = sorted(set(opts) - {args.attack})
    if other:
        raise CliError(f"fastmask tune: argument --attack-opt: sets attack {other[0]!r}, but --attack is "
                       f"{args.attack!r}")
    run_tune(TuneConfig(out=args.out, model=args.model, dataset=args.dataset, preset=args.preset, seed=args.seed,
                        data_dir=args.data_dir, ratios=args.ratios, patterns=args.patterns, modes=args.modes,
                        variability=variability, eps=args.eps, n_robust=args.n_robust, attack=args.attack,
                        attack_opts=opts.get(args.attack), threads=args.threads, quiet=args.quiet))


def cmd_evaluate(args):
    import torch
    from .honest import PRESET_ALIASES
    if args.out:
        folder_arg(Path(args.out))
    if args.preset in PRESET_ALIASES:
        print(f"fastmask evaluate: note: --preset {args.preset} is now --preset {PRESET_ALIASES[args.preset]} "
              f"(attack sizes; smoke/default/full name the training presets of reproduce)", file=sys.stderr)
        args.preset = PRESET_ALIASES[args.preset]
    if args.threads:
        torch.set_num_threads(args.threads)
    evaluate_command(args, log=(lambda *a: None) if args.quiet else print)


def evaluate_command(args, log=print):
    """`fastmask evaluate`: the honest evaluation of checkpoints; files under args.out."""
    from . import attacks as A, data as D, models as M
    from .honest import FILES, HonestSettings, evaluate_models
    from .usermodel import check_logits, command_models
    settings = HonestSettings.preset(args.preset, n=args.n, eps_list=args.eps, pgd_steps=args.pgd_steps,
                                     pgd_alpha=args.pgd_alpha, restarts=args.restarts,
                                     eot_samples=args.eot_samples, seed=args.seed, attacks=args.attacks,
                                     attack_opts=A.parse_options(getattr(args, "attack_opt", None)) or None)
    specs, defs, models = command_models(args.checkpoint, args.from_dir, args.model_def, args.weights)
    baseline = args.baseline if args.baseline else ("baseline" if "baseline" in models else None)
    if baseline is not None and baseline not in models:
        raise ValueError(f"--baseline {baseline!r} is not one of the models {list(models)}")
    settings.mtest = not args.no_mtest
    surrogate = M.load(args.surrogate) if args.surrogate else None
    cfg = (M.read_checkpoint(next(iter(specs.values()))).get("config") or {}) if specs else {}
    dataset = args.dataset or cfg.get("dataset", "mnist")
    data = D.load(dataset, args.data_dir)
    x, y = D.to_float(data.x_test), data.y_test
    for spec, model in defs.items():
        check_logits(model, x, int(y.max()) + 1, f"--model-def {spec!r}")
    about = {"data": f"{dataset} test set ({data.source}, sha256 {data.sha256[:12]}), "
                     f"the first {min(settings.n, len(y))} images",
             "models": ", ".join([f"{k}={v}" for k, v in specs.items()] + [
                 f"{s} with --weights {w}" for s, w in zip(args.model_def or (), args.weights or ())]),
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


def cmd_train(args):
    folder_arg(Path(args.out))
    import torch
    from . import data as D, models as M
    from . import distributed
    from .train import TrainConfig, train
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.adv_check and not args.adv_train:
        raise CliError("fastmask train: argument --adv-check: needs --adv-train")
    if args.adv_steps != 1 and args.adv_train not in ("pgd", "trades", "mart"):
        raise CliError(f"fastmask train: argument --adv-steps: {args.adv_steps} needs --adv-train pgd, "
                       "trades or mart")
    if args.adv_val and not args.adv_train:
        raise CliError(f"fastmask train: argument --adv-val: {args.adv_val} needs --adv-train")
    grad = {k: v for k, v in (("max_norm", args.max_norm), ("noise_std", args.noise_std)) if v}
    tcfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                       fused=args.fused, seed=args.seed, grad=grad, adv_train=args.adv_train,
                       adv_eps=args.adv_eps, adv_alpha=args.adv_alpha, adv_steps=args.adv_steps,
                       adv_check=args.adv_check, lr_schedule=args.lr_schedule, trades_beta=args.trades_beta,
                       adv_val=args.adv_val, adv_val_steps=args.adv_val_steps)
    data = D.load(args.dataset, args.data_dir, split_seed=args.seed, download=args.download)
    if args.train_subset:
        data = data.take(train=args.train_subset)
    if args.mask_mode == "learned":
        mask = M.learned_mask_config(args.mask_l1)
    elif args.mask_ratio > 0:
        redraw = None if args.mask_redraw_epochs is None else \
            args.mask_redraw_epochs * -(-len(data.y_train) // args.batch_size)
        mask = M.mask_config(args.mask_ratio, args.mask_mode, args.mask_scope, args.seed, redraw_steps=redraw,
                             rescale=args.mask_rescale)
    else:
        mask = None
    model = M.build(args.model, mask, seed=args.seed).to(distributed.device())  # cpu unless torchrun + GPUs
    say = (lambda *a: None) if args.quiet else print
    say(f"training {args.model} on {args.dataset} {data.sizes()} (mask {mask}, grad {grad or None}, "
        f"adv {args.adv_train})")
    config = {"model": args.model, "dataset": args.dataset, "mask": mask, "train": tcfg.to_dict(),
              "subset": data.subset, "split_seed": data.split_seed}
    snapshot = None
    if args.save_epochs and distributed.is_main():
        def snapshot(epoch, net, history):  # each epoch's weights, before any early-stopping restore
            cpu = sum(r["cpu_time"] for r in history)
            M.save(Path(args.out) / "epochs" / f"epoch_{epoch:03d}.pt", net, config, data.sha256,
                   extra={"history": list(history), "train_cpu_time": cpu, "epoch": epoch})
    info = train(model, data, tcfg, progress=sys.stderr.isatty() and not args.quiet, log=say,
                 on_epoch=snapshot)
    path = Path(args.out) / "model.pt"
    if distributed.is_main():  # under torchrun, rank 0 writes
        M.save(path, model, config, data.sha256, extra=info)
    say(f"val acc {info['history'][-1]['val_acc']:.4f}; wrote {path}")


def cmd_attack(args):
    import torch
    from . import data as D, models as M
    from .evaluate import evaluate, robustness
    if args.threads:
        torch.set_num_threads(args.threads)
    model, blob = M.load(args.checkpoint, with_meta=True)
    if args.test_mask:
        model = M.with_eval_mask(model, "consistent").eval()
    cfg = blob.get("config") or {}
    data = D.load(cfg.get("dataset", "mnist"), args.data_dir)
    if data.sha256 != blob.get("data_hash"):
        print(f"warning: the data hash differs from the checkpoint's ({data.source})", file=sys.stderr)
    n = min(args.n, len(data.y_test))
    x, y = D.to_float(data.x_test[:n]), data.y_test[:n]
    clean = evaluate(model, x, y)
    rob = robustness(model, x, y, eps_list=args.eps, pgd_steps=args.pgd_steps, pgd_alpha=args.pgd_alpha)
    out = {"checkpoint": str(args.checkpoint), "n": n, "test_mask": args.test_mask,
           "clean_accuracy": clean["accuracy"], "eps": list(args.eps), "fgsm": rob["accuracy"]["fgsm"],
           "pgd": rob["accuracy"]["pgd"], "pgd_steps": args.pgd_steps, "pgd_alpha": args.pgd_alpha}
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(f"{args.checkpoint}: clean accuracy {clean['accuracy']:.4f} on the first {n} test images")
    print("eps   " + " ".join(f"{e:>6g}" for e in args.eps))
    for k in ("fgsm", "pgd"):
        print(f"{k:5s} " + " ".join(f"{a:6.3f}" for a in out[k]))


def one_line(e):
    return "; ".join(l.strip() for l in str(e).splitlines() if l.strip()) or type(e).__name__


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so that the run stops as cleanly as on Ctrl-C."""


# Each signal is also remembered: library code can swallow the exception (a SIGTERM that
# landed in torch's lazy import of sympy/mpmath was caught there and the run went on to
# exit 0), so main() re-raises at the end of a command that saw one.
_stop = {"signal": None}


def _on_sigterm(signum, frame):
    _stop["signal"] = signal.SIGTERM
    raise Terminated()


def _on_sigint(signum, frame):
    _stop["signal"] = signal.SIGINT
    raise KeyboardInterrupt()


def stop_requested():
    """Raise the pending SIGTERM / SIGINT again if one arrived (long loops call this at safe points)."""
    if _stop["signal"] == signal.SIGTERM:
        raise Terminated()
    if _stop["signal"] == signal.SIGINT:
        raise KeyboardInterrupt()


def main(argv=None):
    """Entry point; returns the exit code. FASTMASK_DEBUG=1 re-raises errors with their traceback.
    SIGINT/SIGTERM: one line on stderr, exit 130/143; every file written so far is whole
    (atomic writes), and rerunning the same command resumes from the last checkpoint."""
    import os
    from . import distributed
    from .data import DataError
    from .models import CheckpointError
    _stop["signal"] = None
    old_term = signal.signal(signal.SIGTERM, _on_sigterm)
    old_int = signal.getsignal(signal.SIGINT)
    if old_int is signal.default_int_handler:  # left alone where SIGINT is ignored (a background job)
        signal.signal(signal.SIGINT, _on_sigint)
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        if argv[:1] == ["bench"]:
            args = argparse.Namespace(command="bench", bench_args=argv[1:])
        else:
            args = build_parser().parse_args(argv)
        with distributed.launched():  # under torchrun: join the group, rank 0 prints; else nothing
            {"reproduce": cmd_reproduce, "train": cmd_train, "attack": cmd_attack,
             "evaluate": cmd_evaluate, "tune": cmd_tune, "bench": cmd_bench}[args.command](args)
            stop_requested()  # a signal some library swallowed: still stop with its exit code
    except CliError as e:
        print(one_line(e), file=sys.stderr)
        return 2
    except (DataError, CheckpointError, ValueError, OSError) as e:
        if os.environ.get("FASTMASK_DEBUG"):
            raise
        print(f"fastmask: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        print(f"fastmask: {what}; files written so far are complete, rerun the same command to resume",
              file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        signal.signal(signal.SIGTERM, old_term)
        if old_int is signal.default_int_handler:
            signal.signal(signal.SIGINT, old_int)
        _stop["signal"] = None  # handled here: later in-process calls (the Python API) start clean
    return 0


if __name__ == "__main__":
    sys.exit(main())
