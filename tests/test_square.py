"""fastmask.square: the p schedule, the L-inf stripe start and the L2 grid start and both
proposals from the documented Philox layouts, the ball and range, determinism, and that only
still-robust samples are queried."""
import pytest
import torch

from fastmask import attacks, ops
from fastmask import square as S

from attack_points import mlp_points


def test_p_schedule_is_the_originals():
    assert [S.p_selection(i) for i in (0, 10, 11, 50, 51, 200, 201, 500, 501, 1000, 1001, 2000, 2001,
                                       4000, 4001, 6000, 6001, 8000, 8001, 10 ** 6)] == pytest.approx(
        [0.8, 0.8, 0.4, 0.4, 0.2, 0.2, 0.1, 0.1, 0.05, 0.05, 0.025, 0.025, 0.0125, 0.0125,
         0.00625, 0.00625, 0.003125, 0.003125, 0.0015625, 0.0015625])
    # the original's resc_schedule: iteration 500 of 1000 is iteration 5000 of 10000
    assert S.p_selection(500, 0.8, queries=1000) == pytest.approx(0.8 / 128)
    assert S.side(0.8, 28, 28, 1) == 25 and S.side(0.8 / 512, 28, 28, 1) == 1
    # L2: odd, >= 3, inside the image
    assert S.side_l2(0.8, 28, 28, 1) == 25 and S.side_l2(0.8 / 512, 28, 28, 1) == 3
    assert S.side_l2(0.05, 16, 16, 3) == 5  # round(sqrt(12.8)) = 4 -> 5
    assert S.side_l2(0.8, 4, 4, 1) == 3 and S.side_l2(0.8, 5, 9, 1) == 5


def test_eta_is_the_originals_pattern():
    # s = 3: top row rings(1, 3) = [1/4, 1 + 1/4, 1/4]; bottom rows rings(2, 3) = 1/4 everywhere
    # plus 1 at its centre (row 1, column 1); each half of unit norm, negated below, the whole
    # of unit norm
    top = torch.tensor([[0.25, 1.25, 0.25]], dtype=torch.float64)
    bot = torch.tensor([[0.25, 0.25, 0.25], [0.25, 1.25, 0.25]], dtype=torch.float64)
    want = torch.cat((top / top.norm(), -bot / bot.norm())) / 2 ** 0.5
    assert torch.allclose(S.eta(3, torch.float64), want)
    e = S.eta(25)
    assert e.shape == (25, 25) and float(e.norm()) == pytest.approx(1.0)
    assert (e[:12] > 0).all() and (e[12:] < 0).all() and e[:12].argmax() == 6 * 25 + 12


def _setup(n=40, seed=0):
    return mlp_points(n, seed, wrong=3, scale=0.5, shift=0.25)  # away from [0, 1]: stripes are not clamped


class _Recorder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x):
        z = self.model(x)
        self.calls.append((x.clone(), z.clone()))
        return z


def _linear_setup(seed, n, c, hw):
    # a random linear model and points it classifies right (y = its own prediction)
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(c * hw * hw, 10))
    x = torch.rand(n, c, hw, hw, generator=g)
    with torch.no_grad():
        return model, x, model(x).argmax(1)


def _still_robust(z, y):
    # the rows whose margin z_y - max_{i != y} z_i is still positive
    zo = z.clone()
    zo[torch.arange(len(y)), y] = -float("inf")
    return (z[torch.arange(len(y)), y] > zo.amax(1)).nonzero().squeeze(1)


def test_stripe_start_from_the_philox_layout():
    rows = torch.tensor([0, 3, 7])
    s = S.stripes((8, 2, 5, 6), rows, seed=11)
    words = ops.philox(11, S.TAG, 8 * 2 * 6)
    for i, j in enumerate(rows.tolist()):
        for c in range(2):
            for w in range(6):
                assert s[i, c, 0, w] == (1.0 if words[j * 12 + c * 6 + w] & 1 else -1.0)
    # the first query is the stripe start: x + eps * (the signs of the attacked rows), clamped
    model, x, y = _setup()
    rec = _Recorder(model)
    S.square(rec, x, y, 0.05, queries=1, seed=5)
    todo = torch.arange(3, x.shape[0])  # the first 3 are misclassified: not attacked
    start = (x[todo] + 0.05 * S.stripes(x.shape, todo, seed=5)).clamp(0, 1)
    assert torch.equal(rec.calls[1][0], start)
    assert (start - x[todo] != 0).all()  # every pixel moved by +-eps, constant along each column
    sign = (start - x[todo]).sign()
    assert torch.equal(sign, sign[:, :, :1].expand_as(sign))


