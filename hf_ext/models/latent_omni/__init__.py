"""LatentOmni interleaved text / audio-visual latent reasoning model (issue #10, arXiv 2605.22012).

Importing this package is cheap: the classes load on first attribute access.

Example:
    >>> from hf_ext.models.latent_omni import LatentOmniConfig
    >>> LatentOmniConfig().num_latents
    40
"""

from __future__ import annotations

from hf_ext.utils.lazy import lazy_exports

_LAZY = {
    "LatentOmniConfig": "configuration_latent_omni",
    "LatentOmniForConditionalGeneration": "modeling_latent_omni",
    "LatentOmniCausalLMOutput": "modeling_latent_omni",
    "LatentOmniGenerateOutput": "modeling_latent_omni",
    "energy_pool": "modeling_latent_omni",
    "ospe_position_ids": "modeling_latent_omni",
    "LatentOmniProcessor": "processing_latent_omni",
    "LatentOmniDataCollator": "collator",
    "load_jsonl": "collator",
    "make_synthetic_records": "collator",
    "LatentOmniTrainer": "training",
    "LatentOmniLossLogger": "training",
    "register_now": "_auto",
    "unregister": "_auto",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
