"""Lazy Auto-class registration of LatentOmni (run at ``import hf_ext``; costs well under a millisecond).

Registering with ``AutoConfig`` / ``AutoModelForMultimodalLM`` / ``AutoProcessor`` needs the config and
model classes, whose imports (transformers' configuration / modeling machinery, ~0.4-2 s) ``import hf_ext``
must not pay. So:

* if transformers' auto module (``configuration_auto``, ``modeling_auto``, ``processing_auto``) is already
  imported, register with it right away;
* otherwise put a tiny finder on ``sys.meta_path`` that wraps the loaders of ``transformers.models.auto.*``
  modules only: after one has executed (and no auto module is still mid-import: transformers'
  ``auto_docstring`` re-enters them), the pending registrations run. Any other import passes through
  untouched; the finder removes itself once all three registrations are done.

Cost: after ``import torch, transformers`` (auto modules not loaded yet) this adds well under 10 ms. If the
user imported transformers' Auto classes *before* ``import hf_ext``, registration happens at once and imports
the LatentOmni config and model modules (and with them transformers' modeling machinery, if not loaded yet).

The net effect: ``AutoConfig.from_pretrained(path)`` / ``AutoModelForMultimodalLM.from_pretrained(path)`` /
``AutoProcessor.from_pretrained(path)`` resolve ``model_type="latent_omni"`` after a plain ``import hf_ext``.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys
from collections.abc import Callable
from typing import Any

from hf_ext.utils.import_hooks import drop_stale_finders

logger = logging.getLogger("hf_ext")

_CONFIG_AUTO = "transformers.models.auto.configuration_auto"
_MODELING_AUTO = "transformers.models.auto.modeling_auto"
_PROCESSING_AUTO = "transformers.models.auto.processing_auto"
_AUTO_PREFIX = "transformers.models.auto."


def _register_config() -> None:
    from transformers.models.auto.configuration_auto import AutoConfig

    from .configuration_latent_omni import LatentOmniConfig

    AutoConfig.register("latent_omni", LatentOmniConfig, exist_ok=True)


def _register_models() -> None:
    from transformers.models.auto import modeling_auto

    from .configuration_latent_omni import LatentOmniConfig
    from .modeling_latent_omni import LatentOmniForConditionalGeneration

    for name in ("AutoModelForMultimodalLM", "AutoModelForImageTextToText"):
        auto_cls = getattr(modeling_auto, name, None)
        if auto_cls is not None:
            auto_cls.register(LatentOmniConfig, LatentOmniForConditionalGeneration, exist_ok=True)


def _register_processor() -> None:
    from transformers.models.auto.processing_auto import AutoProcessor

    from .configuration_latent_omni import LatentOmniConfig
    from .processing_latent_omni import LatentOmniProcessor

    AutoProcessor.register(LatentOmniConfig, LatentOmniProcessor, exist_ok=True)


# Auto modules whose import has completed (only those are safe to register with).
_LOADED: set[str] = set()

_PENDING: dict[str, Callable[[], None]] = {
    _CONFIG_AUTO: _register_config,
    _MODELING_AUTO: _register_models,
    _PROCESSING_AUTO: _register_processor,
}


def _auto_busy() -> bool:
    """True while any ``transformers.models.auto.*`` module is still executing (registering then would
    re-enter it through transformers' ``auto_docstring`` and see a partially initialised module)."""
    for name, mod in list(sys.modules.items()):
        if name.startswith(_AUTO_PREFIX) and getattr(getattr(mod, "__spec__", None), "_initializing", False):
            return True
    return False


def _is_circular(exc: BaseException) -> bool:
    msg = str(exc)
    return "partially initialized" in msg or "circular import" in msg


def _run(name: str) -> None:
    fn = _PENDING.get(name)
    if fn is None:
        return
    try:
        fn()
    except (ImportError, AttributeError) as exc:
        if _is_circular(exc):  # some module of the chain is mid-import: a later retry() finishes the job
            return
        _PENDING.pop(name, None)
        logger.warning("hf_ext: latent_omni registration with %s failed: %s", name, exc)
        return
    except Exception as exc:  # pragma: no cover - depends on installed versions
        _PENDING.pop(name, None)
        logger.warning("hf_ext: latent_omni registration with %s failed: %s", name, exc)
        return
    _PENDING.pop(name, None)


def retry() -> None:
    """Run the pending registrations whose transformers auto module has finished importing, unless an auto
    module is still mid-import (called after every ``transformers.models.auto.*`` import and at the end of
    this package's configuration / modeling / processing modules)."""
    if _auto_busy():
        return
    for name in list(_PENDING):
        if name in sys.modules:  # imported meanwhile (e.g. while registering another auto module)
            _LOADED.add(name)
        if name in _LOADED:
            _run(name)
    if not _PENDING:
        _uninstall()


class _RegisteringLoader(importlib.abc.Loader):
    """Delegates to the real loader, then retries the pending registrations."""

    def __init__(self, inner: Any, name: str) -> None:
        self._inner = inner
        self._name = name

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self._inner.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._inner.exec_module(module)
        if self._name in _PENDING:
            _LOADED.add(self._name)
        # our own spec is still flagged as initialising here: clear it for the busy check
        spec = getattr(module, "__spec__", None)
        if spec is not None:
            spec._initializing = False
        retry()

    def __getattr__(self, item: str) -> Any:  # get_code, get_source, is_package, ...
        return getattr(self._inner, item)


class _AutoRegistrationFinder(importlib.abc.MetaPathFinder):
    def __init__(self) -> None:
        self._resolving: set[str] = set()

    def find_spec(
        self, fullname: str, path: Any, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith(_AUTO_PREFIX) or not _PENDING or fullname in self._resolving:
            return None
        self._resolving.add(fullname)  # another finder that asks the meta path again must not come back here
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                        spec.loader = _RegisteringLoader(spec.loader, fullname)
                    return spec
        finally:
            self._resolving.discard(fullname)
        return None


_FINDER = _AutoRegistrationFinder()


def _uninstall() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


def install() -> None:
    """Register now with the auto modules already imported; defer the rest to their first import."""
    drop_stale_finders(_FINDER)
    for name in list(_PENDING):
        if name in sys.modules:
            _LOADED.add(name)
    retry()
    if _PENDING and _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def register_now() -> None:
    """Import the three auto modules (and so register everything) immediately."""
    install()
    import transformers.models.auto.configuration_auto  # noqa: F401
    import transformers.models.auto.modeling_auto  # noqa: F401
    import transformers.models.auto.processing_auto  # noqa: F401

    _LOADED.update(_PENDING)
    retry()
