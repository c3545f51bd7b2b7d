import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmask import attacks
from fastmask.nn import FeatureMask


def _mlp(seed=0, d=2 * 6 * 6, classes=4):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, classes))


def _cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 4))


def _data(n=24, seed=1, shape=(2, 6, 6), classes=4):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n,) + shape, generator=g), torch.randint(0, classes, (n,), generator=g)


class _Masked(nn.Module):
    def __init__(self, body, **mask):
        super().__init__()
        self.mask = FeatureMask(**mask)
        self.body = body

    def forward(self, x):
        return self.body(self.mask(x))


class _LogReg(nn.Module):
    """Binary logistic regression as 2 logits (0, w.x + b): the input gradient of the
    loss has the constant sign -/+ sign(w) for label 1/0."""

    def __init__(self, d, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(d, generator=g)
        w[w.abs() < 0.1] = 0.5  # no zero or tiny weights: every coordinate has a sign
        self.w = nn.Parameter(w)
        self.b = nn.Parameter(torch.tensor(0.1))

    def forward(self, x):
        z = x.flatten(1) @ self.w + self.b
        return torch.stack([torch.zeros_like(z), z], 1)


def _loss(model, x, y):
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


# ----------------------------------------------------------------------------- optimality on a linear model

def test_fgsm_is_optimal_on_logistic_regression_and_pgd_cannot_beat_it():
    x, _ = _data(40, shape=(1, 5, 5))
    y = torch.randint(0, 2, (40,), generator=torch.Generator().manual_seed(3))
    model = _LogReg(25)
    eps = 0.1
    adv_f = attacks.fgsm(model, x, y, eps)
    # the optimum over the box {|d| <= eps} n [0, 1]: every pixel pushed to its bound
    s = torch.where(y == 1, -1.0, 1.0)[:, None] * model.w.detach().sign()
    best = (x.flatten(1) + eps * s).clamp(0, 1).view_as(x)
    torch.testing.assert_close(adv_f, best, rtol=0, atol=1e-7)
    for rand in (False, True):
        adv_p = attacks.pgd(model, x, y, eps, alpha=0.02, steps=20, random_start=rand, seed=5)
        assert (_loss(model, adv_p, y) <= _loss(model, adv_f, y) + 1e-5).all()
        torch.testing.assert_close(adv_p, best, rtol=0, atol=1e-6)
        assert ((adv_p - x).abs() <= eps + 1e-6).all()


# ----------------------------------------------------------------------------- reference libraries

@pytest.mark.parametrize("make", [_mlp, _cnn])
def test_fgsm_and_pgd_equal_torchattacks(make):
    ta = pytest.importorskip("torchattacks")
    model = make().eval()
    x, y = _data()
    for eps in (0.03, 0.2):
        ref = ta.FGSM(model, eps=eps)(x, y)
        torch.testing.assert_close(attacks.fgsm(model, x, y, eps), ref, rtol=0, atol=1e-6)
        ref = ta.PGD(model, eps=eps, alpha=eps / 4, steps=10, random_start=False)(x, y)
        out = attacks.pgd(model, x, y, eps, alpha=eps / 4, steps=10, random_start=False)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_targeted_fgsm_and_pgd_equal_torchattacks():
    ta = pytest.importorskip("torchattacks")
    model = _mlp().eval()
    x, y = _data()
    target = (y + 1) % 4
    atk = ta.FGSM(model, eps=0.1)
    atk.set_mode_targeted_by_label(quiet=True)
    torch.testing.assert_close(attacks.fgsm(model, x, target, 0.1, targeted=True), atk(x, target), rtol=0, atol=1e-6)
    atk = ta.PGD(model, eps=0.1, alpha=0.02, steps=8, random_start=False)
    atk.set_mode_targeted_by_label(quiet=True)
    out = attacks.pgd(model, x, target, 0.1, alpha=0.02, steps=8, random_start=False, targeted=True)
    torch.testing.assert_close(out, atk(x, target), rtol=0, atol=1e-5)


def test_fgsm_and_pgd_equal_art():
    pytest.importorskip("art")
    from art.attacks.evasion import FastGradientMethod, ProjectedGradientDescentPyTorch
    from art.estimators.classification import PyTorchClassifier
    model = _mlp().eval()
    x, y = _data()
    clf = PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=(2, 6, 6), nb_classes=4,
                            clip_values=(0.0, 1.0), device_type="cpu")
    ref = FastGradientMethod(clf, eps=0.1).generate(x.numpy(), y=F.one_hot(y, 4).numpy())
    torch.testing.assert_close(attacks.fgsm(model, x, y, 0.1), torch.from_numpy(ref), rtol=0, atol=1e-6)
    pgd = ProjectedGradientDescentPyTorch(clf, eps=0.1, eps_step=0.025, max_iter=10, num_random_init=0,
                                          batch_size=len(x), verbose=False)
    ref = pgd.generate(x.numpy(), y=F.one_hot(y, 4).numpy())
    out = attacks.pgd(model, x, y, 0.1, alpha=0.025, steps=10, random_start=False)
    torch.testing.assert_close(out, torch.from_numpy(ref), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- restarts, norms, batching

def test_restarts_never_lower_success():
    model = _mlp(2).eval()
    x, y = _data(64)
    broken = {}
    for r in (1, 4):
        adv = attacks.pgd(model, x, y, 0.05, alpha=0.01, steps=5, seed=7, restarts=r)
        with torch.no_grad():
            broken[r] = model(adv).argmax(1) != y
        assert ((adv - x).abs() <= 0.05 + 1e-6).all()
    assert (broken[4] | ~broken[1]).all()  # every sample broken by 1 restart stays broken
    assert broken[4].sum() >= broken[1].sum()


def test_l2_pgd_stays_in_the_ball_and_raises_loss():
    model = _cnn().eval()
    x, y = _data()
    for rand in (False, True):
        adv = attacks.pgd(model, x, y, 0.5, alpha=0.1, steps=10, random_start=rand, norm="2")
        assert ((adv - x).flatten(1).norm(dim=1) <= 0.5 + 1e-5).all()
        assert adv.min() >= 0 and adv.max() <= 1
        assert _loss(model, adv, y).sum() > _loss(model, x, y).sum()


def test_batching_gives_the_same_examples_without_random_start():
    model = _mlp().eval()
    x, y = _data(30)
    torch.testing.assert_close(attacks.fgsm(model, x, y, 0.1, batch_size=7), attacks.fgsm(model, x, y, 0.1),
                               rtol=0, atol=0)
    a = attacks.pgd(model, x, y, 0.1, alpha=0.02, steps=5, random_start=False, batch_size=8)
    torch.testing.assert_close(a, attacks.pgd(model, x, y, 0.1, alpha=0.02, steps=5, random_start=False), rtol=0, atol=1e-6)


def test_random_start_is_seeded():
    model = _mlp().eval()
    x, y = _data()
    a = attacks.pgd(model, x, y, 0.1, alpha=0.02, steps=3, seed=1)
    assert torch.equal(a, attacks.pgd(model, x, y, 0.1, alpha=0.02, steps=3, seed=1))
    assert not torch.equal(a, attacks.pgd(model, x, y, 0.1, alpha=0.02, steps=3, seed=2))


def test_targeted_pgd_reaches_the_target():
    model = _mlp().eval()
    x, y = _data(32)
    target = (y + 1) % 4
    adv = attacks.pgd(model, x, target, 1.0, alpha=0.1, steps=30, targeted=True)
    with torch.no_grad():
        assert (model(adv).argmax(1) == target).float().mean() >= 0.9


# ----------------------------------------------------------------------------- masks: EOT, frozen, state

def test_eot_with_one_sample_equals_pgd_on_a_fixed_mask():
    x, y = _data()
    model = _Masked(_mlp(), ratio=0.3, seed=11, eval_mask="consistent").eval()
    kw = dict(eps=0.1, alpha=0.02, steps=6, seed=3)
    # the model's own (consistent) mask
    assert torch.equal(attacks.eot_pgd(model, x, y, samples=1, masks="model", **kw), attacks.pgd(model, x, y, **kw))
    # one frozen draw: summing k identical gradients does not change their sign
    frozen = attacks.pgd_frozen_mask(model, x, y, **kw)
    for k in (1, 3):
        assert torch.equal(attacks.eot_pgd(model, x, y, samples=k, masks="frozen", **kw), frozen)
    # fresh draws do change the examples
    assert not torch.equal(attacks.eot_pgd(model, x, y, samples=3, **kw), frozen)


def test_mask_states_draw_as_documented():
    x, _ = _data(4)
    model = _Masked(nn.Flatten(), ratio=0.5, seed=2, eval_mask="off").eval()
    with attacks.model_state(model, "model"):
        assert torch.equal(model(x), x.flatten(1))  # eval_mask="off": no mask
    with attacks.model_state(model, "random"):
        a, b = model(x), model(x)
        assert not torch.equal(a, b) and not model.training and model.mask.training
    with attacks.model_state(model, "frozen"):
        assert torch.equal(model(x), model(x))
    with pytest.raises(ValueError, match="masks"):
        with attacks.model_state(model, "sometimes"):
            pass


def test_model_is_left_unchanged():
    x, y = _data()
    model = _Masked(_mlp(), ratio=0.3, seed=1)
    model.train()
    model.body[1].eval()  # mixed flags must come back as they were
    model.body[3].bias.requires_grad_(False)
    params = {k: v.clone() for k, v in model.state_dict().items()}
    model(x)  # advance the mask offset away from its initial value
    buffers = [b.clone() for b in model.mask.buffers()]
    flags = [m.training for m in model.modules()]
    reqs = [p.requires_grad for p in model.parameters()]
    for run in (lambda: attacks.fgsm(model, x, y, 0.1, masks="random"),
                lambda: attacks.pgd(model, x, y, 0.1, alpha=0.02, steps=3, restarts=2, masks="random"),
                lambda: attacks.eot_pgd(model, x, y, 0.1, alpha=0.02, steps=3, samples=4),
                lambda: attacks.pgd_frozen_mask(model, x, y, 0.1, alpha=0.02, steps=3),
                lambda: attacks.input_grad(model, x, y, masks="random")):
        run()
        assert all(torch.equal(a, b) for a, b in zip(model.mask.buffers(), buffers))
        assert [m.training for m in model.modules()] == flags
        assert [p.requires_grad for p in model.parameters()] == reqs
        assert all(p.grad is None for p in model.parameters())
        sd = model.state_dict()
        assert all(torch.equal(sd[k], v) for k, v in params.items() if "mask" not in k)


def test_attacks_do_not_modify_their_input():
    model = _mlp().eval()
    x, y = _data()
    x0 = x.clone()
    attacks.pgd(model, x, y, 0.1, alpha=0.02, steps=3)
    attacks.fgsm(model, x, y, 0.1)
    assert torch.equal(x, x0)


def test_transfer_crafts_on_the_surrogate():
    x, y = _data()
    model, surrogate = _mlp(0).eval(), _mlp(1).eval()
    atk = attacks.make_attack("pgd", 0.1, steps=4)
    assert torch.equal(attacks.transfer(surrogate, model, x, y, atk), atk(surrogate, x, y))
    with pytest.raises(ValueError, match="surrogate"):
        attacks.transfer(model, model, x, y, atk)


def test_make_attack_names_and_alpha():
    x, y = _data()
    model = _mlp().eval()
    atk = attacks.make_attack("pgd", 0.08, steps=10, seed=4)
    assert torch.equal(atk(model, x, y), attacks.pgd(model, x, y, 0.08, alpha=0.02, steps=10, seed=4))
    assert torch.equal(attacks.make_attack("fgsm", 0.1)(model, x, y), attacks.fgsm(model, x, y, 0.1))
    assert torch.equal(attacks.make_attack("pgd", 0.0)(model, x, y), x)
    with pytest.raises(ValueError, match="attack name"):
        attacks.make_attack("cw", 0.1)


def test_bad_arguments_are_named():
    model = _mlp().eval()
    x, y = _data()
    with pytest.raises(ValueError, match="norm"):
        attacks.pgd(model, x, y, 0.1, alpha=0.01, steps=2, norm="1")
    with pytest.raises(ValueError, match="steps"):
        attacks.pgd(model, x, y, 0.1, alpha=0.01, steps=0)
    with pytest.raises(ValueError, match="restarts"):
        attacks.pgd(model, x, y, 0.1, alpha=0.01, steps=2, random_start=False, restarts=3)
    with pytest.raises(ValueError, match="samples"):
        attacks.eot_pgd(model, x, y, 0.1, alpha=0.01, steps=2, samples=0)
    with pytest.raises(ValueError, match="batch_size"):
        attacks.fgsm(model, x, y, 0.1, batch_size=0)
    with pytest.raises(TypeError, match="y must be"):
        attacks.fgsm(model, x, y.float(), 0.1)
    with pytest.raises(ValueError, match="same number"):
        attacks.fgsm(model, x, y[:3], 0.1)
    with pytest.raises(ValueError, match="eps"):
        attacks.fgsm(model, x, y, -0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_inputs_on_a_cuda_model():
    model = _mlp().eval().cuda()
    x, y = _data()
    adv = attacks.pgd(model, x, y, 0.1, alpha=0.02, steps=3, random_start=False, batch_size=10)
    assert adv.device == x.device
    ref = attacks.pgd(model.cpu(), x, y, 0.1, alpha=0.02, steps=3, random_start=False)
    torch.testing.assert_close(adv, ref, rtol=0, atol=1e-5)
