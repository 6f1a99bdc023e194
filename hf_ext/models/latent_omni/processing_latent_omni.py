"""``LatentOmniProcessor``: tokenizer + audio feature extractor + video patchifier for interleaved trajectories.

It adds ``<Unified_Latent>``, ``</Unified_Latent>`` and ``<Unified_Latent_pad>`` to the tokenizer, expands
every ``<Unified_Latent></Unified_Latent>`` marker pair into ``<Unified_Latent>`` + K pads +
``</Unified_Latent>``, expands the Qwen2.5-Omni media placeholders (``<|VIDEO|>``, ``<|AUDIO|>``) to one
token per encoder output, turns question videos (``[T, H, W, 3]`` frame arrays) into Qwen2-VL patches and
audio (16 kHz waveforms) into Whisper log-mel features, and turns the per-block *segment* clips into the
``segment_*`` inputs the model regresses its latents onto.

Example:
    >>> from hf_ext.models.latent_omni.tiny import tiny_latent_omni_processor
    >>> proc = tiny_latent_omni_processor()
    >>> text = proc.expand_latent_markers("think <Unified_Latent></Unified_Latent> done")
    >>> text.count("<Unified_Latent_pad>") == proc.num_latents
    True
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .configuration_latent_omni import LATENT_END_TOKEN, LATENT_PAD_TOKEN, LATENT_START_TOKEN

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

VIDEO_TOKEN = "<|VIDEO|>"
AUDIO_TOKEN = "<|AUDIO|>"
IMAGE_TOKEN = "<|IMAGE|>"
VISION_BOS, VISION_EOS = "<|vision_bos|>", "<|vision_eos|>"
AUDIO_BOS, AUDIO_EOS = "<|audio_bos|>", "<|audio_eos|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"

_MARKER_RE = re.compile(
    re.escape(LATENT_START_TOKEN) + "|" + re.escape(LATENT_END_TOKEN) + "|" + re.escape(LATENT_PAD_TOKEN)
)


# the processor's padding values (the tokenizer's names) -> what they do
_PADDING = {
    True: "longest",
    "longest": "longest",
    "max_length": "max_length",
    False: "do_not_pad",
    "do_not_pad": "do_not_pad",
}


def _feat_extract_output_length(n: int) -> int:
    """Audio tokens the Qwen2.5-Omni audio encoder emits for ``n`` mel frames."""
    n = (n - 1) // 2 + 1
    return (n - 2) // 2 + 1


class LatentOmniProcessor(ProcessorMixin):
    """Builds LatentOmni inputs (see module docstring).

    Args:
        feature_extractor: a ``WhisperFeatureExtractor`` (128 mel bins for Qwen2.5-Omni).
        tokenizer: any fast tokenizer; the three latent tokens are added when missing.
        num_visual_latents / num_audio_latents: K = visual + audio pad slots per block (32 + 8).
        patch_size / temporal_patch_size / merge_size: the vision encoder's patching (14 / 2 / 2).
        fps: frame rate of the frame arrays passed as videos (sets ``video_second_per_grid``).
        max_pixels: frames larger than this (H·W) are downscaled; sizes round to multiples of patch·merge.
        sampling_rate: audio sampling rate (16 kHz).
    """

    def __init__(
        self,
        feature_extractor: Any = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        num_visual_latents: int = 32,
        num_audio_latents: int = 8,
        patch_size: int = 14,
        temporal_patch_size: int = 2,
        merge_size: int = 2,
        fps: float = 2.0,
        max_pixels: int = 128 * 28 * 28,
        sampling_rate: int = 16000,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
    ) -> None:
        for name, v in (("num_visual_latents", num_visual_latents), ("num_audio_latents", num_audio_latents)):
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}={v!r} is invalid; expected an int >= 0")
        if num_visual_latents + num_audio_latents == 0:
            raise ValueError("num_visual_latents + num_audio_latents must be > 0")
        for name, v in (
            ("patch_size", patch_size),
            ("temporal_patch_size", temporal_patch_size),
            ("merge_size", merge_size),
            ("sampling_rate", sampling_rate),
        ):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} is invalid; expected an int >= 1")
        if not fps > 0:
            raise ValueError(f"fps={fps!r} is invalid; expected a float > 0")
        self.num_visual_latents = num_visual_latents
        self.num_audio_latents = num_audio_latents
        self.patch_size = patch_size
        self.temporal_patch_size = temporal_patch_size
        self.merge_size = merge_size
        self.fps = float(fps)
        self.max_pixels = int(max_pixels)
        self.sampling_rate = sampling_rate
        # plain floats: numpy values (an np.float32 mean computed from data) cannot be written to processor_config.json
        for name, seq in (("image_mean", image_mean), ("image_std", image_std)):
            vals = list(seq)
            if not vals or any(isinstance(x, bool) or not isinstance(x, numbers.Real) for x in vals):
                raise ValueError(f"{name}={seq!r} is invalid; expected a non-empty sequence of numbers")
            setattr(self, name, [float(x) for x in vals])
        missing = [
            t
            for t in (LATENT_START_TOKEN, LATENT_END_TOKEN, LATENT_PAD_TOKEN)
            if t not in tokenizer.get_vocab()
        ]
        if missing:
            tokenizer.add_tokens(missing, special_tokens=True)
        super().__init__(feature_extractor, tokenizer, chat_template=chat_template)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, num_mel_bins: int = 128, **kwargs: Any) -> LatentOmniProcessor:
        """Processor around ``tokenizer`` with a fresh ``WhisperFeatureExtractor(feature_size=num_mel_bins)``."""
        from transformers import WhisperFeatureExtractor

        fe = WhisperFeatureExtractor(
            feature_size=num_mel_bins, sampling_rate=kwargs.get("sampling_rate", 16000)
        )
        return cls(fe, tokenizer, **kwargs)

    # ---------------------------------------------------------------------------------- ids
    @property
    def num_latents(self) -> int:
        """K, pad slots per latent block."""
        return self.num_visual_latents + self.num_audio_latents

    def _id(self, token: str) -> int:
        return int(self.tokenizer.convert_tokens_to_ids(token))

    @property
    def latent_start_token_id(self) -> int:
        return self._id(LATENT_START_TOKEN)

    @property
    def latent_end_token_id(self) -> int:
        return self._id(LATENT_END_TOKEN)

    @property
    def latent_pad_token_id(self) -> int:
        return self._id(LATENT_PAD_TOKEN)

    def update_config(self, config: Any) -> Any:
        """Write this tokenizer's latent and media token ids and K into a ``LatentOmniConfig`` (in place).

        The new values are validated on the config; a ``ValueError`` leaves the config as it was."""
        new = {
            "latent_start_token_id": self.latent_start_token_id,
            "latent_end_token_id": self.latent_end_token_id,
            "latent_pad_token_id": self.latent_pad_token_id,
            "num_visual_latents": self.num_visual_latents,
            "num_audio_latents": self.num_audio_latents,
        }
        vocab = self.tokenizer.get_vocab()
        for attr, tok in (
            ("video_token_id", VIDEO_TOKEN),
            ("audio_token_id", AUDIO_TOKEN),
            ("image_token_id", IMAGE_TOKEN),
            ("vision_start_token_id", VISION_BOS),
            ("vision_end_token_id", VISION_EOS),
            ("audio_start_token_id", AUDIO_BOS),
            ("audio_end_token_id", AUDIO_EOS),
        ):
            if tok in vocab:
                new[attr] = vocab[tok]
        missing = object()
        old = {attr: getattr(config, attr, missing) for attr in new}
        for attr, value in new.items():
            setattr(config, attr, value)
        try:
            config._validate_latent_fields()
        except BaseException:  # a refused update: the config keeps what it had
            for attr, value in old.items():
                if value is missing:
                    delattr(config, attr)
                else:
                    setattr(config, attr, value)
            raise
        return config

    # -------------------------------------------------------------------------------- text
    def count_latent_blocks(self, text: str) -> int:
        """Number of latent blocks (``<Unified_Latent>`` markers) in ``text``."""
        return text.count(LATENT_START_TOKEN)

    def expand_latent_markers(self, text: str, *, allow_open_end: bool = True) -> str:
        """Expand each ``<Unified_Latent></Unified_Latent>`` into the trigger, K pads and the end marker.

        Blocks that already hold exactly K pads are kept. A bare ``<Unified_Latent>`` is allowed only at
        the very end of ``text`` (a generation prompt) when ``allow_open_end``.

        Raises:
            ValueError: unbalanced markers or a block with a wrong number of pads.
        """
        out: list[str] = []
        pos = 0
        open_at: int | None = None
        n_pad = 0
        for m in _MARKER_RE.finditer(text):
            tok = m.group(0)
            if tok == LATENT_START_TOKEN:
                if open_at is not None:
                    raise ValueError(
                        f"text: <Unified_Latent> at character {m.start()} opens a block inside another "
                        f"(opened at {open_at}); latent markers unbalanced"
                    )
                out.append(text[pos : m.end()])
                open_at, n_pad = m.start(), 0
            elif tok == LATENT_PAD_TOKEN:
                if open_at is None:
                    raise ValueError(
                        f"text: <Unified_Latent_pad> at character {m.start()} is outside a latent block"
                    )
                if text[pos : m.start()].strip():
                    raise ValueError(
                        f"text: latent block at character {open_at} contains text between its pads"
                    )
                n_pad += 1
            else:
                if open_at is None:
                    raise ValueError(
                        f"text: </Unified_Latent> at character {m.start()} has no matching "
                        "<Unified_Latent>; latent markers unbalanced"
                    )
                inner = text[pos : m.start()]
                if inner.strip():
                    raise ValueError(
                        f"text: latent block at character {open_at} contains text {inner.strip()!r}; "
                        "write `<Unified_Latent></Unified_Latent>` with nothing inside"
                    )
                if n_pad not in (0, self.num_latents):
                    raise ValueError(
                        f"text: latent block at character {open_at} has {n_pad} pads; expected 0 or "
                        f"K = {self.num_latents}"
                    )
                out.append(LATENT_PAD_TOKEN * self.num_latents + LATENT_END_TOKEN)
                open_at = None
            pos = m.end()
        tail = text[pos:]
        if open_at is not None and not (allow_open_end and n_pad == 0 and not tail.strip()):
            raise ValueError(
                f"text: <Unified_Latent> at character {open_at} is never closed by </Unified_Latent> "
                "(only a generation prompt may end with a bare <Unified_Latent>)"
            )
        out.append(tail)
        return "".join(out)

    def render_conversation(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        """ChatML text (Qwen2.5-Omni layout) of ``messages``.

        Each message is ``{"role": ..., "content": str | list}``; list items are ``{"type": "text", "text": ...}``,
        ``{"type": "video"}`` or ``{"type": "audio"}`` and render as the bracketed placeholders that ``__call__``
        expands. Images are not supported by this processor (a still image is a one-frame video here), so
        ``{"type": "image"}`` is an error rather than a placeholder nothing would fill.
        """
        parts = []
        for msg in messages:
            role = msg.get("role")
            if role not in ("system", "user", "assistant"):
                raise ValueError(f"message role={role!r} is invalid; allowed: system, user, assistant")
            content = msg.get("content", "")
            if isinstance(content, str):
                body = content
            else:
                chunks = []
                for item in content:
                    kind = item.get("type")
                    if kind == "text":
                        chunks.append(item.get("text", ""))
                    elif kind == "video":
                        chunks.append(VISION_BOS + VIDEO_TOKEN + VISION_EOS)
                    elif kind == "image":
                        raise ValueError(
                            "content type='image' is not supported by LatentOmniProcessor: pass the image as a "
                            "one-frame video ({'type': 'video'} with a [1, H, W, 3] array), or build pixel_values "
                            "with Qwen2_5OmniProcessor and give them to the model"
                        )
                    elif kind == "audio":
                        chunks.append(AUDIO_BOS + AUDIO_TOKEN + AUDIO_EOS)
                    else:
                        raise ValueError(f"content type={kind!r} is invalid; allowed: text, video, audio")
                body = "".join(chunks)
            parts.append(f"{IM_START}{role}\n{body}{IM_END}\n")
        if add_generation_prompt:
            parts.append(f"{IM_START}assistant\n")
        return "".join(parts)

    # ------------------------------------------------------------------------------- media
    def patchify_video(
        self, frames: Any, name: str = "video frames"
    ) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Frames ``[T, H, W, 3]`` (uint8 0-255 or float 0-1, T >= 1) → Qwen2-VL patches
        ``[t·h·w, 3·temporal_patch·patch²]`` and the grid ``(t, h, w)`` in patches. ``name`` labels errors."""
        x = torch.as_tensor(np.asarray(frames))
        if x.dim() != 4 or x.shape[-1] != 3 or min(x.shape) < 1:
            raise ValueError(
                f"{name} has shape {tuple(x.shape)}; expected [T, H, W, 3] with at least one frame of at least "
                "1 x 1 pixels"
            )
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        x = x.permute(0, 3, 1, 2)  # T, C, H, W
        t, c, h, w = x.shape
        factor = self.patch_size * self.merge_size
        scale = min(1.0, math.sqrt(self.max_pixels / float(h * w)))
        h2 = max(factor, int(round(h * scale / factor)) * factor)
        w2 = max(factor, int(round(w * scale / factor)) * factor)
        if (h2, w2) != (h, w):
            x = F.interpolate(x, size=(h2, w2), mode="bilinear", align_corners=False)
        mean = torch.tensor(self.image_mean).view(1, -1, 1, 1)
        std = torch.tensor(self.image_std).view(1, -1, 1, 1)
        x = (x - mean) / std
        tp, ps, ms = self.temporal_patch_size, self.patch_size, self.merge_size
        if t % tp:
            x = torch.cat([x, x[-1:].expand(tp - t % tp, -1, -1, -1)], 0)
        gt, gh, gw = x.shape[0] // tp, h2 // ps, w2 // ps
        x = x.reshape(gt, tp, c, gh // ms, ms, ps, gw // ms, ms, ps)
        x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return x.reshape(gt * gh * gw, c * tp * ps * ps), (gt, gh, gw)

    def _videos(self, videos: Sequence[Any], fps: float, name: str = "videos") -> dict[str, torch.Tensor]:
        patches, grids = [], []
        for i, v in enumerate(videos):
            p, g = self.patchify_video(v, f"{name}[{i}]")
            patches.append(p)
            grids.append(g)
        return {
            "pixel_values_videos": torch.cat(patches, 0),
            "video_grid_thw": torch.tensor(grids, dtype=torch.long),
            "video_second_per_grid": torch.full((len(grids),), self.temporal_patch_size / fps),
        }

    def _audio(self, audio: Sequence[Any], name: str = "audio") -> dict[str, torch.Tensor]:
        arrays = [np.asarray(a, dtype=np.float32).reshape(-1) for a in audio]
        for i, a in enumerate(arrays):
            if a.size < 400:
                raise ValueError(f"{name}[{i}] has {a.size} samples; expected at least 400 (25 ms at 16 kHz)")
        feats = self.feature_extractor(
            arrays,
            sampling_rate=self.sampling_rate,
            return_attention_mask=True,
            padding="longest",
            return_tensors="pt",
        )
        return {"input_features": feats["input_features"], "feature_attention_mask": feats["attention_mask"]}

    def video_token_count(self, grid: Sequence[int]) -> int:
        return int(grid[0] * grid[1] * grid[2]) // (self.merge_size**2)

    # -------------------------------------------------------------------------------- call
    def __call__(  # type: ignore[override]
        self,
        text: str | list[str] | None = None,
        videos: Sequence[Any] | None = None,
        audio: Sequence[Any] | None = None,
        *,
        answers: str | list[str] | None = None,
        segment_videos: Sequence[Any] | None = None,
        segment_audios: Sequence[Any] | None = None,
        padding: bool | str = True,
        padding_side: str | None = None,
        max_length: int | None = None,
        return_tensors: str = "pt",
        fps: float | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Build model inputs.

        Args:
            text: prompt(s), e.g. from :meth:`render_conversation`; ``<|VIDEO|>`` / ``<|AUDIO|>`` once per
                item of ``videos`` / ``audio`` (batch order), latent markers allowed.
            videos: frame arrays ``[T, H, W, 3]`` for the ``<|VIDEO|>`` placeholders.
            audio: 1-D waveforms at ``sampling_rate`` for the ``<|AUDIO|>`` placeholders.
            answers: training targets appended to each prompt (tokenized separately, as at inference);
                adds ``labels`` (-100 on the prompt, the pads and ``</Unified_Latent>``) and pads right.
            segment_videos / segment_audios: one clip per latent block, row-major (the feature targets).
            padding: ``True`` / ``'longest'`` (to the longest row), ``'max_length'`` (to ``max_length``) or
                ``False`` / ``'do_not_pad'`` (rows must have equal length); left for prompts, right with ``answers``
                unless ``padding_side`` says otherwise.
            max_length: a longer row is a ``ValueError`` (never truncated: that would cut media or latent blocks).
            fps: frame rate of this call's frame arrays (default: the processor's ``fps``); the processor is
                not changed.

        Returns:
            ``BatchFeature`` with ``input_ids``, ``attention_mask`` [, ``labels``] [, question media]
            [, ``segment_pixel_values_videos``, ``segment_video_grid_thw``, ``segment_input_features``,
            ``segment_feature_attention_mask``].

        Raises:
            ValueError: unbalanced latent markers, placeholder/media count mismatch, or a latent block
                without its segment features — all before any tokenization or media work.
        """
        if kwargs.pop("use_audio_in_video", False):
            raise ValueError(
                "use_audio_in_video=True is not supported by LatentOmniProcessor (it needs Qwen2.5-Omni's "
                "interleaved chunk layout): build the question inputs with Qwen2_5OmniProcessor and pass them to "
                "the model, which forwards use_audio_in_video to get_rope_index"
            )
        if kwargs:
            raise ValueError(f"unexpected arguments {sorted(kwargs)}")
        pad_mode = _PADDING.get(padding) if isinstance(padding, (bool, str)) else None
        if pad_mode is None:
            raise ValueError(
                f"padding={padding!r} is invalid; allowed: True / 'longest', 'max_length' (with max_length), "
                "False / 'do_not_pad'"
            )
        if max_length is not None and (
            isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1
        ):
            raise ValueError(f"max_length={max_length!r} is invalid; expected None or an int >= 1")
        if pad_mode == "max_length" and max_length is None:
            raise ValueError("padding='max_length' needs max_length")
        if fps is None:
            fps = self.fps
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
            raise ValueError(f"fps={fps!r} is invalid; expected a float > 0")
        fps = float(fps)
        if text is None:
            raise ValueError("text is required")
        texts = [text] if isinstance(text, str) else list(text)
        ans = None if answers is None else ([answers] if isinstance(answers, str) else list(answers))
        if ans is not None and len(ans) != len(texts):
            raise ValueError(f"answers has {len(ans)} items but text has {len(texts)}")
        videos = list(videos) if videos is not None else []
        audio = list(audio) if audio is not None else []
        # 1. validate counts before any work
        if any(IMAGE_TOKEN in t for t in texts):
            raise ValueError(
                f"text contains {IMAGE_TOKEN}, which LatentOmniProcessor cannot fill (it takes no images): pass the "
                "image as a one-frame video, or build pixel_values with Qwen2_5OmniProcessor"
            )
        n_vid = sum(t.count(VIDEO_TOKEN) for t in texts)
        n_aud = sum(t.count(AUDIO_TOKEN) for t in texts)
        if n_vid != len(videos):
            raise ValueError(
                f"text has {n_vid} {VIDEO_TOKEN} placeholders but {len(videos)} videos were given"
            )
        if n_aud != len(audio):
            raise ValueError(
                f"text has {n_aud} {AUDIO_TOKEN} placeholders but {len(audio)} audio clips were given"
            )
        prompts = [self.expand_latent_markers(t, allow_open_end=ans is None) for t in texts]
        targets = (
            [self.expand_latent_markers(a, allow_open_end=False) for a in ans] if ans is not None else None
        )
        n_blocks = sum(self.count_latent_blocks(t) for t in texts)
        if targets is not None:
            n_blocks += sum(self.count_latent_blocks(a) for a in ans)
        if targets is not None or segment_videos is not None or segment_audios is not None:
            open_blocks = (
                sum(1 for t in texts if t.rstrip().endswith(LATENT_START_TOKEN)) if ans is None else 0
            )
            n_closed = n_blocks - open_blocks
            for name, seg, k in (
                ("segment_videos", segment_videos, self.num_visual_latents),
                ("segment_audios", segment_audios, self.num_audio_latents),
            ):
                got = 0 if seg is None else len(seg)
                if k > 0 and got != n_closed:
                    raise ValueError(
                        f"missing modality features for a latent segment: the text has {n_closed} latent block(s) "
                        f"but {name} has {got} clip(s) (one per block, row-major)"
                    )
        # 2. media → features and placeholder expansion
        out: dict[str, Any] = {}
        if videos:
            vid = self._videos(videos, fps)
            out.update(vid)
            counts = iter(self.video_token_count(g) for g in vid["video_grid_thw"].tolist())
            prompts = [
                re.sub(re.escape(VIDEO_TOKEN), lambda _m: VIDEO_TOKEN * next(counts), t) for t in prompts
            ]
        if audio:
            aud = self._audio(audio)
            out.update(aud)
            lens = iter(
                _feat_extract_output_length(int(n)) for n in aud["feature_attention_mask"].sum(-1).tolist()
            )
            prompts = [
                re.sub(re.escape(AUDIO_TOKEN), lambda _m: AUDIO_TOKEN * next(lens), t) for t in prompts
            ]
        if segment_videos and self.num_visual_latents > 0:
            seg = self._videos(segment_videos, fps, "segment_videos")
            out["segment_pixel_values_videos"] = seg["pixel_values_videos"]
            out["segment_video_grid_thw"] = seg["video_grid_thw"]
        if segment_audios and self.num_audio_latents > 0:
            seg = self._audio(segment_audios, "segment_audios")
            out["segment_input_features"] = seg["input_features"]
            out["segment_feature_attention_mask"] = seg["feature_attention_mask"]
        # 3. tokens (prompt and answer tokenized separately, as at inference)
        tok = self.tokenizer
        rows = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        label_rows = [[-100] * len(r) for r in rows]
        if targets is not None:
            no_loss = {self.latent_pad_token_id, self.latent_end_token_id}
            for i, a in enumerate(targets):
                a_ids = tok(a, add_special_tokens=False)["input_ids"]
                rows[i] = rows[i] + a_ids
                label_rows[i] = label_rows[i] + [-100 if t in no_loss else t for t in a_ids]
        if max_length is not None:
            for i, r in enumerate(rows):
                if len(r) > max_length:
                    raise ValueError(
                        f"sample {i} has {len(r)} tokens > max_length={max_length} (truncation would cut "
                        "media or latent blocks; drop or shorten the sample)"
                    )
        side = padding_side or ("right" if targets is not None else "left")
        if side not in ("left", "right"):
            raise ValueError(f"padding_side={side!r} is invalid; allowed: left, right")
        width = max(len(r) for r in rows) if pad_mode != "max_length" else max_length
        if pad_mode == "do_not_pad" and len({len(r) for r in rows}) > 1:
            raise ValueError(f"padding={padding!r} needs equal-length rows")
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, (r, lab) in enumerate(zip(rows, label_rows)):
            sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
            ids[i, sl] = torch.tensor(r, dtype=torch.long)
            mask[i, sl] = 1
            labels[i, sl] = torch.tensor(lab, dtype=torch.long)
        out["input_ids"] = ids
        out["attention_mask"] = mask
        if targets is not None:
            out["labels"] = labels
        return BatchFeature(data=out, tensor_type=return_tensors)

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(*args, **kwargs)

    def compact_latents(self, text: str) -> str:
        """Replace each run of K pad tokens in decoded text with ``[K latents]`` for display."""
        return re.sub(
            f"(?:{re.escape(LATENT_PAD_TOKEN)})+",
            lambda m: f"[{m.group(0).count(LATENT_PAD_TOKEN)} latents]",
            text,
        )

    @property
    def model_input_names(self) -> list[str]:
        return [
            "input_ids",
            "attention_mask",
            "pixel_values_videos",
            "video_grid_thw",
            "video_second_per_grid",
            "input_features",
            "feature_attention_mask",
            "segment_pixel_values_videos",
            "segment_video_grid_thw",
            "segment_input_features",
            "segment_feature_attention_mask",
        ]


__all__ = ["LatentOmniProcessor"]

# Finish any Auto registration deferred while this module was importing (see _auto.py).
from ._auto import retry as _retry_registration  # noqa: E402

_retry_registration()
