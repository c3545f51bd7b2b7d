"""fastmask.models: the paper's architectures, the mask slot, checkpoints."""
import pickle

import pytest
import torch
from torch import nn

from fastmask import models as M
from fastmask.nn import FeatureMask

MASK = {"ratio": 0.3, "mode": "pixel", "scope": "sample", "channels": "shared", "fill": 0.0, "seed": 5,
        "eval_mask": "off"}


def test_architectures():
    x = torch.rand(3, 1, 28, 28)
    mlp, cnn = M.build("mlp"), M.build("cnn")
    assert mlp(x).shape == cnn(x).shape == (3, 10)
    # 784-256-128-10 and conv32-conv64-dense128-10 (28 -> 26 -> 13 -> 11 -> 5)
    assert M.n_params(mlp) == 784 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10
    assert M.n_params(cnn) == (32 * 9 + 32) + (64 * 32 * 9 + 64) + (64 * 5 * 5 * 128 + 128) + (128 * 10 + 10)
    assert [type(m).__name__ for m in mlp.net] == ["Flatten", "Linear", "ReLU", "Linear", "ReLU", "Linear"]
    with pytest.raises(ValueError, match="model='resnet'"):
        M.build("resnet")


@pytest.mark.parametrize("name", M.MODELS)
def test_mask_slot_same_architecture(name):
    plain, masked = M.build(name, seed=1), M.build(name, MASK, seed=1)
    assert isinstance(plain.mask, nn.Identity) and isinstance(masked.mask, FeatureMask)
    assert [(k, p.shape) for k, p in plain.net.named_parameters()] == \
           [(k, p.shape) for k, p in masked.net.named_parameters()]
    # same seed -> same initial weights, whatever the mask
    assert all(torch.equal(a, b) for a, b in zip(plain.net.parameters(), masked.net.parameters()))
    x = torch.rand(4, 1, 28, 28)
    masked.eval()
    plain.eval()
    assert torch.equal(masked(x), plain(x))  # eval_mask="off": no mask at test time
    masked.train()
    assert not torch.equal(masked(x), plain(x))  # training: a random mask


def test_build_seed_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = M.build("mlp", seed=7)
    assert torch.equal(torch.rand(3), expected)
    b = M.build("mlp", seed=7)
    c = M.build("mlp", seed=8)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.net[1].weight, c.net[1].weight)


def test_save_load_roundtrip(tmp_path):
    model = M.build("cnn", MASK, seed=0)
    model.train()
    model(torch.rand(2, 1, 28, 28))  # advance the mask's RNG state
    cfg = {"row": "r", "lr": 1e-3, "nested": {"a": [1, 2]}}
    path = tmp_path / "sub" / "m.pt"
    M.save(path, model, cfg, "abc123", extra={"history": [{"loss": 0.5}]})
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.pt"]  # nothing temporary left
    back, blob = M.load(path, with_meta=True)
    assert not back.training and blob["config"] == cfg and blob["data_hash"] == "abc123"
    assert blob["extra"] == {"history": [{"loss": 0.5}]}
    for (k, v), (k2, v2) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    x = torch.rand(5, 1, 28, 28)
    model.eval()
    assert torch.equal(back(x), model(x))
    assert isinstance(M.load(path), M.Net)


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(M.CheckpointError, match=f"{tmp_path / 'none.pt'} does not exist"):
        M.load(tmp_path / "none.pt")
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(M.CheckpointError, match=f"{bad} is unreadable"):
        M.load(bad)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(M.CheckpointError, match=f"{other} is not a fastmask checkpoint"):
        M.load(other)
    # a pickle of arbitrary objects is refused by weights_only loading
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(nn.Linear(2, 2)))
    with pytest.raises(M.CheckpointError, match="unreadable"):
        M.load(evil)
    # weights that do not fit the model
    model = M.build("mlp")
    M.save(tmp_path / "m.pt", model, {}, "h")
    blob = torch.load(tmp_path / "m.pt", weights_only=True)
    blob["model"] = "cnn"
    torch.save(blob, tmp_path / "wrong.pt")
    with pytest.raises(M.CheckpointError, match="does not fit its model"):
        M.load(tmp_path / "wrong.pt")
    with pytest.raises(TypeError, match="Net"):
        M.save(tmp_path / "x.pt", nn.Linear(2, 2), {}, "h")


def test_with_eval_mask():
    model = M.build("mlp", MASK, seed=0).eval()
    x = torch.rand(6, 1, 28, 28)
    mt = M.with_eval_mask(model, "consistent").eval()
    y1, y2 = mt(x), mt(x)
    assert torch.equal(y1, y2)  # one consistent mask: the same output every time
    assert not torch.equal(y1, model(x))  # and it does mask
    assert model.mask_cfg["eval_mask"] == "off"  # the original is untouched
    with pytest.raises(ValueError, match="no FeatureMask"):
        M.with_eval_mask(M.build("mlp"), "consistent")
