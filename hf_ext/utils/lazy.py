"""Lazy package exports: a package names its public objects, and they load on first access.

Example (in a package ``__init__.py``)::

    _LAZY = {"SALEConfig": "config", "calibrate": "hf_ext.attention.sale.calibrate",
             "register_sale": "_registration:register_now"}
    __getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())

A target is ``module`` (the attribute has the exported name) or ``module:attribute``; a module name
without a dot is taken relative to the package. ``module:`` (empty attribute) exports the module itself.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(
    package: str, mapping: dict[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Build the module-level ``__getattr__`` and ``__dir__`` for ``package``.

    Loaded values are cached in ``namespace`` (the package's ``globals()``), so each loads once.
    """

    def __getattr__(name: str) -> Any:
        target = mapping.get(name)
        if target is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module_name, sep, attr = target.partition(":")
        if "." not in module_name:
            module_name = f"{package}.{module_name}"
        module = importlib.import_module(module_name)
        value = (getattr(module, attr) if attr else module) if sep else getattr(module, name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(mapping))

    return __getattr__, __dir__
