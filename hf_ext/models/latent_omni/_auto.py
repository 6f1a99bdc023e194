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

An entry someone else registered under ``"latent_omni"`` (or for :class:`LatentOmniConfig`) before that is kept,
with one warning (:mod:`hf_ext.utils.name_clash`); :func:`register_now` raises instead, or replaces it with
``overwrite=True``. :func:`unregister` removes LatentOmni's entries again and puts back any it replaced.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

from hf_ext.utils.import_hooks import drop_stale_finders
from hf_ext.utils.name_clash import check_on_clash, may_register, note_replaced, remove_ours

logger = logging.getLogger("hf_ext")

_CONFIG_AUTO = "transformers.models.auto.configuration_auto"
_MODELING_AUTO = "transformers.models.auto.modeling_auto"
_PROCESSING_AUTO = "transformers.models.auto.processing_auto"
_AUTO_PREFIX = "transformers.models.auto."


_FIX = "hf_ext.models.latent_omni.register_now(overwrite=True)"
Writes = list[Callable[[], None]]
_AUTO_CONFIG = "transformers' AutoConfig"
_AUTO_PROCESSOR = "transformers' AutoProcessor"
_AUTO_MODELS = ("AutoModelForMultimodalLM", "AutoModelForImageTextToText")
_CONFIG_MODULE = f"{__package__}.configuration_latent_omni"
_MODEL_MODULE = f"{__package__}.modeling_latent_omni"
_PROCESSOR_MODULE = f"{__package__}.processing_latent_omni"
# registry -> the foreign entry a registration replaced under our key there (overwrite=True), put back by unregister()
_REPLACED: dict[str, Any] = {}


def _entry(mapping: Any, key: Any) -> Any:
    """What ``mapping`` (one of transformers' lazy auto mappings) holds under ``key`` now, or ``None``."""
    try:
        return mapping[key]
    # nothing there (or a native entry that won't load)
    except (KeyError, ValueError, AttributeError, ImportError):
        return None


def _write(registry: str, mapping: Any, register: Callable[..., None], key: Any, ours: Any) -> None:
    """``register(key, ours, exist_ok=True)``, the Auto class's own registration, which stores ``ours`` under ``key``
    in ``mapping._extra_content`` (where transformers keeps registered entries; its native ones live apart and are
    never touched), first keeping the foreign entry it replaces there for :func:`unregister`."""
    note_replaced(_REPLACED, registry, mapping._extra_content.get(key), ours)
    register(key, ours, exist_ok=True)


def _plan_config(overwrite: bool, on_clash: str) -> Writes:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING, AutoConfig

    from .configuration_latent_omni import LatentOmniConfig

    current = _entry(CONFIG_MAPPING, "latent_omni")
    if overwrite or may_register(
        _AUTO_CONFIG, "latent_omni", current, LatentOmniConfig, fix=_FIX, on_clash=on_clash
    ):
        return [
            partial(
                _write, _AUTO_CONFIG, CONFIG_MAPPING, AutoConfig.register, "latent_omni", LatentOmniConfig
            )
        ]
    return []


def _plan_models(overwrite: bool, on_clash: str) -> Writes:
    from transformers.models.auto import modeling_auto

    from .configuration_latent_omni import LatentOmniConfig
    from .modeling_latent_omni import LatentOmniForConditionalGeneration as Model

    writes: Writes = []
    for name in _AUTO_MODELS:
        auto_cls = getattr(modeling_auto, name, None)
        if auto_cls is None:
            continue
        current = _entry(auto_cls._model_mapping, LatentOmniConfig)
        if overwrite or may_register(
            f"transformers' {name}", "LatentOmniConfig", current, Model, fix=_FIX, on_clash=on_clash
        ):
            registry = f"transformers' {name}"
            writes.append(
                partial(_write, registry, auto_cls._model_mapping, auto_cls.register, LatentOmniConfig, Model)
            )
    return writes


def _plan_processor(overwrite: bool, on_clash: str) -> Writes:
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING, AutoProcessor

    from .configuration_latent_omni import LatentOmniConfig
    from .processing_latent_omni import LatentOmniProcessor

    current = _entry(PROCESSOR_MAPPING, LatentOmniConfig)
    if overwrite or may_register(
        _AUTO_PROCESSOR,
        "LatentOmniConfig",
        current,
        LatentOmniProcessor,
        fix=_FIX,
        on_clash=on_clash,
    ):
        register = AutoProcessor.register
        return [
            partial(
                _write, _AUTO_PROCESSOR, PROCESSOR_MAPPING, register, LatentOmniConfig, LatentOmniProcessor
            )
        ]
    return []


_PLANS: dict[str, Callable[[bool, str], Writes]] = {
    _CONFIG_AUTO: _plan_config,
    _MODELING_AUTO: _plan_models,
    _PROCESSING_AUTO: _plan_processor,
}


