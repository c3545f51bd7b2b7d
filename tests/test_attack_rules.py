"""The attack rules that a wrong implementation could break without changing any
statistic the other tests look at: which restart PGD keeps per sample, what EOT
averages, and that nested model_state() blocks never reuse a mask draw.

Each expectation is rebuilt from outside the attack, from the documented rule
(fastmask.attacks' docstrings) and the public ops, and compared exactly.
Every new call passes everything after eps by keyword.
"""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmask import attacks, losses, ops
from fastmask.nn import FeatureMask

C, D = 4, 64  # classes, input size (1 x 8 x 8)


CHECKPOINT = Path(__file__).parent / "data" / "attack_rules_mlp.pt"


def train_mlp(protos):
    """The recipe of tests/data/attack_rules_mlp.pt: a 64-32-4 MLP trained (about a second)
    on 2000 noisy copies of the 4 prototypes. Regenerate with
    `python -c "import test_attack_rules as t; t.save_checkpoint()"` from tests/."""
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, C, (2000,), generator=g)
    x = (protos[y] + 0.35 * torch.randn(2000, D, generator=g)).clamp(0, 1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, 32), nn.ReLU(), nn.Linear(32, C))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(30):
        for i in range(0, 2000, 100):
            opt.zero_grad()
            F.cross_entropy(model(x[i:i + 100]), y[i:i + 100]).backward()
            opt.step()
    return model.eval()


def _prototypes():
    return torch.rand(C, D, generator=torch.Generator().manual_seed(0))


def save_checkpoint():
    torch.save(train_mlp(_prototypes()).state_dict(), CHECKPOINT)


