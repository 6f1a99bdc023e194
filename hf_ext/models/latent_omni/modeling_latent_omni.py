"""LatentOmni: a Qwen2.5-Omni thinker that interleaves text with audio-visual latent reasoning steps.

``LatentOmniForConditionalGeneration`` subclasses transformers' ``Qwen2_5OmniThinkerForConditionalGeneration``
(same weights, same encoders, same 3-D M-RoPE) and adds, per arXiv 2605.22012:

* **latent blocks** ``<Unified_Latent> <Unified_Latent_pad> x K </Unified_Latent>`` (K = 32 visual + 8 audio).
  In ``generate`` (Coconut style) the thinker's last hidden state (after the final norm) is fed back as the
  next input embedding for K steps, with the KV cache; no LM head, no sampling. Then ``</Unified_Latent>``
  is forced and text decoding resumes.
* **training by teacher forcing**: pad slot i receives the energy-pooled, detached segment feature f_i
  (vision encoder after its merger / audio encoder after its projection, i.e. the LLM input space);
  the hidden state one position earlier (the trigger for i = 0) is regressed onto f_i (next-feature
  prediction), exactly what generation feeds back.
* **OSPE** position ids: with B = position of ``<Unified_Latent>`` + 1, visual latent i gets
  (t, h, w) = (B+i, B+i, B+i), audio latent j gets (B + 4j, 0, 0) and text resumes at B + K. The same
  ids are used in training and in generation.
* **controlled attention** (training): from the first ``<Unified_Latent>`` on, text queries cannot see the
  question's audio/video tokens; the trigger and pad (latent) queries can.
* **losses**: ``loss = text CE + λ1 · MSE(latents, targets) + λ2 · L_sync`` with L_sync a symmetric InfoNCE
  between time-aligned visual and audio latents (32 visual latents energy-pooled to the 8 audio times),
  each through a LayerNorm→Linear→GELU→Linear head, L2-normalised, learnable temperature (init 0.07).
  ``text_loss``, ``latent_loss`` and ``sync_loss`` are returned separately.

Segment clips are *not* put in the token sequence: their features are passed as ``segment_*`` inputs
(raw pixels / mel features run through the model's own encoders, or precomputed LLM-space features).
Tokens that nobody attends to and whose outputs are unused (the spec's in-sequence segment clip) have no
effect on the rest of the sequence, so this is equivalent and cheaper.

Example:
    >>> from hf_ext.models.latent_omni.tiny import tiny_latent_omni
    >>> model = tiny_latent_omni()
    >>> ids = torch.tensor([[1, 20, 21, model.config.latent_start_token_id]])
    >>> out = model.generate(ids, max_new_tokens=model.config.num_latents + 3)
    >>> out.shape[1] == 4 + model.config.num_latents + 3
    True
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import ModelOutput
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniThinkerForConditionalGeneration

from .configuration_latent_omni import LatentOmniConfig

# the media keyword arguments of _embed_prompt and _rope_positions (generate passes them from one dict)
_EMBED_MEDIA = (
    "pixel_values",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
    "input_features",
    "feature_attention_mask",
    "audio_feature_lengths",
)
_ROPE_MEDIA = (
    "image_grid_thw",
    "video_grid_thw",
    "feature_attention_mask",
    "audio_feature_lengths",
    "use_audio_in_video",
    "video_second_per_grid",
)

# ------------------------------------------------------------------------------------ pure helpers


def energy_pool(x: torch.Tensor, num_slots: int, eps: float = 1e-6) -> torch.Tensor:
    """Energy-weighted pooling of a token sequence down (or up) to ``num_slots`` slots.

    Weights are ``w = ||x_n||² + eps``; each slot is ``avgpool(x·w) / avgpool(w)`` over its bin
    (``adaptive_avg_pool1d`` bins). With fewer tokens than slots the sequence is linearly interpolated
    (``align_corners=True``: the first and last slots are the first and last tokens).

    Args:
        x: ``[..., N, D]`` features (N >= 1).
        num_slots: S, the number of output slots.
        eps: ε added to the energy.

    Returns:
        ``[..., S, D]`` in ``x.dtype`` (computed in float32).
    """
    if x.shape[-2] < 1:
        raise ValueError("energy_pool: x has 0 tokens; a segment needs at least one feature row")
    if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots < 1:
        raise ValueError(f"energy_pool: num_slots={num_slots!r} must be an int >= 1")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < math.inf:
        raise ValueError(f"energy_pool: eps={eps!r} must be a finite float >= 0 (NaN / negative weights)")
    lead, (n, d) = x.shape[:-2], x.shape[-2:]
    xf = x.reshape(-1, n, d).float()
    if n == num_slots:
        out = xf
    elif n < num_slots:
        if n == 1:
            out = xf.expand(-1, num_slots, -1)
        else:
            out = F.interpolate(
                xf.transpose(1, 2), size=num_slots, mode="linear", align_corners=True
            ).transpose(1, 2)
    else:
        w = xf.pow(2).sum(-1, keepdim=True) + eps  # [M, N, 1]
        num = F.adaptive_avg_pool1d((xf * w).transpose(1, 2), num_slots)  # [M, D, S]
        den = F.adaptive_avg_pool1d(w.transpose(1, 2), num_slots)  # [M, 1, S]
        out = (num / den).transpose(1, 2)
    return out.reshape(*lead, num_slots, d).to(x.dtype)


def ospe_position_ids(
    base: int | torch.Tensor,
    num_visual: int,
    num_audio: int,
    *,
    audio_time_stride: int = 4,
    use_ospe: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Position ids ``[3, K]`` (t, h, w) of one latent block whose first slot follows the trigger.

    ``base`` is B = (position of ``<Unified_Latent>``) + 1. With OSPE: visual latent i → (B+i, B+i, B+i);
    audio latent j → (B + stride·j, 0, 0). Without OSPE: slot k → (B+k, B+k, B+k). Text after the block
    resumes at B + K in both cases.
    """
    for name, value, low in (("num_visual", num_visual, 0), ("num_audio", num_audio, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"ospe_position_ids: {name}={value!r} must be an int >= {low}")
    if isinstance(audio_time_stride, bool) or not isinstance(audio_time_stride, int) or audio_time_stride < 1:
        raise ValueError(f"ospe_position_ids: audio_time_stride={audio_time_stride!r} must be an int >= 1")
    if not isinstance(use_ospe, bool):
        raise ValueError(f"ospe_position_ids: use_ospe={use_ospe!r} must be True or False")
    k = num_visual + num_audio
    base_t = torch.as_tensor(base, device=device).long().reshape(())
    if not use_ospe:
        return (base_t + torch.arange(k, device=base_t.device)).unsqueeze(0).expand(3, k).clone()
    pos = torch.zeros(3, k, dtype=torch.long, device=base_t.device)
    vis = base_t + torch.arange(num_visual, device=base_t.device)
    pos[:, :num_visual] = vis.unsqueeze(0)
    pos[0, num_visual:] = base_t + audio_time_stride * torch.arange(num_audio, device=base_t.device)
    return pos


def find_latent_blocks(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    config: LatentOmniConfig,
    *,
    allow_open_end: bool = False,
) -> tuple[list[tuple[int, int]], list[int]]:
    """Locate and validate latent blocks.

    A complete block is ``<Unified_Latent>`` followed by exactly K ``<Unified_Latent_pad>`` and
    ``</Unified_Latent>``. With ``allow_open_end`` a row may end (last valid token) with a bare trigger.

    Returns:
        ``(blocks, open_rows)``: ``blocks`` lists ``(row, trigger_index)`` of complete blocks in row-major,
        left-to-right order (the order segment features must follow); ``open_rows`` the rows ending with
        an open trigger.

    Raises:
        ValueError: unbalanced markers, a wrong number of pad tokens, or a pad outside a block.
    """
    start, end, pad = config.latent_start_token_id, config.latent_end_token_id, config.latent_pad_token_id
    k = config.num_latents
    ids = input_ids.detach()
    is_marker = (ids == start) | (ids == end) | (ids == pad)
    blocks: list[tuple[int, int]] = []
    open_rows: list[int] = []
    if not bool(is_marker.any()):
        return blocks, open_rows
    valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(ids, dtype=torch.bool)
    names = {start: "<Unified_Latent>", end: "</Unified_Latent>", pad: "<Unified_Latent_pad>"}
    for b in range(ids.shape[0]):
        row_valid = valid[b].nonzero().flatten()
        last_valid = int(row_valid[-1]) if row_valid.numel() else -1
        pos = (is_marker[b] & valid[b]).nonzero().flatten().tolist()
        toks = ids[b, pos].tolist() if pos else []
        i = 0
        while i < len(pos):
            p, t = pos[i], toks[i]
            if t != start:
                what = (
                    "has no matching <Unified_Latent> before it" if t == end else "is outside a latent block"
                )
                raise ValueError(
                    f"input_ids row {b}: {names[t]} at position {p} {what} (latent markers unbalanced)"
                )
            n_pad = 0
            j = i + 1
            while j < len(pos) and toks[j] == pad and pos[j] == p + 1 + n_pad:
                n_pad += 1
                j += 1
            if n_pad == 0 and j == len(pos) and p == last_valid and allow_open_end:
                open_rows.append(b)
                break
            if j == len(pos) or toks[j] != end:
                if n_pad == 0 and p == last_valid:
                    raise ValueError(
                        f"input_ids row {b}: <Unified_Latent> at position {p} ends the sequence without its "
                        f"{k} <Unified_Latent_pad> slots and </Unified_Latent> (an open trigger is only allowed "
                        "at the end of a generate() prompt)"
                    )
                raise ValueError(
                    f"input_ids row {b}: <Unified_Latent> at position {p} is not closed by </Unified_Latent> "
                    f"right after its pad slots (latent markers unbalanced)"
                )
            if n_pad != k or pos[j] != p + k + 1:
                raise ValueError(
                    f"input_ids row {b}: latent block at position {p} has {n_pad} <Unified_Latent_pad> tokens; "
                    f"expected exactly K = num_visual_latents + num_audio_latents = {k}"
                )
            blocks.append((b, p))
            i = j + 1
    return blocks, open_rows


def controlled_attention_mask(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    config: LatentOmniConfig,
) -> torch.Tensor:
    """Boolean ``[B, 1, L, L]`` mask (True = may attend) of LatentOmni's controlled attention.

    Causal + key padding; in addition, from the first ``<Unified_Latent>`` of a row on, every query that
    is not a latent token (trigger or pad slot) is blocked from the question's image/video/audio
    placeholder tokens. The diagonal is always allowed so padded rows never become empty.
    """
    bsz, length = input_ids.shape
    dev = input_ids.device
    ar = torch.arange(length, device=dev)
    allowed = (ar[None, :] <= ar[:, None]).unsqueeze(0).expand(bsz, -1, -1)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, :]
    media_ids = torch.tensor(
        [config.image_token_id, config.video_token_id, config.audio_token_id],
        device=dev,
        dtype=input_ids.dtype,
    )
    media = torch.isin(input_ids, media_ids)
    is_start = input_ids == config.latent_start_token_id
    latent_query = is_start | (input_ids == config.latent_pad_token_id)
    first = torch.where(
        is_start.any(1), is_start.float().argmax(1), torch.full_like(is_start[:, 0], length, dtype=torch.long)
    )
    text_after = (ar[None, :] >= first[:, None]) & ~latent_query
    blocked = text_after[:, :, None] & media[:, None, :]
    allowed = (allowed & ~blocked) | torch.eye(length, dtype=torch.bool, device=dev)[None]
    return allowed[:, None]