def test_proposal_from_the_philox_layout():
    # the first proposal of each still-robust sample j: x_best with its s x s window at
    # (vh, vw) of block j set to x_best + 2 eps * (bit c of w2 ? 1 : -1) in channel c, clipped
    # to the eps ball and [0, 1]; a 3-channel input, its box edges reached (x up to 1)
    model, x, y = _linear_setup(3, 12, 3, 16)
    rec = _Recorder(model)
    eps, p_init, seed = 0.1, 0.1, 4
    S.square(rec, x, y, eps, queries=1, p_init=p_init, seed=seed)
    start, z0 = rec.calls[1]
    rows = _still_robust(z0, y)  # still robust at the start
    assert 3 < rows.numel() and rec.calls[2][0].shape[0] == rows.numel()
    s = S.side(S.p_selection(0, p_init), 16, 16, 3)
    blk = ops.philox(seed, S.TAG | 1, 4 * len(y)).view(-1, 4)
    want = start[rows].clone()
    for i, j in enumerate(rows.tolist()):
        vh, vw = (int(blk[j, 0]) * (16 - s)) >> 32, (int(blk[j, 1]) * (16 - s)) >> 32
        for c in range(3):
            v = want[i, c, vh:vh + s, vw:vw + s] + 2 * eps * (1.0 if int(blk[j, 2]) >> c & 1 else -1.0)
            xc = x[j, c, vh:vh + s, vw:vw + s]
            want[i, c, vh:vh + s, vw:vw + s] = torch.minimum(torch.maximum(v, xc - eps), xc + eps).clamp(0, 1)
    assert torch.equal(rec.calls[2][0], want)


def _l2_start_by_loops(x, rows, eps, seed):
    # the grid start written out: square (a, b) of sample j at rows/cols 1 + 5a, 1 + 5b (28 x 28:
    # s = 5, margin 1), eta(5) (transposed on bit 0 of its second word) times the sign of bit c
    n, c = len(rows), x.shape[1]
    words = ops.philox(seed, S.TAG2, 2 * (int(rows.max()) + 1) * 25)
    delta = torch.zeros(n, c, 28, 28)
    for i, j in enumerate(rows.tolist()):
        for k in range(25):
            a, b = divmod(k, 5)
            w0, w1 = int(words[2 * (j * 25 + k)]), int(words[2 * (j * 25 + k) + 1])
            pat = S.eta(5).t() if w1 & 1 else S.eta(5)
            for ch in range(c):
                delta[i, ch, 1 + 5 * a:6 + 5 * a, 1 + 5 * b:6 + 5 * b] = pat * (1.0 if w0 >> ch & 1 else -1.0)
    norm = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    return (x[rows] + delta / (norm + 1e-12) * eps).clamp(0, 1)


def _l2_proposal_by_loops(x, best, rows, t, s, eps, seed):
    # the original's L2 update, sample by sample, from block j of iteration t
    blk = ops.philox(seed, S.TAG2 | (t + 1), 8 * (int(rows.max()) + 1)).view(-1, 8)
    c, h, w = x.shape[1:]
    out = []
    for i, j in enumerate(rows.tolist()):
        b = [int(v) for v in blk[j]]
        vh, vw, vh2, vw2 = ((b[k] * (h - s)) >> 32 for k in range(4))
        d = best[i] - x[j]
        both = torch.zeros(c, h, w, dtype=torch.bool)
        both[:, vh:vh + s, vw:vw + s] = True
        both[:, vh2:vh2 + s, vw2:vw2 + s] = True
        pat = S.eta(s).t() if b[5] & 1 else S.eta(s)
        new = torch.empty(c, s, s)
        for ch in range(c):
            old = d[ch, vh:vh + s, vw:vw + s]
            new[ch] = pat * (1.0 if b[4] >> ch & 1 else -1.0) + old / (old.norm() + 1e-12)
            room = ((eps ** 2 - d.norm() ** 2).clamp_min(0) / c + d[both].norm() ** 2).sqrt()
            new[ch] = new[ch] / (new[ch].norm() + 1e-12) * room
        d = d.clone()
        d[:, vh2:vh2 + s, vw2:vw2 + s] = 0
        d[:, vh:vh + s, vw:vw + s] = new
        out.append((x[j] + d / (d.norm() + 1e-12) * eps).clamp(0, 1))
    return torch.stack(out)


