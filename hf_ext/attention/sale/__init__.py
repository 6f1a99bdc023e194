"""SALE sparse prefill attention for transformers (issue #5).

Switch on with ``AutoModelForCausalLM.from_pretrained(path, attn_implementation="sale")``,
``model.set_attn_implementation("sale")`` or :func:`enable_sale`. Settings live in :class:`SALEConfig`
(stored on ``model.config.sale_config``); :func:`calibrate` fits per-(layer, head) thresholds.

Everything is imported lazily: importing this package does not import torch, transformers or triton.

Example:
    >>> from hf_ext.attention.sale import SALEConfig
    >>> SALEConfig(tau=0.5).tau
    0.5
"""

from __future__ import annotations

from hf_ext.utils.lazy import lazy_exports

_LAZY = {
    "SALEConfig": "hf_ext.attention.sale.config",
    "enable_sale": "hf_ext.attention.sale.integration",
    "disable_sale": "hf_ext.attention.sale.integration",
    "set_sale_config": "hf_ext.attention.sale.integration",
    "get_sale_config": "hf_ext.attention.sale.integration",
    "calibrate": "hf_ext.attention.sale.calibrate",
    "sale_attention_forward": "hf_ext.attention.sale.attention",
    "sale_stats": "hf_ext.attention.sale.attention",
    "register_sale": "hf_ext.attention.sale._registration:register_now",
    "unregister_sale": "hf_ext.attention.sale._registration:unregister",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
