"""fastmask.apgd: the step-size schedule and halving rule on scripted loss traces, the attack's
contracts (ball, range, untouched misclassified points, never below its start), determinism,
and bad input."""
import pytest
import torch

from fastmask import apgd as A
from fastmask import attacks, losses, models, ops

from attack_points import mlp_points


def test_checkpoints_are_the_papers_schedule():
    # p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)
    p, prev, want = 0.22, 0.0, []
    while p <= 1.0 + 1e-9:
        want.append(round(p * 100))
        p, prev = p + max(p - prev - 0.03, 0.06), p
    assert A.checkpoints(100) == want == [22, 41, 57, 70, 80, 87, 93, 99]
    assert A.checkpoints(10) == [2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert A.checkpoints(1) == [1]


def _drive(traces, steps=100, rho=0.75):
    """Feed per-sample loss traces (S x steps, S samples) to StepControl; the halve masks per checkpoint."""
    t = torch.tensor(traces, dtype=torch.float64)
    ctl = A.StepControl(t[:, 0], steps, rho, 2.0)
    halves = []
    for i in range(1, t.shape[1]):
        _, h = ctl.update(t[:, i])
        if h is not None:
            halves.append(h.tolist())
    return halves, ctl


def test_halving_rule_on_scripted_losses():
    n = 42  # two checkpoints: after step 22 (window 22) and after step 41 (window 19)
    up = [float(i) for i in range(n + 1)]                        # rises every step
    flat = [0.0] * (n + 1)                                       # never rises
    up17 = [float(min(i, 17)) for i in range(n + 1)]             # 17 of 22 rises > 0.75 * 22 = 16.5
    up16 = [float(min(i, 16)) for i in range(n + 1)]             # 16 of 22 rises <= 16.5
    # window 1 rises (not halved); window 2 falls back and climbs, 18 rises of 19 > 14.25, but
    # stays below the best: not "too few rises", yet not halved last time and no better best -> halved
    osc = up[:23] + [0.1 * j for j in range(20)]
    ups = sum(osc[i] > osc[i - 1] for i in range(23, 42))
    assert ups > 0.75 * 19 and max(osc[23:42]) < max(osc[:23])
    # halved at 22 (flat at 5); then the same climb below 5: the 2nd condition does not apply
    # right after a halving
    flat_osc = [5.0] * 23 + osc[23:]
    halves, ctl = _drive([up, flat, up17, up16, osc, flat_osc])
    assert halves[0] == [False, True, False, True, False, True]
    assert halves[1] == [False, True, True, True, True, False]  # up17, up16: flat in window 2
    assert ctl.eta.tolist() == [2.0, 0.5, 1.0, 0.5, 1.0, 1.0]


def test_improved_marks_new_best_points():
    ctl = A.StepControl(torch.tensor([1.0, 1.0]), 100, 0.75, 0.6)
    imp, _ = ctl.update(torch.tensor([2.0, 0.5]))
    assert imp.tolist() == [True, False] and ctl.best.tolist() == [2.0, 1.0]
    ctl.keep(torch.tensor([False, True]))
    assert ctl.best.tolist() == [1.0] and ctl.eta.tolist() == [pytest.approx(0.6)]


def _setup(n=48, seed=0):
    return mlp_points(n, seed, wrong=5)  # five points misclassified from the start


def _acc(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y)


@pytest.mark.parametrize("norm, eps", [("inf", 0.01), ("2", 0.3)])
@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_respects_ball_and_range_and_leaves_misclassified_points(norm, eps, loss):
    model, x, y = _setup()
    xa = A.apgd(model, x, y, eps, norm=norm, loss=loss, steps=20)
    d = (xa - x).flatten(1)
    dist = d.abs().max(1).values if norm == "inf" else d.norm(dim=1)
    assert (dist <= eps * (1 + 1e-5) + 1e-6).all()
    assert xa.min() >= 0 and xa.max() <= 1
    assert torch.equal(xa[:5], x[:5])
    rob = _acc(model, xa, y)
    assert 0 < rob.sum() < _acc(model, x, y).sum()  # breaks some points, not all, at this eps
    # stronger than its own random start, and never worse than it on any sample
    x0 = ops.random_start(x, eps, seed=0, offset=0, norm=norm)
    assert rob.sum() <= _acc(model, x0, y).sum()
    with torch.no_grad():
        v0, v = losses.value(loss, model(x0), y), losses.value(loss, model(xa), y)
    keep = rob & _acc(model, x0, y)
    assert (v[keep] >= v0[keep]).all()


class _Recorder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.rows = model, []

    def forward(self, x):
        self.rows.append(x.detach().clone())
        return self.model(x)


@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_robust_points_end_at_their_best_iterate(loss):
    model, x, y = _setup()
    rec = _Recorder(model)
    xa = A.apgd(rec, x, y, 0.01, loss=loss, steps=12)
    seen = torch.cat(rec.rows[1:])  # every iterate evaluated (the first forward is the clean one)
    owner = torch.cdist(seen.flatten(1), x.flatten(1), p=float("inf")).argmin(1)
    with torch.no_grad():
        v_seen = losses.value(loss, model(seen), y[owner])
    rob = _acc(model, xa, y)
    assert rob.sum() > 10
    with torch.no_grad():
        v_out = losses.value(loss, model(xa), y)
    for i in rob.nonzero().squeeze(1).tolist():  # up to float rounding (batches of other sizes)
        assert v_out[i] >= v_seen[owner == i].max() - 1e-5 * v_seen.abs().max()


def test_apgd_targeted_breaks_at_least_what_its_first_target_does():
    model, x, y = _setup()
    one = _acc(model, A.apgd_targeted(model, x, y, 0.01, steps=10, targets=1), y).sum()
    three = _acc(model, A.apgd_targeted(model, x, y, 0.01, steps=10, targets=3), y).sum()
    assert three <= one < _acc(model, x, y).sum()


def test_only_robust_points_are_attacked():
    model, x, y = _setup()
    stats = {"grads": 0}
    steps = 20
    xa = A._apgd(model, x, y, 0.01, "inf", steps, "ce", 1, 0.75, 1, "model", 0, None, 0.0, 1.0, None, stats)
    clean_ok = int(_acc(model, x, y).sum())
    broken = clean_ok - int(_acc(model, xa, y).sum())
    assert broken > 0
    # the 5 misclassified points cost nothing, and each broken point stops costing at once
    assert stats["grads"] <= clean_ok * (steps + 1) - broken
    assert stats["grads"] >= (clean_ok - broken) * (steps + 1)


def test_same_seed_same_bits_and_threads_do_not_matter():
    model, x, y = _setup(n=70)  # > 2 x inputgrad.MIN_PIECE rows: micro-batches run
    a = A.apgd(model, x, y, 0.02, steps=15, loss="dlr", seed=3, restarts=2)
    b = A.apgd(model, x, y, 0.02, steps=15, loss="dlr", seed=3, restarts=2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        c = A.apgd(model, x, y, 0.02, steps=15, loss="dlr", seed=3, restarts=2)
        torch.set_num_threads(2)
        d = A.apgd(model, x, y, 0.02, steps=15, loss="dlr", seed=3, restarts=2)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d)
    assert not torch.equal(a, A.apgd(model, x, y, 0.02, steps=15, loss="dlr", seed=4, restarts=2))


def test_model_is_left_unchanged():
    model = models.build("mlp", {"ratio": 0.3, "seed": 0}).train()
    x = torch.rand(8, 1, 28, 28)
    y = torch.randint(0, 10, (8,))
    bufs = [b.clone() for b in model.buffers()]
    A.apgd(model, x, y, 0.1, steps=3, eot_samples=2, masks="random")
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(bufs, model.buffers()))


