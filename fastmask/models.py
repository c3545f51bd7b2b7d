"""The paper's two models (section VI), with an optional FeatureMask in front.

Every row of the experiment uses the same architecture: only `model.mask`
differs (nn.Identity when there is no masking; a FeatureMask for the random,
fixed, block, blur, dropout-style and variability rows; a LearnedMask, the
paper's soft mask of eqs. 15-17, when the mask config is {"kind": "learned", ...}).

    mlp: 784 -> 256 -> 128 -> 10, ReLU
    cnn: conv 32 3x3, ReLU, maxpool 2 -> conv 64 3x3, ReLU, maxpool 2 -> dense 128, ReLU -> 10

Checkpoints are plain dicts (tensors, str, int, float, bool, lists, dicts) so
that torch.load(weights_only=True) can read them.
"""
import io
import itertools
from pathlib import Path

import torch
from torch import nn

from .data import atomic_write_bytes

MODELS = ("mlp", "cnn")
INPUT_SHAPE = (1, 28, 28)  # one MNIST / Fashion-MNIST image: the shape of a learned mask
CHECKPOINT_KIND = "fastmask-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or not a fastmask checkpoint."""


def body(name):
    if name == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(),
                             nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
    if name == "cnn":
        return nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                             nn.Linear(64 * 5 * 5, 128), nn.ReLU(), nn.Linear(128, 10))
    raise ValueError(f"model={name!r} is not one of {MODELS}")


class Net(nn.Module):
    """mask (FeatureMask, LearnedMask or identity) followed by the classifier; input N x 1 x 28 x 28 in [0, 1]."""

    def __init__(self, name, mask_cfg=None):
        super().__init__()
        self.name = name
        self.mask_cfg = dict(mask_cfg) if mask_cfg else None
        if is_learned(self.mask_cfg):
            from .nn import LearnedMask
            self.mask = LearnedMask(INPUT_SHAPE, **{k: v for k, v in self.mask_cfg.items() if k != "kind"})
        elif self.mask_cfg:
            from .nn import FeatureMask
            self.mask = FeatureMask(**self.mask_cfg)
        else:
            self.mask = nn.Identity()
        self.net = body(name)

    def forward(self, x):
        if self._mask_fuses():
            h = self.mask.linear(x.flatten(1), self.net[1])
            for layer in itertools.islice(self.net, 2, None):
                h = layer(h)
            return h
        return self.net(self.mask(x))

    def _mask_fuses(self):
        """Whether the learned mask runs fused with the first Linear layer (the MLP; LearnedMask.linear):
        the same function, a cheaper backward. Not with hooks on the modules it skips."""
        from .nn import LearnedMask
        m, net = self.mask, self.net
        if type(m) is not LearnedMask:  # every other model, on each forward: nothing more to look at
            return False
        from .inputgrad import _global_hooks, _hooked
        return (len(net) > 1 and type(net[0]) is nn.Flatten
                and type(net[1]) is nn.Linear and net[0].start_dim == 1 and net[0].end_dim == -1
                and not any(_hooked(k) for k in (self, m, net, net[0], net[1])) and not _global_hooks())


def mask_config(ratio, mode="pixel", scope="sample", seed=0, redraw_steps=None, rescale=False):
    """The FeatureMask config of a trained row (`fastmask train` and the reproduce rows): shared
    channels, fill 0, mask seed = training seed + 1 (not the weights' seed), no mask in eval mode.
    redraw_steps / rescale (FeatureMask) enter the config only when set, so the configs of the
    rows without them, and their checkpoints, are what they always were."""
    cfg = {"ratio": ratio, "mode": mode, "scope": scope, "channels": "shared", "fill": 0.0, "seed": seed + 1,
           "eval_mask": "off"}
    if redraw_steps is not None:
        cfg["redraw_steps"] = redraw_steps
    if rescale:
        cfg["rescale"] = True
    return cfg


def learned_mask_config(l1, init=3.0):
    """The config of a LearnedMask row: lambda = l1 (>= 0) of the penalty lambda * sum |M|."""
    from . import _checks as C
    return {"kind": "learned", "l1": C.nonneg("l1", l1), "init": float(init)}


def is_learned(mask_cfg):
    return bool(mask_cfg) and mask_cfg.get("kind") == "learned"


def has_test_mask(mask_cfg):
    """Whether a test mask (M_test) means something: a FeatureMask config (a learned mask is
    always applied, deterministically, so it has no separate test-mask variant)."""
    return bool(mask_cfg) and not is_learned(mask_cfg)


def build(name, mask_cfg=None, seed=None):
    """A fresh model; `seed` makes the initial weights reproducible without touching the global RNG."""
    if seed is None:
        return Net(name, mask_cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Net(name, mask_cfg)


def with_eval_mask(model, eval_mask):
    """A copy of a masked model whose FeatureMask does `eval_mask` ("off" / "consistent") in eval mode."""
    if not has_test_mask(model.mask_cfg):
        raise ValueError(f"model {model.name!r} has no FeatureMask, so eval_mask={eval_mask!r} means nothing")
    other = Net(model.name, dict(model.mask_cfg, eval_mask=eval_mask))
    other.load_state_dict(model.state_dict())
    return other.train(model.training)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def save(path, model, config, data_hash, extra=None):
    """Write a checkpoint atomically: weights, the row's config, the data hash and
    `extra` (e.g. the training history, so that a resumed run reports the same figures)."""
    if not isinstance(model, Net):
        raise TypeError(f"save expects a fastmask.models.Net, got {type(model).__name__}")
    blob = {"kind": CHECKPOINT_KIND, "version": CHECKPOINT_VERSION, "model": model.name,
            "mask_cfg": model.mask_cfg, "config": config, "data_hash": data_hash, "extra": extra,
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    buf = io.BytesIO()
    torch.save(blob, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_weights_only(path, error):
    """torch.load(path, weights_only=True) on the CPU; a failure raises error(first line of the reason)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise error(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from None


def read_checkpoint(path):
    """The checkpoint dict, after checking it is one; CheckpointError naming the path otherwise."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    blob = load_weights_only(path, lambda why: CheckpointError(f"checkpoint {path} is unreadable: {why}"))
    if not isinstance(blob, dict) or blob.get("kind") != CHECKPOINT_KIND:
        raise CheckpointError(f"{path} is not a fastmask checkpoint")
    if blob.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {blob.get('version')!r}, "
                              f"expected {CHECKPOINT_VERSION}")
    return blob


def load(path, with_meta=False):
    """A ready model (eval mode) from a checkpoint; with_meta=True also returns the dict."""
    blob = read_checkpoint(path)
    try:
        model = Net(blob["model"], blob["mask_cfg"])
        model.load_state_dict(blob["state_dict"])
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} does not fit its model: {first}") from None
    model.eval()
    return (model, blob) if with_meta else model
