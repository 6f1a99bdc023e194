"""Interleaved-trajectory data for LatentOmni: the JSONL schema, a loader, a collator and a synthetic set.

JSONL schema (one trajectory per line)::

    {
      "id": "clip-0001",                        # optional
      "system": "You are a helpful assistant.",  # optional (collator default otherwise)
      "question": "Which instrument starts first?",
      "video": "media/clip-0001.npy",           # optional question frames [T, H, W, 3] (.npy/.npz, or a list)
      "fps": 2.0,                                # optional frame rate of "video" (collator default otherwise)
      "audio": "media/clip-0001.wav",           # optional 16 kHz mono waveform (.wav/.npy, or a list)
      "answer": "The piano is heard <Unified_Latent></Unified_Latent> before the drums. Answer: A",
      "segments": [                              # one evidence segment per latent marker, in order
        {"start": 2.0, "end": 4.0},              #   a time span (seconds) of the question clip, or
        {"video": "media/seg.npy", "audio": "media/seg.wav"}   # explicit segment media
      ]
    }

Each latent marker pair in ``answer`` becomes ``<Unified_Latent>`` + K pads + ``</Unified_Latent>``; its
segment's frames / audio are run through the model's encoders and energy-pooled into the K latent targets.
Video files (.mp4) are not decoded here (no video decoder dependency): extract frames to .npy first.

Example:
    >>> from hf_ext.models.latent_omni.tiny import tiny_latent_omni_processor
    >>> coll = LatentOmniDataCollator(tiny_latent_omni_processor())
    >>> batch = coll(make_synthetic_records(2, seed=0))
    >>> sorted(k for k in batch if k.startswith("segment_"))[:2]
    ['segment_feature_attention_mask', 'segment_input_features']
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

DEFAULT_SYSTEM = "You are a helpful assistant that reasons over audio and video."
COLORS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
TONES = {"low": 220.0, "high": 880.0}


def _load_array(value: Any, root: Path | None, what: str) -> np.ndarray:
    if value is None:
        raise ValueError(f"{what} is missing")
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, torch.Tensor):
        return value.numpy()
    if isinstance(value, (list, tuple)):
        return np.asarray(value)
    if not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"{what}={type(value).__name__} is invalid; expected a path, a list or an array")
    path = Path(value)
    if root is not None and not path.is_absolute():
        path = root / path
    if not path.exists():
        raise FileNotFoundError(f"{what}: {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return np.load(path)
    if suffix == ".npz":
        with np.load(path) as z:
            return z[z.files[0]]
    if suffix == ".wav":
        from scipy.io import wavfile

        sr, raw = wavfile.read(path)
        data = raw.astype(np.float32)
        if raw.dtype == np.uint8:  # 8-bit PCM is unsigned, silence at 128
            data = (data - 128.0) / 128.0
        elif np.issubdtype(raw.dtype, np.integer):
            data = data / float(np.iinfo(raw.dtype).max + 1)
        if data.ndim == 2:
            data = data.mean(1)
        if sr != 16000:
            from scipy.signal import resample_poly

            g = np.gcd(int(sr), 16000)
            data = resample_poly(data, 16000 // g, int(sr) // g).astype(np.float32)
        return data
    raise ValueError(
        f"{what}: {path.name} has an unsupported type; use .npy/.npz frames or .wav/.npy audio "
        "(decode videos to frame arrays first)"
    )


def load_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a trajectory JSONL file (schema in the module docstring); relative media paths resolve against
    the file's folder (stored as ``_root``)."""
    path = Path(path)
    records = []
    with path.open() as f:
        for i, line in enumerate(f):
            line = line.strip()
            if not line:
                continue
            rec = json.loads(line)
            for key in ("question", "answer"):
                if key not in rec:
                    raise ValueError(f"{path}:{i + 1}: missing required field {key!r}")
            rec["_root"] = str(path.parent)
            records.append(rec)
    return records


