"""fastmask.fab: the L-inf projection onto a hyperplane inside the box (against a bisection on
its defining function), and FAB-T's contracts: radius, range, untouched misclassified points,
determinism, bad input."""
import pytest
import torch

from fastmask import attacks, fab, ops, reference

from attack_points import mlp_points


def test_projection_hand_case(backend):
    t = torch.tensor([[0.5, 0.5], [0.9, 0.2]])
    w = torch.tensor([[1.0, 1.0], [1.0, -2.0]])
    b = torch.tensor([0.6, 0.0])
    d = fab.project_linf(t, w, b)
    # row 0: <w, t> = 1 -> 0.6 by moving both down by 0.2
    # row 1: <w, t> = 0.5 -> 0: x0 down (room 0.9), x1 up (room 0.8), 3 lam = 0.5
    assert d.tolist() == [pytest.approx([-0.2, -0.2]), pytest.approx([-1 / 6, 1 / 6])]


def _f(lam, t, w, c):  # the decrease of <w, x> reachable with |d|_inf <= lam inside [0, 1]
    room = torch.where(w > 0, t, 1 - t)
    return (w.abs() * torch.minimum(torch.full_like(room, lam), room)).sum()


def test_projection_is_the_smallest_step_inside_the_box(backend):
    g = torch.Generator().manual_seed(0)
    t = torch.rand(50, 30, generator=g, dtype=torch.float64)
    w = torch.randn(50, 30, generator=g, dtype=torch.float64) * (torch.rand(50, 30, generator=g) > 0.2)
    b = (w * t).sum(1) + torch.randn(50, generator=g, dtype=torch.float64) * 6
    d = fab.project_linf(t, w, b)
    assert ((t + d) >= -1e-12).all() and ((t + d) <= 1 + 1e-12).all() and (d[w == 0] == 0).all()
    feasible = 0
    for i in range(50):
        c = abs(((w[i] * t[i]).sum() - b[i]).item())
        ww = w[i] if (w[i] * t[i]).sum() >= b[i] else -w[i]
        if _f(1.0, t[i], ww, c) < c:  # out of reach: all the way to the corner
            assert torch.allclose(d[i], -torch.sign(ww) * torch.where(ww > 0, t[i], 1 - t[i]))
            continue
        feasible += 1
        assert (w[i] * (t[i] + d[i])).sum().item() == pytest.approx(b[i].item(), abs=1e-9)
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if _f(mid, t[i], ww, c) >= c else (mid, hi)
        assert d[i].abs().max().item() == pytest.approx(hi, abs=1e-9)
    assert 10 < feasible < 50


def test_projection_edge_rows(backend):
    # already on the plane (c = 0): no move; every room 0 or every w 0: nothing can move
    t = torch.tensor([[0.5, 0.25], [0.0, 1.0], [0.3, 0.7]], dtype=torch.float64)
    w = torch.tensor([[1.0, -1.0], [1.0, -1.0], [0.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([0.25, -5.0, 1.0], dtype=torch.float64)
    d = fab.project_linf(t, w, b)
    assert d.abs().max() == 0
    # out of reach in a box [-1, 2]: all the way to the corner that lowers <w, x>
    d = fab.project_linf(t[:1], w[:1], torch.tensor([-9.0], dtype=torch.float64), -1.0, 2.0)
    assert d.tolist() == [pytest.approx([-1.5, 1.75])]


def test_projection_kernel_matches_the_reference():
    # FAB-like float32 rows: many t at the box faces (ties among the rooms), some w = 0,
    # both signs of c, some rows out of reach; the kernel's float64 sums against the sorted
    # float32 cumsums of the reference
    if not ops._ext_available:
        pytest.skip("fastmask._C is not built")
    g = torch.Generator().manual_seed(1)
    t = torch.rand(300, 784, generator=g)
    t[torch.rand(300, 784, generator=g) < 0.5] = 0.0
    t[torch.rand(300, 784, generator=g) < 0.2] = 1.0
    w = torch.randn(300, 784, generator=g) * (torch.rand(300, 784, generator=g) > 0.1)
    b = (w * t).sum(1) + torch.randn(300, generator=g) * torch.logspace(-3, 2.5, 300)
    d, r = ops.project_linf(t, w, b), reference.project_linf(t, w, b)
    assert torch.allclose(d, r, rtol=1e-4, atol=1e-5)
    assert (d[w == 0] == 0).all() and ((t + d) >= 0).all() and ((t + d) <= 1).all()
    torch.library.opcheck(torch.ops.fastmask.project_linf, (t[:4], w[:4], b[:4], 0.0, 1.0))


def test_projection_bad_input():
    t, w, b = torch.zeros(3, 4), torch.ones(3, 4), torch.zeros(3)
    with pytest.raises(ValueError, match=r"b must have shape \(3,\), got \(2,\)"):
        ops.project_linf(t, w, b[:2])
    with pytest.raises(ValueError, match=r"t and w must be N x D of one shape, got t \(3, 4\) and w \(3, 5\)"):
        ops.project_linf(t, torch.ones(3, 5), b)
    with pytest.raises(ValueError, match="t, w and b must share dtype and device"):
        ops.project_linf(t, w.double(), b)


def _setup(n=40, seed=0):
    return mlp_points(n, seed)


def test_fab_targeted_contracts():
    model, x, y = _setup()
    stats = {"grads": 0, "queries": 0}
    xa = fab.fab_targeted(model, x, y, 0.02, steps=10, targets=3, _stats=stats)
    assert ((xa - x).abs() <= 0.02 + 1e-6).all() and xa.min() >= 0 and xa.max() <= 1
    assert torch.equal(xa[:4], x[:4])
    with torch.no_grad():
        wrong = model(xa).argmax(1) != y
        moved = (xa != x).flatten(1).any(1)
    assert torch.equal(moved[4:], wrong[4:])  # a point moves only when FAB broke it within eps
    assert 4 < wrong.sum() < len(y)
    assert torch.equal(xa, fab.fab_targeted(model, x, y, 0.02, steps=10, targets=3))
    # more targets break at least as much; broken points cost nothing more
    more = fab.fab_targeted(model, x, y, 0.02, steps=10, targets=6)
    with torch.no_grad():
        assert (model(more).argmax(1) != y).sum() >= wrong.sum()
    assert stats["grads"] < 3 * 10 * 36
    assert attacks.fab_targeted is fab.fab_targeted


@pytest.mark.parametrize("kw, match", [
    (dict(targets=10), r"targets must be an integer in \[1, classes - 1 = 9\], got 10"),
    (dict(steps=0), "steps must be >= 1, got 0"),
    (dict(norm="2"), "norm must be 'inf'"),
    (dict(eta=0.5), "eta out of range, got 0.5"),
])
def test_bad_input(kw, match):
    model, x, y = _setup(n=4)
    with pytest.raises(ValueError, match=match):
        fab.fab_targeted(model, x, y, 0.1, **{"steps": 2, **kw})
