"""Configuration of SALE sparse prefill attention.

The config is stored on ``model.config.sale_config`` as a plain dict (``SALEConfig.to_dict()``), so
``save_pretrained`` writes it into ``config.json`` and ``from_pretrained`` restores it; the attention
function reads it back with :meth:`SALEConfig.from_dict`.

This module imports nothing heavy (no torch), so it is safe to import from ``import hf_ext``.

Example:
    >>> cfg = SALEConfig(tau=0.002, min_seq_len=256, block_q=16, block_k=16)
    >>> SALEConfig.from_dict(cfg.to_dict()) == cfg
    True
    >>> cfg.tau_for(layer_idx=0, num_heads=2)
    [0.002, 0.002]
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

_BACKENDS = ("auto", "triton", "torch")
_ON_UNSUPPORTED = ("fallback", "error")
_BITS = (4, 8)
_BLOCKS = (16, 32, 64, 128)


def _is_int(v: Any) -> bool:
    """An integer (Python or numpy), not a bool and not a float such as 16.0."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


@dataclass
class SALEConfig:
    """Settings of the ``"sale"`` attention implementation.

    A (query-block, key-block) pair is computed when some query row of the block gives one of the block's
    keys an (estimated) softmax weight above ``tau`` (the Relative Attention Score test). Smaller ``tau``
    keeps more blocks (more accurate, slower); ``tau -> 0`` is dense attention.
    """

    tau: float = field(
        default=1e-3,
        metadata={
            "help": "Default Relative-Attention-Score threshold, in (0, 1). Used for every (layer, head) "
            "that has no calibrated value in `taus`."
        },
    )
    taus: list[list[float]] | None = field(
        default=None,
        metadata={
            "help": "Per-layer, per-query-head thresholds [num_layers][num_heads] (written by "
            "`calibrate`) of the text model (the whole model when it has no sub-models); each value in [0, 1), 0 "
            "keeps every block of that head (dense). None: use `tau`."
        },
    )
    encoder_taus: list[list[float]] | None = field(
        default=None,
        kw_only=True,  # added after block_q...: positional arguments keep their old meaning
        metadata={
            "help": "Thresholds [num_encoder_layers][num_heads] of the text model's non-causal (encoder) "
            "self-attention, where it shares its config and layer_idx values with causal decoder self-attention "
            "(BART, Moonshine); written by `calibrate`. Those encoder layers read it, the "
            "decoder layers read `taus`. None: the encoder layers read `taus` too."
        },
    )
    sub_taus: dict[str, list[list[float]]] | None = field(
        default=None,
        kw_only=True,  # added after block_q...: positional arguments keep their old meaning
        metadata={
            "help": "Thresholds of other sub-models whose attention layers number their own `layer_idx` from 0 "
            "(e.g. Gemma4's vision tower): {sub-config name, e.g. 'vision_config': [num_layers][num_heads]}, "
            "written by `calibrate`. A sub-model not listed uses `taus`. None: none."
        },
    )
    block_q: int | None = field(
        default=None,
        metadata={
            "help": "Query block size (16, 32, 64 or 128); None: the kernel default (DEFAULT_BLOCK_Q)."
        },
    )
    block_k: int | None = field(
        default=None,
        metadata={"help": "Key block size (16, 32, 64 or 128); None: the kernel default (DEFAULT_BLOCK_K)."},
    )
    sink_blocks: int = field(
        default=1, metadata={"help": "Leading key blocks always kept (attention sinks), >= 0."}
    )
    local_window: int = field(
        default=128, metadata={"help": "Keys before the diagonal that are always kept (local window), >= 0."}
    )
    min_seq_len: int = field(
        default=4096,
        metadata={
            "help": "Prompts (query length) shorter than this use dense sdpa; decode steps always do. >= 2."
        },
    )
    bits: int = field(default=8, metadata={"help": "Quantisation bits of the Q/K score estimate: 8 or 4."})
    backend: str = field(
        default="auto",
        metadata={
            "help": "Kernel backend: 'auto' (Triton on CUDA, torch reference elsewhere), 'triton', 'torch'."
        },
    )
    on_unsupported: str = field(
        default="fallback",
        metadata={
            "help": "What to do on an input the sparse kernel cannot take (dtype, head dim, device, "
            "softcap, sliding window, custom mask): 'fallback' = dense attention with a one-time "
            "warning, 'error' = raise ValueError."
        },
    )

    def __post_init__(self) -> None:
        # numpy / other real scalars are accepted and stored as Python numbers (config.json must serialise them)
        if (
            isinstance(self.tau, bool)
            or not isinstance(self.tau, numbers.Real)
            or not 0.0 < float(self.tau) < 1.0
        ):
            raise ValueError(f"tau={self.tau!r} is invalid: it must be a float in the open interval (0, 1)")
        self.tau = float(self.tau)
        if self.taus is not None:
            self.taus = self._check_taus(self.taus)
        if self.encoder_taus is not None:
            self.encoder_taus = self._check_taus(self.encoder_taus, "encoder_taus")
        if self.sub_taus is not None:
            self.sub_taus = self._check_sub_taus(self.sub_taus)
        for name in ("block_q", "block_k"):
            v = getattr(self, name)
            if v is None:
                continue
            if not _is_int(v) or int(v) not in _BLOCKS:
                raise ValueError(
                    f"{name}={v!r} is invalid: allowed values are None (kernel default) or {list(_BLOCKS)}"
                )
            setattr(self, name, int(v))
        for name, lo in (("sink_blocks", 0), ("local_window", 0), ("min_seq_len", 2)):
            v = getattr(self, name)
            if not _is_int(v) or int(v) < lo:
                raise ValueError(f"{name}={v!r} is invalid: it must be an integer >= {lo}")
            setattr(self, name, int(v))
        if not _is_int(self.bits) or int(self.bits) not in _BITS:
            raise ValueError(f"bits={self.bits!r} is invalid: allowed values are {list(_BITS)}")
        self.bits = int(self.bits)
        if self.backend not in _BACKENDS:
            raise ValueError(f"backend={self.backend!r} is invalid: allowed values are {list(_BACKENDS)}")
        if self.on_unsupported not in _ON_UNSUPPORTED:
            raise ValueError(
                f"on_unsupported={self.on_unsupported!r} is invalid: allowed values are {list(_ON_UNSUPPORTED)}"
            )

    @staticmethod
    def _check_taus(taus: Any, name: str = "taus") -> list[list[float]]:
        if not isinstance(taus, (list, tuple)) or not taus:
            raise ValueError(
                f"{name} is invalid: it must be None or a non-empty nested list [num_layers][num_heads]"
            )
        out: list[list[float]] = []
        width = None
        for li, row in enumerate(taus):
            if not isinstance(row, (list, tuple)) or not row:
                raise ValueError(
                    f"{name}[{li}] is invalid: each layer needs a non-empty list of per-head values"
                )
            if width is None:
                width = len(row)
            elif len(row) != width:
                raise ValueError(
                    f"{name}[{li}] has {len(row)} heads but {name}[0] has {width}: rows must be equal length"
                )
            vals = []
            for hi, t in enumerate(row):
                if (
                    isinstance(t, bool)
                    or not isinstance(t, numbers.Real)  # numpy / torch scalars too
                    or math.isnan(float(t))
                    or not 0.0 <= float(t) < 1.0
                ):
                    raise ValueError(f"{name}[{li}][{hi}]={t!r} is invalid: per-head tau must be in [0, 1)")
                vals.append(float(t))
            out.append(vals)
        return out

    @classmethod
    def _check_sub_taus(cls, sub_taus: Any) -> dict[str, list[list[float]]]:
        if not isinstance(sub_taus, dict) or not sub_taus:
            raise ValueError(
                "sub_taus is invalid: it must be None or a non-empty dict {sub-config name: [num_layers][num_heads]}"
            )
        out: dict[str, list[list[float]]] = {}
        for name, taus in sub_taus.items():
            if not isinstance(name, str) or not name:
                raise ValueError(
                    f"sub_taus key {name!r} is invalid: keys are sub-config names such as 'vision_config'"
                )
            out[name] = cls._check_taus(taus, f"sub_taus[{name!r}]")
        return out

    # ------------------------------------------------------------------------------ lookup
    def for_sub_model(self, name: str | None) -> SALEConfig:
        """The config the attention modules of sub-model ``name`` (a sub-config name such as ``"vision_config"``;
        ``None``: the text model) read: ``taus`` replaced by ``sub_taus[name]`` where listed, without ``sub_taus``;
        ``encoder_taus`` only for the text model."""
        if name is None:
            return replace(self, sub_taus=None)
        taus = self.taus
        if self.sub_taus is not None and name in self.sub_taus:
            taus = self.sub_taus[name]
        return replace(self, taus=taus, encoder_taus=None, sub_taus=None)

    def tau_for(self, layer_idx: int | None, num_heads: int, *, encoder: bool = False) -> list[float]:
        """Per-query-head thresholds of one layer (``len == num_heads``).

        ``encoder``: the layer is non-causal (encoder) self-attention; it reads ``encoder_taus`` where set, else
        ``taus``.

        Raises ``ValueError`` (naming the table) when that table was calibrated for a different head count or has
        no row for ``layer_idx``.
        """
        name, taus = "taus", self.taus
        if encoder and self.encoder_taus is not None:
            name, taus = "encoder_taus", self.encoder_taus
        if taus is None or layer_idx is None:
            return [self.tau] * num_heads
        if not 0 <= layer_idx < len(taus):
            raise ValueError(
                f"sale_config.{name} has {len(taus)} layers but layer_idx={layer_idx} was requested; "
                f"re-run calibrate() for this model or set {name}=None"
            )
        row = taus[layer_idx]
        if len(row) != num_heads:
            raise ValueError(
                f"sale_config.{name}[{layer_idx}] has {len(row)} heads but the layer has {num_heads} query heads; "
                f"re-run calibrate() for this model or set {name}=None"
            )
        return list(row)

    # ------------------------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (what is stored on ``model.config.sale_config``)."""
        d = asdict(self)
        if d["taus"] is not None:
            d["taus"] = [list(r) for r in d["taus"]]
        if d["encoder_taus"] is None:  # the format of configs saved before encoder_taus existed
            del d["encoder_taus"]
        else:
            d["encoder_taus"] = [list(r) for r in d["encoder_taus"]]
        if d["sub_taus"] is None:  # the format of configs saved before sub_taus existed
            del d["sub_taus"]
        else:
            d["sub_taus"] = {k: [list(r) for r in v] for k, v in d["sub_taus"].items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | SALEConfig | None) -> SALEConfig:
        """Inverse of :meth:`to_dict`; ``None`` gives the defaults. Unknown keys raise ``ValueError``."""
        if d is None:
            return cls()
        if isinstance(d, cls):
            return d
        if not isinstance(d, dict):
            raise ValueError(f"sale_config must be a dict or SALEConfig, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"sale_config has unknown keys {unknown}; allowed keys are {sorted(known)}")
        return cls(**d)

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name -> help text (used by the docs table)."""
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}
