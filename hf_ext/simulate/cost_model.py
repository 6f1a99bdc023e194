"""Iteration-time and KV-memory cost model of one serving engine.

One continuous-batching iteration runs ``P`` prefill tokens (chunks of new prompts) together with a decode
step for ``n`` running sequences whose contexts sum to ``C`` tokens.  Its time is

    t = max(floor, a + b * n + c * C + [P > 0] * (a_p + p * P + q * A))

where ``A = sum_i chunk_i * (offset_i + chunk_i / 2)`` is the attention work of the prefill chunks (token x
context pairs) and ``floor`` is the launch-bound floor of an eager step (``decode_floor_s`` when the step has
decode sequences, ``prefill_floor_s`` otherwise).  The flat region matters: GPU.md measures eager
transformers decode of a Llama-3.1-8B shape on one H100 at ~45 ms/step flat up to batch 32.

KV memory is ``kv_bytes_per_token`` per token (``2 * layers * kv_heads * head_dim * dtype bytes``).

Parameters come from :mod:`hf_ext.simulate.calibrate` (fit to measurements) and are stored as JSON under
``hf_ext/simulate/calibrations/``.

Example:
    >>> cm = CostModel(decode_floor_s=0.045, per_seq_s=1e-4, per_ctx_token_s=3e-7)
    >>> round(cm.decode_time(batch=1, ctx_per_seq=1024), 3)
    0.045
    >>> brute = sum(cm.decode_time(4, (4000 + 4 * i) / 4) for i in range(10))
    >>> abs(cm.decode_span(n=4, ctx0=4000, k=10) - brute) < 1e-12
    True
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

CALIBRATION_DIR = Path(__file__).resolve().parent / "calibrations"


@dataclass
class CostModel:
    """Per-iteration time model (seconds) and KV bytes per token; see the module docstring."""

    decode_floor_s: float = field(default=0.0, metadata={"help": "launch-bound floor of a step with decode"})
    prefill_floor_s: float = field(default=0.0, metadata={"help": "floor of a prefill-only step"})
    base_s: float = field(default=0.0, metadata={"help": "a: fixed time per iteration above the floor"})
    prefill_base_s: float = field(
        default=0.0, metadata={"help": "a_p: extra fixed time of a step with prefill"}
    )
    per_seq_s: float = field(default=0.0, metadata={"help": "b: time per decoding sequence"})
    per_ctx_token_s: float = field(default=0.0, metadata={"help": "c: time per context token read by decode"})
    per_prefill_token_s: float = field(default=0.0, metadata={"help": "p: time per prefill token"})
    per_prefill_attn_s: float = field(
        default=0.0, metadata={"help": "q: time per prefill (token x ctx) pair"}
    )
    kv_bytes_per_token: float = field(default=0.0, metadata={"help": "KV-cache bytes per token (all layers)"})
    name: str = field(default="custom", metadata={"help": "label (device + model shape)"})
    source: str = field(default="", metadata={"help": "where the figures come from (measured / published)"})
    extra: dict[str, Any] = field(default_factory=dict, metadata={"help": "fit details, measured points"})

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name in ("name", "source", "extra"):
                continue
            v = getattr(self, f.name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"CostModel.{f.name} must be a finite number >= 0, got {v!r}")

    # ------------------------------------------------------------------------------------ times
    def iteration_time(
        self, prefill_tokens: int, prefill_attn: float, n_decode: int, ctx_decode: float
    ) -> float:
        """Time of one mixed iteration: ``prefill_tokens`` new tokens, ``n_decode`` sequences decoding
        over ``ctx_decode`` context tokens in total."""
        lin = self.base_s + self.per_seq_s * n_decode + self.per_ctx_token_s * ctx_decode
        if prefill_tokens:
            lin += (
                self.prefill_base_s
                + self.per_prefill_token_s * prefill_tokens
                + self.per_prefill_attn_s * prefill_attn
            )
        floor = self.decode_floor_s if n_decode > 0 else self.prefill_floor_s
        return lin if lin > floor else floor

    def prefill_time(self, tokens: int, batch: int = 1) -> float:
        """Time to prefill ``batch`` prompts of ``tokens`` tokens each in one iteration (no decode)."""
        return self.iteration_time(batch * tokens, batch * tokens * tokens / 2.0, 0, 0.0)

    def decode_time(self, batch: int, ctx_per_seq: float) -> float:
        """Time of one decode step of ``batch`` sequences with ``ctx_per_seq`` context tokens each."""
        return self.iteration_time(0, 0.0, batch, batch * ctx_per_seq)

    def decode_span(self, n: int, ctx0: float, k: int) -> float:
        """Total time of ``k`` consecutive decode-only steps of ``n`` sequences starting at total context
        ``ctx0`` (each step adds ``n`` context tokens): closed form of ``sum_i max(floor, lin(i))``."""
        if k <= 0:
            return 0.0
        lin0 = self.base_s + self.per_seq_s * n + self.per_ctx_token_s * ctx0
        slope = self.per_ctx_token_s * n
        floor = self.decode_floor_s if n > 0 else self.prefill_floor_s
        if lin0 >= floor:
            i_star = 0
        elif slope <= 0.0:
            return floor * k
        else:
            i_star = math.ceil((floor - lin0) / slope)
            if i_star >= k:
                return floor * k
        m = k - i_star
        # sum_{i=i_star}^{k-1} (lin0 + slope * i)
        s = m * lin0 + slope * (i_star + k - 1) * m / 2.0
        return floor * i_star + s

    def steps_within(self, n: int, ctx0: float, budget: float, k_max: int) -> int:
        """Smallest ``k`` in ``[1, k_max]`` with ``decode_span(n, ctx0, k) >= budget`` (``k_max`` if none)."""
        if self.decode_span(n, ctx0, k_max) < budget:
            return k_max
        lo, hi = 1, k_max
        while lo < hi:
            mid = (lo + hi) // 2
            if self.decode_span(n, ctx0, mid) >= budget:
                hi = mid
            else:
                lo = mid + 1
        return lo

    # ----------------------------------------------------------------------------- constructors
    @classmethod
    def constant(cls, step_s: float, kv_bytes_per_token: float = 0.0) -> CostModel:
        """Every iteration takes ``step_s`` seconds (a single-server queue when ``max_num_seqs=1``)."""
        return cls(
            decode_floor_s=step_s,
            prefill_floor_s=step_s,
            kv_bytes_per_token=kv_bytes_per_token,
            name=f"constant-{step_s:g}s",
            source="synthetic",
        )

    @staticmethod
    def kv_bytes_from_config(config: Any, dtype_bytes: int = 2) -> int:
        """``2 * layers * kv_heads * head_dim * dtype_bytes`` for a transformers decoder config."""
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return int(2 * config.num_hidden_layers * kv * head_dim * dtype_bytes)

    # ------------------------------------------------------------------------------------- json
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CostModel:
        """Inverse of :meth:`to_dict`. An unknown (e.g. misspelt) key is a ValueError, not a silent 0;
        free-form metadata belongs under ``extra``."""
        if not isinstance(d, dict):
            raise ValueError(f"a CostModel dict must be a JSON object, got {type(d).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(
                f"unknown CostModel key(s) {unknown}; valid keys: {', '.join(known)} "
                "(put other metadata under 'extra')"
            )
        return cls(**d)

    @classmethod
    def load(cls, name_or_path: str | Path) -> CostModel:
        """Load a JSON calibration: a path, or the stem of a file in ``hf_ext/simulate/calibrations``."""
        p = Path(name_or_path)
        if not p.exists():
            cand = CALIBRATION_DIR / (
                str(name_or_path) + ("" if str(name_or_path).endswith(".json") else ".json")
            )
            if not cand.exists():
                avail = ", ".join(sorted(x.stem for x in CALIBRATION_DIR.glob("*.json"))) or "none"
                raise FileNotFoundError(
                    f"no calibration {name_or_path!r}; available in {CALIBRATION_DIR}: {avail}"
                )
            p = cand
        try:
            return cls.from_dict(json.loads(p.read_text()))
        except ValueError as e:
            raise ValueError(f"{p}: {e}") from e


def default_gpu_cost_model() -> CostModel:
    """The measured H100 / Llama-3.1-8B-shape ``generate`` calibration when shipped, else the GPU.md
    published-figures fit. Fits to continuous-batching steps (``transformers_cb-…``) and to whole padded batches
    (``…-generate-padded``) are for the engines they were measured on and never the default."""
    from hf_ext.simulate.cb_steps import is_cb_calibration  # cb_steps imports this module

    avail = available_calibrations()
    measured = [
        c
        for c in avail
        if "h100" in c
        and c.endswith("llama3.1-8b")
        and not c.startswith("gpu_md")
        and not is_cb_calibration(c)
    ]
    if measured:
        return CostModel.load(measured[0])
    return (
        CostModel.load("gpu_md-h100-llama3.1-8b")
        if "gpu_md-h100-llama3.1-8b" in avail
        else gpu_md_h100_llama8b()
    )


def available_calibrations() -> list[str]:
    """Stems of the JSON calibrations shipped in ``hf_ext/simulate/calibrations``."""
    return sorted(x.stem for x in CALIBRATION_DIR.glob("*.json"))


def gpu_md_h100_llama8b() -> CostModel:
    """Starting point from GPU.md's published serving table (NOT measured by us).

    H100, Llama-3.1-8B-shaped random bf16 model, transformers ``generate`` eager with DynamicCache/sdpa:
    prefill 512/2,048/8,192 tokens = 39.0/66.8/278.1 ms; decode at context 1,024 with batch 1/8/32/64 =
    47.2/43.6/42.3/67.9 ms.  Fit by hand to those seven points (see ``calibrate.fit_gpu_md``).
    """
    from hf_ext.simulate.calibrate import fit_gpu_md

    return fit_gpu_md()
