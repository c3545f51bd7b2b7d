import pytest


@pytest.fixture(params=["ext", "ref"])
def backend(request, monkeypatch):
    """Run a test through the C++ extension ("ext") and through the pure-PyTorch
    fallback ("ref"), by flipping fastmask.ops' module-level switch."""
    from fastmask import ops

    if request.param == "ext" and not ops._ext_available:
        pytest.skip("fastmask._C is not built or FASTMASK_DISABLE_EXT=1 (the 'ref' variant runs)")
    monkeypatch.setattr(ops, "_use_ext", request.param == "ext")
    return request.param
