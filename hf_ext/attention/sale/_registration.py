"""Cheap registration of the ``"sale"`` attention implementation with transformers.

``transformers.modeling_utils`` (home of ``AttentionInterface``) takes seconds to import, far over the
0.5 s budget of ``import hf_ext``. So :func:`install` registers at once when that module is already
loaded, and otherwise registers through :func:`hf_ext.utils.import_hooks.when_imported` right after
transformers finishes importing it — before any ``from_pretrained(..., attn_implementation="sale")``
can look the name up. An entry registered under ``"sale"`` by someone else is never replaced silently
(:mod:`hf_ext.utils.name_clash`: kept with one warning at import, an error from an explicit call).
:func:`unregister` takes ``"sale"`` out of both interfaces again, putting back an entry that
``register_now(overwrite=True)`` replaced. Nothing here imports torch, transformers or triton at module import time.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import threading
from typing import Any

from hf_ext.utils.import_hooks import when_imported
from hf_ext.utils.name_clash import check_on_clash, may_register, note_replaced, remove_ours

logger = logging.getLogger("hf_ext")

NAME = "sale"
_TARGET = "transformers.modeling_utils"
_LOCK = threading.Lock()
_REGISTERED = False
_FIX = "hf_ext.attention.sale.register_sale(overwrite=True)"
_ATTENTION = "transformers' AttentionInterface"
_MASK = "transformers' AttentionMaskInterface"
# registry -> the foreign entry register_now(overwrite=True) replaced under "sale" there, put back by unregister()
_REPLACED: dict[str, Any] = {}
# unregister() was called: the automatic registration still pending (install's post-import hook) does nothing
_WITHDRAWN = False


def register_now(*, overwrite: bool = False, on_clash: str = "raise") -> bool:
    """Register ``"sale"`` in ``AttentionInterface`` and ``AttentionMaskInterface`` (idempotent).

    Imports transformers' modeling utilities (slow the first time); :func:`install` defers this.

    Args:
        overwrite: replace an entry another library or the user registered under ``"sale"`` in either interface
            (by default it is left in place: see ``on_clash``).
        on_clash: what to do when such a foreign entry is there and ``overwrite`` is off: ``"raise"`` a
            ``ValueError`` naming it (explicit calls, :func:`~hf_ext.attention.sale.enable_sale`), or ``"warn"``
            once and register nothing (the automatic registration at ``import hf_ext``).

    Returns:
        ``True`` when ``"sale"`` is SALE's in both interfaces afterwards.

    Example:
        >>> from hf_ext.attention.sale import register_sale
        >>> register_sale()
        True
    """
    global _REGISTERED, _WITHDRAWN
    check_on_clash(on_clash)
    if not isinstance(overwrite, bool):
        raise ValueError(f"overwrite must be True or False, got {overwrite!r}")
    _WITHDRAWN = False  # an explicit call after unregister(): "sale" is wanted again
    # imported before taking the lock: the first import of transformers.modeling_utils runs install()'s post-import
    # hook, which calls this function again
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    from hf_ext.attention.sale.attention import sale_attention_forward, sale_mask

    with _LOCK:
        # The mask builder matters: without it transformers silently drops padding masks for a new name.
        # sale_mask (the sdpa builder) gives None (pure causal, bottom-right, no padding) or a 4-D boolean mask we
        # can decode.
        entries = (
            (_ATTENTION, AttentionInterface, sale_attention_forward),
            (_MASK, AttentionMaskInterface, sale_mask),
        )
        if not overwrite:  # both checked before either is written
            for registry, iface, ours in entries:
                current = iface._global_mapping.get(NAME)
                if not may_register(registry, NAME, current, ours, fix=_FIX, on_clash=on_clash):
                    return False
        for registry, iface, ours in entries:
            note_replaced(_REPLACED, registry, iface._global_mapping.get(NAME), ours)
            iface.register(NAME, ours)
        _REGISTERED = True
        return True


def unregister() -> None:
    """Take ``"sale"`` out of ``AttentionInterface`` and ``AttentionMaskInterface`` where it is still SALE's, and
    put back the entry :func:`register_now` with ``overwrite=True`` replaced there (the very object).

    A no-op where ``"sale"`` is not SALE's (never registered, already unregistered, or re-registered by someone
    else since). Before transformers' modeling utilities are imported nothing is registered yet: this imports
    nothing and withdraws the automatic registration of ``import hf_ext``. :func:`register_now` (and
    :func:`~hf_ext.attention.sale.enable_sale`, :func:`~hf_ext.attention.sale.calibrate`, which call it)
    registers again. A model already switched to ``"sale"`` cannot run its attention afterwards: call
    :func:`~hf_ext.attention.sale.disable_sale` on it first.

    Example:
        >>> from hf_ext.attention.sale import register_sale, unregister_sale
        >>> unregister_sale()
        >>> register_sale()
        True
    """
    global _REGISTERED, _WITHDRAWN
    with _LOCK:
        _WITHDRAWN = True
        _REGISTERED = False
        modeling = sys.modules.get(_TARGET)
        if modeling is None:  # nothing registered yet (registration needs this module): nothing to import
            return
        attention = sys.modules.get("hf_ext.attention.sale.attention")
        if attention is None:  # our functions were never loaded, so none of them can be registered
            return
        masking = sys.modules.get("transformers.masking_utils")
        entries = (
            (_ATTENTION, modeling.AttentionInterface, attention.sale_attention_forward),
            (_MASK, None if masking is None else masking.AttentionMaskInterface, attention.sale_mask),
        )
        for registry, iface, ours in entries:
            if iface is not None:
                remove_ours(iface._global_mapping, NAME, ours, _REPLACED, registry)


def _automatic(_module: Any) -> None:
    """The registration of ``import hf_ext`` (a foreign entry is kept, with a warning), unless withdrawn."""
    if not _WITHDRAWN:
        register_now(on_clash="warn")


def install() -> None:
    """Register now if transformers' modeling utilities are loaded, else on their first import."""
    if _REGISTERED:
        return
    if _TARGET in sys.modules:
        register_now(on_clash="warn")
        return
    if importlib.util.find_spec("transformers") is None:  # transformers not installed: nothing to register
        return
    when_imported(_TARGET, _automatic)
