"""fastmask: fused feature-masking, attack-step and gradient-manipulation ops for PyTorch.

    import fastmask
    y = fastmask.ops.mask_apply(x, 0.3, seed=0, offset=step)
    layer = fastmask.nn.FeatureMask(0.3, seed=0)

`fastmask.ops` holds the ops (C++/CUDA extension `fastmask._C` when built, else the
pure-PyTorch reference in `fastmask.reference`); `fastmask.nn` the modules; `fastmask.attacks` the attacks. Importing
fastmask imports only torch.
"""
from fastmask import attacks, nn, ops, reference  # noqa: F401
from fastmask.ops import extension_loaded  # noqa: F401

__version__ = "0.1.0"
__all__ = ["ops", "nn", "attacks", "reference", "extension_loaded", "__version__"]
