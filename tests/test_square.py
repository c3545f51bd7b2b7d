"""fastmask.square: the p schedule, the stripe start from the documented Philox layout, the
ball and range, determinism, and that only still-robust samples are queried."""
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
    g = torch.Generator().manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 10))
    x = torch.rand(12, 3, 16, 16, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    rec = _Recorder(model)
    eps, p_init, seed = 0.1, 0.1, 4
    S.square(rec, x, y, eps, queries=1, p_init=p_init, seed=seed)
    start, z0 = rec.calls[1]
    zo = z0.clone()
    zo[torch.arange(len(y)), y] = -float("inf")
    rows = (z0[torch.arange(len(y)), y] > zo.amax(1)).nonzero().squeeze(1)  # still robust at the start
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


def test_ball_range_determinism_and_strength():
    model, x, y = _setup()
    a = S.square(model, x, y, 0.05, queries=100, seed=1)
    assert ((a - x).abs() <= 0.05 + 1e-6).all() and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, S.square(model, x, y, 0.05, queries=100, seed=1))
    assert not torch.equal(a, S.square(model, x, y, 0.05, queries=100, seed=2))
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
    with pytest.raises(ValueError, match=r"norm must be 'inf' \(Square's L2 version is not implemented\), got '2'"):
        S.square(model, x, y, 0.1, norm="2")
    with pytest.raises(ValueError, match=r"p_init must be in \(0, 1\], got 0"):
        S.square(model, x, y, 0.1, p_init=0)
    with pytest.raises(ValueError, match=r"y must hold labels in \[0, 10\)"):
        S.square(model, x, torch.full((4,), 12), 0.1)
    assert attacks.square is S.square
