"""TIE: tail-inflated-expectation shortest-job-first scheduling with log-t length prediction (issue #6).

Public names load lazily (this module imports neither torch nor transformers):

* :class:`TIEConfig`, :class:`PredictorConfig` — settings;
* :class:`LogT`, :func:`expected_length`, :func:`cvar_length`, :func:`tie_score` — the length law;
* :class:`LengthPredictor` — encoder + heads, ``fit`` / ``predict`` / ``save_pretrained``;
* :class:`TIEScheduler`, :func:`order_batch`, :func:`annotate_requests` — simulator scheduler and offline order;
* :func:`enable_tie_scheduler`, :func:`tie_generate_batch`, :class:`TIECBScheduler` — transformers
  continuous batching (``ContinuousBatchingConfig(scheduler_type="tie")``).

``import hf_ext`` installs a post-import hook (:func:`install_import_hook`) that adds ``"tie"`` to
transformers' ``SCHEDULER_MAPPING`` as soon as transformers loads its continuous-batching scheduler
module, so ``scheduler_type="tie"`` works without importing that (≈2 s) module eagerly.

Example:
    >>> from hf_ext.generation.tie import TIEConfig
    >>> TIEConfig().alpha
    0.9
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import logging
import sys
from typing import Any

logger = logging.getLogger("hf_ext")

_LAZY = {
    "TIEConfig": "config",
    "PredictorConfig": "config",
    "LogT": "distribution",
    "expected_length": "distribution",
    "cvar_length": "distribution",
    "tie_score": "distribution",
    "LengthPredictor": "predictor",
    "TIEScheduler": "scheduler",
    "order_batch": "scheduler",
    "annotate_requests": "scheduler",
    "heuristic_prediction": "scheduler",
    "enable_tie_scheduler": "cb",
    "tie_generate_batch": "cb",
    "set_length_hints": "cb",
    "TIECBScheduler": "cb",
    "generate_workload": "data",
    "match_to_lengths": "data",
}

__all__ = [*_LAZY, "install_import_hook", "remove_import_hook"]

_CB_SCHEDULER_MODULE = "transformers.generation.continuous_batching.scheduler"


def __getattr__(name: str) -> Any:
    sub = _LAZY.get(name)
    if sub is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{sub}"), name)
    globals()[name] = value
    return value


def _register_now() -> None:
    if "hf_ext.generation.tie.cb" in sys.modules:
        return  # being imported right now: cb.py registers itself when it finishes
    try:
        from hf_ext.generation.tie.cb import register

        register()
    except Exception as exc:  # pragma: no cover - depends on the installed transformers
        logger.warning("hf_ext: could not register the 'tie' continuous-batching scheduler: %s", exc)


class _PostImportHook(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loader of transformers' CB scheduler module to register "tie" after it runs."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != _CB_SCHEDULER_MODULE:
            return None
        remove_import_hook()  # one shot; also avoids recursion below
        spec = None
        for finder in sys.meta_path:
            fs = getattr(finder, "find_spec", None)
            if fs is not None:
                spec = fs(fullname, path, target)
                if spec is not None:
                    break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        original = loader.exec_module

        def exec_module(module: Any) -> None:
            original(module)
            _register_now()

        loader.exec_module = exec_module  # instance attribute of this module's own loader
        return spec


_HOOK: _PostImportHook | None = None


def install_import_hook() -> None:
    """Register "tie" now if transformers' CB scheduler module is loaded, else when it gets imported (cheap)."""
    global _HOOK
    if _CB_SCHEDULER_MODULE in sys.modules:
        _register_now()
        return
    if _HOOK is None:
        _HOOK = _PostImportHook()
        sys.meta_path.insert(0, _HOOK)


def remove_import_hook() -> None:
    """Uninstall the post-import hook (the "tie" entry, if already added, stays)."""
    global _HOOK
    if _HOOK is not None:
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(_HOOK)
        _HOOK = None
