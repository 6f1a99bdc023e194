"""Name registration done at ``import hf_ext``.

Each component owns one function here. A function may only register names (attention
implementations, Auto classes, scheduler keys); it must not import diffusers, trl or triton,
and it must be idempotent. Failures are logged, never raised: a broken optional integration
must not make ``import hf_ext`` fail.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("hf_ext")

_DONE = False


def register_all() -> None:
    """Run every component's registration once."""
    global _DONE
    if _DONE:
        return
    _DONE = True
    for fn in _REGISTRATIONS:
        try:
            fn()
        except Exception as exc:  # pragma: no cover - depends on installed versions
            logger.warning("hf_ext: registration %s failed: %s", fn.__name__, exc)


def _register_sale() -> None:
    """SALE: ``"sale"`` in transformers' AttentionInterface + AttentionMaskInterface (deferred, cheap)."""
    from hf_ext.attention.sale._registration import install

    install()


def _register_tie() -> None:
    """TIE: ``"tie"`` in transformers' continuous-batching SCHEDULER_MAPPING, via a one-shot post-import hook
    (transformers.generation.continuous_batching takes ~2 s to import, so it is never imported here)."""
    from hf_ext.generation.tie import install_import_hook

    install_import_hook()


def _register_latent_omni() -> None:
    """LatentOmni: ``model_type="latent_omni"`` in AutoConfig / AutoModelForMultimodalLM /
    AutoModelForImageTextToText / AutoProcessor, registered when transformers' auto modules are first
    imported (a post-import hook; nothing heavy is imported here)."""
    from hf_ext.models.latent_omni._auto import install

    install()


# Components append their registration functions to this list (one line each).
_REGISTRATIONS: list = [_register_sale, _register_tie, _register_latent_omni]
