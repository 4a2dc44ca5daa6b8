"""Loads the compiled extensions built from csrc/ and falls back to pure Python when absent.

`_helpers` (pybind11, no torch) and `_fused_kernels` (torch extension). A missing extension gives
one warning per process naming what is missing and how to build it; set MEGATRON_LITE_NO_EXTENSIONS=1
to force the fallbacks (the tests use it to exercise them).
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

_cache: dict[str, ModuleType | None] = {}
_warned: set[str] = set()
_BUILD_HINT = "build it with `pip install --no-build-isolation -e .` (or `make build`)"


def load(name: str) -> ModuleType | None:
    """Return megatron_lite.<name>, or None (after one warning) if it is not built or disabled."""
    if name in _cache:
        return _cache[name]
    module = None
    reason = "disabled by MEGATRON_LITE_NO_EXTENSIONS=1"
    if os.environ.get("MEGATRON_LITE_NO_EXTENSIONS", "") not in ("1", "true", "yes"):
        try:
            if name == "_fused_kernels":
                import torch  # noqa: F401  (a torch extension must come after torch)
            module = importlib.import_module(f"megatron_lite.{name}")
        except ImportError as e:
            reason = f"not importable ({e}); {_BUILD_HINT}"
    if module is None and name not in _warned:
        _warned.add(name)
        warnings.warn(
            f"megatron_lite: C++ extension {name} {reason}; using the slower pure-Python fallback",
            RuntimeWarning,
            stacklevel=2,
        )
    _cache[name] = module
    return module
