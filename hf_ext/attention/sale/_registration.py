"""Cheap registration of the ``"sale"`` attention implementation with transformers.

``transformers.modeling_utils`` (home of ``AttentionInterface``) takes seconds to import, far over the
0.5 s budget of ``import hf_ext``. So :func:`install` registers at once when that module is already
loaded, and otherwise installs a one-shot post-import hook on ``sys.meta_path`` that registers right
after transformers finishes importing it — before any ``from_pretrained(..., attn_implementation="sale")``
can look the name up. Nothing here imports torch, transformers or triton at module import time.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import logging
import sys
import threading

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
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
        from transformers.modeling_utils import AttentionInterface

        from hf_ext.attention.sale.attention import sale_attention_forward

        AttentionInterface.register(NAME, sale_attention_forward)
        # The mask builder matters: without it transformers silently drops padding masks for a new name.
        # The sdpa builder gives None (pure causal, no padding) or a 4-D boolean mask we can decode.
        AttentionMaskInterface.register(NAME, sdpa_mask)
        _REGISTERED = True


class _AfterImportFinder(importlib.abc.MetaPathFinder):
    """Runs :func:`register_now` right after ``transformers.modeling_utils`` has been executed."""

    def __init__(self) -> None:
        self._busy = False

    def find_spec(self, fullname, path=None, target=None):  # noqa: D102
        if fullname != _TARGET or self._busy:
            return None
        self._busy = True
        try:
            spec = None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        finally:
            self._busy = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        original_exec = loader.exec_module
        finder = self

        def exec_module(module):
            original_exec(module)
            loader.exec_module = original_exec
            finder.remove()
            try:
                register_now()
            except Exception as exc:  # pragma: no cover - depends on installed versions
                logger.warning("hf_ext: registering the 'sale' attention failed: %s", exc)

        loader.exec_module = exec_module
        return spec

    def remove(self) -> None:
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)


def install() -> None:
    """Register now if transformers' modeling utilities are loaded, else on their first import."""
    if _REGISTERED:
        return
    if _TARGET in sys.modules:
        register_now()
        return
    if importlib.util.find_spec("transformers") is None:  # transformers not installed: nothing to register
        return
    if not any(isinstance(f, _AfterImportFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImportFinder())
