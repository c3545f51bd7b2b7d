"""White-box and transfer attacks built on the fused ops (fastmask.ops).

Every attack has the form attack(model, x, y, eps, *, ...) -> x_adv, everything
after eps keyword-only: x is N x ... in [lo, hi] (default [0, 1]), y the N labels
(the targets when targeted=True).
x_adv has x's shape, dtype and device; batches of `batch_size` run on the
model's device. The model is left exactly as it was: training flags,
parameters' requires_grad and the buffers (RNG offsets) of its FeatureMask
modules are restored. Input gradients come from torch.autograd.grad with the
parameters frozen, so no parameter .grad is touched; plain Linear/Conv2d/ReLU/
MaxPool2d chains (the paper's models without a mask) take fastmask.inputgrad
instead: the same ATen backward kernels without a graph, in cache-sized
micro-batches on CPU, bit for bit the same gradient.

The step rule, one for every iterative attack: alpha=None is 2.5 * eps / steps
(Madry et al.: the steps can cross the ball and come back), see default_alpha.

The registry (REGISTRY, one Attack entry per attack: name, function, settings
with defaults and checks) is what make_attack, evaluate.robustness, the honest
evaluation and `fastmask evaluate --attack-opt NAME.KEY=VALUE` read; a new
attack is one function, one register(Attack(...)) and one test (DEVELOPERS.md).

The loss is summed over the batch (per-sample gradients do not depend on the
batch): the cross-entropy by default, or loss="cw" / "dlr" (fastmask.losses).
Targeted attacks descend the loss to the target labels instead.

masks= says what the FeatureMask modules do while the attack runs:
  "model"  - what the model does in eval mode (no mask, or its consistent mask)
  "random" - a fresh mask draw at every forward (the FeatureMask modules run in
             training mode, advancing their offsets); the randomized defence
  "frozen" - one draw, reused by every forward of the attack
Nested model_state() blocks restore the offsets only at the outermost exit, so
inside one evaluation (fastmask.evaluate) no mask draw is ever reused.
"""
import contextlib
import dataclasses
import functools
import importlib
import inspect
import weakref

import torch
import torch.nn.functional as F

from . import _checks as C
from . import inputgrad, losses, ops

__all__ = ["fgsm", "pgd", "eot_pgd", "pgd_frozen_mask", "transfer", "make_attack", "default_alpha",
           "model_state", "feature_masks", "input_grad", "check_inputs", "MASK_STATES", "ATTACKS",
           "Setting", "Attack", "REGISTRY", "register", "get", "parse_options"]

MASK_STATES = ("model", "random", "frozen")
PGD_LOSSES = ("ce", "cw", "dlr")
_depth = weakref.WeakKeyDictionary()  # model -> nesting depth of model_state


def feature_masks(model, modules=None):
    """The fastmask.nn.FeatureMask modules inside `model` (in module order)."""
    try:
        from .nn import FeatureMask
    except ImportError:  # nn not built yet / stripped-down install
        return []
    return [m for m in (model.modules() if modules is None else modules) if isinstance(m, FeatureMask)]


def _mask_buffers(fms):
    return [b for m in fms for b in m.buffers(recurse=False)]


@contextlib.contextmanager
def model_state(model, masks="model"):
    """Everything in eval mode, parameters frozen, FeatureMask modules per `masks`; all restored on exit."""
    if masks not in MASK_STATES:
        raise ValueError(f"masks must be one of {MASK_STATES}, got {masks!r}")
    mods = list(model.modules())
    fms = feature_masks(model, mods)
    flags = [(m, m.training) for m in mods]
    frozen = [p for p in model.parameters() if p.requires_grad]
    outer = _depth.get(model, 0) == 0
    saved = [b.clone() for b in _mask_buffers(fms)] if outer else None
    hooks = []
    _depth[model] = _depth.get(model, 0) + 1
    try:
        if any(t for _, t in flags):
            model.eval()
        for p in frozen:
            p.requires_grad_(False)
        if masks != "model":
            for m in fms:
                m.train()
        if masks == "frozen":  # every forward starts from the same offsets: the same draw
            snap = {m: [b.clone() for b in m.buffers(recurse=False)] for m in fms}

            def rewind(m, args):
                for b, s in zip(m.buffers(recurse=False), snap[m]):
                    b.copy_(s)
            hooks = [m.register_forward_pre_hook(rewind) for m in fms]
        yield model
    finally:
        for h in hooks:
            h.remove()
        _depth[model] -= 1
        if outer:
            del _depth[model]
            for b, s in zip(_mask_buffers(fms), saved):
                b.copy_(s)
        for m, t in flags:
            if m.training != t:
                m.training = t
        for p in frozen:
            p.requires_grad_(True)


