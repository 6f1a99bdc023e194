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

import importlib
from typing import Any

_LAZY = {
    "SALEConfig": "hf_ext.attention.sale.config",
    "enable_sale": "hf_ext.attention.sale.integration",
    "disable_sale": "hf_ext.attention.sale.integration",
    "set_sale_config": "hf_ext.attention.sale.integration",
    "get_sale_config": "hf_ext.attention.sale.integration",
    "calibrate": "hf_ext.attention.sale.calibrate",
    "sale_attention_forward": "hf_ext.attention.sale.attention",
    "sale_stats": "hf_ext.attention.sale.attention",
    "register_sale": "hf_ext.attention.sale._registration",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'hf_ext.attention.sale' has no attribute {name!r}")
    attr = "register_now" if name == "register_sale" else name
    value = getattr(importlib.import_module(mod), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
