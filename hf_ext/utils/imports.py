"""Lazy optional-dependency imports with errors that name the extra to install."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

# module name -> pip extra of hf-ext that provides it (pyproject's optional-dependencies)
_EXTRAS = {"diffusers": "diffusers", "trl": "trl"}
# modules that no extra provides: installed on their own
_DIRECT = {"triton"}


def is_available(module: str) -> bool:
    """True when ``module`` can be imported (without importing it; a dotted name imports its parent packages).

    False, not an exception, for a dotted name whose parent package is missing (``"diffusers.hooks"`` without
    diffusers) or is a plain module.
    """
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ModuleNotFoundError of a parent; ValueError: a __spec__ of None
        return False


def require(module: str, feature: str = "") -> ModuleType:
    """Import an optional dependency or raise an ``ImportError`` naming the extra.

    Example:
        >>> require("json").dumps([1])
        '[1]'
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        what = f" for {feature}" if feature else ""
        if module in _DIRECT:
            how = f"`pip install {module}`"
        else:
            how = f"`pip install 'hf-ext[{_EXTRAS.get(module, 'all')}]'` (or `pip install {module}`)"
        raise ImportError(f"{module!r} is needed{what} but is not installed; install it with {how}.") from exc


def cuda_available() -> bool:
    """True when torch sees a CUDA device."""
    import torch

    return torch.cuda.is_available()
