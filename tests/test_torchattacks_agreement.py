"""fastmask's APGD-CE, APGD-T, FAB-T and Square agree with torchattacks' APGD, APGDT, FAB and Square
(configured as the original, with fewer steps / queries for speed but equal on both sides)
on the committed adversarially trained CNN, Square and FAB-T in L2 too: each robust accuracy
lies in the 95 % Wilson interval of the other's (benchmarks/compare_autoattack.py runs the full-size comparison).
torchattacks' L-inf FAB-T takes minutes here, so that case is marked slow."""
from pathlib import Path

import pytest
import torch

from fastmask import apgd as A
from fastmask import data as D
from fastmask import fab as F
from fastmask import models as M
from fastmask import square as S
from fastmask import stats

ta = pytest.importorskip("torchattacks")
MEASURED = Path(__file__).resolve().parent.parent / "docs" / "measured"
N, EPS, EPS_L2, STEPS, QUERIES = 64, 0.3, 2.0, 10, 100


@pytest.fixture(scope="module")
def setup(mnist):
    d = mnist
    model = M.load(MEASURED / "cnn_pgd3.pt").eval()
    return model, D.to_float(d.x_test[:N]), d.y_test[:N]


def _robust(model, xa, x, y, l2=False):
    if l2:
        assert (xa - x).flatten(1).norm(dim=1).max() <= EPS_L2 + 1e-4
    else:
        assert (xa - x).abs().max() <= EPS + 1e-5
    assert xa.min() >= 0 and xa.max() <= 1
    with torch.no_grad():
        return int((model(xa).argmax(1) == y).sum())


def _agree(k_fm, k_ta):
    lo, hi = stats.wilson(k_fm, N)
    lo2, hi2 = stats.wilson(k_ta, N)
    assert lo <= k_ta / N <= hi and lo2 <= k_fm / N <= hi2, (k_fm, k_ta)


@pytest.mark.parametrize("which", ["apgd-ce", "apgd-t", pytest.param("fab-t", marks=pytest.mark.slow), "square",
                                   "fab-t-l2", "square-l2"])
def test_agrees_with_torchattacks(which, setup):
    model, x, y = setup
    if which == "apgd-ce":
        fm = A.apgd(model, x, y, EPS, steps=STEPS)
        other = ta.APGD(model, norm="Linf", eps=EPS, steps=STEPS, n_restarts=1, seed=0, loss="ce")
    elif which == "apgd-t":
        fm = A.apgd_targeted(model, x, y, EPS, steps=STEPS)
        other = ta.APGDT(model, norm="Linf", eps=EPS, steps=STEPS, n_restarts=1, seed=0, n_classes=10)
    elif which == "fab-t":
        fm = F.fab_targeted(model, x, y, EPS, steps=STEPS)
        other = ta.FAB(model, norm="Linf", eps=EPS, steps=STEPS, n_restarts=1, alpha_max=0.1, eta=1.05, beta=0.9,
                       seed=0, multi_targeted=True, n_classes=10)
    elif which == "fab-t-l2":
        fm = F.fab_targeted(model, x, y, EPS_L2, norm="2", steps=STEPS)
        other = ta.FAB(model, norm="L2", eps=EPS_L2, steps=STEPS, n_restarts=1, alpha_max=0.1, eta=1.05, beta=0.9,
                       seed=0, multi_targeted=True, n_classes=10)
    else:
        l2 = which == "square-l2"
        eps = EPS_L2 if l2 else EPS
        fm = S.square(model, x, y, eps, norm="2" if l2 else "inf", queries=QUERIES)
        other = ta.Square(model, norm="L2" if l2 else "Linf", eps=eps, n_queries=QUERIES, n_restarts=1, p_init=0.8,
                          loss="margin", resc_schedule=False, seed=0)
    l2 = which.endswith("-l2")
    k_fm, k_ta = _robust(model, fm, x, y, l2), _robust(model, other(x, y), x, y, l2)
    with torch.no_grad():
        clean = int((model(x).argmax(1) == y).sum())
    assert k_fm < clean  # the attack does something on this model
    _agree(k_fm, k_ta)
