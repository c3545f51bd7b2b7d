"""`fastmask evaluate --model-def package.module:factory --weights FILE` (fastmask.usermodel): any
torch.nn.Module, its state dict read with weights_only=True; a bad spec or file is one line naming it;
and `--attacks autoattack` from the command line."""
import json
import textwrap

import pytest
import torch

from fastmask import cli, data as D, honest, usermodel
from idx_data import write_idx

NETS = textwrap.dedent('''
    import torch
    from torch import nn

    def small():
        torch.manual_seed(5)
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))  # 10 logits (the data has 3 classes)

    def two_classes():
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 2))

    def broken():
        raise RuntimeError("no GPU here")

    def number():
        return 3

    not_callable = 7
''')


@pytest.fixture
def user(tmp_path, monkeypatch):
    """A user package on the Python path, a state dict for its factory `small`, and a 3-class IDX set."""
    (tmp_path / "usernets.py").write_text(NETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    import usernets
    importlib.reload(usernets)
    trained = usernets.small()
    with torch.no_grad():  # weights that differ from the factory's own initialisation
        trained[1].weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(9))
    torch.save(trained.state_dict(), tmp_path / "w.pt")
    write_idx(tmp_path / "data", 60, 40)
    return tmp_path, trained


def run_cli(*argv):
    torch.set_num_threads(1)
    return cli.main([str(a) for a in argv])


def test_model_def_evaluates_the_loaded_weights(user):
    tmp, trained = user
    out = tmp / "o"
    assert run_cli("evaluate", "--model-def", "usernets:small", "--weights", tmp / "w.pt", "--data-dir", tmp / "data",
                   "--preset", "check", "--n", 16, "--eps", "0,0.05", "--pgd-steps", 2, "--attacks", "autoattack",
                   "--attack-opt", "autoattack.steps=2", "--attack-opt", "autoattack.queries=5", "--out", out,
                   "--quiet") == 0
    rep = json.loads((out / "honest.json").read_text())
    assert list(rep["rows"]) == ["small"]
    assert "usernets:small with --weights" in rep["about"]["models"]
    assert rep["settings"]["attack_opts"] == {"autoattack": {"steps": 2, "queries": 5}}
    row = rep["rows"]["small"]
    assert row["autoattack"]["version"] == "standard" and row["autoattack"]["options"]["steps"] == 2
    # the figures are those of the model with the file's weights (not the factory's initialisation)
    data = D.load("mnist", tmp / "data")
    x, y = D.to_float(data.x_test[:16]), data.y_test[:16]
    with torch.no_grad():
        want = (trained.eval()(x).argmax(1) == y).double().mean().item()
    assert row["clean"]["accuracy"] == want
    assert row["robustness"]["robust_accuracy"][1] <= row["robustness"]["accuracy"]["autoattack"][1]


@pytest.mark.parametrize("spec, weights, message", [
    ("usernets.small", "w.pt", "--model-def 'usernets.small': expected package.module:factory"),
    ("nosuchpkg_xyz.nets:small", "w.pt", "no module 'nosuchpkg_xyz.nets' on the Python path"),
    ("usernets:large", "w.pt", "module 'usernets' has no attribute 'large'"),
    ("usernets:not_callable", "w.pt", "'not_callable' is a int, not callable"),
    ("usernets:number", "w.pt", "the factory returned a int, not a torch.nn.Module"),
    ("usernets:broken", "w.pt", "calling broken() raised RuntimeError: no GPU here"),
    ("usernets:small", "missing.pt", "--weights '{tmp}/missing.pt': no such file"),
    ("usernets:small", "garbage.pt", "--weights '{tmp}/garbage.pt': not readable by torch.load(weights_only=True)"),
    ("usernets:small", "list.pt", "--weights '{tmp}/list.pt': holds a list, not a state dict"),
    ("usernets:two_classes", "w.pt", "--weights '{tmp}/w.pt' does not fit usernets:two_classes: Error(s) in loading"),
])
def test_bad_model_def_is_one_line(user, capsys, spec, weights, message):
    tmp, _ = user
    (tmp / "garbage.pt").write_text("not a zip")
    torch.save([torch.zeros(2)], tmp / "list.pt")
    assert run_cli("evaluate", "--model-def", spec, "--weights", tmp / weights, "--data-dir", tmp / "data",
                   "--out", tmp / "o") == 2
    err = capsys.readouterr().err
    assert message.format(tmp=tmp) in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_model_def_pairs_and_outputs(user, capsys):
    tmp, _ = user
    common = ("--data-dir", tmp / "data", "--out", tmp / "o")
    assert run_cli("evaluate", "--model-def", "usernets:small", *common) == 2
    assert "--model-def and --weights come in pairs: got 1 --model-def and 0 --weights" in capsys.readouterr().err
    # a model whose logits cannot hold the labels (3 classes in the data)
    m = usermodel.load_model_def("usernets:two_classes", _save(tmp, "usernets:two_classes"))
    with pytest.raises(ValueError, match=r"maps \(2, 1, 28, 28\) to \(2, 2\), not 2 x classes logits"):
        usermodel.check_logits(m, torch.rand(4, 1, 28, 28), 3, "--model-def 'usernets:two_classes'")
    assert run_cli("evaluate", "--model-def", "usernets:two_classes", "--weights", tmp / "two.pt", *common) == 2
    assert "to (2, 2), not 2 x classes logits (classes >= 3)" in capsys.readouterr().err
    # names: the factory's, or NAME=; two models may not share one
    assert run_cli("evaluate", "--model-def", "usernets:small", "--weights", tmp / "w.pt", "--model-def",
                   "usernets:small", "--weights", tmp / "w.pt", *common) == 2
    assert "the name 'small' is taken" in capsys.readouterr().err


def _save(tmp, spec):
    m = usermodel._factory(spec)()
    torch.save(m.state_dict(), tmp / "two.pt")
    return tmp / "two.pt"


@pytest.mark.parametrize("argv, message", [
    (["--attacks", "aa"], "argument --attacks: invalid choice: 'aa'"),
    (["--attack-opt", "autoattack.steps=2"], "needs attacks='autoattack', got 'pgd'"),
    (["--attacks", "autoattack", "--attack-opt", "autoattack.version=rand"], "the honest evaluation picks"),
    (["--attacks", "autoattack", "--attack-opt", "autoattack.queries=0"], "autoattack.queries must be >= 1"),
])
def test_attacks_choice_errors(user, capsys, argv, message):
    tmp, _ = user
    assert run_cli("evaluate", "--model-def", "usernets:small", "--weights", tmp / "w.pt", "--data-dir",
                   tmp / "data", "--out", tmp / "o", *argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_python_api_any_module(user):
    """docs/evaluation.md's example: evaluate_models on any nn.Module, AutoAttack included."""
    tmp, trained = user
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 3, (8,))
    s = honest.HonestSettings.preset("check", n=8, eps_list=(0, 0.05), attacks="autoattack", pgd_steps=2)
    rep = honest.evaluate_models({"mine": trained}, x, y, tmp / "api", settings=s, baseline=None, log=lambda *a: None)
    assert rep["rows"]["mine"]["autoattack"]["version"] == "standard"
    assert (tmp / "api" / "honest.md").is_file()