def _loss_value_grad(model, x, y, loss, target=None):
    """(d(sum L)/dx, L (N,), logits) for the per-sample loss L = losses.value(loss, logits, y, target);
    zeros where the output does not depend on x. Graph-free for plain layer chains."""
    def fn(z, rows):
        return losses.value_and_grad(loss, z, y[rows], None if target is None else target[rows])
    layers = inputgrad.plan(model)
    if layers is not None:
        r = inputgrad.value_grad(model, layers, x, fn)
        if r is not None:
            return r
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        z = model(x)
    out, gz = fn(z.detach(), slice(None))
    g = torch.autograd.grad(z, x, gz, allow_unused=True)[0] if z.requires_grad else None
    return (torch.zeros_like(x) if g is None else g), out, z.detach()


def _logits(model, x):
    """model(x) without autograd, through fastmask.inputgrad's forward where the model has a plan
    (the layout its gradients use); for attacks that only query the model."""
    layers = inputgrad.plan(model)
    if layers is not None:
        z = inputgrad.logits(model, layers, x)
        if z is not None:
            return z
    with torch.no_grad():
        return model(x)


def _loss_grad(model, x, y, targeted, loss="ce"):
    """d(sum L)/dx (minus it when targeted); zeros where the output does not depend on x.
    Plain layer chains skip autograd (fastmask.inputgrad: autograd's kernels, its bits; on CPU
    those of the channels-last model)."""
    if loss != "ce":
        g = _loss_value_grad(model, x, y, loss)[0]
        return -g if targeted else g
    layers = inputgrad.plan(model)
    if layers is not None:
        g = inputgrad.loss_grad(model, layers, x, y, targeted)
        if g is not None:
            return g
    x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(model(x), y, reduction="sum")
    if not loss.requires_grad:
        return torch.zeros_like(x)
    (g,) = torch.autograd.grad(-loss if targeted else loss, x, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


def check_inputs(x, y, batch_size=None):
    """The checks every attack and evaluation runs on (x, y, batch_size)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.dtype != torch.long:
        raise TypeError(f"y must be a 1-D int64 tensor of labels, got {getattr(y, 'dtype', type(y).__name__)} "
                        f"with shape {tuple(getattr(y, 'shape', ()))}")
    if x.dim() < 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same number of samples, got x {tuple(x.shape)} and y {tuple(y.shape)}")
    if batch_size is not None:
        C.positive_int("batch_size", batch_size)


def device_of(model, x):
    """The device the attack runs on: the model's (x's for a model without parameters)."""
    p = next(model.parameters(), None)
    return x.device if p is None else p.device


def _batched(model, x, y, batch_size, fn):
    """fn(xb, yb, k) -> adversarial batch, over batches k of x on the model's device; result on x's device."""
    dev, n = device_of(model, x), x.shape[0]
    bs = n if batch_size is None else batch_size
    if n <= bs:
        return fn(x.to(dev).contiguous(), y.to(dev), 0).to(x.device)
    out = torch.empty_like(x)
    for k, i in enumerate(range(0, n, bs)):
        out[i:i + bs] = fn(x[i:i + bs].to(dev).contiguous(), y[i:i + bs].to(dev), k)
    return out


def input_grad(model, x, y, *, targeted=False, masks="model", batch_size=None):
    """The attack's input gradient d(sum CE)/dx, batched, model left unchanged."""
    check_inputs(x, y, batch_size)
    with model_state(model, masks):
        return _batched(model, x, y, batch_size, lambda xb, yb, k: _loss_grad(model, xb, yb, targeted))


