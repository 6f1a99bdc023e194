"""Run a callback right after a module has been imported — without importing it ourselves.

``import hf_ext`` must stay cheap, but some registrations (an attention implementation, a
continuous-batching scheduler) live in transformers modules that take seconds to import. Instead of
importing them, :func:`when_imported` runs the callback at once if the module is already loaded, or
else wraps that module's loader (through one finder on ``sys.meta_path``) so the callback runs right
after the module body has executed — before user code can use it. Other imports pass through untouched
and the finder removes itself once no callback is pending.

Example:
    >>> seen = []
    >>> when_imported("json", lambda mod: seen.append(mod.__name__))
    >>> seen
    ['json']
"""

from __future__ import annotations

import contextlib
import importlib.abc
import logging
import sys
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

logger = logging.getLogger("hf_ext")

_LOCK = threading.RLock()
_NONE = object()
_PENDING: dict[str, list[Callable[[ModuleType], None]]] = {}


def _run(name: str, module: ModuleType, callbacks: list[Callable[[ModuleType], None]]) -> None:
    for cb in callbacks:
        try:
            cb(module)
        except Exception as exc:  # pragma: no cover - depends on installed versions
            logger.warning(
                "hf_ext: post-import hook %s for %s failed: %s", getattr(cb, "__name__", cb), name, exc
            )


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the real loader of a watched module to run its callbacks afterwards."""

    def __init__(self) -> None:
        self._resolving: set[str] = set()

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in _PENDING or fullname in self._resolving:
            return None
        self._resolving.add(fullname)
        try:
            spec = None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        finally:
            self._resolving.discard(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        original_exec = loader.exec_module
        own = vars(loader).get("exec_module", _NONE) if hasattr(loader, "__dict__") else _NONE

        def exec_module(module: ModuleType) -> None:
            original_exec(module)
            # the loader as it was: its class's exec_module (no attribute of its own), or the one it had
            if own is _NONE:
                vars(loader).pop("exec_module", None)
            else:
                loader.exec_module = own
            with _LOCK:
                callbacks = _PENDING.pop(fullname, [])
                if not _PENDING:
                    _remove_finder()
            _run(fullname, module, callbacks)

        loader.exec_module = exec_module
        return spec


_FINDER = _PostImportFinder()


def _remove_finder() -> None:
    with contextlib.suppress(ValueError):
        sys.meta_path.remove(_FINDER)


def drop_stale_finders(finder: Any) -> None:
    """Remove from ``sys.meta_path`` every instance of ``finder``'s class made by an earlier copy of its module
    (``hf_ext`` imported again after its modules were dropped from ``sys.modules``, as test runners and notebook
    reloaders do): such copies' callbacks and registrations belong to the old modules, and two copies that each
    ask the meta path again call one another. ``finder`` itself stays."""
    cls = type(finder)
    sys.meta_path[:] = [
        f
        for f in sys.meta_path
        if f is finder or type(f).__qualname__ != cls.__qualname__ or type(f).__module__ != cls.__module__
    ]


def when_imported(module: str, callback: Callable[[ModuleType], None]) -> None:
    """Call ``callback(module_object)`` once ``module`` is imported (now, if it already is).

    Errors raised by the callback are logged as warnings, never raised into the importing code.
    """
    mod = sys.modules.get(module)
    if mod is not None:
        _run(module, mod, [callback])
        return
    with _LOCK:
        _PENDING.setdefault(module, []).append(callback)
        if _FINDER not in sys.meta_path:
            drop_stale_finders(_FINDER)
            sys.meta_path.insert(0, _FINDER)


def cancel(module: str) -> None:
    """Forget the callbacks pending for ``module`` (those already run stay run)."""
    with _LOCK:
        _PENDING.pop(module, None)
        if not _PENDING:
            _remove_finder()