class _Bad(torch.nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :10].unsqueeze(1)


@pytest.mark.parametrize("kw, match", [
    (dict(eps=-0.1), "eps must be a finite number >= 0, got -0.1"),
    (dict(steps=0), "steps must be >= 1, got 0"),
    (dict(loss="cw"), r"loss must be one of \('ce', 'dlr'\), got 'cw'"),
    (dict(norm="1"), "norm must be one of 'inf', '2', got '1'"),
    (dict(restarts=0), "restarts must be >= 1, got 0"),
    (dict(y=torch.full((4,), 10)), r"y must hold labels in \[0, 10\) \(the model's classes\), got 10"),
    (dict(y=torch.full((4,), -1)), r"y must hold labels in \[0, 10\) \(the model's classes\), got -1"),
    (dict(model=_Bad()), r"model output must be N x classes \(N = 4\), got shape \(4, 1, 10\)"),
])
def test_bad_input(kw, match):
    args = dict(model=models.build("mlp", seed=0), x=torch.rand(4, 1, 28, 28), y=torch.zeros(4, dtype=torch.long),
                eps=0.1)
    args.update(kw)
    model, x, y, eps = args.pop("model"), args.pop("x"), args.pop("y"), args.pop("eps")
    with pytest.raises(ValueError, match=match):
        A.apgd(model, x, y, eps, steps=args.pop("steps", 2), **args)


@pytest.mark.parametrize("targets, match", [
    (10, r"targets must be an integer in \[1, classes - 1 = 9\], got 10"),
    (0, "targets must be >= 1, got 0"),
])
def test_bad_targets(targets, match):
    with pytest.raises(ValueError, match=match):
        A.apgd_targeted(models.build("mlp", seed=0), torch.rand(4, 1, 28, 28), torch.zeros(4, dtype=torch.long),
                        0.1, steps=2, targets=targets)


def test_exported_from_attacks():
    assert attacks.apgd is A.apgd and attacks.apgd_targeted is A.apgd_targeted


def test_random_masks_attack_every_sample():
    model = models.build("mlp", {"ratio": 0.5, "seed": 0}).eval()
    x = torch.rand(12, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (12,), generator=torch.Generator().manual_seed(1))
    stats = {"grads": 0}
    A._apgd(model, x, y, 0.05, "inf", 3, "ce", 1, 0.75, 2, "random", 0, None, 0.0, 1.0, None, stats)
    assert stats["grads"] >= 12 * 2  # the start point of every sample, 2 draws each, whatever one forward said
