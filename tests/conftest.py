import pytest


def pytest_report_header(config):
    """Which CPU ISA paths this run exercises (the ISA tests skip the ones the CPU lacks)."""
    from isa import summary  # tests/ is on sys.path (rootdir-relative test modules)
    return summary()


@pytest.fixture(params=["ext", "ref"])
def backend(request, monkeypatch):
    """Run a test through the C++ extension ("ext") and through the pure-PyTorch
    fallback ("ref"), by flipping fastmask.ops' module-level switch."""
    from fastmask import ops

    if request.param == "ext" and not ops._ext_available:
        pytest.skip("fastmask._C is not built or FASTMASK_DISABLE_EXT=1 (the 'ref' variant runs)")
    monkeypatch.setattr(ops, "_use_ext", request.param == "ext")
    return request.param


@pytest.fixture(scope="session")
def mnist():
    """The real MNIST splits (fastmask.data.load("mnist")); the test skips when no source is installed."""
    from fastmask import data as D

    try:
        return D.load("mnist")
    except D.DataError as e:
        pytest.skip(f"no MNIST: {e}")