@pytest.fixture(scope="module")
def trained():
    """A trained MLP (the committed checkpoint: training weights differ across CPUs and thread
    counts, and the mutation job runs these tests once per mutant) and 300 test inputs that
    blend its 4 prototypes with weights near 1/4 each: ambiguous points near the junction
    of the classes, where a broken restart can have a lower loss than an unbroken one;
    labelled by the model's clean prediction (every sample starts correct)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, 32), nn.ReLU(), nn.Linear(32, C))
    model.load_state_dict(torch.load(CHECKPOINT, weights_only=True))
    model.eval()
    with torch.random.fork_rng():  # near the 4-class junction: Dirichlet(30, 30, 30, 30) weights
        torch.manual_seed(2)
        w = torch.distributions.Dirichlet(torch.full((C,), 30.0)).sample((300,))
    xt = (w @ _prototypes()).view(-1, 1, 8, 8)
    with torch.no_grad():
        yt = model(xt).argmax(1)
    return model, xt, yt


def _one_restart(model, x, y, eps, alpha, steps, seed, r, targeted=False):
    """Restart r of attacks.pgd, rebuilt from its docstring: random start with Philox (seed,
    offset = r << 32 | batch 0), then `steps` ops.pgd_step_ along the input gradient."""
    adv = ops.random_start(x, eps, seed=seed, offset=r << 32)
    for _ in range(steps):
        ops.pgd_step_(adv, x, attacks.input_grad(model, adv, y, targeted=targeted), alpha, eps)
    return adv


@pytest.mark.parametrize("targeted", [False, True])
def test_restarts_keep_the_per_sample_worst_case(trained, targeted):
    """Per sample, pgd(restarts=R) returns the restart that breaks it (the highest loss
    among those that do), else the one with the highest loss; the first on ties."""
    model, x, y = trained
    if targeted:
        y = (y + 1) % C
    eps, alpha, steps, R, seed = 0.05, 0.0125, 1, 6, 0
    runs = torch.stack([_one_restart(model, x, y, eps, alpha, steps, seed, r, targeted) for r in range(R)])
    with torch.no_grad():
        logits = torch.stack([model(a) for a in runs])  # R x N x C
    loss = torch.stack([F.cross_entropy(lg, y, reduction="none") for lg in logits])
    broken = logits.argmax(2) == y if targeted else logits.argmax(2) != y
    score = -loss if targeted else loss  # what the attack maximises
    # the rule, written out: rank (broken, score) lexicographically, the first restart on ties
    key = broken.double() * (score.max() - score.min() + 1) + score.double()
    choice = key.argmax(0)
    n = torch.arange(len(y))
    # the data must tell the rules apart, or this test proves nothing
    assert (broken.any(0) & ~broken[0]).sum() >= 5  # single-restart PGD leaves points a restart breaks
    assert (choice != 0).any() and (choice != R - 1).any()  # neither "keep first" nor "keep last"
    assert (score.argmax(0) != choice).any()  # nor "rank by loss only"
    got = attacks.pgd(model, x, y, eps, alpha=alpha, steps=steps, restarts=R, random_start=True, seed=seed,
                      targeted=targeted)
    assert torch.equal(got, runs[choice, n])
    with torch.no_grad():
        hit = model(got).argmax(1) == y if targeted else model(got).argmax(1) != y
    assert torch.equal(hit, broken.any(0))


def test_restarts_through_evaluate_count_every_restart(trained):
    """robustness() with restarts: a sample is wrong under "pgd" iff some restart breaks it."""
    from fastmask import evaluate
    model, x, y = trained
    eps, steps, R = 0.05, 1, 6
    runs = [_one_restart(model, x, y, eps, 0.0125, steps, 0, r) for r in range(R)]
    with torch.no_grad():
        broken = torch.stack([model(a).argmax(1) != y for a in runs]).any(0)
    out = evaluate.robustness(model, x, y, eps_list=[eps], attacks=("pgd",), pgd_steps=steps, pgd_alpha=0.0125,
                              restarts=R, seed=0)
    assert torch.equal(out["correct"]["pgd"][0], ~broken)
    one = evaluate.robustness(model, x, y, eps_list=[eps], attacks=("pgd",), pgd_steps=steps, pgd_alpha=0.0125,
                              restarts=1, seed=0)
    with torch.no_grad():
        broken0 = model(runs[0]).argmax(1) != y
    assert torch.equal(one["correct"]["pgd"][0], ~broken0)
    assert out["accuracy"]["pgd"][0] < one["accuracy"]["pgd"][0]


# ----------------------------------------------------------------------------- EOT

def _masked(trained_model, ratio=0.5, seed=3):
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.mask = FeatureMask(ratio=ratio, seed=seed)
            self.body = trained_model

        def forward(self, x):
            return self.body(self.mask(x))
    return Masked().eval()


def test_eot_step_follows_the_sum_of_k_fresh_draws(trained):
    """One EOT step with samples=k moves along sign(g_1 + ... + g_k), the gradients of k
    consecutive fresh mask draws (and the draw after them starts the next step)."""
    base, x, y = trained
    model = _masked(base)
    eps, alpha, k = 0.1, 0.02, 5
    with attacks.model_state(model, "random"):  # outermost: the k inner calls draw k different masks
        grads = [attacks.input_grad(model, x, y, masks="random") for _ in range(k)]
    g = grads[0].clone()
    for gi in grads[1:]:
        g += gi
    want = ops.pgd_step(x, x, g, alpha, eps)
    one = ops.pgd_step(x, x, grads[0], alpha, eps)
    assert not torch.equal(want, one)  # the average differs from one draw's step here
    for gi in grads[1:]:
        assert not torch.equal(gi, grads[0])  # the draws are fresh
    got = attacks.eot_pgd(model, x, y, eps, alpha=alpha, steps=1, samples=k, random_start=False, masks="random")
    assert torch.equal(got, want)
    # two steps: the second step's k draws are the next k, not the first k again
    with attacks.model_state(model, "random"):
        adv = x.clone()
        for _ in range(2):
            g = attacks.input_grad(model, adv, y, masks="random")
            for _ in range(k - 1):
                g += attacks.input_grad(model, adv, y, masks="random")
            ops.pgd_step_(adv, x, g, alpha, eps)
    got2 = attacks.eot_pgd(model, x, y, eps, alpha=alpha, steps=2, samples=k, random_start=False, masks="random")
    assert torch.equal(got2, adv)


def test_eot_samples_change_the_examples(trained):
    base, x, y = trained
    model = _masked(base)
    kw = dict(alpha=0.02, steps=3, random_start=False, masks="random")
    one = attacks.eot_pgd(model, x, y, 0.1, samples=1, **kw)
    five = attacks.eot_pgd(model, x, y, 0.1, samples=5, **kw)
    assert not torch.equal(one, five)


# ----------------------------------------------------------------------------- nested model_state

def test_nested_model_state_never_reuses_a_draw(trained):
    """Inside an outer model_state, inner blocks (every attack and predict opens one) leave the
    mask offsets where they got to: each forward draws a new mask. Only the outermost exit
    restores the offsets."""
    base, x, _ = trained
    model = _masked(base)
    start = [b.clone() for b in model.mask.buffers()]
    with attacks.model_state(model, "random"):
        a = model(x)
        with attacks.model_state(model, "random"):
            b = model(x)
            with attacks.model_state(model, "random"):
                c = model(x)
        d = model(x)  # after two nested exits
        assert not torch.equal(a, b) and not torch.equal(b, c) and not torch.equal(c, d)
        assert not torch.equal(a, d) and not torch.equal(b, d)
    assert all(torch.equal(p, q) for p, q in zip(model.mask.buffers(), start))
    # the same through the public calls: two input gradients inside one evaluation differ
    with attacks.model_state(model, "random"):
        g1 = attacks.input_grad(model, x, x.new_zeros(len(x), dtype=torch.long), masks="random")
        g2 = attacks.input_grad(model, x, x.new_zeros(len(x), dtype=torch.long), masks="random")
    assert not torch.equal(g1, g2)
    # and outside any block each call starts from the model's own offsets: the same draw
    g3 = attacks.input_grad(model, x, x.new_zeros(len(x), dtype=torch.long), masks="random")
    assert torch.equal(g3, g1)
    assert all(torch.equal(p, q) for p, q in zip(model.mask.buffers(), start))


# ----------------------------------------------------------------------------- make_attack

def test_make_attack_passes_every_setting(trained):
    """make_attack(name, eps, **settings)(model, x, y) is the named attack called with the same
    settings: box, batch size, masks, restarts, samples, seed (a randomized model, a box other
    than [0, 1] and batches, so that each setting changes the examples)."""
    base, x, y = trained
    model = _masked(base)
    x, y = x[:40], y[:40]
    box = dict(lo=0.1, hi=0.9, batch_size=16)
    common = dict(alpha=0.02, steps=2, seed=5, restarts=2, **box)
    for name, direct in [
            ("fgsm", lambda: attacks.fgsm(model, x, y, 0.1, masks="random", **box)),
            ("pgd", lambda: attacks.pgd(model, x, y, 0.1, masks="random", **common)),
            ("pgd_l2", lambda: attacks.pgd(model, x, y, 0.1, norm="2", masks="random", **common)),
            ("eot", lambda: attacks.eot_pgd(model, x, y, 0.1, samples=3, masks="random", **common)),
            ("frozen", lambda: attacks.pgd_frozen_mask(model, x, y, 0.1, **common))]:
        # each entry takes only its own settings (the registry refuses the others)
        own = {k: v for k, v in dict(steps=2, alpha=0.02, restarts=2, samples=3).items()
               if k in attacks.REGISTRY[name].settings}
        atk = attacks.make_attack(name, 0.1, seed=5, masks="random", **own, **box)
        assert torch.equal(atk(model, x, y), direct()), name
    # each setting matters here (else the equalities above would prove nothing)
    pgd = lambda **kw: attacks.pgd(model, x, y, 0.1, **dict(dict(masks="random", **common), **kw))  # noqa: E731
    ref = pgd()
    for change in (dict(lo=0.0), dict(hi=1.0), dict(batch_size=None), dict(masks="model"), dict(seed=6),
                   dict(restarts=1)):
        assert not torch.equal(pgd(**change), ref), change
    # eot defaults to random masks, and alpha defaults to 2.5 eps / steps
    assert torch.equal(attacks.make_attack("eot", 0.1, steps=2, samples=3, seed=5)(model, x, y),
                       attacks.eot_pgd(model, x, y, 0.1, alpha=0.125, steps=2, samples=3, seed=5, masks="random"))
    assert torch.equal(attacks.make_attack("frozen", 0.1, steps=4)(model, x, y),
                       attacks.pgd_frozen_mask(model, x, y, 0.1, alpha=0.0625, steps=4, seed=0))


def test_frozen_mask_and_eot_settings(trained):
    """pgd_frozen_mask and eot_pgd honour targeted and batch_size like pgd."""
    base, x, y = trained
    model = _masked(base)
    x, y = x[:40], y[:40]
    kw = dict(alpha=0.02, steps=3, seed=1)
    t = (y + 1) % C
    tgt = attacks.pgd_frozen_mask(model, x, t, 0.1, targeted=True, **kw)
    assert not torch.equal(tgt, attacks.pgd_frozen_mask(model, x, t, 0.1, **kw))
    with attacks.model_state(model, "frozen"):  # targeted: the loss to the target goes down
        assert F.cross_entropy(model(tgt), t) < F.cross_entropy(model(x), t)
    assert not torch.equal(attacks.pgd_frozen_mask(model, x, y, 0.1, batch_size=16, **kw),
                           attacks.pgd_frozen_mask(model, x, y, 0.1, **kw))
    # the same for EOT
    kw = dict(alpha=0.02, steps=2, seed=1, samples=2)
    tgt = attacks.eot_pgd(model, x, t, 0.1, targeted=True, **kw)
    assert not torch.equal(tgt, attacks.eot_pgd(model, x, t, 0.1, **kw))
    assert not torch.equal(attacks.eot_pgd(model, x, y, 0.1, batch_size=16, **kw),
                           attacks.eot_pgd(model, x, y, 0.1, **kw))


def test_transfer_errors_name_the_problem(trained):
    model, x, y = trained
    with pytest.raises(ValueError, match="^transfer needs a surrogate other than the attacked model$"):
        attacks.transfer(model, model, x, y, attacks.make_attack("fgsm", 0.1))
    with pytest.raises(TypeError, match=r"^attack must be callable as attack\(model, x, y\), got 3$"):
        attacks.transfer(_masked(model), model, x, y, 3)


def test_input_grad_batches_and_eot_mask_choice(trained):
    """input_grad checks and honours batch_size (random masks: each batch's forward draws
    its own masks); make_attack("eot", masks="frozen") keeps the frozen mask."""
    base, x, y = trained
    model = _masked(base)
    x, y = x[:40], y[:40]
    with pytest.raises(ValueError, match="^batch_size must be >= 1, got 0$"):
        attacks.input_grad(model, x, y, batch_size=0)
    assert not torch.equal(attacks.input_grad(model, x, y, masks="random", batch_size=16),
                           attacks.input_grad(model, x, y, masks="random"))
    kw = dict(steps=2, alpha=0.02, samples=2, seed=3)
    frozen = attacks.eot_pgd(model, x, y, 0.1, masks="frozen", **kw)
    assert torch.equal(attacks.make_attack("eot", 0.1, masks="frozen", **kw)(model, x, y), frozen)
    assert not torch.equal(frozen, attacks.eot_pgd(model, x, y, 0.1, masks="random", **kw))


def _rebuilt_pgd(model, x, y, eps, alpha, steps, *, seed=0, norm="inf", lo=0.0, hi=1.0, targeted=False,
                 masks="model", samples=1):
    """attacks.pgd / eot_pgd with one restart and one batch, rebuilt from the public ops: random
    start (seed, offset 0), then per step the sum of `samples` input gradients (each a fresh
    draw under masks="random": they run inside one outer model_state)."""
    with attacks.model_state(model, masks):
        adv = ops.random_start(x, eps, seed=seed, offset=0, norm=norm, lo=lo, hi=hi)
        for _ in range(steps):
            g = attacks.input_grad(model, adv, y, targeted=targeted, masks=masks)
            for _ in range(samples - 1):
                g += attacks.input_grad(model, adv, y, targeted=targeted, masks=masks)
            ops.pgd_step_(adv, x, g, alpha, eps, lo, hi, norm)
    return adv


def test_pgd_and_eot_equal_their_rebuilt_steps(trained):
    """Each setting reaches the steps: the L2 ball (random start included), a box other than
    [0, 1] (random start included), targeted (every EOT draw too), random masks (one draw per
    PGD step, k per EOT step)."""
    base, x, y = trained
    model = _masked(base)
    x, y = x[:40], y[:40]
    t = (y + 1) % C
    cases = [(base, y, dict(norm="2"), 0.5), (base, y, dict(lo=0.3, hi=0.7), 0.1),
             (base, y, dict(norm="2", lo=0.3, hi=0.7), 0.5), (base, t, dict(targeted=True), 0.1),
             (model, y, dict(masks="random"), 0.1)]
    for net, lab, kw, eps in cases:
        want = _rebuilt_pgd(net, x, lab, eps, eps / 4, 2, seed=4, **kw)
        got = attacks.pgd(net, x, lab, eps, alpha=eps / 4, steps=2, random_start=True, seed=4, **kw)
        assert torch.equal(got, want), kw
    for kw in (dict(masks="random"), dict(masks="random", targeted=True)):
        lab = t if kw.get("targeted") else y
        want = _rebuilt_pgd(model, x, lab, 0.1, 0.025, 2, seed=4, samples=3, **kw)
        got = attacks.eot_pgd(model, x, lab, 0.1, alpha=0.025, steps=2, samples=3, random_start=True, seed=4, **kw)
        assert torch.equal(got, want), kw
    # one spelling per norm, as in the ops: 2 is "2", "Linf" / "L2" are refused by name
    assert torch.equal(attacks.pgd(base, x, y, 0.5, alpha=0.1, steps=2, norm="2"),
                       attacks.pgd(base, x, y, 0.5, alpha=0.1, steps=2, norm=2))
    for bad in ("Linf", "L2"):
        with pytest.raises(ValueError, match=f"^norm must be one of 'inf', '2', got '{bad}'$"):
            attacks.pgd(base, x, y, 0.1, alpha=0.02, steps=2, norm=bad)


def test_fgsm_settings(trained):
    base, x, y = trained
    model = _masked(base)
    x, y = x[:40], y[:40]
    g = attacks.input_grad(base, x, y)
    assert torch.equal(attacks.fgsm(base, x, y, 0.1, lo=0.3, hi=0.7), ops.fgsm(x, g, 0.1, 0.3, 0.7))
    assert torch.equal(attacks.fgsm(base, x, y, 0.1, targeted=True), ops.fgsm(x, -g, 0.1, 0.0, 1.0))
    rnd = attacks.fgsm(model, x, y, 0.1, masks="random")
    with attacks.model_state(model, "random"):
        assert torch.equal(rnd, ops.fgsm(x, attacks.input_grad(model, x, y, masks="random"), 0.1, 0.0, 1.0))
    assert not torch.equal(rnd, attacks.fgsm(model, x, y, 0.1, masks="model"))
    assert not torch.equal(rnd, attacks.fgsm(model, x, y, 0.1, masks="random", batch_size=16))


def test_two_restarts_and_argument_checks(trained):
    """restarts=2 keeps the per-sample worst of the two (not the first); the checks name the
    argument and value; norm aliases; restarts > 1 needs a random start."""
    model, x, y = trained
    runs = torch.stack([_one_restart(model, x, y, 0.05, 0.0125, 1, 0, r) for r in range(2)])
    with torch.no_grad():
        logits = torch.stack([model(a) for a in runs])
    loss = torch.stack([F.cross_entropy(lg, y, reduction="none") for lg in logits])
    broken = logits.argmax(2) != y
    second = (broken[1] & ~broken[0]) | ((broken[1] == broken[0]) & (loss[1] > loss[0]))
    assert second.any() and not second.all()
    got = attacks.pgd(model, x, y, 0.05, alpha=0.0125, steps=1, restarts=2, random_start=True, seed=0)
    assert torch.equal(got, torch.where(second[:, None, None, None], runs[1], runs[0]))
    kw = dict(alpha=0.01, steps=1)
    for bad, msg in [(dict(steps=0), "steps must be >= 1, got 0"),
                     (dict(steps=2.5), "steps must be an integer >= 1, got 2.5"),
                     (dict(steps=True), "steps must be an integer >= 1, got True"),
                     (dict(restarts=0), "restarts must be >= 1, got 0"),
                     (dict(batch_size=0), "batch_size must be >= 1, got 0"),
                     (dict(restarts=2, random_start=False),
                      "restarts=2 needs random_start=True (restarts from x itself are identical)")]:
        with pytest.raises(ValueError) as info:
            attacks.pgd(model, x, y, 0.1, **dict(kw, **bad))
        assert str(info.value) == msg
    with pytest.raises(ValueError) as info:
        attacks.eot_pgd(model, x, y, 0.1, samples=0, **kw)
    assert str(info.value) == "samples must be >= 1, got 0"
    with pytest.raises(ValueError) as info:
        attacks.pgd(model, x, y, 0.1, norm="l1", **kw)
    assert str(info.value) == "norm must be one of 'inf', '2', got 'l1'"
    l2 = attacks.pgd(model, x, y, 0.5, alpha=0.1, steps=1, norm="2")
    for alias in (2.0, 2):  # the numbers name the norm too; other strings ("l2", "2.0") are refused
        assert torch.equal(attacks.pgd(model, x, y, 0.5, alpha=0.1, steps=1, norm=alias), l2), alias
    for bad in ("l2", "2.0"):
        with pytest.raises(ValueError, match="^norm must be one of 'inf', '2', got"):
            attacks.pgd(model, x, y, 0.5, alpha=0.1, steps=1, norm=bad)


class _Constant(nn.Module):
    """Logits that do not depend on x (with and without a parameter)."""

    def __init__(self, with_param):
        super().__init__()
        self.p = nn.Parameter(torch.ones(C)) if with_param else None

    def forward(self, x):
        out = torch.zeros(len(x), C)
        return out + self.p if self.p is not None else out


def test_input_grad_values_and_input_checks(trained):
    """input_grad is d(sum CE)/dx (minus it when targeted), zeros where the output does not
    depend on x; bad x / y are refused with the type named."""
    model, x, y = trained
    xr = x.clone().requires_grad_(True)
    F.cross_entropy(model(xr), y, reduction="sum").backward()
    g = attacks.input_grad(model, x, y)
    torch.testing.assert_close(g, xr.grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(attacks.input_grad(model, x, y, targeted=True), -xr.grad, rtol=1e-6, atol=1e-7)
    for const in (_Constant(True), _Constant(False)):
        z = attacks.input_grad(const, x, y)
        assert torch.equal(z, torch.zeros_like(x))
    for bad, msg in [(x.long(), "x must be a floating-point tensor, got torch.int64"),
                     (x.tolist(), "x must be a floating-point tensor, got list")]:
        with pytest.raises(TypeError) as info:
            attacks.fgsm(model, bad, y, 0.1)
        assert str(info.value) == msg
    for bad, msg in [(y.float(), "y must be a 1-D int64 tensor of labels, got torch.float32 with shape (300,)"),
                     (y[:, None], "y must be a 1-D int64 tensor of labels, got torch.int64 with shape (300, 1)"),
                     (y.tolist(), "y must be a 1-D int64 tensor of labels, got list with shape ()")]:
        with pytest.raises(TypeError) as info:
            attacks.fgsm(model, x, bad, 0.1)
        assert str(info.value) == msg
    with pytest.raises(ValueError) as info:
        attacks.fgsm(model, x, y[:3], 0.1)
    assert str(info.value) == "x and y must have the same number of samples, got x (300, 1, 8, 8) and y (3,)"


def test_input_grad_of_a_model_autograd_differentiates(trained):
    """The autograd path (a model with a FeatureMask) also returns d(sum CE)/dx, not the mean's."""
    base, x, y = trained
    model = _masked(base)
    xr = x.clone().requires_grad_(True)
    F.cross_entropy(base(xr), y, reduction="sum").backward()  # the mask is off in eval mode
    torch.testing.assert_close(attacks.input_grad(model, x, y), xr.grad, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- the margin losses, zero gradients,
# batch offsets, 1-D inputs, the defaults and transfer

def _margin_pgd(model, x, y, eps, alpha, steps, loss, targeted, seed=0):
    """pgd(loss="cw"/"dlr") rebuilt: from the random start (seed, offset 0), each step follows
    the gradient of the summed loss (descended when targeted): torch autograd through the model
    of the closed-form d loss / d logits of fastmask.losses (tests/test_losses.py checks that
    against autograd of losses.value; autograd all the way differs in the last bits, enough
    to flip the sign of near-zero pixels)."""
    adv = ops.random_start(x, eps, seed=seed, offset=0)
    with attacks.model_state(model):
        for _ in range(steps):
            xr = adv.clone().requires_grad_(True)
            z = model(xr)
            gz = losses.value_and_grad(loss, z.detach(), y)[1]
            (g,) = torch.autograd.grad(z, xr, -gz if targeted else gz)
            ops.pgd_step_(adv, x, g, alpha, eps)
    return adv


@pytest.mark.parametrize("loss", ["cw", "dlr"])
def test_pgd_margin_losses_follow_their_gradient(trained, loss):
    """loss= reaches every step, untargeted and targeted, on the graph-free path (a plain layer
    chain) and the autograd one (a FeatureMask in the model, off in eval mode); EOT's extra
    draws take the same loss (with masks="model" the k gradients are equal: the same sign).
    All 300 points: enough rows for inputgrad to size its micro-batches (by the model)."""
    base, x, y = trained
    for net in (base, _masked(base)):
        for lab, targeted in ((y, False), ((y + 1) % C, True)):
            want = _margin_pgd(net, x, lab, 0.1, 0.025, 3, loss, targeted, seed=4)
            kw = dict(alpha=0.025, steps=3, seed=4, targeted=targeted)
            got = attacks.pgd(net, x, lab, 0.1, loss=loss, **kw)
            assert torch.equal(got, want), (net, targeted)
            assert not torch.equal(got, attacks.pgd(net, x, lab, 0.1, **kw))  # not the cross-entropy's
            assert torch.equal(attacks.eot_pgd(net, x, lab, 0.1, loss=loss, samples=2, masks="model", **kw), want)
    with pytest.raises(ValueError, match=r"^loss must be one of \('ce', 'cw', 'dlr'\), got 'logit-diff'$"):
        attacks.pgd(base, x, y, 0.1, steps=1, loss="logit-diff")


def test_zero_gradient_and_batch_offsets(trained):
    """An output that does not depend on x has input gradient 0 for every loss (PGD does not
    move from its start), and batch k of a batched attack starts from Philox offset k."""
    _, x, y = trained
    x, y = x[:10], y[:10]
    for m in (_Constant(True), _Constant(False)):
        for loss in ("ce", "cw", "dlr"):
            for targeted in (False, True):
                assert torch.equal(attacks.pgd(m, x, y, 0.1, steps=1, random_start=False, loss=loss,
                                               targeted=targeted), x)
    m = _Constant(True)
    got = attacks.pgd(m, x, y, 0.1, steps=1, seed=5, batch_size=4)
    want = torch.cat([ops.random_start(x[i:i + 4], 0.1, seed=5, offset=k) for k, i in enumerate(range(0, 10, 4))])
    assert torch.equal(got, want)


def test_one_dimensional_inputs_are_samples():
    """x of shape (N,) is N one-feature samples; a 0-d x has no samples."""
    class Scalar(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(1, 2)

        def forward(self, x):
            return self.lin(x.unsqueeze(1))
    torch.manual_seed(0)
    m = Scalar()
    x, y = torch.rand(6), torch.tensor([0, 1, 0, 1, 1, 0])
    xr = x.clone().requires_grad_(True)
    F.cross_entropy(m(xr), y, reduction="sum").backward()
    assert torch.equal(attacks.fgsm(m, x, y, 0.1), (x + 0.1 * xr.grad.sign()).clamp(0, 1))
    with pytest.raises(ValueError) as info:
        attacks.fgsm(m, torch.tensor(0.5), y[:1], 0.1)
    assert str(info.value) == "x and y must have the same number of samples, got x () and y (1,)"


def _tiny_masked():
    torch.manual_seed(0)
    model = nn.Sequential(FeatureMask(ratio=0.3, seed=2), nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.rand(8, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model.eval()(x).argmax(1)
    return model, x, y


def test_defaults_are_the_registry_defaults():
    """Each attack function called with its defaults is make_attack's attack with no settings
    given: 40 steps, 20 EOT draws, seed 0, one restart from a random start, L-inf."""
    model, x, y = _tiny_masked()
    for name in ("fgsm", "pgd", "eot", "frozen"):
        fn = attacks.get(name).function()
        assert torch.equal(fn(model, x, y, 0.1), attacks.make_attack(name, 0.1)(model, x, y)), name
    want = attacks.pgd(model, x, y, 0.1, steps=40, alpha=2.5 * 0.1 / 40, seed=0, random_start=True)
    assert torch.equal(attacks.pgd(model, x, y, 0.1), want)
    # EOT: the sum of 20 fresh draws per step; frozen: one draw for the whole attack
    assert torch.equal(attacks.eot_pgd(model, x, y, 0.1), attacks.eot_pgd(model, x, y, 0.1, samples=20, seed=0,
                                                                          steps=40, masks="random"))
    assert torch.equal(attacks.pgd_frozen_mask(model, x, y, 0.1), attacks.eot_pgd(model, x, y, 0.1, samples=1,
                                                                                  masks="frozen"))


def test_transfer_pgd_is_pgd_on_the_surrogate(trained):
    """transfer_pgd crafts PGD on the surrogate with every setting passed on (its defaults are
    pgd's); make_attack("transfer") is it, and refuses to run without a surrogate. (The trained
    MLP's ambiguous points: there the start, the steps and the restarts change the result.)"""
    surrogate, x, y = trained
    x, y = x[:40], y[:40]
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, C)).eval()
    assert torch.equal(attacks.transfer_pgd(model, x, y, 0.1, surrogate=surrogate), attacks.pgd(surrogate, x, y, 0.1))
    assert not torch.equal(attacks.pgd(surrogate, x, y, 0.1), attacks.pgd(model, x, y, 0.1))
    assert not torch.equal(attacks.pgd(surrogate, x, y, 0.1), attacks.pgd(surrogate, x, y, 0.1, seed=1))
    assert not torch.equal(attacks.pgd(surrogate, x, y, 0.1), attacks.pgd(surrogate, x, y, 0.1, steps=41))
    for kw in (dict(steps=3, alpha=0.03, random_start=False, lo=0.1, hi=0.9),
               dict(steps=2, seed=5, restarts=3, lo=0.2, hi=0.8, batch_size=7)):
        want = attacks.pgd(surrogate, x, y, 0.1, **kw)
        assert torch.equal(attacks.transfer_pgd(model, x, y, 0.1, surrogate=surrogate, **kw), want), kw
        assert torch.equal(attacks.make_attack("transfer", 0.1, surrogate=surrogate, **kw)(model, x, y), want), kw
    one = dict(steps=2, seed=5, lo=0.2, hi=0.8)
    assert not torch.equal(attacks.pgd(surrogate, x, y, 0.1, restarts=3, batch_size=7, **one),
                           attacks.pgd(surrogate, x, y, 0.1, restarts=3, **one))
    assert not torch.equal(attacks.pgd(surrogate, x, y, 0.1, restarts=3, batch_size=7, **one),
                           attacks.pgd(surrogate, x, y, 0.1, batch_size=7, **one))
    with pytest.raises(ValueError, match=r"^attack 'transfer' needs surrogate=$"):
        attacks.make_attack("transfer", 0.1)
    with pytest.raises(ValueError, match=r"^transfer needs a surrogate other than the attacked model$"):
        attacks.transfer_pgd(model, x, y, 0.1, surrogate=model)


def test_restarts_keep_the_first_on_a_tie(trained):
    """Restarts of equal loss and equal broken state: the first is kept (an output that ignores
    x gives every restart the same loss; with no gradient each stays at its random start)."""
    _, x, y = trained
    x, y = x[:10], y[:10]
    got = attacks.pgd(_Constant(True), x, y, 0.1, steps=1, restarts=3, seed=5)
    assert torch.equal(got, ops.random_start(x, 0.1, seed=5, offset=0))


def test_feature_masks_of_the_modules_given():
    model, _, _ = _tiny_masked()
    assert attacks.feature_masks(model) == [model[0]]
    assert attacks.feature_masks(model, [model[2], model[3]]) == []
    assert attacks.feature_masks(model, list(model)[:1]) == [model[0]]