class LatentOmniDataCollator:
    """Turns trajectory records (dicts in the JSONL schema, media as paths or arrays) into model inputs.

    Args:
        processor: a :class:`LatentOmniProcessor`.
        fps: frame rate of question videos when a record gives none.
        system_prompt: used when a record has no ``system``.
        max_length: longer samples raise a ``ValueError`` (no silent truncation of media/latent blocks).
        sampling_rate: samples per second of the records' audio, used to cut a segment's audio by its
            ``start`` / ``end`` seconds.

    Returns (``__call__``): a dict with ``input_ids``, ``attention_mask``, ``labels`` (-100 on the prompt,
    the latent pads, ``</Unified_Latent>`` and padding), question media and the ``segment_*`` targets.
    """

    def __init__(
        self,
        processor: Any,
        fps: float = 2.0,
        system_prompt: str = DEFAULT_SYSTEM,
        max_length: int | None = None,
        sampling_rate: int = 16000,
    ) -> None:
        if not fps > 0:
            raise ValueError(f"fps={fps!r} is invalid; expected a float > 0")
        # checked here, not at the first batch (max_length) or never (sampling_rate cuts the segments' audio)
        if max_length is not None and (
            isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1
        ):
            raise ValueError(f"max_length={max_length!r} is invalid; expected None or an int >= 1")
        if isinstance(sampling_rate, bool) or not isinstance(sampling_rate, int) or sampling_rate < 1:
            raise ValueError(f"sampling_rate={sampling_rate!r} is invalid; expected an int >= 1 (Hz)")
        if not isinstance(system_prompt, str):
            raise ValueError(f"system_prompt={system_prompt!r} is invalid; expected a string")
        self.processor = processor
        self.fps = float(fps)
        self.system_prompt = system_prompt
        self.max_length = max_length
        self.sampling_rate = sampling_rate

    def _segment(
        self,
        rec: dict,
        i: int,
        seg: dict,
        video: np.ndarray | None,
        audio: np.ndarray | None,
        root: Path | None,
        fps: float,
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        proc = self.processor
        rid = rec.get("id", "?")
        sv = sa = None
        if proc.num_visual_latents > 0:
            if seg.get("video") is not None:
                sv = _load_array(seg["video"], root, f"record {rid} segment {i} video")
            elif "start" in seg and "end" in seg and video is not None:
                a, b = int(float(seg["start"]) * fps), int(np.ceil(float(seg["end"]) * fps))
                sv = video[a : max(b, a + 1)]
            if sv is None or len(sv) == 0:
                raise ValueError(
                    f"missing modality features for a latent segment: record {rid} segment {i} has no video "
                    "(give segment 'video' or 'start'/'end' over the question 'video')"
                )
        if proc.num_audio_latents > 0:
            if seg.get("audio") is not None:
                sa = _load_array(seg["audio"], root, f"record {rid} segment {i} audio")
            elif "start" in seg and "end" in seg and audio is not None:
                a, b = (
                    int(float(seg["start"]) * self.sampling_rate),
                    int(float(seg["end"]) * self.sampling_rate),
                )
                sa = audio[a:b]
            if sa is None or len(sa) == 0:
                raise ValueError(
                    f"missing modality features for a latent segment: record {rid} segment {i} has no audio "
                    "(give segment 'audio' or 'start'/'end' over the question 'audio')"
                )
        return sv, sa

    def __call__(self, records: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        proc = self.processor
        prompts, answers, videos, audios, seg_v, seg_a = [], [], [], [], [], []
        fps_seen: set[float] = set()
        for rec in records:
            root = Path(rec["_root"]) if rec.get("_root") else None
            rid = rec.get("id", "?")
            for key in ("question", "answer"):
                if key not in rec:
                    raise ValueError(f"record {rid}: missing required field {key!r}")
            video = (
                _load_array(rec["video"], root, f"record {rid} video")
                if rec.get("video") is not None
                else None
            )
            audio = (
                _load_array(rec["audio"], root, f"record {rid} audio")
                if rec.get("audio") is not None
                else None
            )
            fps = rec.get("fps")
            if fps is None:  # optional: the collator's default
                fps = self.fps
            if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
                raise ValueError(f"record {rid}: fps={fps!r} is invalid; expected a number > 0 (or null)")
            fps = float(fps)
            content: list[dict[str, Any]] = []
            if video is not None:
                content.append({"type": "video"})
                videos.append(video)
                fps_seen.add(fps)
            if audio is not None:
                content.append({"type": "audio"})
                audios.append(audio.reshape(-1))
            content.append({"type": "text", "text": rec["question"]})
            msgs = [
                {"role": "system", "content": rec.get("system") or self.system_prompt},
                {"role": "user", "content": content},
            ]
            prompts.append(proc.render_conversation(msgs, add_generation_prompt=True))
            answer = rec["answer"]
            if not answer.rstrip().endswith("<|im_end|>"):
                answer = answer + "<|im_end|>"
            answers.append(answer)
            segs = rec.get("segments") or []
            n_blocks = proc.count_latent_blocks(answer)
            if len(segs) != n_blocks:
                raise ValueError(
                    f"missing modality features for a latent segment: record {rid} has {n_blocks} latent block(s) "
                    f"in its answer but {len(segs)} segment(s)"
                )
            for i, seg in enumerate(segs):
                sv, sa = self._segment(rec, i, seg, video, audio, root, fps)
                if sv is not None:
                    seg_v.append(sv)
                if sa is not None:
                    seg_a.append(sa.reshape(-1))
        if len(fps_seen) > 1:
            raise ValueError(
                f"records in one batch use different fps {sorted(fps_seen)}; batch them separately"
            )
        batch = proc(
            fps=fps_seen.pop()
            if fps_seen
            else None,  # this batch's frame rate; the processor stays as it was
            text=prompts,
            videos=videos or None,
            audio=audios or None,
            answers=answers,
            segment_videos=seg_v or None,
            segment_audios=seg_a or None,
            max_length=self.max_length,
            padding_side="right",
        )
        return dict(batch)


# ---------------------------------------------------------------------------------- synthetic data
def make_synthetic_records(
    n: int,
    seed: int = 0,
    frames: int = 8,
    size: int = 16,
    fps: float = 2.0,
    seconds_audio: float | None = None,
) -> list[dict[str, Any]]:
    """``n`` synthetic interleaved trajectories (media as in-memory arrays).

    The second half of each clip shows one colour while a low or high tone plays; the answer reasons
    ``... <Unified_Latent></Unified_Latent> ...`` over that half (its segment) and names colour and tone.
    """

    def is_int(v: Any, low: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= low

    def is_pos(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0

    for name, value, low in (("n", n, 1), ("seed", seed, 0), ("frames", frames, 2), ("size", size, 1)):
        if not is_int(value, low):
            raise ValueError(f"{name}={value!r} is invalid; expected an int >= {low}")
    if not is_pos(fps):
        raise ValueError(f"fps={fps!r} is invalid; expected a finite float > 0")
    if seconds_audio is not None and not is_pos(seconds_audio):
        raise ValueError(f"seconds_audio={seconds_audio!r} is invalid; expected None or a finite float > 0")
    rng = np.random.default_rng(seed)
    sr = 16000
    dur = seconds_audio if seconds_audio is not None else frames / fps
    t = np.arange(int(dur * sr)) / sr
    recs = []
    for i in range(n):
        color = list(COLORS)[int(rng.integers(len(COLORS)))]
        tone = list(TONES)[int(rng.integers(len(TONES)))]
        video = rng.integers(0, 60, (frames, size, size, 3)).astype(np.uint8)
        video[frames // 2 :] = np.clip(
            np.array(COLORS[color])[None, None, None]
            + rng.integers(-20, 20, (frames - frames // 2, size, size, 3)),
            0,
            255,
        ).astype(np.uint8)
        audio = (0.02 * rng.standard_normal(t.size)).astype(np.float32)
        half = t.size // 2
        audio[half:] += (0.3 * np.sin(2 * np.pi * TONES[tone] * t[half:])).astype(np.float32)
        recs.append(
            {
                "id": f"synthetic-{i}",
                "question": "What colour appears and what tone plays?",
                "video": video,
                "fps": fps,
                "audio": audio,
                "answer": f"Look at the end <Unified_Latent></Unified_Latent> the colour is {color} and the tone is {tone}.",
                "segments": [{"start": dur / 2, "end": dur}],
            }
        )
    return recs


def write_synthetic_jsonl(folder: str | os.PathLike, n: int, seed: int = 0, **kwargs: Any) -> Path:
    """Write :func:`make_synthetic_records` as ``folder/train.jsonl`` plus ``.npy`` frames and ``.wav`` audio."""
    from scipy.io import wavfile

    records = make_synthetic_records(
        n, seed=seed, **kwargs
    )  # its argument errors come before any file is touched
    folder = Path(folder)
    (folder / "media").mkdir(parents=True, exist_ok=True)
    path = folder / "train.jsonl"
    with path.open("w") as f:
        for rec in records:
            vid = f"media/{rec['id']}.npy"
            aud = f"media/{rec['id']}.wav"
            np.save(folder / vid, rec["video"])
            wavfile.write(folder / aud, 16000, (np.clip(rec["audio"], -1, 1) * 32767).astype(np.int16))
            rec = dict(rec, video=vid, audio=aud)
            f.write(json.dumps(rec) + "\n")
    return path


__all__ = ["LatentOmniDataCollator", "load_jsonl", "make_synthetic_records", "write_synthetic_jsonl"]
