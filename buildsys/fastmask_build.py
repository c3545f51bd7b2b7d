"""The build backend: scikit-build-core, behind one check that torch is importable.

fastmask's extension is compiled against the torch it will run with, so the build
needs that torch. pip's default build isolation builds in a fresh environment
without it; instead of failing deep inside CMake, the build stops at once with the
one line that says what to run (README, Install).
"""
import importlib.util

from scikit_build_core import build as _skbc
from scikit_build_core.build import *  # noqa: F401,F403  (the PEP 517 / 660 hooks)

NO_TORCH = ("fastmask: torch is not importable in the build environment (pip's build isolation); "
            "run `pip install torch` first, then `pip install --no-build-isolation .`")


def check_torch():
    if importlib.util.find_spec("torch") is None:
        raise SystemExit(NO_TORCH)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    check_torch()
    return _skbc.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    check_torch()
    return _skbc.build_editable(wheel_directory, config_settings, metadata_directory)


def get_requires_for_build_wheel(config_settings=None):
    check_torch()
    return _skbc.get_requires_for_build_wheel(config_settings)


def get_requires_for_build_editable(config_settings=None):
    check_torch()
    return _skbc.get_requires_for_build_editable(config_settings)