def symmetric_info_nce(z_a: torch.Tensor, z_b: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of L2-normalised ``[N, E]`` embeddings: row i of each is the positive pair."""
    logits = logit_scale * z_a.float() @ z_b.float().t()
    target = torch.arange(z_a.shape[0], device=z_a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


# ----------------------------------------------------------------------------------------- modules


class SyncProjectionHead(nn.Module):
    """LayerNorm → Linear → GELU → Linear: ``[..., D] -> [..., E]`` (one for visual, one for audio)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class SyncTemperature(nn.Module):
    """Learnable InfoNCE temperature stored as ``log(1/τ)``; ``scale()`` = 1/τ clamped to [1, 100]."""

    def __init__(self, temperature: float) -> None:
        super().__init__()
        self.init_value = math.log(1.0 / temperature)
        self.log_scale = nn.Parameter(torch.tensor(self.init_value))

    def scale(self) -> torch.Tensor:
        return self.log_scale.float().clamp(0.0, math.log(100.0)).exp()


@dataclass
class LatentOmniCausalLMOutput(ModelOutput):
    """Output of :meth:`LatentOmniForConditionalGeneration.forward` on the latent path.

    Attributes:
        loss: ``text_loss + λ1·latent_loss + λ2·sync_loss`` (when ``labels`` are given).
        text_loss: causal-LM CE over text tokens (latent pads and the forced ``</Unified_Latent>`` excluded).
        latent_loss: MSE between predicted latents and energy-pooled segment targets.
        sync_loss: symmetric audio-visual InfoNCE.
        logits: ``[B, L, V]``.
        latent_predictions: ``[n_blocks, K, D]`` hidden states that predict each latent slot.
        latent_targets: ``[n_blocks, K, D]`` detached pooled targets (the teacher-forced inputs).
        hidden_states: with ``output_hidden_states=True``, the decoder's embeddings and every layer's output,
            each ``[B, L, D]``.
        attentions: with ``output_attentions=True`` (eager attention), every layer's ``[B, H, L, L]`` weights.
    """

    loss: torch.FloatTensor | None = None
    text_loss: torch.FloatTensor | None = None
    latent_loss: torch.FloatTensor | None = None
    sync_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    latent_predictions: torch.FloatTensor | None = None
    latent_targets: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class LatentOmniGenerateOutput(ModelOutput):
    """``generate(..., return_dict_in_generate=True)`` result.

    Attributes:
        sequences: ``[B, L + new]``; latent steps appear as ``<Unified_Latent_pad>`` ids.
        latent_states: per row, a ``[n_steps, D]`` tensor of the hidden states fed back as latent inputs
            (when ``output_latents=True``).
    """

    sequences: torch.LongTensor | None = None
    latent_states: list[torch.Tensor] | None = None


@dataclass
class _DecodeState:
    """Mutable state of the latent/text decoding loop (see ``_latent_prefill`` / ``_latent_decode``)."""

    cache: Any
    embeds: torch.Tensor | None  # [B, T, D] (no-cache mode only)
    positions: torch.Tensor | None  # [3, B, T] (no-cache mode only)
    attention_mask: torch.Tensor  # [B, T]
    sequences: torch.Tensor  # [B, T]
    last_hidden: torch.Tensor  # [B, D]
    mode: list[str]  # "text" | "latent" | "end" | "done"
    latent_i: list[int]
    base: list[int]
    next_pos: list[int]
    blocks: list[int]


_CACHE_KW: str | None = None


def _cache_kwarg(text_model: nn.Module) -> str:
    """``cache`` (transformers >= 5.2x) or ``past_key_values`` (older 5.x) for the text model's forward."""
    global _CACHE_KW
    if _CACHE_KW is None:
        params = inspect.signature(type(text_model).forward).parameters
        _CACHE_KW = "cache" if "cache" in params else "past_key_values"
    return _CACHE_KW


# ------------------------------------------------------------------------------------------- model


# generation_config fields the latent decoding loop does not apply, with the value at which each changes nothing;
# set to anything else they are an error there (latent_reasoning=False runs transformers' generate, which has them)
DEFAULT_MAX_NEW_TOKENS = 20
"""New tokens ``generate()`` produces when neither ``max_new_tokens`` nor ``max_length`` is set (argument or
generation config): transformers' default ``max_length=20``, which its ``generate`` counts as 20 tokens after the
prompt, capped so that prompt + new tokens stay within the text model's ``max_position_embeddings``. A latent
block takes K + 1 steps (40 + 1 with the paper's K), so set ``max_new_tokens`` when the output may hold one."""

_LATENT_GEN_UNSUPPORTED: dict[str, Any] = {
    "num_beams": 1,
    "num_beam_groups": 1,
    "num_return_sequences": 1,
    "penalty_alpha": None,
    "diversity_penalty": 0.0,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "min_p": None,
    "min_length": 0,
    "encoder_repetition_penalty": 1.0,
    "bad_words_ids": None,
    "force_words_ids": None,
    "sequence_bias": None,
    "exponential_decay_length_penalty": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "begin_suppress_tokens": None,
    "guidance_scale": 1.0,
    "stop_strings": None,
    "renormalize_logits": False,
    "watermarking_config": None,
    "top_h": None,
    "dola_layers": None,
    "token_healing": False,
    "max_time": None,
    "constraints": None,
    # per-step outputs LatentOmniGenerateOutput does not carry (it has sequences and latent_states only)
    "output_scores": False,
    "output_logits": False,
    "output_attentions": False,
    "output_hidden_states": False,
}


def _hf_generation_defaults() -> dict[str, Any]:
    """transformers' global generation defaults (``GenerationConfig._get_default_generation_params``), which its
    ``generate`` applies to fields that neither the call nor any generation config set; ``top_k`` = 50 is the one
    that changes sampling."""
    from transformers import GenerationConfig

    get = getattr(GenerationConfig, "_get_default_generation_params", None)
    out = dict(get()) if get is not None else {}
    out.setdefault("top_k", 50)
    return out


class _KeepScore:
    """Run ``procs`` but keep token ``token``'s score: the generation config's repetition penalty and n-gram ban
    apply to text, while latent blocks (triggered by ``<Unified_Latent>``) are bounded by ``max_latent_blocks``."""

    def __init__(self, procs: Any, token: int) -> None:
        self.procs, self.token = procs, token

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        kept = scores[:, self.token].clone()
        scores = self.procs(input_ids, scores)
        scores[:, self.token] = kept
        return scores


def _latent_text_processors(gc: Any, prompt_len: int, eos: list[int], device: Any) -> tuple[Any, list[int]]:
    """The text-step logits processors that ``gc`` asks for and the latent loop applies (repetition penalty,
    no-repeat n-grams, a minimum of new tokens) and its ``suppress_tokens``; raises ``ValueError`` naming any
    other output-changing field that is set."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinNewTokensLengthLogitsProcessor,
        NoRepeatNGramLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
    )

    unsupported = {
        f: getattr(gc, f)
        for f, neutral in _LATENT_GEN_UNSUPPORTED.items()
        if getattr(gc, f, None) is not None and getattr(gc, f) != neutral
    }
    if unsupported:
        raise ValueError(
            f"generate() with latent_reasoning=True does not apply generation_config fields {unsupported}; "
            "it applies max_new_tokens, max_length, do_sample, temperature, top_k, top_p, repetition_penalty, "
            "no_repeat_ngram_size, min_new_tokens, suppress_tokens, eos_token_id and pad_token_id, and returns "
            "sequences and (output_latents=True) latent_states only. Reset the others "
            "(model.generation_config.<field> = None) or use latent_reasoning=False"
        )
    procs = LogitsProcessorList()
    if gc.repetition_penalty is not None and gc.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(float(gc.repetition_penalty)))
    if gc.no_repeat_ngram_size:
        procs.append(NoRepeatNGramLogitsProcessor(int(gc.no_repeat_ngram_size)))
    if gc.min_new_tokens and eos:
        procs.append(
            MinNewTokensLengthLogitsProcessor(prompt_len, int(gc.min_new_tokens), eos, device=device)
        )
    return procs, [int(t) for t in (gc.suppress_tokens or [])]


def _warn_uncompiled_latent_loop(gc: Any) -> None:
    """Warn when ``gc`` asks for transformers' compiled / static-cache decoding, which the latent loop does not apply
    (it runs the decoder as it is, on a ``DynamicCache``)."""
    asked = [f for f in ("compile_config", "cache_implementation") if getattr(gc, f, None) is not None]
    if asked:
        warnings.warn(
            f"generate() with latent_reasoning=True does not apply {' / '.join(asked)}: the latent loop runs the "
            "thinker's decoder as it is, with a DynamicCache (nothing is compiled for it). To compile it, compile the "
            "decoder in place once (model.model.language_model.compile(), or .compile() on model.model where it has "
            "no language_model); latent_reasoning=False runs transformers' generate, which applies both",
            UserWarning,
            stacklevel=4,  # the caller of generate (under torch.no_grad's wrapper)
        )


class LatentOmniForConditionalGeneration(Qwen2_5OmniThinkerForConditionalGeneration):
    """Qwen2.5-Omni thinker with interleaved audio-visual latent reasoning (see module docstring).

    Inputs (forward, training): the thinker's usual ``input_ids`` / ``attention_mask`` / ``labels`` and
    question media (``pixel_values_videos`` + ``video_grid_thw``, ``input_features`` +
    ``feature_attention_mask``, ``use_audio_in_video`` ...), plus one segment per complete latent block
    (row-major order): either ``segment_visual_features`` / ``segment_audio_features`` (lists of
    ``[N_i, D]`` LLM-space features) or raw ``segment_pixel_values_videos`` + ``segment_video_grid_thw``
    (one grid row per segment) and ``segment_input_features`` + ``segment_feature_attention_mask``
    (one row per segment).
    """

    config_class = LatentOmniConfig
    config: LatentOmniConfig
    # Loss components are means: let Trainer handle gradient accumulation scaling itself.
    accepts_loss_kwargs = False

    def __init__(self, config: LatentOmniConfig) -> None:
        super().__init__(config)
        d = config.get_text_config().hidden_size
        hid = config.sync_head_hidden_size or d
        self.sync_visual_head = SyncProjectionHead(d, hid, config.sync_projection_dim)
        self.sync_audio_head = SyncProjectionHead(d, hid, config.sync_projection_dim)
        self.sync_temperature = SyncTemperature(config.sync_temperature)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, SyncTemperature):
            from transformers import initialization as hf_init

            hf_init.constant_(module.log_scale, math.log(1.0 / self.config.sync_temperature))

    # ------------------------------------------------------------------ version-robust accessors
    def _text_model(self) -> nn.Module:
        """The thinker's decoder (``model.language_model`` on transformers >= 5.2x, ``model`` before)."""
        return getattr(self.model, "language_model", self.model)

    def _audio_tower(self) -> nn.Module:
        return getattr(self.model, "audio_tower", None) or self.audio_tower

    def _run_text_model(
        self,
        embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | dict | None,
        cache: Any = None,
        full: bool = False,
        **extra: Any,
    ) -> Any:
        """Run the decoder on ``embeds [B, T, D]`` with 3-D ``position_ids [3, B, T]``; returns the normed
        last hidden states ``[B, T, D]``, or with ``full`` the decoder's whole output (``extra`` such as
        ``output_hidden_states`` go to it)."""
        tm = self._text_model()
        kw = {_cache_kwarg(tm): cache} if cache is not None else {}
        out = tm(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=cache is not None,
            **kw,
            **extra,
        )
        return out if full else out.last_hidden_state

    # ------------------------------------------------------------------------------ embeddings
    def _embed_prompt(
        self,
        input_ids: torch.Tensor,
        *,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        feature_attention_mask: torch.Tensor | None = None,
        audio_feature_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with the question's image/video/audio features scattered into their
        placeholder tokens: ``[B, L, D]``. Raises a ``ValueError`` when placeholders and features differ."""
        cfg = self.config
        embeds = self.get_input_embeddings()(input_ids)

        def scatter(
            embeds: torch.Tensor, token_id: int, feats: torch.Tensor | None, name: str, tok: str
        ) -> torch.Tensor:
            mask = input_ids == token_id
            n = int(mask.sum())
            if feats is None:
                if n:
                    raise ValueError(f"input_ids contain {n} {tok} placeholder tokens but {name} is None")
                return embeds
            if feats.shape[0] != n:
                raise ValueError(
                    f"{name} gives {feats.shape[0]} feature rows but input_ids contain {n} {tok} placeholder tokens"
                )
            return embeds.masked_scatter(mask.unsqueeze(-1), feats.to(embeds.device, embeds.dtype))

        audio = None
        if input_features is not None:
            audio = self.get_audio_features(
                input_features, feature_attention_mask, audio_feature_lengths, return_dict=True
            ).last_hidden_state
        embeds = scatter(embeds, cfg.audio_token_id, audio, "input_features", "<|AUDIO|>")
        image = None
        if pixel_values is not None:
            image = torch.cat(
                list(self.get_image_features(pixel_values, image_grid_thw, return_dict=True).pooler_output)
            )
        embeds = scatter(embeds, cfg.image_token_id, image, "pixel_values", "<|IMAGE|>")
        video = None
        if pixel_values_videos is not None:
            video = torch.cat(
                list(
                    self.get_video_features(
                        pixel_values_videos, video_grid_thw, return_dict=True
                    ).pooler_output
                )
            )
        embeds = scatter(embeds, cfg.video_token_id, video, "pixel_values_videos", "<|VIDEO|>")
        return embeds

    def _rope_positions(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        image_grid_thw: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        feature_attention_mask: torch.Tensor | None = None,
        audio_feature_lengths: torch.Tensor | None = None,
        use_audio_in_video: bool | None = None,
        video_second_per_grid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The thinker's 3-D M-RoPE ids ``[3, B, L]`` (latent slots counted as text)."""
        if feature_attention_mask is not None:
            audio_feature_lengths = feature_attention_mask.sum(-1)
        if video_grid_thw is not None and video_second_per_grid is None:
            video_second_per_grid = torch.ones(video_grid_thw.shape[0], device=input_ids.device)
        pos, _ = self.get_rope_index(
            input_ids,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            attention_mask=attention_mask,
            use_audio_in_video=bool(use_audio_in_video),
            audio_seqlens=audio_feature_lengths,
            second_per_grids=video_second_per_grid,
        )
        return pos.to(input_ids.device)

    def _ospe(self, base: int | torch.Tensor, device: torch.device) -> torch.Tensor:
        cfg = self.config
        return ospe_position_ids(
            base,
            cfg.num_visual_latents,
            cfg.num_audio_latents,
            audio_time_stride=cfg.ospe_audio_time_stride,
            use_ospe=cfg.use_ospe,
            device=device,
        )

    def apply_ospe(self, position_ids: torch.Tensor, blocks: list[tuple[int, int]]) -> torch.Tensor:
        """Overwrite the latent slots of ``position_ids [3, B, L]`` with OSPE ids (returns a copy).

        ``blocks`` lists ``(row, trigger_index)`` (see :func:`find_latent_blocks`); the trigger's own
        temporal id + 1 is B. Text after each block already sits at B + K (slots count as text first).
        """
        pos = position_ids.clone()
        k = self.config.num_latents
        for b, s in blocks:
            pos[:, b, s + 1 : s + 1 + k] = self._ospe(pos[0, b, s] + 1, pos.device)
        return pos

    # -------------------------------------------------------------------------------- targets
    def _segment_features(
        self,
        n_blocks: int,
        *,
        segment_visual_features: list[torch.Tensor] | None,
        segment_audio_features: list[torch.Tensor] | None,
        segment_pixel_values_videos: torch.Tensor | None,
        segment_video_grid_thw: torch.Tensor | None,
        segment_input_features: torch.Tensor | None,
        segment_feature_attention_mask: torch.Tensor | None,
        with_grad: bool,
    ) -> tuple[list[torch.Tensor] | None, list[torch.Tensor] | None]:
        """Per-block LLM-space segment features (lists of ``[N_i, D]``), validated against ``n_blocks``."""
        cfg = self.config
        d = cfg.get_text_config().hidden_size
        ctx = torch.enable_grad() if with_grad else torch.no_grad()

        vis = aud = None
        if cfg.num_visual_latents > 0:
            vis = self._segment_modality(
                n_blocks,
                ctx,
                "visual",
                ("segment_visual_features", segment_visual_features),
                ("segment_pixel_values_videos", segment_pixel_values_videos),
                ("segment_video_grid_thw", segment_video_grid_thw),
                self._encode_segment_videos,
            )
        if cfg.num_audio_latents > 0:
            aud = self._segment_modality(
                n_blocks,
                ctx,
                "audio",
                ("segment_audio_features", segment_audio_features),
                ("segment_input_features", segment_input_features),
                ("segment_feature_attention_mask", segment_feature_attention_mask),
                self._encode_segment_audio,
            )
        for name, feats in (("segment_visual_features", vis), ("segment_audio_features", aud)):
            for i, f in enumerate(feats or []):
                if f.dim() != 2 or f.shape[0] < 1 or f.shape[1] != d:
                    raise ValueError(
                        f"{name}[{i}] has shape {tuple(f.shape)}; expected [N >= 1, hidden_size={d}]"
                    )
        return vis, aud

    @staticmethod
    def _segment_modality(
        n_blocks: int,
        ctx: Any,
        label: str,
        given: tuple[str, list[torch.Tensor] | None],
        raw: tuple[str, torch.Tensor | None],
        aux: tuple[str, torch.Tensor | None],
        encode: Callable[[torch.Tensor, torch.Tensor], list[torch.Tensor]],
    ) -> list[torch.Tensor] | None:
        """One modality's per-block features: the given list, else ``encode(raw, aux)``; one per latent block."""
        feats = None
        if given[1] is not None:
            feats = list(given[1])
        elif raw[1] is not None:
            if aux[1] is None:
                raise ValueError(f"{raw[0]} needs {aux[0]} (one row per segment)")
            with ctx:
                feats = encode(raw[1], aux[1])
        n = 0 if feats is None else len(feats)
        if n != n_blocks:
            raise ValueError(
                f"missing modality features for a latent segment: input_ids contain {n_blocks} latent "
                f"block(s) but {n} {label} segment(s) were given (pass {given[0]}=[...] or "
                f"{raw[0]} + {aux[0]}, one segment per block)"
            )
        return feats

    def _encode_segment_videos(
        self, pixel_values_videos: torch.Tensor, grid_thw: torch.Tensor
    ) -> list[torch.Tensor]:
        """Video tower, pooled to LLM space: one ``[N_i, D]`` per segment (a row of ``grid_thw``)."""
        return list(self.get_video_features(pixel_values_videos, grid_thw, return_dict=True).pooler_output)

    def _encode_segment_audio(
        self, input_features: torch.Tensor, attention_mask: torch.Tensor
    ) -> list[torch.Tensor]:
        """Audio tower: one ``[N_i, D]`` per segment (a row of ``input_features`` / ``attention_mask``)."""
        flat = self.get_audio_features(input_features, attention_mask, return_dict=True).last_hidden_state
        _, out_lens = self._audio_tower()._get_feat_extract_output_lengths(attention_mask.sum(-1))
        return list(torch.split(flat, out_lens.tolist()))

    def pool_segment_targets(
        self, visual: list[torch.Tensor] | None, audio: list[torch.Tensor] | None, n_blocks: int
    ) -> torch.Tensor:
        """Energy-pool per-block features to the K slots: ``[n_blocks, K, D]`` = 32 visual then 8 audio."""
        cfg = self.config
        eps = cfg.energy_pool_eps
        out = []
        for i in range(n_blocks):
            parts = []
            if cfg.num_visual_latents > 0:
                parts.append(energy_pool(visual[i], cfg.num_visual_latents, eps))
            if cfg.num_audio_latents > 0:
                parts.append(energy_pool(audio[i], cfg.num_audio_latents, eps))
            out.append(torch.cat(parts, 0))
        return torch.stack(out, 0)

    def sync_loss_from(self, visual: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE between ``visual [n, Kv, D]`` (energy-pooled to the Ka audio times) and
        ``audio [n, Ka, D]``; positives are the same block and time step."""
        cfg = self.config
        ka = audio.shape[1]
        v = energy_pool(visual, ka, cfg.energy_pool_eps)
        wv, wa = self.sync_visual_head.fc1.weight, self.sync_audio_head.fc1.weight  # their device and dtype
        zv = F.normalize(
            self.sync_visual_head(v.reshape(-1, v.shape[-1]).to(wv.device, wv.dtype)).float(), dim=-1
        )
        za = F.normalize(
            self.sync_audio_head(audio.reshape(-1, audio.shape[-1]).to(wa.device, wa.dtype)).float(), dim=-1
        )
        return symmetric_info_nce(zv, za.to(zv.device), self.sync_temperature.scale().to(zv.device))

    # ---------------------------------------------------------------------------------- forward
    def forward(  # type: ignore[override]
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        feature_attention_mask: torch.Tensor | None = None,
        audio_feature_lengths: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        use_audio_in_video: bool | None = None,
        video_second_per_grid: torch.Tensor | None = None,
        segment_visual_features: list[torch.Tensor] | None = None,
        segment_audio_features: list[torch.Tensor] | None = None,
        segment_pixel_values_videos: torch.Tensor | None = None,
        segment_video_grid_thw: torch.LongTensor | None = None,
        segment_input_features: torch.Tensor | None = None,
        segment_feature_attention_mask: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> LatentOmniCausalLMOutput | Any:
        """Teacher-forced forward with latent blocks (see class docstring for the inputs).

        Calls that carry a KV cache, ``use_cache=True`` or ``inputs_embeds`` (e.g. transformers'
        ``GenerationMixin.generate``) go to the unchanged thinker forward; they must not contain latent
        pads. Everything else takes the latent path and returns :class:`LatentOmniCausalLMOutput`.

        Shapes: ``input_ids [B, L]``; ``logits [B, L, V]``; ``latent_predictions [n_blocks, K, D]``.
        """
        cfg = self.config
        kwargs.pop("num_items_in_batch", None)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        upstream = bool(use_cache) or cache is not None or inputs_embeds is not None
        if upstream:
            if input_ids is not None and bool((input_ids == cfg.latent_pad_token_id).any()):
                raise ValueError(
                    "latent blocks (<Unified_Latent_pad> in input_ids) need the latent path: call forward with "
                    "use_cache=False and without a cache/inputs_embeds, or use generate() to decode"
                )
            return super().forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                labels=labels,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                input_features=input_features,
                feature_attention_mask=feature_attention_mask,
                audio_feature_lengths=audio_feature_lengths,
                pixel_values=pixel_values,
                image_grid_thw=image_grid_thw,
                pixel_values_videos=pixel_values_videos,
                video_grid_thw=video_grid_thw,
                use_audio_in_video=use_audio_in_video,
                video_second_per_grid=video_second_per_grid,
                use_cache=use_cache,
                **kwargs,
            )
        if input_ids is None:
            raise ValueError(
                "input_ids is required on the latent path (inputs_embeds routes to the thinker forward)"
            )
        output_hidden_states = kwargs.pop("output_hidden_states", None)
        output_attentions = kwargs.pop("output_attentions", None)
        return_dict = kwargs.pop("return_dict", None)
        logits_to_keep = kwargs.pop("logits_to_keep", 0)
        for name in ("cache", "past_key_values"):  # None here (else the call went upstream)
            kwargs.pop(name, None)
        if kwargs:
            raise ValueError(
                f"forward() on the latent path got arguments it does not use: {sorted(kwargs)}; it also takes "
                "output_hidden_states, output_attentions, return_dict and logits_to_keep"
            )
        if labels is not None and logits_to_keep not in (0, None):
            raise ValueError(
                "logits_to_keep must be 0 with labels: the text loss needs every position's logits"
            )
        tcfg = cfg.get_text_config()
        if output_hidden_states is None:
            output_hidden_states = bool(getattr(tcfg, "output_hidden_states", False))
        if output_attentions is None:
            output_attentions = bool(getattr(tcfg, "output_attentions", False))
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # 1. validate everything before any compute
        blocks, _ = find_latent_blocks(input_ids, attention_mask, cfg, allow_open_end=True)
        n_blocks = len(blocks)
        want_feature_grad = cfg.sync_source == "features" and self.training and cfg.sync_loss_weight > 0
        vis_feats, aud_feats = (None, None)
        if n_blocks or any(
            x is not None
            for x in (
                segment_visual_features,
                segment_audio_features,
                segment_pixel_values_videos,
                segment_input_features,
            )
        ):
            vis_feats, aud_feats = self._segment_features(
                n_blocks,
                segment_visual_features=segment_visual_features,
                segment_audio_features=segment_audio_features,
                segment_pixel_values_videos=segment_pixel_values_videos,
                segment_video_grid_thw=segment_video_grid_thw,
                segment_input_features=segment_input_features,
                segment_feature_attention_mask=segment_feature_attention_mask,
                with_grad=want_feature_grad,
            )
        # 2. embeddings: question media + teacher-forced latent slots
        embeds = self._embed_prompt(
            input_ids,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            pixel_values_videos=pixel_values_videos,
            video_grid_thw=video_grid_thw,
            input_features=input_features,
            feature_attention_mask=feature_attention_mask,
            audio_feature_lengths=audio_feature_lengths,
        )
        targets = None
        if n_blocks:
            targets = (
                self.pool_segment_targets(vis_feats, aud_feats, n_blocks)
                .detach()
                .to(embeds.device, embeds.dtype)
            )
            slot_mask = (input_ids == cfg.latent_pad_token_id).unsqueeze(-1)
            embeds = embeds.masked_scatter(slot_mask, targets.reshape(-1, targets.shape[-1]))
        # 3. positions (OSPE on the slots) and the controlled attention mask
        if position_ids is None:
            position_ids = self._rope_positions(
                input_ids,
                attention_mask,
                image_grid_thw=image_grid_thw,
                video_grid_thw=video_grid_thw,
                feature_attention_mask=feature_attention_mask,
                audio_feature_lengths=audio_feature_lengths,
                use_audio_in_video=use_audio_in_video,
                video_second_per_grid=video_second_per_grid,
            )
            position_ids = self.apply_ospe(position_ids, blocks)
        mask: Any = attention_mask
        if cfg.controlled_attention and n_blocks:
            mask = self._controlled_mask(input_ids, attention_mask, embeds.dtype)
        # 4. decoder
        dec = self._run_text_model(
            embeds,
            position_ids,
            mask,
            full=True,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        hidden = dec.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep])
        # 5. losses
        text_loss = None
        if labels is not None:
            labels = labels.clone()
            labels[(input_ids == cfg.latent_pad_token_id) | (input_ids == cfg.latent_end_token_id)] = -100
            text_loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=cfg.get_text_config().vocab_size
            )
        latent_loss = sync_loss = preds = None
        if n_blocks:
            k = cfg.num_latents
            rows = torch.tensor([b for b, _ in blocks], device=hidden.device)
            starts = torch.tensor([s for _, s in blocks], device=hidden.device)
            idx = starts[:, None] + torch.arange(k, device=hidden.device)[None, :]  # trigger .. slot K-2
            preds = hidden[rows[:, None], idx]  # [n, K, D]
            latent_loss = F.mse_loss(preds.float(), targets.to(preds.device).float())
            kv, ka = cfg.num_visual_latents, cfg.num_audio_latents
            if kv > 0 and ka > 0:
                if cfg.sync_source not in ("latents", "features"):  # a config edited after it was checked
                    raise ValueError(
                        f"sync_source={cfg.sync_source!r} is invalid; allowed values: latents, features"
                    )
                if cfg.sync_source == "latents":
                    sync_loss = self.sync_loss_from(preds[:, :kv], preds[:, kv:])
                else:
                    v = torch.stack([energy_pool(f, kv, cfg.energy_pool_eps) for f in vis_feats])
                    a = torch.stack([energy_pool(f, ka, cfg.energy_pool_eps) for f in aud_feats])
                    sync_loss = self.sync_loss_from(v, a)
        loss = None
        if text_loss is not None:  # the parts may sit on different GPUs when the model is split (device_map)
            loss = text_loss
            if latent_loss is not None:
                loss = loss + cfg.latent_loss_weight * latent_loss.to(loss.device)
            if sync_loss is not None:
                loss = loss + cfg.sync_loss_weight * sync_loss.to(loss.device)
        out = LatentOmniCausalLMOutput(
            loss=loss,
            text_loss=text_loss,
            latent_loss=latent_loss,
            sync_loss=sync_loss,
            logits=logits,
            latent_predictions=preds,
            latent_targets=targets,
            hidden_states=dec.hidden_states if output_hidden_states else None,
            attentions=dec.attentions if output_attentions else None,
        )
        use_dict = return_dict if return_dict is not None else getattr(cfg, "return_dict", True)
        return out if use_dict else out.to_tuple()

    def _controlled_mask(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, dtype: torch.dtype
    ) -> dict:
        """The controlled mask in the format the configured attention implementation expects."""
        tcfg = self._text_model().config
        impl = getattr(tcfg, "_attn_implementation", None) or "eager"
        if "sliding_attention" in (getattr(tcfg, "layer_types", None) or []):
            raise ValueError(
                "controlled_attention=True does not support sliding-window layers; set use_sliding_window=False"
            )
        allowed = controlled_attention_mask(input_ids, attention_mask, self.config)
        if impl == "sdpa":
            mask = allowed
        elif impl == "eager":
            mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
                ~allowed, torch.finfo(dtype).min
            )
        else:
            raise ValueError(
                f"controlled_attention=True needs attn_implementation in ('sdpa', 'eager'); got {impl!r} "
                "(or set config.controlled_attention=False)"
            )
        return {"full_attention": mask}

    # --------------------------------------------------------------------------------- generate
    def _latent_prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        use_cache: bool,
        media: dict[str, Any],
        max_blocks: int | None = None,
    ) -> _DecodeState:
        """Run the prompt through the model and set up the decoding state; ``max_blocks`` is the latent-block
        cap per row (default ``config.max_latent_blocks``), checked against a prompt that opens a block."""
        cfg = self.config
        if max_blocks is None:
            max_blocks = cfg.max_latent_blocks
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("generate needs left-padded input_ids (tokenizer.padding_side='left')")
        if bool((input_ids == cfg.latent_pad_token_id).any()):
            raise ValueError(
                "missing modality features for a latent segment: the generate() prompt contains "
                "<Unified_Latent_pad> slots, which have no features at inference; end the prompt with "
                "<Unified_Latent> to let the model produce the latents"
            )
        _, open_rows = find_latent_blocks(input_ids, attention_mask, cfg, allow_open_end=True)
        if open_rows and max_blocks < 1:
            # the prompt's open block counts towards the cap like an emitted one: a cap of 0 forbids it
            raise ValueError(
                f"max_latent_blocks={max_blocks} allows no latent block, but prompt row(s) {open_rows} end with "
                "<Unified_Latent>, which opens one; pass max_latent_blocks >= 1 (or set "
                "config.max_latent_blocks) or drop the trailing <Unified_Latent>"
            )
        embeds = self._embed_prompt(input_ids, **{k: media.get(k) for k in _EMBED_MEDIA})
        pos = self._rope_positions(input_ids, attention_mask, **{k: media.get(k) for k in _ROPE_MEDIA})
        cache = DynamicCache(config=self._text_model().config) if use_cache else None
        hidden = self._run_text_model(embeds, pos, attention_mask, cache)
        bsz = input_ids.shape[0]
        last_pos = pos[:, :, -1].max(0).values.tolist()
        state = _DecodeState(
            cache=cache,
            embeds=None if use_cache else embeds,
            positions=None if use_cache else pos,
            attention_mask=attention_mask,
            sequences=input_ids,
            last_hidden=hidden[:, -1],
            mode=["text"] * bsz,
            latent_i=[0] * bsz,
            base=[0] * bsz,
            next_pos=[p + 1 for p in last_pos],
            blocks=[0] * bsz,
        )
        for b in open_rows:
            state.mode[b] = "latent"
            state.base[b] = int(pos[0, b, -1]) + 1
            state.blocks[b] = 1
        return state

    def _latent_decode(
        self,
        state: _DecodeState,
        max_new_tokens: int,
        *,
        do_sample: bool = False,
        logits_processor: Any = None,
        logits_warper: Any = None,
        eos_token_ids: list[int] | None = None,
        pad_token_id: int = 0,
        max_latent_blocks: int | None = None,
        collect_latents: bool = False,
        suppress_tokens: Sequence[int] = (),
        stopping_criteria: Any = None,
        streamer: Any = None,
    ) -> tuple[torch.Tensor, list[list[torch.Tensor]] | None]:
        """Run ``max_new_tokens`` steps from ``state`` (mutated). Returns the new ids ``[B, n]`` and, when
        ``collect_latents``, per row the hidden states fed back as latent inputs.

        ``stopping_criteria`` (transformers' ``StoppingCriteriaList``) is called after every step with the
        sequences so far and the step's scores (``[B, V]``, zero for rows that did not decode text); a row it marks
        done produces ``pad_token_id`` from then on. ``streamer.put`` gets each step's ids ``[B]`` (CPU)."""
        cfg = self.config
        k = cfg.num_latents
        emb = self.get_input_embeddings()
        # a model split over GPUs (device_map): hidden states leave the last layer's device, token ids and
        # masks live where the inputs came in, the embedding table and the LM head where they were placed
        dev = state.last_hidden.device
        ids_dev = state.sequences.device
        emb_dev = emb.weight.device
        bsz = len(state.mode)
        eos = set(eos_token_ids or [])
        max_blocks = cfg.max_latent_blocks if max_latent_blocks is None else max_latent_blocks
        suppress = [cfg.latent_pad_token_id, cfg.latent_end_token_id, *suppress_tokens]
        collected: list[list[torch.Tensor]] | None = [[] for _ in range(bsz)] if collect_latents else None
        # OSPE ids of slot i for trigger base B: off0[i] + B * uses_base[i] (per axis t, h, w)
        off0 = self._ospe(0, "cpu")
        uses_base = (self._ospe(1, "cpu") - off0).tolist()
        off0 = off0.tolist()
        new_tokens = []
        for _ in range(max_new_tokens):
            if all(m == "done" for m in state.mode):
                break
            h = state.last_hidden
            text_rows = [b for b in range(bsz) if state.mode[b] == "text"]
            toks = [pad_token_id] * bsz
            step_scores = None
            if text_rows:  # LM head + sampling only for rows decoding text
                ridx = torch.tensor(text_rows, device=dev)
                scores = self.lm_head(h[ridx]).float()
                rsel = ridx.to(ids_dev)
                seqs = state.sequences[rsel]
                if logits_processor is not None:
                    # processors see the whole batch, row i = sequence i (as in transformers' generate: some keep
                    # per-row state or use the row index); rows not decoding text get zero scores, discarded after
                    full = scores.new_zeros(bsz, scores.shape[-1], device=ids_dev)
                    full[rsel] = scores.to(ids_dev)
                    scores = logits_processor(state.sequences, full)[rsel]
                scores[:, suppress] = -float("inf")
                no_more = torch.tensor(
                    [state.blocks[b] >= max_blocks for b in text_rows], device=scores.device
                )
                scores[no_more, cfg.latent_start_token_id] = -float("inf")
                if do_sample:
                    if logits_warper is not None:
                        scores = logits_warper(seqs, scores)
                    picked = torch.multinomial(F.softmax(scores, -1), 1).squeeze(1)
                else:
                    picked = scores.argmax(-1)
                if stopping_criteria is not None:
                    step_scores = scores.new_zeros(bsz, scores.shape[-1], device=ids_dev)
                    step_scores[rsel] = scores.to(ids_dev)
                for b, t in zip(text_rows, picked.tolist()):
                    toks[b] = t
            step_pos = torch.empty(3, bsz, dtype=torch.long)
            use_hidden = [False] * bsz
            for b in range(bsz):
                m = state.mode[b]
                if m == "latent":
                    i = state.latent_i[b]
                    toks[b] = cfg.latent_pad_token_id
                    use_hidden[b] = True
                    base = state.base[b]
                    step_pos[:, b] = torch.tensor([off0[a][i] + base * uses_base[a][i] for a in range(3)])
                    state.latent_i[b] = i + 1
                    if i + 1 == k:
                        state.mode[b] = "end"
                elif m == "end":
                    toks[b] = cfg.latent_end_token_id
                    step_pos[:, b] = state.base[b] + k
                    state.next_pos[b] = state.base[b] + k + 1
                    state.mode[b] = "text"
                else:
                    step_pos[:, b] = state.next_pos[b]
                    if m == "text":
                        if toks[b] in eos:
                            state.mode[b] = "done"
                        elif toks[b] == cfg.latent_start_token_id:
                            state.mode[b] = "latent"
                            state.latent_i[b] = 0
                            state.base[b] = state.next_pos[b] + 1
                            state.blocks[b] += 1
                    state.next_pos[b] += 1
            tok_t = torch.tensor(toks, device=ids_dev)
            x = emb(tok_t.to(emb_dev)).unsqueeze(1)
            if any(use_hidden):
                hid_rows = torch.tensor(use_hidden, device=x.device)
                x = torch.where(hid_rows[:, None, None], h.unsqueeze(1).to(x.device, x.dtype), x)
                if collected is not None:
                    for b in range(bsz):
                        if use_hidden[b]:
                            collected[b].append(h[b].detach().clone())
            step_pos = step_pos.to(x.device).unsqueeze(-1)  # [3, B, 1]
            state.attention_mask = torch.cat([state.attention_mask, state.attention_mask.new_ones(bsz, 1)], 1)
            state.sequences = torch.cat([state.sequences, tok_t[:, None]], 1)
            if state.cache is not None:
                hidden = self._run_text_model(x, step_pos, state.attention_mask, state.cache)
            else:
                state.embeds = torch.cat([state.embeds, x], 1)
                state.positions = torch.cat([state.positions, step_pos], 2)
                hidden = self._run_text_model(state.embeds, state.positions, state.attention_mask)
            state.last_hidden = hidden[:, -1]
            new_tokens.append(tok_t)
            if streamer is not None:
                streamer.put(tok_t.cpu())
            if stopping_criteria is not None:
                if step_scores is None:  # a step without text rows: no scores, zeros as for latent rows
                    vocab = int(self.lm_head.weight.shape[0])
                    step_scores = torch.zeros(bsz, vocab, device=ids_dev)
                done = stopping_criteria(state.sequences, step_scores)
                for b in torch.as_tensor(done, device="cpu").reshape(-1).nonzero().flatten().tolist():
                    state.mode[b] = "done"
        out = torch.stack(new_tokens, 1) if new_tokens else state.sequences.new_zeros(bsz, 0)
        return out, collected

    @torch.no_grad()
    def generate(  # type: ignore[override]
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int | None = None,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        use_cache: bool | None = None,
        latent_reasoning: bool = True,
        max_latent_blocks: int | None = None,
        logits_processor: Any = None,
        return_dict_in_generate: bool | None = None,
        output_latents: bool = False,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        feature_attention_mask: torch.Tensor | None = None,
        audio_feature_lengths: torch.Tensor | None = None,
        use_audio_in_video: bool | None = None,
        video_second_per_grid: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor | LatentOmniGenerateOutput:
        """Decode with interleaved latent reasoning (greedy or sampling), with or without a KV cache.

        When the model emits ``<Unified_Latent>`` (or the prompt ends with it) the next K steps feed
        the last hidden state back as the input embedding at OSPE positions, skipping the LM head and
        sampling; then ``</Unified_Latent>`` is forced and text decoding continues. Latent steps count
        towards ``max_new_tokens`` and appear as ``<Unified_Latent_pad>`` ids in the output.
        ``latent_reasoning=False`` calls transformers' ``GenerationMixin.generate`` (all strategies) with
        the latent tokens suppressed.

        Args:
            input_ids: ``[B, L]`` left-padded prompt ids (may end with ``<Unified_Latent>``).
            max_new_tokens: most new tokens per row, latent steps included. Default: the generation config's
                ``max_new_tokens``, else its ``max_length`` minus the prompt length, else transformers' default
                of 20 new tokens (:data:`DEFAULT_MAX_NEW_TOKENS`, capped at ``max_position_embeddings`` minus the
                prompt length, with a ``UserWarning`` as transformers gives), the same as
                ``latent_reasoning=False``.
            max_latent_blocks: most latent blocks per row, counting a block the prompt opens by ending with
                ``<Unified_Latent>`` (default ``config.max_latent_blocks``). 0 allows none: the model cannot
                emit the trigger, and a prompt that ends with it is a ``ValueError``.
            logits_processor: optional ``LogitsProcessorList`` applied at text steps; it sees the whole batch
                (row i = sequence i), rows in a latent step with zero scores that are discarded.
            stopping_criteria: optional ``StoppingCriteriaList`` (or list of criteria), called after every step,
                latent steps included, with the sequences so far and that step's scores (zero rows where no text
                was decoded); a row it marks done gets ``pad_token_id`` from then on, and generation ends when
                every row is done, as in transformers.
            streamer: optional streamer (``TextStreamer`` ...): ``put`` gets the prompt, then each step's ids
                (latent steps as ``<Unified_Latent_pad>``), and ``end()`` is called at the end.
            output_latents: with ``return_dict_in_generate``, also return the fed-back hidden states (without it,
                a ``ValueError``).
            do_sample / temperature / top_k / top_p: as in transformers, from the arguments, else the generation
                config; sampling with ``top_k`` unset anywhere uses transformers' global default ``top_k=50``
                (``top_k=0`` turns it off).
            use_cache / return_dict_in_generate: ``None`` (default) takes the generation config's value (default
                ``True`` / ``False``), as transformers' generate does.

        The generation config is merged as transformers' generate merges it: a ``generation_config=`` replaces
        ``model.generation_config`` but its unset (``None``) fields are taken from it (eos / pad ids, sampling,
        penalties, ``suppress_tokens`` ...), and ``generate()`` arguments override both.

        Returns:
            ``[B, L + new]`` ids, or :class:`LatentOmniGenerateOutput`.
        """
        cfg = self.config
        media = dict(
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            pixel_values_videos=pixel_values_videos,
            video_grid_thw=video_grid_thw,
            input_features=input_features,
            feature_attention_mask=feature_attention_mask,
            audio_feature_lengths=audio_feature_lengths,
            use_audio_in_video=use_audio_in_video,
            video_second_per_grid=video_second_per_grid,
        )
        if not latent_reasoning:
            for name, v in (("output_latents", output_latents), ("max_latent_blocks", max_latent_blocks)):
                if v not in (None, False):
                    raise ValueError(
                        f"{name}={v!r} needs latent_reasoning=True (latent_reasoning=False runs transformers' "
                        "generate, which has no latent blocks)"
                    )
            if input_ids is not None and bool((input_ids == cfg.latent_start_token_id).any()):
                raise ValueError(
                    "latent_reasoning=False: the prompt must not contain <Unified_Latent> markers"
                )
            passed = {k: v for k, v in media.items() if v is not None}
            for name, v in (
                ("max_new_tokens", max_new_tokens),
                ("do_sample", do_sample),
                ("temperature", temperature),
                ("top_k", top_k),
                ("top_p", top_p),
                ("eos_token_id", eos_token_id),
                ("pad_token_id", pad_token_id),
                ("logits_processor", logits_processor),
            ):
                if v is not None:
                    passed[name] = v
            for name, v in (("use_cache", use_cache), ("return_dict_in_generate", return_dict_in_generate)):
                if v is not None:  # else the generation config's value, as in transformers
                    passed[name] = v
            # the latent tokens join whatever the caller or the generation config (a given one first, then the
            # model's, as transformers merges them) suppresses
            user = kwargs.pop("suppress_tokens", None)
            if user is None:
                given = kwargs.get("generation_config")
                user = getattr(given, "suppress_tokens", None) if given is not None else None
            if user is None:
                user = self.generation_config.suppress_tokens
            latent_ids = [cfg.latent_start_token_id, cfg.latent_end_token_id, cfg.latent_pad_token_id]
            suppress = sorted({int(t) for t in (user or [])} | set(latent_ids))
            return super().generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                suppress_tokens=suppress,
                **passed,
                **kwargs,
            )
        if input_ids is None:
            raise ValueError("generate() needs input_ids")
        # as transformers' generate (_prepare_generation_config): a given config replaces the model's, but its unset
        # (None) fields come from the model's; generation-config fields passed to generate() override both
        given = kwargs.pop("generation_config", None)
        stopping_criteria = kwargs.pop("stopping_criteria", None)
        streamer = kwargs.pop("streamer", None)
        if stopping_criteria is not None:
            from transformers.generation.stopping_criteria import StoppingCriteriaList

            stopping_criteria = StoppingCriteriaList(list(stopping_criteria))
        gc = copy.deepcopy(self.generation_config)
        if given is not None:
            gc = copy.deepcopy(given)
            gc.update(**self.generation_config.to_dict(), defaults_only=True, allow_custom_entries=True)
        unknown = gc.update(**kwargs)
        if unknown:
            raise ValueError(
                f"generate() with latent_reasoning=True got unknown arguments {sorted(unknown)}; it takes "
                "max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id, pad_token_id, use_cache, "
                "max_latent_blocks, logits_processor, stopping_criteria, streamer, return_dict_in_generate, "
                "output_latents, the media inputs, generation_config and the generation-config fields it applies"
            )
        default_length = False
        if max_new_tokens is None:
            if gc.max_new_tokens is not None:
                max_new_tokens = gc.max_new_tokens
            elif gc.max_length is not None:  # transformers' meaning: prompt + new tokens
                max_new_tokens = max(int(gc.max_length) - input_ids.shape[1], 0)
            else:  # transformers' default: 20 new tokens, within max_position_embeddings
                limit = getattr(cfg.get_text_config(), "max_position_embeddings", None)
                max_new_tokens = DEFAULT_MAX_NEW_TOKENS
                if limit is not None:
                    max_new_tokens = max(min(max_new_tokens, int(limit) - input_ids.shape[1]), 0)
                default_length = True
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if max_latent_blocks is not None and (
            isinstance(max_latent_blocks, bool)
            or not isinstance(max_latent_blocks, int)
            or max_latent_blocks < 0
        ):
            raise ValueError(f"max_latent_blocks must be None or an int >= 0, got {max_latent_blocks!r}")
        do_sample = bool(gc.do_sample if do_sample is None else do_sample)
        if use_cache is None:
            use_cache = gc.use_cache is not False
        if return_dict_in_generate is None:
            return_dict_in_generate = bool(gc.return_dict_in_generate)
        if output_latents and not return_dict_in_generate:
            raise ValueError(
                "output_latents=True needs return_dict_in_generate=True: the latent states are returned in "
                "LatentOmniGenerateOutput.latent_states, a bare tensor of ids has no place for them"
            )
        if eos_token_id is None:
            eos_token_id = (
                gc.eos_token_id if gc.eos_token_id is not None else cfg.get_text_config().eos_token_id
            )
        eos = (
            []
            if eos_token_id is None
            else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        )
        if pad_token_id is None:
            pad_token_id = gc.pad_token_id if gc.pad_token_id is not None else (eos[0] if eos else 0)
        warper = None
        if do_sample:
            from transformers.generation.logits_process import (
                LogitsProcessorList,
                TemperatureLogitsWarper,
                TopKLogitsWarper,
                TopPLogitsWarper,
            )

            warper = LogitsProcessorList()
            t = temperature if temperature is not None else gc.temperature
            if t is not None and t != 1.0:
                warper.append(TemperatureLogitsWarper(t))
            tk = top_k if top_k is not None else gc.top_k
            # unset everywhere: transformers' generate samples with its global default (top_k=50)
            if tk is None:
                tk = _hf_generation_defaults()["top_k"]
            if tk:
                warper.append(TopKLogitsWarper(tk))
            tp = top_p if top_p is not None else gc.top_p
            if tp is not None and tp < 1.0:
                warper.append(TopPLogitsWarper(tp))
        procs, extra_suppress = _latent_text_processors(gc, input_ids.shape[1], eos, input_ids.device)
        if procs:
            from transformers.generation.logits_process import LogitsProcessorList

            kept = _KeepScore(procs, cfg.latent_start_token_id)
            logits_processor = LogitsProcessorList([*(logits_processor or []), kept])
        max_blocks = cfg.max_latent_blocks if max_latent_blocks is None else max_latent_blocks
        state = self._latent_prefill(input_ids, attention_mask, use_cache, media, max_blocks)
        _warn_uncompiled_latent_loop(gc)  # after every input check, as the warning below
        if default_length:  # after every input check: a refused call gets its ValueError only
            warnings.warn(
                f"generate() got neither max_new_tokens nor max_length: it generates at most {max_new_tokens} new "
                "tokens (transformers' default max_length=20, counted after the prompt); a latent block takes "
                f"{cfg.num_latents + 1} steps. Set max_new_tokens to control the length.",
                UserWarning,
                stacklevel=3,
            )
        # as transformers' generate: the prompt first, then each step's ids, then end()
        if streamer is not None:
            streamer.put(input_ids.cpu())
        new, collected = self._latent_decode(
            state,
            max_new_tokens,
            do_sample=do_sample,
            logits_processor=logits_processor,
            suppress_tokens=extra_suppress,
            logits_warper=warper,
            eos_token_ids=eos,
            pad_token_id=int(pad_token_id),
            max_latent_blocks=max_blocks,
            collect_latents=output_latents,
            stopping_criteria=stopping_criteria,
            streamer=streamer,
        )
        if streamer is not None:
            streamer.end()
        sequences = torch.cat([input_ids, new], 1)
        if not return_dict_in_generate:
            return sequences
        latents = None
        if collected is not None:
            d = cfg.get_text_config().hidden_size
            latents = [torch.stack(c) if c else state.last_hidden.new_zeros(0, d) for c in collected]
        return LatentOmniGenerateOutput(sequences=sequences, latent_states=latents)


__all__ = [
    "LatentOmniForConditionalGeneration",
    "LatentOmniCausalLMOutput",
    "LatentOmniGenerateOutput",
    "energy_pool",
    "ospe_position_ids",
    "find_latent_blocks",
    "controlled_attention_mask",
]

# Finish any Auto registration deferred while this module was importing (see _auto.py).
from ._auto import retry as _retry_registration  # noqa: E402

_retry_registration()