def test_l2_start_and_proposal_from_the_philox_layout():
    model, x, y = _linear_setup(5, 10, 2, 28)
    rec = _Recorder(model)
    eps, seed = 0.5, 7
    S.square(rec, x, y, eps, norm="2", queries=2, p_init=0.05, seed=seed)
    rows = torch.arange(10)
    start = rec.calls[1][0]
    assert torch.allclose(start, _l2_start_by_loops(x, rows, eps, seed), atol=1e-6)
    assert ((start - x).flatten(1).norm(dim=1) <= eps + 1e-5).all()
    # the first proposal: every sample still robust after the start (eps small for this model)
    alive = _still_robust(rec.calls[1][1], y)
    assert alive.numel() > 5 and rec.calls[2][0].shape[0] == alive.numel()
    s = S.side_l2(S.p_selection(0, 0.05), 28, 28, 2)
    assert s == 7
    want = _l2_proposal_by_loops(x, start[alive], alive, 0, s, eps, seed)
    assert torch.allclose(rec.calls[2][0], want, atol=1e-5)


@pytest.mark.parametrize("norm, eps", [("inf", 0.05), ("2", 0.5)])
def test_ball_range_determinism_and_strength(norm, eps):
    model, x, y = _setup()
    a = S.square(model, x, y, eps, norm=norm, queries=100, seed=1)
    dist = (a - x).flatten(1).abs().amax(1) if norm == "inf" else (a - x).flatten(1).norm(dim=1)
    assert (dist <= eps + 1e-5).all() and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, S.square(model, x, y, eps, norm=norm, queries=100, seed=1))
    assert not torch.equal(a, S.square(model, x, y, eps, norm=norm, queries=100, seed=2))
    with torch.no_grad():
        before = (model(x).argmax(1) == y).sum()
        after = (model(a).argmax(1) == y).sum()
    assert after < before


def test_only_still_robust_samples_are_queried():
    model, x, y = _setup()
    rec = _Recorder(model)
    stats = {"queries": 0}
    xa = S.square(rec, x, y, 0.05, queries=60, _stats=stats)
    broken_owners = set(range(3))  # misclassified from the start: never queried after the clean forward
    total = 0
    for xs, z in rec.calls[1:]:
        owner = torch.cdist(xs.flatten(1), x.flatten(1), p=float("inf")).argmin(1)
        assert not broken_owners & set(owner.tolist())
        assert len(set(owner.tolist())) == len(owner)  # one query per sample per iteration
        broken_owners |= set(owner[z.argmax(1) != y[owner]].tolist())
        total += xs.shape[0]
    assert total == stats["queries"] and len(broken_owners) > 3
    with torch.no_grad():
        assert ((model(xa).argmax(1) != y).nonzero().squeeze(1).tolist()) == sorted(broken_owners)


def test_bad_input():
    model, x, y = _setup(n=4)
    with pytest.raises(ValueError, match="queries must be >= 1, got 0"):
        S.square(model, x, y, 0.1, queries=0)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0, got -1"):
        S.square(model, x, y, -1)
    with pytest.raises(ValueError, match=r"norm must be one of 'inf', '2', got '1'"):
        S.square(model, x, y, 0.1, norm="1")
    with pytest.raises(ValueError, match=r"p_init must be in \(0, 1\], got 0"):
        S.square(model, x, y, 0.1, p_init=0)
    with pytest.raises(ValueError, match=r"y must hold labels in \[0, 10\)"):
        S.square(model, x, torch.full((4,), 12), 0.1)
    assert attacks.square is S.square
