"""Cheap registration of the ``"sale"`` attention implementation with transformers.

``transformers.modeling_utils`` (home of ``AttentionInterface``) takes seconds to import, far over the
0.5 s budget of ``import hf_ext``. So :func:`install` registers at once when that module is already
loaded, and otherwise registers through :func:`hf_ext.utils.import_hooks.when_imported` right after
transformers finishes importing it — before any ``from_pretrained(..., attn_implementation="sale")``
can look the name up. Nothing here imports torch, transformers or triton at module import time.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import threading

from hf_ext.utils.import_hooks import when_imported

logger = logging.getLogger("hf_ext")

NAME = "sale"
_TARGET = "transformers.modeling_utils"
_LOCK = threading.Lock()
_REGISTERED = False


def register_now() -> None:
    """Register ``"sale"`` in ``AttentionInterface`` and ``AttentionMaskInterface`` (idempotent).

    Imports transformers' modeling utilities (slow the first time); :func:`install` defers this.
    """
    global _REGISTERED
    with _LOCK:
        if _REGISTERED:
            return
        from transformers.masking_utils import AttentionMaskInterface
        from transformers.modeling_utils import AttentionInterface

        from hf_ext.attention.sale.attention import sale_attention_forward, sale_mask

        AttentionInterface.register(NAME, sale_attention_forward)
        # The mask builder matters: without it transformers silently drops padding masks for a new name.
        # sale_mask (the sdpa builder) gives None (pure causal, bottom-right, no padding) or a 4-D boolean mask we
        # can decode.
        AttentionMaskInterface.register(NAME, sale_mask)
        _REGISTERED = True


def install() -> None:
    """Register now if transformers' modeling utilities are loaded, else on their first import."""
    if _REGISTERED:
        return
    if _TARGET in sys.modules:
        register_now()
        return
    if importlib.util.find_spec("transformers") is None:  # transformers not installed: nothing to register
        return
    when_imported(_TARGET, lambda _module: register_now())
