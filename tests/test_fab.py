"""fastmask.fab: the L-inf and L2 projections onto a hyperplane inside the box (against a
bisection on their defining functions), and FAB-T's contracts in both norms: radius, range,
untouched misclassified points, determinism, bad input."""
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


def _l2_by_bisection(t, w, b, lo, hi):
    # float64: d(l) = clip(-l w, lo - t, hi - t), l >= 0 (the KKT form of the nearest box point
    # on the plane), l found by bisection on w.d(l) = -c; reach: whether any l gets there
    c = (w * t).sum(1) - b
    w = torch.where((c < 0).unsqueeze(1), -w, w)
    c = c.abs()

    def d(lam):
        return torch.maximum(torch.minimum(-lam.unsqueeze(1) * w, hi - t), lo - t)
    a, z = torch.zeros_like(c), torch.full_like(c, 1e9)
    for _ in range(200):
        m = (a + z) / 2
        far = -(w * d(m)).sum(1) >= c
        a, z = torch.where(far, a, m), torch.where(far, m, z)
    return d(z), -(w * d(torch.full_like(c, 1e12))).sum(1) >= c


def test_l2_projection_hand_case():
    # row 0: <w, t> = 1 -> 0.6 along w, no bound met: d = -0.4 w / |w|^2 = (-0.2, -0.2);
    # row 1: coordinate 0 meets 0 at l = 0.1 (t = 0.1), the rest moves along w alone
    t = torch.tensor([[0.5, 0.5], [0.1, 0.5]], dtype=torch.float64)
    w = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([0.6, 0.2], dtype=torch.float64)
    assert fab.project_l2(t, w, b).tolist() == [pytest.approx([-0.2, -0.2]), pytest.approx([-0.1, -0.3])]


@pytest.mark.parametrize("box", [(0.0, 1.0), (-1.0, 2.0)])
def test_l2_projection_is_the_nearest_box_point_on_the_plane(box):
    lo, hi = box
    g = torch.Generator().manual_seed(2)
    t = lo + (hi - lo) * torch.rand(300, 40, generator=g, dtype=torch.float64)
    t[torch.rand(300, 40, generator=g) < 0.3] = lo  # points on the faces, as images have
    w = torch.randn(300, 40, generator=g, dtype=torch.float64) * (torch.rand(300, 40, generator=g) > 0.2)
    b = (w * t).sum(1) + torch.randn(300, generator=g, dtype=torch.float64) * torch.logspace(-3, 2, 300, dtype=torch.float64)
    d = fab.project_l2(t, w, b, lo, hi)
    want, reach = _l2_by_bisection(t, w, b, lo, hi)
    assert 30 < reach.sum() < 300  # both kinds of rows
    assert torch.allclose(d, want, atol=1e-7)
    assert ((t + d) >= lo - 1e-12).all() and ((t + d) <= hi + 1e-12).all() and (d[w == 0] == 0).all()
    assert torch.allclose((w * (t + d)).sum(1)[reach], b[reach], atol=1e-9)
    # float32, as FAB calls it: the same point to rounding
    d32 = fab.project_l2(t.float(), w.float(), b.float(), lo, hi)
    assert torch.allclose(d32.double(), want, atol=1e-4)


def test_l2_projection_edge_rows():
    # on the plane: no move; every w 0: no move; c > 0 but every coordinate already at the bound
    # it would move to: no move (out of reach, and the nearest box point is t itself)
    t = torch.tensor([[0.5, 0.25], [0.3, 0.7], [0.0, 1.0]])
    w = torch.tensor([[1.0, -1.0], [0.0, 0.0], [1.0, -1.0]])
    b = torch.tensor([0.25, 1.0, -5.0])
    assert fab.project_l2(t, w, b).abs().max() == 0


def _setup(n=40, seed=0):
    return mlp_points(n, seed)


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_fab_targeted_contracts(norm):
    model, x, y = _setup()
    eps = 0.02 if norm == "inf" else 0.15
    stats = {"grads": 0, "queries": 0}
    xa = fab.fab_targeted(model, x, y, eps, norm=norm, steps=10, targets=3, _stats=stats)
    dist = (xa - x).flatten(1).abs().amax(1) if norm == "inf" else (xa - x).flatten(1).norm(dim=1)
    assert (dist <= eps + 1e-6).all() and xa.min() >= 0 and xa.max() <= 1
    assert torch.equal(xa[:4], x[:4])
    with torch.no_grad():
        wrong = model(xa).argmax(1) != y
        moved = (xa != x).flatten(1).any(1)
    assert torch.equal(moved[4:], wrong[4:])  # a point moves only when FAB broke it within eps
    assert 4 < wrong.sum() < len(y)
    assert torch.equal(xa, fab.fab_targeted(model, x, y, eps, norm=norm, steps=10, targets=3))
    # more targets break at least as much; broken points cost nothing more
    more = fab.fab_targeted(model, x, y, eps, norm=norm, steps=10, targets=6)
    with torch.no_grad():
        assert (model(more).argmax(1) != y).sum() >= wrong.sum()
    assert stats["grads"] < 3 * 10 * 36
    assert attacks.fab_targeted is fab.fab_targeted


@pytest.mark.parametrize("kw, match", [
    (dict(targets=10), r"targets must be an integer in \[1, classes - 1 = 9\], got 10"),
    (dict(steps=0), "steps must be >= 1, got 0"),
    (dict(norm="1"), "norm must be one of 'inf', '2', got '1'"),
    (dict(eta=0.5), "eta out of range, got 0.5"),
])
def test_bad_input(kw, match):
    model, x, y = _setup(n=4)
    with pytest.raises(ValueError, match=match):
        fab.fab_targeted(model, x, y, 0.1, **{"steps": 2, **kw})