def _automatic(name: str) -> Callable[[], None]:
    """The registration run by the import hook for auto module ``name``: a foreign entry is kept, with a warning
    (:mod:`hf_ext.utils.name_clash`)."""

    def run() -> None:
        for write in _PLANS[name](False, "warn"):
            write()

    run.__name__ = f"register_with_{name.rsplit('.', 1)[-1]}"
    return run


# Auto modules whose import has completed (only those are safe to register with).
_LOADED: set[str] = set()

_PENDING: dict[str, Callable[[], None]] = {name: _automatic(name) for name in _PLANS}


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
        spec = getattr(module, "__spec__", None)
        try:
            self._inner.exec_module(module)
        finally:
            # the module keeps its real loader, not this wrapper (import hf_ext registers names, nothing else)
            if getattr(module, "__loader__", None) is self:
                module.__loader__ = self._inner
            if spec is not None and spec.loader is self:
                spec.loader = self._inner
        if self._name in _PENDING:
            _LOADED.add(self._name)
        # our own spec is still flagged as initialising here: clear it for the busy check
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


def register_now(*, overwrite: bool = False, on_clash: str = "raise") -> None:
    """Import the three auto modules and register LatentOmni with them now (idempotent).

    Args:
        overwrite: replace an entry someone else registered under ``model_type="latent_omni"`` (AutoConfig) or
            for :class:`LatentOmniConfig` (AutoModel* / AutoProcessor). By default such an entry is left in place.
        on_clash: what to do then: ``"raise"`` a ``ValueError`` naming it before anything is registered, or
            ``"warn"`` once and register only where the name is free (what ``import hf_ext`` does).

    Example:
        >>> from hf_ext.models.latent_omni import register_now
        >>> register_now()
    """
    check_on_clash(on_clash)
    if not isinstance(overwrite, bool):
        raise ValueError(f"overwrite must be True or False, got {overwrite!r}")
    # the automatic (warn-and-keep) registration is not wanted any more: this call checks and registers all three
    _PENDING.clear()
    _uninstall()
    drop_stale_finders(_FINDER)
    import transformers.models.auto.configuration_auto  # noqa: F401
    import transformers.models.auto.modeling_auto  # noqa: F401
    import transformers.models.auto.processing_auto  # noqa: F401

    _LOADED.update(_PLANS)
    writes = [w for plan in _PLANS.values() for w in plan(overwrite, on_clash)]  # all checked, then written
    for write in writes:
        write()


def _registered_entries() -> list[tuple[str, Any, Any, Any]]:
    """``(registry, mapping, key, our entry)`` for every registry :func:`register_now` writes to, among those whose
    transformers auto module and LatentOmni module are both imported already (imports nothing: where one is not,
    nothing of ours can be registered)."""
    mods = sys.modules
    conf = getattr(mods.get(_CONFIG_MODULE), "LatentOmniConfig", None)
    if conf is None:
        return []
    out: list[tuple[str, Any, Any, Any]] = []
    config_auto = mods.get(_CONFIG_AUTO)
    if config_auto is not None:
        out.append((_AUTO_CONFIG, config_auto.CONFIG_MAPPING, "latent_omni", conf))
    model = getattr(mods.get(_MODEL_MODULE), "LatentOmniForConditionalGeneration", None)
    modeling_auto = mods.get(_MODELING_AUTO)
    if model is not None and modeling_auto is not None:
        for name in _AUTO_MODELS:
            auto_cls = getattr(modeling_auto, name, None)
            if auto_cls is not None:
                out.append((f"transformers' {name}", auto_cls._model_mapping, conf, model))
    processor = getattr(mods.get(_PROCESSOR_MODULE), "LatentOmniProcessor", None)
    processing_auto = mods.get(_PROCESSING_AUTO)
    if processor is not None and processing_auto is not None:
        out.append((_AUTO_PROCESSOR, processing_auto.PROCESSOR_MAPPING, conf, processor))
    return out


def unregister() -> None:
    """Remove LatentOmni from ``AutoConfig``, ``AutoModelForMultimodalLM``, ``AutoModelForImageTextToText`` and
    ``AutoProcessor`` where the entry is still ours, putting back the entry :func:`register_now` with
    ``overwrite=True`` replaced there (the very object).

    A no-op where the entry is not ours (never registered, already unregistered, or re-registered by someone else
    since). The automatic registration of ``import hf_ext`` still pending (transformers' auto modules not imported
    yet) is withdrawn too; nothing is imported. :func:`register_now` registers again.

    Example:
        >>> from hf_ext.models.latent_omni import register_now, unregister
        >>> unregister()
        >>> register_now()
    """
    _PENDING.clear()  # the automatic registration is not wanted any more either
    _uninstall()
    drop_stale_finders(_FINDER)
    for registry, mapping, key, ours in _registered_entries():
        remove_ours(mapping._extra_content, key, ours, _REPLACED, registry)