def default_alpha(eps, steps):
    """The step of every iterative attack when alpha is None: 2.5 * eps / steps (Madry et al.,
    so that the steps can cross the ball); eps = 0: 1.0 (any step leaves x unchanged)."""
    return 2.5 * eps / steps if eps > 0 else 1.0


def fgsm(model, x, y, eps, *, targeted=False, lo=0.0, hi=1.0, masks="model", batch_size=None):
    """Fast gradient sign method: clamp(x + eps * sign(grad), lo, hi) (one fused op)."""
    check_inputs(x, y, batch_size)

    def one(xb, yb, k):
        return ops.fgsm(xb, _loss_grad(model, xb, yb, targeted), eps, lo, hi)
    with model_state(model, masks):
        return _batched(model, x, y, batch_size, one)


def _pgd_run(model, x_nat, y, eps, alpha, steps, rand, seed, offset, norm, targeted, lo, hi, samples, loss):
    if rand:
        x_adv = ops.random_start(x_nat, eps, seed=seed, offset=offset, norm=norm, lo=lo, hi=hi)
    else:
        x_adv = x_nat.clone()
    for _ in range(steps):
        g = _loss_grad(model, x_adv, y, targeted, loss)
        for _ in range(samples - 1):  # EOT: sum (= k x mean) of the gradients over fresh draws
            g += _loss_grad(model, x_adv, y, targeted, loss)
        ops.pgd_step_(x_adv, x_nat, g, alpha, eps, lo, hi, norm)
    return x_adv


def _pgd(model, x, y, eps, alpha, steps, random_start, seed, restarts, norm, targeted, lo, hi,
         masks, batch_size, samples, loss="ce"):
    check_inputs(x, y, batch_size)
    norm = C.norm("norm", norm)
    losses.check(loss, choices=PGD_LOSSES)
    C.positive_int("steps", steps)
    C.positive_int("restarts", restarts)
    C.positive_int("samples", samples)
    if restarts > 1 and not random_start:
        raise ValueError(f"restarts={restarts} needs random_start=True (restarts from x itself are identical)")
    if alpha is None:
        alpha = default_alpha(eps, steps)

    def one(xb, yb, k):
        best = best_broken = best_loss = None
        for r in range(restarts):
            adv = _pgd_run(model, xb, yb, eps, alpha, steps, random_start, seed, (r << 32) + k,
                           norm, targeted, lo, hi, samples, loss)
            if restarts == 1:
                return adv
            with torch.no_grad():  # keep the per-sample worst case: broken first, then highest loss
                logits = model(adv)
                value = losses.value(loss, logits, yb)
                broken = (logits.argmax(1) == yb) if targeted else (logits.argmax(1) != yb)
                value = -value if targeted else value
            if best is None:
                best, best_broken, best_loss = adv, broken, value
                continue
            better = (broken & ~best_broken) | ((broken == best_broken) & (value > best_loss))
            best[better] = adv[better]
            best_broken |= broken
            best_loss = torch.where(better, value, best_loss)
        return best
    with model_state(model, masks):
        return _batched(model, x, y, batch_size, one)


def pgd(model, x, y, eps, *, steps=40, alpha=None, random_start=True, seed=0, restarts=1, norm="inf",
        targeted=False, lo=0.0, hi=1.0, masks="model", batch_size=None, loss="ce"):
    """Projected gradient descent (Madry et al.), L-inf or L2, in place with ops.pgd_step_.

    alpha: the step; None is default_alpha(eps, steps) = 2.5 * eps / steps.
    loss: "ce" (cross-entropy), "cw" (margin max_{i!=y} z_i - z_y) or "dlr" (fastmask.losses).
    random_start: start from ops.random_start (uniform in the L-inf ball, uniform in
    the L2 ball) with Philox (seed, offset = restart << 32 | batch index).
    restarts > 1: per sample, keep the restart that breaks it (or, if none does,
    the one with the highest loss), so a sample counts as broken if any restart breaks it.
    """
    return _pgd(model, x, y, eps, alpha, steps, random_start, seed, restarts, norm, targeted,
                lo, hi, masks, batch_size, 1, loss)


