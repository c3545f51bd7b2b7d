"""The models of `fastmask evaluate`: fastmask checkpoints (--checkpoint NAME=PATH, --from DIR)
and any torch.nn.Module (--model-def package.module:factory --weights FILE).

    model = load_model_def("mypkg.nets:small_cnn", "weights.pt")

The factory is imported from the user's PYTHONPATH and called with no arguments; it
returns a torch.nn.Module mapping N x C x H x W inputs in [0, 1] to logits (N x classes).
The weights are a state dict read with torch.load(weights_only=True) (no pickled code
runs). Every failure is a ValueError of one line naming the value.
"""
import importlib
from pathlib import Path

import torch
from torch import nn

from . import models as M

__all__ = ["load_model_def", "check_logits", "model_defs", "parse_checkpoints", "command_models"]


def _factory(spec):
    mod_name, sep, attr = str(spec).partition(":")
    if not sep or not mod_name or not attr:
        raise ValueError(f"--model-def {spec!r}: expected package.module:factory")
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and (mod_name == e.name or mod_name.startswith(e.name + ".")):
            raise ValueError(f"--model-def {spec!r}: no module {mod_name!r} on the Python path (PYTHONPATH)") from None
        raise ValueError(f"--model-def {spec!r}: importing {mod_name!r} failed: {e}") from None
    except Exception as e:  # the user's module raised while importing
        raise ValueError(f"--model-def {spec!r}: importing {mod_name!r} failed: {type(e).__name__}: {e}") from None
    fn = mod
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ValueError(f"--model-def {spec!r}: module {mod_name!r} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(f"--model-def {spec!r}: {attr!r} is a {type(fn).__name__}, not callable")
    return fn


def load_model_def(spec, weights):
    """factory() of spec "package.module:factory", with the state dict of file `weights`; in eval mode."""
    fn = _factory(spec)
    try:
        model = fn()
    except Exception as e:
        raise ValueError(f"--model-def {spec!r}: calling {spec.partition(':')[2]}() raised "
                         f"{type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model-def {spec!r}: the factory returned a {type(model).__name__}, not a torch.nn.Module")
    path = Path(weights)
    if not path.is_file():
        raise ValueError(f"--weights {str(weights)!r}: no such file")
    sd = M.load_weights_only(path, lambda why: ValueError(
        f"--weights {str(weights)!r}: not readable by torch.load(weights_only=True): {why}"))
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"--weights {str(weights)!r}: holds a {type(sd).__name__}, not a state dict "
                         "({name: tensor})")
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        first = " ".join(str(e).split())
        raise ValueError(f"--weights {str(weights)!r} does not fit {spec}: {first[:300]}") from None
    return model.eval()


def check_logits(model, x, classes, what):
    """One forward of two inputs: the output must be 2 x K logits with K >= classes (the labels' count)."""
    with torch.no_grad():
        z = model(x[:2])
    if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[0] != len(x[:2]) or z.shape[1] < classes:
        shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"{what}: the model maps {tuple(x[:2].shape)} to {shape}, not "
                         f"{len(x[:2])} x classes logits (classes >= {classes})")


def model_defs(specs, weights):
    """{name: (spec, model)} from `--model-def [NAME=]package.module:factory` and `--weights FILE` lists,
    paired in order (the name defaults to the factory's)."""
    specs, weights = list(specs or ()), list(weights or ())
    if len(specs) != len(weights):
        raise ValueError(f"--model-def and --weights come in pairs: got {len(specs)} --model-def and "
                         f"{len(weights)} --weights")
    out = {}
    for spec, w in zip(specs, weights):
        name, sep, target = spec.partition("=")
        if not sep:
            name, target = None, spec
        model = load_model_def(target, w)
        name = target.partition(":")[2].rpartition(".")[2] if name is None else name
        if not name:
            raise ValueError(f"--model-def {spec!r}: expected [NAME=]package.module:factory")
        if name in out:
            raise ValueError(f"--model-def {spec!r}: the name {name!r} is taken; write NAME=package.module:factory")
        out[name] = (spec, model)
    return out


def parse_checkpoints(specs, from_dir=None, required=True):
    """{name: path} from NAME=PATH strings and/or the checkpoints/*.pt of a reproduce folder
    (required=False: none is fine, the models come from --model-def)."""
    out = {}
    if from_dir is not None:
        folder = Path(from_dir) / "checkpoints"
        if not folder.is_dir():
            raise ValueError(f"--from {str(from_dir)!r}: no checkpoints/ folder in it")
        out.update({p.stem: p for p in sorted(folder.glob("*.pt"))})
    for spec in specs or ():
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).stem, spec
        if not name or not path:
            raise ValueError(f"--checkpoint {spec!r}: expected NAME=PATH or PATH")
        out[name] = Path(path)
    if not out and required:
        raise ValueError("no models: give --checkpoint NAME=PATH (repeatable), --from DIR or --model-def")
    return out


def command_models(checkpoints, from_dir, specs, weights):
    """(checkpoint paths {name: path}, {spec: model} of --model-def, every model {name: model}, the
    baseline first in every table) from the command line's --checkpoint, --from, --model-def, --weights."""
    from .honest import load_models
    paths = parse_checkpoints(checkpoints, from_dir, required=not specs)
    defs = model_defs(specs, weights)
    taken = sorted(set(defs) & set(paths))
    if taken:
        raise ValueError(f"--model-def: the name {taken[0]!r} is also a checkpoint's; write "
                         "NAME=package.module:factory")
    models = {**load_models(paths), **{name: m for name, (_, m) in defs.items()}}
    if "baseline" in models:
        models = {"baseline": models.pop("baseline"), **models}
    return paths, {spec: m for spec, m in defs.values()}, models
