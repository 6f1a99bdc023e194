"""``LatentOmniConfig``: a Qwen2.5-Omni thinker config plus the latent-reasoning settings.

The class extends transformers' ``Qwen2_5OmniThinkerConfig`` (so every thinker field, sub-config and
checkpoint keeps working) with the LatentOmni fields: latent token ids, the number of visual / audio
latent steps per block (K = 32 + 8 by default), the OSPE settings and the loss weights (λ1 = 0.005
for the latent MSE, λ2 = 1.0 for the audio-visual sync InfoNCE), all from arXiv 2605.22012.

Example:
    >>> from hf_ext.models.latent_omni.configuration_latent_omni import LatentOmniConfig
    >>> cfg = LatentOmniConfig()
    >>> cfg.num_latents, cfg.latent_loss_weight
    (40, 0.005)
"""

from __future__ import annotations

import inspect
import math
from dataclasses import field
from typing import Any

from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniThinkerConfig

LATENT_START_TOKEN = "<Unified_Latent>"
LATENT_END_TOKEN = "</Unified_Latent>"
LATENT_PAD_TOKEN = "<Unified_Latent_pad>"

SYNC_SOURCES = ("latents", "features")
# SyncTemperature clamps the learnable logit scale 1/τ to [1, 100]
SYNC_TEMPERATURE_MIN, SYNC_TEMPERATURE_MAX = 0.01, 1.0


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class LatentOmniConfig(Qwen2_5OmniThinkerConfig):
    """Configuration of :class:`LatentOmniForConditionalGeneration` (``model_type="latent_omni"``).

    All Qwen2.5-Omni thinker arguments (``text_config``, ``vision_config``, ``audio_config``, media
    token ids, ``position_id_per_seconds`` ...) are accepted unchanged. The default token ids are the
    first free ids of the Qwen2.5-Omni vocabulary (151665-151667); the processor adds the three tokens
    to the tokenizer and :meth:`LatentOmniProcessor.update_config` writes the ids it got.
    """

    model_type = "latent_omni"

    vision_start_token_id: int = field(
        default=151652, metadata={"help": "Id of `<|vision_bos|>` (read by the thinker's get_rope_index)."}
    )
    vision_end_token_id: int = field(default=151653, metadata={"help": "Id of `<|vision_eos|>`."})
    latent_start_token_id: int = field(
        default=151665, metadata={"help": "Id of `<Unified_Latent>`, the trigger the model learns to emit."}
    )
    latent_end_token_id: int = field(
        default=151666, metadata={"help": "Id of `</Unified_Latent>`, forced after the K latent steps."}
    )
    latent_pad_token_id: int = field(
        default=151667, metadata={"help": "Id of `<Unified_Latent_pad>`, one per latent slot in a block."}
    )
    num_visual_latents: int = field(
        default=32, metadata={"help": "Visual latent steps per block (first in the block). Paper: 32."}
    )
    num_audio_latents: int = field(
        default=8, metadata={"help": "Audio latent steps per block (after the visual ones). Paper: 8."}
    )
    use_ospe: bool = field(
        default=True,
        metadata={
            "help": "Omni-Sync Position Embedding: visual latent i gets (t,h,w)=(B+i)x3, audio latent j gets "
            "(B+stride*j, 0, 0). False gives plain sequential text positions. Used in training and generation."
        },
    )
    ospe_audio_time_stride: int = field(
        default=4,
        metadata={
            "help": "OSPE: audio latent j shares its time with visual latent stride*j. Paper: 4 (=32/8)."
        },
    )
    latent_loss_weight: float = field(
        default=0.005, metadata={"help": "λ1: weight of the latent next-feature MSE. Paper: 0.005."}
    )
    sync_loss_weight: float = field(
        default=1.0, metadata={"help": "λ2: weight of the symmetric audio-visual InfoNCE. Paper: 1.0."}
    )
    sync_source: str = field(
        default="latents",
        metadata={
            "help": "What the sync InfoNCE compares: 'latents' (the model's predicted visual/audio latent "
            "states; trains the LM) or 'features' (the segment encoder features before detaching; trains the "
            "encoders and heads only)."
        },
    )
    sync_projection_dim: int = field(default=256, metadata={"help": "Output size of the two sync heads."})
    sync_head_hidden_size: int | None = field(
        default=None, metadata={"help": "Hidden size of the sync heads (None: the LM hidden size)."}
    )
    sync_temperature: float = field(
        default=0.07,
        metadata={
            "help": "Initial InfoNCE temperature (learnable, clamped to [0.01, 1]; must lie in that range)."
        },
    )
    energy_pool_eps: float = field(
        default=1e-6,
        metadata={"help": "ε of the energy weights w = ||x||² + ε used to pool segment features."},
    )
    controlled_attention: bool = field(
        default=True,
        metadata={
            "help": "Training mask: from the first `<Unified_Latent>` on, text queries cannot attend to the "
            "question's audio/video tokens (latent trigger and pad queries can)."
        },
    )
    max_latent_blocks: int = field(
        default=3, metadata={"help": "Generation: most latent blocks per sequence (paper trajectories: 1-3)."}
    )

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        self._validate_latent_fields()

    def validate(self) -> None:
        """transformers' checks (run by ``save_pretrained``), then the LatentOmni fields': a field changed after
        construction (``config.sync_source = ...``) is checked before it is saved."""
        super().validate()
        self._validate_latent_fields()

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
        """As transformers' ``from_dict``, then the LatentOmni checks again: ``from_pretrained(path, x=...)`` sets
        its overrides after construction, where ``__post_init__`` no longer sees them."""
        out = super().from_dict(config_dict, **kwargs)
        (out[0] if isinstance(out, tuple) else out)._validate_latent_fields()
        return out

    # ------------------------------------------------------------------------------------ helpers
    @property
    def num_latents(self) -> int:
        """K: latent slots per block (visual + audio)."""
        return int(self.num_visual_latents) + int(self.num_audio_latents)

    def _validate_latent_fields(self) -> None:
        for name in ("num_visual_latents", "num_audio_latents"):
            v = getattr(self, name)
            if not _is_int(v) or v < 0:
                raise ValueError(f"{name}={v!r} is invalid; expected an int >= 0")
        if self.num_latents == 0:
            raise ValueError(
                "num_visual_latents + num_audio_latents must be > 0 (got 0 latent slots per block)"
            )
        if not _is_int(self.ospe_audio_time_stride) or self.ospe_audio_time_stride < 1:
            raise ValueError(
                f"ospe_audio_time_stride={self.ospe_audio_time_stride!r} is invalid; expected an int >= 1"
            )
        if (
            self.use_ospe
            and self.num_visual_latents > 0
            and self.num_audio_latents > 0
            and self.ospe_audio_time_stride * (self.num_audio_latents - 1) > self.num_visual_latents - 1
        ):
            raise ValueError(
                f"ospe_audio_time_stride={self.ospe_audio_time_stride} with num_audio_latents="
                f"{self.num_audio_latents} places audio latents after the last visual latent "
                f"(num_visual_latents={self.num_visual_latents}); need stride*(num_audio_latents-1) < "
                "num_visual_latents"
            )
        ids = {
            "latent_start_token_id": self.latent_start_token_id,
            "latent_end_token_id": self.latent_end_token_id,
            "latent_pad_token_id": self.latent_pad_token_id,
        }
        vocab = getattr(self.get_text_config(), "vocab_size", None)
        for name, v in ids.items():
            if not _is_int(v) or v < 0 or (vocab is not None and v >= vocab):
                raise ValueError(f"{name}={v!r} is invalid; expected an int in [0, vocab_size={vocab})")
        if len(set(ids.values())) != 3:
            raise ValueError(f"latent token ids must be distinct, got {ids}")
        taken = self._other_special_ids()
        for name, v in ids.items():
            if v in taken:
                raise ValueError(
                    f"{name}={v} is invalid: it is also {taken[v]}; the latent tokens need ids of their own "
                    "(add them to the tokenizer and set the ids with LatentOmniProcessor.update_config)"
                )
        for name in ("latent_loss_weight", "sync_loss_weight"):
            v = getattr(self, name)
            if not _is_number(v) or not 0 <= v < math.inf:
                raise ValueError(f"{name}={v!r} is invalid; expected a finite float >= 0")
        if self.sync_source not in SYNC_SOURCES:
            raise ValueError(
                f"sync_source={self.sync_source!r} is invalid; allowed values: {', '.join(SYNC_SOURCES)}"
            )
        t = self.sync_temperature
        # the learnable temperature is clamped to [0.01, 1] (logit scale 1..100): an initial value outside would
        # start at the bound, where the clamp passes no gradient
        if not _is_number(t) or not SYNC_TEMPERATURE_MIN <= t <= SYNC_TEMPERATURE_MAX:
            raise ValueError(
                f"sync_temperature={t!r} is invalid; expected a float in [{SYNC_TEMPERATURE_MIN}, "
                f"{SYNC_TEMPERATURE_MAX}] (the range the learnable temperature is clamped to)"
            )
        e = self.energy_pool_eps
        if not _is_number(e) or not 0 <= e < math.inf:
            raise ValueError(f"energy_pool_eps={e!r} is invalid; expected a finite float >= 0")
        for name in ("use_ospe", "controlled_attention"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid; expected True or False")
        if not _is_int(self.sync_projection_dim) or self.sync_projection_dim < 1:
            raise ValueError(
                f"sync_projection_dim={self.sync_projection_dim!r} is invalid; expected an int >= 1"
            )
        if self.sync_head_hidden_size is not None and (
            not _is_int(self.sync_head_hidden_size) or self.sync_head_hidden_size < 1
        ):
            raise ValueError(
                f"sync_head_hidden_size={self.sync_head_hidden_size!r} is invalid; expected None or an int >= 1"
            )
        if not _is_int(self.max_latent_blocks) or self.max_latent_blocks < 0:
            raise ValueError(f"max_latent_blocks={self.max_latent_blocks!r} is invalid; expected an int >= 0")

    def _other_special_ids(self) -> dict[int, str]:
        """The media placeholder / boundary ids and the bos / eos / pad ids (top level and text config) that are
        set, each with the field it comes from: a latent token sharing one would be taken for it (a media
        placeholder gets features scattered in, an eos ends generation instead of opening a block, a pad id
        makes every padded prompt look like it holds latent slots)."""
        taken: dict[int, str] = {}
        fields = [
            (self, f)
            for f in (
                "image_token_id",
                "video_token_id",
                "audio_token_id",
                "vision_start_token_id",
                "vision_end_token_id",
                "audio_start_token_id",
                "audio_end_token_id",
                "bos_token_id",
                "eos_token_id",
                "pad_token_id",
            )
        ]
        text = self.get_text_config()
        if text is not self:
            fields += [(text, f) for f in ("bos_token_id", "eos_token_id", "pad_token_id")]
        for obj, f in fields:
            v = getattr(obj, f, None)
            for t in v if isinstance(v, (list, tuple)) else [v]:
                if _is_int(t):
                    where = f if obj is self else f"text_config.{f}"
                    taken.setdefault(t, where)
        return taken

    @classmethod
    def from_thinker_config(cls, thinker_config: Any, **latent_kwargs: Any) -> LatentOmniConfig:
        """Build a LatentOmni config from a ``Qwen2_5OmniThinkerConfig`` (e.g. Qwen2.5-Omni-7B's thinker).

        ``latent_kwargs`` set the LatentOmni fields (token ids, K, λ1, λ2, ...).
        """
        d = thinker_config.to_dict()
        for k in ("model_type", "architectures", "transformers_version", "auto_map"):
            d.pop(k, None)
        # an unknown key would be kept as a stray attribute and the field meant (a typo) left at its default
        params = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
        unknown = sorted(set(latent_kwargs) - params - set(d))
        if unknown:
            own = sorted(params - set(inspect.signature(Qwen2_5OmniThinkerConfig.__init__).parameters))
            raise ValueError(
                f"from_thinker_config got unknown field(s) {unknown}; the LatentOmni fields are {own} "
                "(a field of the thinker config may be given too)"
            )
        d.update(latent_kwargs)
        return cls(**d)


__all__ = ["LatentOmniConfig", "LATENT_START_TOKEN", "LATENT_END_TOKEN", "LATENT_PAD_TOKEN"]

# Finish any Auto registration deferred while this module was importing (see _auto.py).
from ._auto import retry as _retry_registration  # noqa: E402

_retry_registration()