def eot_pgd(model, x, y, eps, *, steps=40, alpha=None, samples=20, seed=0, random_start=True, restarts=1,
            norm="inf", targeted=False, lo=0.0, hi=1.0, masks="random", batch_size=None, loss="ce"):
    """PGD with Expectation over Transformation: each step follows the gradient
    averaged over `samples` fresh mask draws (masks="random": FeatureMask modules
    draw at every forward; their offsets are restored afterwards). loss: as for pgd."""
    return _pgd(model, x, y, eps, alpha, steps, random_start, seed, restarts, norm, targeted,
                lo, hi, masks, batch_size, samples, loss)


def pgd_frozen_mask(model, x, y, eps, *, steps=40, alpha=None, random_start=True, seed=0, restarts=1,
                    norm="inf", targeted=False, lo=0.0, hi=1.0, batch_size=None):
    """PGD against one frozen mask draw (every forward of the attack sees the same masks)."""
    return _pgd(model, x, y, eps, alpha, steps, random_start, seed, restarts, norm, targeted,
                lo, hi, "frozen", batch_size, 1)


def transfer(surrogate, model, x, y, attack):
    """Black-box transfer: x_adv = attack(surrogate, x, y), crafted without `model`'s gradients.

    attack is any attack(model, x, y) -> x_adv, e.g. make_attack("pgd", 0.1). (A combinator,
    not an attack; the registry's "transfer" entry is the attack built on it.)
    """
    if surrogate is model:
        raise ValueError("transfer needs a surrogate other than the attacked model")
    if not callable(attack):
        raise TypeError(f"attack must be callable as attack(model, x, y), got {attack!r}")
    return attack(surrogate, x, y)


def transfer_pgd(model, x, y, eps, *, surrogate, steps=40, alpha=None, random_start=True, seed=0, restarts=1,
                 lo=0.0, hi=1.0, batch_size=None):
    """PGD crafted on `surrogate` (a separately trained model), scored on `model`."""
    return transfer(surrogate, model, x, y, functools.partial(
        pgd, eps=eps, steps=steps, alpha=alpha, random_start=random_start, seed=seed, restarts=restarts,
        lo=lo, hi=hi, batch_size=batch_size))


# ---------------------------------------------------------------- the registry
def _alpha(name, v):
    return None if v is None else C.positive(name, v)


def _bool(name, v):
    if not isinstance(v, bool):
        raise C.BadValue(name, v, "must be True or False")
    return v


def _parse_bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not true or false")


