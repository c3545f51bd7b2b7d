"""The attack registry: one entry per attack reaches make_attack, evaluate.robustness, the honest
evaluation and the command line's --attack-opt; and the one set of argument checks (fastmask._checks)."""
import pytest
import torch
from torch import nn

from fastmask import _checks as C
from fastmask import attacks, cli, evaluate as E, honest, stats


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).eval()


def _data(n=30):
    g = torch.Generator().manual_seed(3)
    return torch.rand(n, 1, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def shift(model, x, y, eps, *, sign=1.0, lo=0.0, hi=1.0, batch_size=None):
    """A toy attack: every pixel moved by sign * eps (no gradient)."""
    return (x + sign * eps).clamp(lo, hi)


@pytest.fixture
def toy_entry():
    """A new attack: one function and one register() call, nothing else."""
    entry = attacks.register(attacks.Attack(
        "shift", shift, {"sign": attacks.Setting(1.0, C.finite, float, "direction")}, kind="black_box"))
    yield entry
    del attacks.REGISTRY["shift"]


def test_a_new_entry_reaches_every_consumer(toy_entry):
    model, (x, y) = _mlp(), _data()
    down = attacks.make_attack("shift", 0.2, sign=-1.0)(model, x, y)
    assert torch.equal(down, (x - 0.2).clamp(0, 1))
    r = E.robustness(model, x, y, eps_list=[0.0, 0.2], attacks=("fgsm", "shift"), options={"shift": {"sign": -1.0}})
    assert r["correct"]["shift"][1].tolist() == (E.predict(model, down) == y).tolist()
    assert r["config"]["options"] == {"shift": {"sign": -1.0}}
    assert attacks.parse_options(["shift.sign=-1"]) == {"shift": {"sign": -1.0}}
    # the honest evaluation runs it (honest="always" by default), with its options, after the built-in ones
    rep = honest.honest_report({"m": model}, x, y, eps_list=[0.0, 0.2], pgd_steps=2, restarts=2,
                               options={"shift": {"sign": -1.0}})
    acc = rep["rows"]["m"]["robustness"]["accuracy"]
    assert list(acc) == ["fgsm", "pgd", "pgd_restarts", "shift"]
    assert acc["shift"] == r["accuracy"]["shift"]


def test_settings_are_checked_and_named(toy_entry):
    with pytest.raises(ValueError, match="attack 'pgd' has no setting 'step'"):
        attacks.make_attack("pgd", 0.1, step=3)
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        attacks.make_attack("pgd", 0.1, steps=0)
    with pytest.raises(ValueError, match="shift.sign must be finite, got nan"):
        attacks.get("shift").options({"sign": float("nan")})
    for spec, want in (("pgd.steps", "expected NAME.KEY=VALUE"), ("cw.steps=3", "unknown attack 'cw'"),
                       ("pgd.nope=3", "has no setting 'nope'"), ("pgd.steps=x", "'x' is not a valid steps"),
                       ("pgd.steps=0", "pgd.steps must be >= 1, got 0"),
                       ("pgd.random_start=maybe", "not a valid random_start")):
        with pytest.raises(ValueError, match=want):
            attacks.parse_options([spec])
    with pytest.raises(ValueError, match="already registered"):
        attacks.register(attacks.Attack("shift", shift))
    with pytest.raises(ValueError, match="kind='white'"):
        attacks.register(attacks.Attack("other", shift, kind="white"))


def test_one_step_rule_and_keyword_only_signatures():
    model, (x, y) = _mlp(), _data()
    for fn in (attacks.fgsm, attacks.pgd, attacks.eot_pgd, attacks.pgd_frozen_mask):
        with pytest.raises(TypeError):
            fn(model, x, y, 0.1, 0.02)  # everything after eps is keyword-only
    assert attacks.default_alpha(0.1, 4) == 2.5 * 0.1 / 4
    rule = attacks.pgd(model, x, y, 0.1, steps=4, seed=1)
    assert torch.equal(rule, attacks.pgd(model, x, y, 0.1, steps=4, alpha=2.5 * 0.1 / 4, seed=1))
    assert torch.equal(rule, attacks.make_attack("pgd", 0.1, steps=4, seed=1)(model, x, y))
    r = E.robustness(model, x, y, eps_list=[0.1], attacks=("pgd",), pgd_steps=4, seed=1)  # pgd_alpha=None: the rule
    assert r["correct"]["pgd"][0].tolist() == (E.predict(model, rule) == y).tolist()


def test_options_for_an_attack_not_run_are_refused():
    model, (x, y) = _mlp(), _data()
    with pytest.raises(ValueError, match="options for 'eot'"):
        E.robustness(model, x, y, eps_list=[0.1], attacks=("fgsm",), options={"eot": {"samples": 2}})
    with pytest.raises(ValueError, match="has no setting 'samples'"):
        honest.HonestSettings(attack_opts={"pgd": {"samples": 2}})


def test_versus_baseline_is_compare_per_row():
    a = torch.tensor([[True, True, False, True], [False, True, False, False]])
    b = torch.tensor([[True, False, False, False], [False, False, False, True]])
    rows = {"base": {"c": b}, "x": {"c": a}}
    vs = stats.versus_baseline(rows, "base", lambda r: r["c"])
    assert list(vs) == ["x"] and vs["x"] == [stats.compare(a[0], b[0]), stats.compare(a[1], b[1])]
    one = stats.versus_baseline(rows, "base", lambda r: {"first": r["c"][0]}, keys=("delta",))
    assert one == {"x": {"first": {"delta": stats.compare(a[0], b[0])["delta"]}}}


def test_one_norm_rule_for_ops_and_attacks():
    model, (x, y) = _mlp(), _data(4)
    for bad in ("l2", "linf", "1"):
        with pytest.raises(ValueError, match=f"norm must be one of 'inf', '2', got '{bad}'"):
            attacks.pgd(model, x, y, 0.1, steps=1, norm=bad)
    assert C.norm("norm", 2) == "2" and C.norm("norm", float("inf")) == "inf"


def test_one_check_three_spellings(capsys):
    with pytest.raises(ValueError, match=r"^steps must be >= 1, got 0$"):
        C.positive_int("steps", 0)
    with pytest.raises(ValueError, match=r"^n=0 must be >= 1$"):
        honest.HonestSettings(n=0)
    assert cli.main(["attack", "--checkpoint", "x.pt", "--pgd-steps", "0"]) == 2
    assert "argument --pgd-steps: '0' must be >= 1" in capsys.readouterr().err


def test_old_preset_names_keep_working_with_a_note(tmp_path, capsys):
    assert honest.HonestSettings.preset("smoke") == honest.HonestSettings.preset("check")
    assert cli.main(["evaluate", "--preset", "smoke", "--out", str(tmp_path / "o")]) == 2  # no models
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("fastmask evaluate: note: --preset smoke is now --preset check") and len(err) == 2
    assert cli.main(["evaluate", "--preset", "check", "--attack-opt", "pgd.steps=0", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--attack-opt pgd.steps must be >= 1, got 0" in err


def test_an_entry_may_name_its_function_lazily():
    """fn as "module:function" is imported on first use (a module that imports attacks.py can hold it)."""
    entry = attacks.register(attacks.Attack("fgsm_lazy", "fastmask.attacks:fgsm", kind="single_step", honest=None))
    try:
        model, (x, y) = _mlp(), _data()
        assert entry.function() is attacks.fgsm
        assert torch.equal(attacks.make_attack("fgsm_lazy", 0.1)(model, x, y), attacks.fgsm(model, x, y, 0.1))
    finally:
        del attacks.REGISTRY["fgsm_lazy"]


def test_autoattack_components_are_entries():
    """Each AutoAttack component is one registry entry: make_attack(name, eps, **settings) is the
    function called with those settings, and its settings are checked by name."""
    from fastmask import models
    model = models.build("mlp", seed=0).eval()
    x = torch.rand(12, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y = model(x).argmax(1)
    cases = [("apgd", dict(steps=3, loss="dlr"), lambda: attacks.apgd(model, x, y, 0.05, steps=3, loss="dlr")),
             ("apgd_t", dict(steps=3, targets=2), lambda: attacks.apgd_targeted(model, x, y, 0.05, steps=3, targets=2)),
             ("fab_t", dict(steps=3, targets=2), lambda: attacks.fab_targeted(model, x, y, 0.05, steps=3, targets=2)),
             ("square", dict(queries=15), lambda: attacks.square(model, x, y, 0.05, queries=15))]
    for name, settings, direct in cases:
        assert torch.equal(attacks.make_attack(name, 0.05, **settings)(model, x, y), direct()), name
    with pytest.raises(ValueError, match="loss must be one of"):
        attacks.make_attack("apgd", 0.05, loss="cw")
    with pytest.raises(ValueError, match="queries must be >= 1, got 0"):
        attacks.make_attack("square", 0.05, queries=0)


def test_autoattack_entry_passes_every_setting(monkeypatch):
    """make_attack("autoattack", eps, **settings): each setting reaches the cascade (the x_adv of a
    small run often does not show a changed size: broken points stop early, robust ones stay x)."""
    from fastmask import autoattack as AA
    seen = {}

    def spy(model, x, y, eps, **kw):
        seen.update(kw, eps=eps)
        return x, {}
    monkeypatch.setattr(AA, "autoattack", spy)
    x, y = torch.rand(2, 1, 28, 28), torch.tensor([0, 1])
    attacks.make_attack("autoattack", 0.05, seed=4, version="rand", steps=3, queries=5, targets=2, draws=6,
                        eot_samples=7)(None, x, y)
    assert seen == dict(eps=0.05, version="rand", seed=4, batch_size=None, steps=3, queries=5, targets=2, draws=6,
                        eot_samples=7)
    with pytest.raises(ValueError, match="autoattack.draws must be >= 1, got 0"):
        attacks.parse_options(["autoattack.draws=0"])
    assert attacks.parse_options(["autoattack.draws=none"]) == {"autoattack": {"draws": None}}


def _message(exc, fn, *args, **kw):
    with pytest.raises(exc) as info:
        fn(*args, **kw)
    return str(info.value)


def test_registry_refusals_are_worded_exactly():
    """register() takes every documented kind and honest choice and names the field it refuses;
    an entry's settings, missing context and a default that fails its own check are named."""
    assert _message(TypeError, attacks.register, {"name": "x"}) == "register takes an Attack, got dict"
    for field, value, choices in (("kind", "white", "'single_step', 'iterative', 'black_box', 'transfer'"),
                                  ("norm", "1", "'inf', '2'"), ("honest", "never", "'always', 'test_mask', None")):
        entry = attacks.Attack("other", shift, **{field: value})
        assert _message(ValueError, attacks.register, entry) == f"{field}={value!r} must be one of {choices}"
        assert "other" not in attacks.REGISTRY
    for kw in (dict(kind="iterative"), dict(kind="transfer"), dict(honest="test_mask"), dict(honest=None),
               dict(norm="2")):
        attacks.register(attacks.Attack("other", shift, **kw))
        del attacks.REGISTRY["other"]
    assert _message(ValueError, attacks.get("fgsm").options, {"steps": 3}) == (
        "attack 'fgsm' has no setting 'steps' (its settings: none)")
    assert _message(ValueError, attacks.get("pgd").options, {"step": 3}) == (
        "attack 'pgd' has no setting 'step' (its settings: steps, alpha, restarts, random_start)")
    assert _message(ValueError, attacks.make_attack, "pgd", 0.1, random_start="yes") == (
        "pgd.random_start must be True or False, got 'yes'")
    assert _message(ValueError, attacks.make_attack, "pgd", 0.1, alpha=-1.0) == "pgd.alpha must be > 0, got -1.0"
    # a given value is named NAME.KEY, a default (the entry's own) by its key
    bad = attacks.Attack("bad_default", shift, {"n": attacks.Setting(0, C.positive_int)})
    assert _message(ValueError, bad.options) == "n must be >= 1, got 0"
    assert _message(ValueError, bad.options, {"n": -1}) == "bad_default.n must be >= 1, got -1"
    assert _message(ValueError, attacks.get("transfer").bind, 0.1) == "attack 'transfer' needs surrogate="
    # "module:function" may be relative to the fastmask package
    assert attacks.Attack("rel", ".square:square").function() is attacks.square


def test_parse_options_spellings():
    """--attack-opt NAME.KEY=VALUE: the first '=' ends the key, the first '.' the name; booleans
    in the usual spellings, any case; alpha none/auto; each refusal names the option."""
    def opt(spec):
        return attacks.parse_options([spec])
    for text in ("1", "true", "yes", "on", "TRUE", "On"):
        assert opt(f"pgd.random_start={text}") == {"pgd": {"random_start": True}}, text
    for text in ("0", "false", "no", "off", "FALSE", "Off"):
        assert opt(f"pgd.random_start={text}") == {"pgd": {"random_start": False}}, text
    assert _message(ValueError, attacks.RANDOM_START.parse, "maybe") == "'maybe' is not true or false"
    for text in ("none", "auto", "None", "AUTO"):
        assert opt(f"pgd.alpha={text}") == {"pgd": {"alpha": None}}, text
    assert opt("pgd.alpha=0.05") == {"pgd": {"alpha": 0.05}}
    for spec, want in (
            ("pgd.steps=1=2", "'1=2' is not a valid steps"),
            ("pgd.x.y=1", "attack 'pgd' has no setting 'x.y' (its settings: steps, alpha, restarts, random_start)"),
            (".steps=3", "expected NAME.KEY=VALUE (e.g. pgd.steps=100)"),
            ("pgd.=3", "expected NAME.KEY=VALUE (e.g. pgd.steps=100)"),
            ("fgsm.steps=3", "attack 'fgsm' has no setting 'steps' (its settings: none)")):
        assert _message(ValueError, opt, spec) == f"--attack-opt {spec!r}: {want}", spec
    assert _message(ValueError, opt, "pgd.alpha=-1") == "--attack-opt pgd.alpha must be > 0, got -1.0"
    assert _message(ValueError, opt, "nope.steps=3").startswith(
        "--attack-opt 'nope.steps=3': unknown attack 'nope' (one of fgsm, pgd, eot, frozen, pgd_l2, transfer, ")