def _parse_alpha(text):
    return None if text.lower() in ("none", "auto") else float(text)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting of an attack: its default, check(name, value) -> value (fastmask._checks),
    and parse(text) -> value for the command line."""
    default: object
    check: object
    parse: object = int
    help: str = ""


STEPS = Setting(40, C.positive_int, int, "iterations")
ALPHA = Setting(None, _alpha, _parse_alpha, "step; none: 2.5 eps / steps")
RESTARTS = Setting(1, C.positive_int, int, "random restarts (per sample, the worst case counts)")
RANDOM_START = Setting(True, _bool, _parse_bool, "start from a uniform point of the eps-ball")
SAMPLES = Setting(20, C.positive_int, int, "EOT: mask draws averaged per step")
PGD_SETTINGS = {"steps": STEPS, "alpha": ALPHA, "restarts": RESTARTS, "random_start": RANDOM_START}


@dataclasses.dataclass(frozen=True)
class Attack:
    """One registry entry.

    name: what make_attack, robustness(attacks=...) and --attack-opt NAME.KEY=V call it.
    fn: attack(model, x, y, eps, *, <settings>, <context>) -> x_adv, or "module:function"
        (imported on first use, so an entry may point into a module that imports this one).
    settings: {key: Setting}: what a user may set; fn takes each as a keyword.
    fixed: keywords the entry always passes (pgd_l2: norm="2").
    kind: "single_step" | "iterative" (white-box, gradient) | "black_box" | "transfer";
        evaluate.sanity_checks reads it (white-box attacks must beat transfer, iterative ones FGSM).
    norm: the threat model, "inf" or "2" (the checks compare attacks of one norm only).
    random_masks: the attack needs fresh mask draws (EOT): the caller's masks="model" becomes "random".
    needs: context keywords the caller must give (transfer: surrogate).
    honest: when the honest evaluation (honest.honest_report, `fastmask evaluate`) runs it:
        "always", "test_mask" (rows masked at test time only: a randomized defence) or None (never);
        in registry order (an entry's place changes the random mask draws of the rows after it).
    The context (seed, masks, batch_size, lo, hi, surrogate) is passed to fn when its signature takes it.
    """
    name: str
    fn: object
    settings: dict = dataclasses.field(default_factory=dict)
    fixed: dict = dataclasses.field(default_factory=dict)
    kind: str = "iterative"
    norm: str = "inf"
    random_masks: bool = False
    needs: tuple = ()
    honest: str = "always"
    help: str = ""

    def function(self):
        fn = self.fn
        if isinstance(fn, str):
            mod, _, attr = fn.partition(":")
            fn = getattr(importlib.import_module(mod, __package__), attr)
        return fn

    def options(self, given=None):
        """The settings: defaults, overridden by `given` (checked; an unknown key is an error)."""
        given = dict(given or {})
        unknown = sorted(set(given) - set(self.settings))
        if unknown:
            raise ValueError(f"attack {self.name!r} has no setting {unknown[0]!r} "
                             f"(its settings: {', '.join(self.settings) or 'none'})")
        out = {}
        for key, s in self.settings.items():
            v = given.get(key, s.default)
            out[key] = s.check(f"{self.name}.{key}" if key in given else key, v)
        return out

    def bind(self, eps, options=None, **context):
        """attack(model, x, y) at eps with these settings and context."""
        fn = self.function()
        params = inspect.signature(fn).parameters
        missing = [k for k in self.needs if context.get(k) is None]
        if missing:
            raise ValueError(f"attack {self.name!r} needs {missing[0]}=")
        if self.random_masks and context.get("masks") == "model":
            context["masks"] = "random"
        kw = {k: v for k, v in context.items() if k in params}
        return functools.partial(fn, eps=eps, **self.options(options), **self.fixed, **kw)


REGISTRY = {}


def register(entry):
    """Add an Attack entry (its name must be new); returns it."""
    if not isinstance(entry, Attack):
        raise TypeError(f"register takes an Attack, got {type(entry).__name__}")
    if entry.name in REGISTRY:
        raise ValueError(f"attack {entry.name!r} is already registered")
    C.field(C.choice, "kind", entry.kind, ("single_step", "iterative", "black_box", "transfer"))
    C.field(C.choice, "norm", entry.norm, C.NORMS)
    C.field(C.choice, "honest", entry.honest, ("always", "test_mask", None))
    REGISTRY[entry.name] = entry
    return entry


def get(name):
    """The registry entry `name`."""
    if name not in REGISTRY:
        raise ValueError(f"attack name must be one of {tuple(REGISTRY)}, got {name!r}")
    return REGISTRY[name]


register(Attack("fgsm", fgsm, kind="single_step", help="fast gradient sign method, one step of eps"))
register(Attack("pgd", pgd, PGD_SETTINGS, help="PGD, L-inf"))
register(Attack("eot", eot_pgd, dict(PGD_SETTINGS, samples=SAMPLES), random_masks=True, honest="test_mask",
                help="PGD with Expectation over Transformation (fresh mask draws, averaged gradients)"))
register(Attack("frozen", pgd_frozen_mask, PGD_SETTINGS, honest="test_mask", help="PGD against one frozen mask draw"))
register(Attack("pgd_l2", pgd, PGD_SETTINGS, fixed={"norm": "2"}, norm="2", honest=None,
                help="PGD, L2 (eps is the L2 radius)"))
register(Attack("transfer", transfer_pgd, PGD_SETTINGS, kind="transfer", needs=("surrogate",),
                help="PGD crafted on a separately trained surrogate (black-box transfer)"))


def make_attack(name, eps, *, seed=0, masks="model", batch_size=None, lo=0.0, hi=1.0, surrogate=None,
                **settings):
    """attack(model, x, y) -> x_adv: registry entry `name` at eps with its settings (e.g. steps=10,
    alpha=None: 2.5 eps / steps) and the context (seed, masks, batch_size, lo, hi; surrogate for
    "transfer"). "eot" uses masks="random" unless masks is given other than "model"."""
    return get(name).bind(eps, settings, seed=seed, masks=masks, batch_size=batch_size, lo=lo, hi=hi,
                          surrogate=surrogate)


def parse_options(specs, *, flag="--attack-opt"):
    """{name: {key: value}} from "NAME.KEY=VALUE" strings (each value parsed and checked by its Setting)."""
    out = {}
    for spec in specs or ():
        head, sep, text = str(spec).partition("=")
        name, dot, key = head.partition(".")
        if not sep or not dot or not name or not key:
            raise ValueError(f"{flag} {spec!r}: expected NAME.KEY=VALUE (e.g. pgd.steps=100)")
        if name not in REGISTRY:
            raise ValueError(f"{flag} {spec!r}: unknown attack {name!r} (one of {', '.join(REGISTRY)})")
        entry = REGISTRY[name]
        if key not in entry.settings:
            raise ValueError(f"{flag} {spec!r}: attack {name!r} has no setting {key!r} "
                             f"(its settings: {', '.join(entry.settings) or 'none'})")
        s = entry.settings[key]
        try:
            value = s.parse(text.strip())
        except ValueError:
            raise ValueError(f"{flag} {spec!r}: {text!r} is not a valid {key}") from None
        try:
            out.setdefault(name, {})[key] = s.check(f"{flag} {name}.{key}", value)
        except (ValueError, TypeError) as e:
            raise ValueError(str(e)) from None
    return out


# ----------------------------------------------------------------------------- AutoAttack components
# (each in its own module, importing the machinery above; registered after the entries above,
# with honest=None, so the honest evaluation's attacks and mask draws do not move)
from .apgd import apgd, apgd_targeted  # noqa: E402
from .square import square  # noqa: E402
from .fab import fab_targeted  # noqa: E402
from .autoattack import autoattack, autoattack_examples  # noqa: E402
__all__ += ["apgd", "apgd_targeted", "square", "fab_targeted", "autoattack"]

STEPS_100 = Setting(100, C.positive_int, int, "iterations")
TARGETS = Setting(9, C.positive_int, int, "target classes, the top-k others at the clean point")
_APGD = {"steps": STEPS_100, "restarts": RESTARTS, "rho": Setting(0.75, C.positive, float, "step-halving threshold")}
_LOSS = Setting("ce", lambda n, v: losses.check(v, choices=("ce", "dlr")), str, "ce or dlr")
register(Attack("apgd", apgd, dict(_APGD, loss=_LOSS), honest=None, help="Auto-PGD (Croce & Hein 2020), L-inf"))
register(Attack("apgd_t", apgd_targeted, dict(_APGD, targets=TARGETS),
                honest=None, help="Auto-PGD on the targeted DLR loss, the top-k other classes in turn"))
register(Attack("fab_t", fab_targeted, {"steps": STEPS_100, "targets": TARGETS},
                honest=None, help="targeted FAB (Croce & Hein 2020), L-inf"))
register(Attack("square", square, {"queries": Setting(5000, C.positive_int, int, "queries per sample"),
                                   "p_init": Setting(0.8, C.positive, float, "initial square size (fraction)")},
                kind="black_box", honest=None, help="Square Attack (Andriushchenko et al. 2020), gradient-free, L-inf"))
_DRAWS = Setting(None, lambda n, v: None if v is None else C.positive_int(n, v), lambda t: None if t.lower() in
                 ("none", "auto") else int(t), "forwards scoring each result; none: 1 (standard), 5 (rand)")
# honest=None: the honest evaluation runs the cascade itself (fastmask.honest_autoattack: standard or
# rand per row, a per-attack report), not as one more x_adv
register(Attack("autoattack", autoattack_examples,
                {"version": Setting("standard", lambda n, v: C.choice(n, v, ("standard", "rand")), str,
                                    "standard or rand"),
                 "steps": STEPS_100, "queries": Setting(5000, C.positive_int, int, "Square queries per sample"),
                 "targets": TARGETS, "draws": _DRAWS, "eot_samples": SAMPLES},
                honest=None, help="the AutoAttack cascade (APGD-CE, APGD-T, FAB-T, Square; rand: EOT)"))
ATTACKS = tuple(n for n, e in REGISTRY.items() if e.kind != "transfer")  # what make_attack builds alone
