"""The plan: a JSON-serialisable hybrid-parallel strategy produced by the search.

Example:
    >>> p = Plan.uniform("tiny", gpus=2, dp_type="fsdp", zero=3, ckpt=True, global_batch=4, seq_len=16)
    >>> Plan.from_json(p.to_json()) == p
    True
    >>> p.describe()
    'pp1 tp1 dp2 fsdp b2x1 zero3 ckpt 2/2'
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field
from typing import Any, ClassVar

from hf_ext.accelerate.autoparallel.cost_model import (
    DP_TYPES,
    LayerStrategy,
    ParallelConfig,
    check_attention_options,
)
from hf_ext.accelerate.autoparallel.shapes import ModelShape, get_shape

PLAN_VERSION = 1


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_version(version: Any) -> None:
    """A plan's ``version``: an int from 1 to :data:`PLAN_VERSION` (a newer plan needs a newer hf_ext)."""
    if not _is_int(version) or version < 1:
        raise ValueError(
            f"Plan.version must be an int >= 1 (this hf_ext writes {PLAN_VERSION}), got {version!r}"
        )
    if version > PLAN_VERSION:
        raise ValueError(f"plan version {version} is newer than supported ({PLAN_VERSION}); upgrade hf_ext")


def _layer_ok(x: Any) -> bool:
    """A plan's per-layer entry: ``{"zero": 0 | 2 | 3, "ckpt": bool}`` exactly."""
    return (
        isinstance(x, dict)
        and set(x) == {"zero", "ckpt"}
        and _is_int(x["zero"])
        and x["zero"] in (0, 2, 3)
        and isinstance(x["ckpt"], bool)
    )


@dataclass
class Plan:
    """A complete plan.

    Attributes:
        model: the :class:`ModelShape` as a dict.
        gpus, pp, tp, sp, dp_type, micro_batch, num_micro_batches: see :class:`ParallelConfig`.
        global_batch, seq_len: the training step the plan was made for.
        stages: ``[start, end)`` decoder-layer ranges of the pipeline stages.
        layers: per decoder layer ``{"zero": 0|2|3, "ckpt": bool}``.
        predicted: cost-model figures (``step_ms``, ``tokens_per_s``, ``mfu``, ``memory_gb`` per stage, ...).
        hardware: name and memory of the device the plan was made for.
        attn_implementation, padding_mask: the attention kernel and whether the batches carry a padding
            ``attention_mask`` with pads, as searched (:class:`SearchConfig`); they decide which dense sdpa
            masks the memory model counts. A plan written before they existed loads with ``"sdpa"`` and ``False``.
    """

    model: dict[str, Any]
    gpus: int
    pp: int
    tp: int
    sp: bool
    dp_type: str
    micro_batch: int
    num_micro_batches: int
    global_batch: int
    seq_len: int
    stages: list[list[int]]
    layers: list[dict[str, Any]]
    predicted: dict[str, Any] = field(default_factory=dict)
    hardware: dict[str, Any] = field(default_factory=dict)
    version: int = PLAN_VERSION
    attn_implementation: str = "sdpa"
    padding_mask: bool = False

    def __post_init__(self) -> None:
        # a JSON plan edited by hand: "false" is a true string, 2.0 is not a degree; refuse rather than coerce
        _check_version(self.version)
        if not isinstance(self.model, dict):
            raise ValueError(f"Plan.model must be a dict of ModelShape fields, got {self.model!r:.80}")
        for name in ("gpus", "pp", "tp", "micro_batch", "num_micro_batches", "global_batch", "seq_len"):
            if not _is_int(getattr(self, name)):
                raise ValueError(f"Plan.{name} must be an int, got {getattr(self, name)!r}")
        if not isinstance(self.sp, bool):
            raise ValueError(f"Plan.sp must be true or false, got {self.sp!r}")
        check_attention_options(self.attn_implementation, self.padding_mask, "Plan")
        bad = [x for x in self.layers if not _layer_ok(x)] if isinstance(self.layers, list) else [self.layers]
        if bad:
            raise ValueError(
                f'Plan.layers entries must be {{"zero": 0 | 2 | 3, "ckpt": true | false}}, got {bad[0]!r}'
            )
        if not isinstance(self.stages, list) or not all(
            isinstance(r, (list, tuple)) and len(r) == 2 and all(_is_int(i) for i in r) for r in self.stages
        ):
            raise ValueError(f"Plan.stages must be [start, end) pairs of ints, got {self.stages!r}")
        cfg = self.config  # validates degrees
        # the zero stages the cost model prices for this config (and the search picks from): 0 for ddp and for a
        # single data-parallel rank, 2 / 3 for fsdp; apply_plan would run another (fsdp zero 0 as zero 3, ddp
        # ignoring zero 2 / 3) than the one the plan's prediction assumed
        allowed = sorted({s.zero for s in cfg.layer_strategies()})
        wrong = sorted({x["zero"] for x in self.layers} - set(allowed))
        if wrong:
            raise ValueError(
                f"Plan.layers: zero {wrong} with dp_type={self.dp_type!r} and dp={self.dp}; the zero stages of "
                f"such a plan are {allowed}"
            )
        n = self.shape.num_layers
        if len(self.layers) != n:
            raise ValueError(f"Plan.layers has {len(self.layers)} entries, the model has {n} layers")
        if len(self.stages) != self.pp:
            raise ValueError(f"Plan.stages has {len(self.stages)} ranges but pp={self.pp}")
        pos = 0
        for a, b in self.stages:
            if a != pos or b <= a:
                raise ValueError(
                    f"Plan.stages must be consecutive non-empty [start, end) ranges, got {self.stages}"
                )
            pos = b
        if pos != n:
            raise ValueError(f"Plan.stages end at layer {pos}, the model has {n} layers")
        if self.dp * self.micro_batch * self.num_micro_batches != self.global_batch:
            raise ValueError(
                f"Plan: dp*micro_batch*num_micro_batches = {self.dp}*{self.micro_batch}*{self.num_micro_batches}"
                f" must equal global_batch={self.global_batch}"
            )

    # ------------------------------------------------------------------------------------- views
    @property
    def shape(self) -> ModelShape:
        return ModelShape.from_dict(self.model)

    @property
    def dp(self) -> int:
        return self.gpus // (self.pp * self.tp)

    @property
    def config(self) -> ParallelConfig:
        return ParallelConfig(
            self.gpus, self.pp, self.tp, self.sp, self.micro_batch, self.num_micro_batches, self.dp_type
        )

    def layer_strategies(self) -> list[LayerStrategy]:
        return [LayerStrategy(int(x["zero"]), bool(x["ckpt"])) for x in self.layers]

    def stage_strategies(self) -> list[list[LayerStrategy]]:
        ls = self.layer_strategies()
        return [ls[a:b] for a, b in self.stages]

    def describe(self) -> str:
        """One-line summary, e.g. ``pp2 tp4+sp dp16 fsdp b1x32 zero3 ckpt 40/80``."""
        ls = self.layer_strategies()
        zs = sorted({s.zero for s in ls})
        nck = sum(s.ckpt for s in ls)
        tp = f"tp{self.tp}" + ("+sp" if self.sp else "")
        z = "/".join(f"zero{z}" for z in zs) if self.dp_type == "fsdp" and self.dp > 1 else "zero0"
        return (
            f"pp{self.pp} {tp} dp{self.dp} {self.dp_type} b{self.micro_batch}x{self.num_micro_batches} "
            f"{z} ckpt {nck}/{len(ls)}"
        )

    # -------------------------------------------------------------------------------------- json
    # Fields added after the first plan format: written only when they differ from their default, so a
    # plan that does not use them still loads in an hf_ext older than them (which refuses unknown keys).
    _OPTIONAL_FIELDS: ClassVar[tuple[str, ...]] = ("attn_implementation", "padding_mask")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (numpy scalars as Python numbers, tuples as lists)."""
        from hf_ext.utils.jsonable import to_jsonable

        d = to_jsonable(asdict(self))
        for name in self._OPTIONAL_FIELDS:
            if d[name] == self.__dataclass_fields__[name].default:
                del d[name]
        return d

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        """The plan :meth:`to_dict` wrote; a hand-edited one is checked key by key (``ValueError`` naming the
        key), never coerced."""
        fields = set(cls.__dataclass_fields__)
        if not isinstance(d, Mapping):
            raise ValueError(
                f"Plan.from_dict expects a dict (a plan's JSON object with keys {sorted(fields)}), "
                f"got {type(d).__name__}: {d!r:.80}"
            )
        _check_version(d.get("version", PLAN_VERSION))
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"plan: unknown key(s) {unknown}; a plan has {sorted(fields)}")
        required = [
            f
            for f, v in cls.__dataclass_fields__.items()
            if v.default is MISSING and v.default_factory is MISSING
        ]
        missing = sorted(f for f in required if f not in d)
        if missing:
            raise ValueError(f"plan: missing key(s) {missing}")
        known = dict(d)
        if isinstance(known["stages"], (list, tuple)):  # anything else: __post_init__ names it
            known["stages"] = [list(r) if isinstance(r, (list, tuple)) else r for r in known["stages"]]
        return cls(**known)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))

    def save(self, path: str) -> str:
        """Write :meth:`to_json`; the text is made first and the file replaced whole, so a value JSON cannot hold
        raises ``TypeError`` and leaves the previous file."""
        from hf_ext.utils.atomic import atomic_write_text

        text = self.to_json()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atomic_write_text(path, text)
        return path

    @classmethod
    def load(cls, path: str) -> Plan:
        with open(path) as f:
            return cls.from_json(f.read())

    # ------------------------------------------------------------------------------- constructors
    @classmethod
    def from_config(
        cls,
        shape: ModelShape,
        cfg: ParallelConfig,
        stages: list[list[LayerStrategy]],
        *,
        global_batch: int,
        seq_len: int,
        predicted: dict[str, Any] | None = None,
        hardware: dict[str, Any] | None = None,
        attn_implementation: str = "sdpa",
        padding_mask: bool = False,
    ) -> Plan:
        ranges, pos = [], 0
        for s in stages:
            ranges.append([pos, pos + len(s)])
            pos += len(s)
        layers = [{"zero": st.zero, "ckpt": st.ckpt} for s in stages for st in s]
        return cls(
            shape.to_dict(),
            cfg.gpus,
            cfg.pp,
            cfg.tp,
            cfg.sp,
            cfg.dp_type,
            cfg.micro_batch,
            cfg.num_micro_batches,
            global_batch,
            seq_len,
            ranges,
            layers,
            predicted or {},
            hardware or {},
            attn_implementation=attn_implementation,
            padding_mask=padding_mask,
        )

    @classmethod
    def uniform(
        cls,
        model: str | ModelShape | Any,
        *,
        gpus: int,
        dp_type: str = "fsdp",
        zero: int = 3,
        ckpt: bool = False,
        tp: int = 1,
        pp: int = 1,
        sp: bool = False,
        global_batch: int,
        seq_len: int,
        micro_batch: int | None = None,
        attn_implementation: str = "sdpa",
        padding_mask: bool = False,
    ) -> Plan:
        """A hand-written plan with the same strategy on every layer (e.g. the DDP / FSDP baselines).

        ``attn_implementation`` / ``padding_mask``: see :class:`~hf_ext.accelerate.autoparallel.search.SearchConfig`.

        Raises:
            ValueError: a bad argument, named with the values it allows, before any arithmetic on it.
        """
        for name, v in (
            ("gpus", gpus),
            ("tp", tp),
            ("pp", pp),
            ("global_batch", global_batch),
            ("seq_len", seq_len),
        ):
            if not _is_int(v) or v < 1:
                raise ValueError(f"Plan.uniform: {name} must be an int >= 1, got {v!r}")
        if micro_batch is not None and (not _is_int(micro_batch) or micro_batch < 1):
            raise ValueError(
                f"Plan.uniform: micro_batch must be None (one micro-batch) or an int >= 1, got {micro_batch!r}"
            )
        if dp_type not in DP_TYPES:
            raise ValueError(f"Plan.uniform: dp_type must be one of {', '.join(DP_TYPES)}, got {dp_type!r}")
        if not _is_int(zero) or zero not in (0, 2, 3):
            raise ValueError(f"Plan.uniform: zero must be 0, 2 or 3, got {zero!r}")
        for name, v in (("ckpt", ckpt), ("sp", sp)):
            if not isinstance(v, bool):
                raise ValueError(f"Plan.uniform: {name} must be True or False, got {v!r}")
        check_attention_options(attn_implementation, padding_mask, "Plan.uniform")
        if gpus % (pp * tp):
            raise ValueError(
                f"Plan.uniform: gpus={gpus} must be a multiple of pp*tp={pp * tp} (pp={pp}, tp={tp})"
            )
        shape = get_shape(model)
        if pp > shape.num_layers:
            raise ValueError(f"Plan.uniform: pp={pp} must be at most the model's {shape.num_layers} layers")
        dp = gpus // (pp * tp)
        if micro_batch is None:
            micro_batch = max(1, global_batch // dp)
        if global_batch % (dp * micro_batch):
            raise ValueError(
                f"global_batch={global_batch} must be divisible by dp*micro_batch={dp * micro_batch}"
            )
        cfg = ParallelConfig(gpus, pp, tp, sp, micro_batch, global_batch // (dp * micro_batch), dp_type)
        z = 0 if dp_type == "ddp" or dp == 1 else zero
        n = shape.num_layers
        per = [n // pp + (1 if i < n % pp else 0) for i in range(pp)]
        stages = [[LayerStrategy(z, ckpt)] * k for k in per]
        return cls.from_config(
            shape,
            cfg,
            stages,
            global_batch=global_batch,
            seq_len=seq_len,
            attn_implementation=attn_implementation,
            padding_mask=padding_mask,
        )

    # ------------------------------------------------------------------------------- integration
    def to_parallelism_config(self) -> Any:
        """An Accelerate ``ParallelismConfig`` for plans it can express (pp == 1, fsdp or ddp).

        Accelerate has no pipeline dimension and applies one FSDP setting to all layers: per-layer
        zero2/zero3 mixes and per-layer checkpointing are applied by :func:`apply_plan` instead.
        """
        if self.pp > 1:
            raise ValueError(
                f"Accelerate ParallelismConfig has no pipeline dimension (plan has pp={self.pp})"
            )
        from accelerate.parallelism_config import ParallelismConfig

        if self.dp_type == "ddp":
            return ParallelismConfig(dp_replicate_size=self.dp, dp_shard_size=1, tp_size=self.tp)
        return ParallelismConfig(dp_replicate_size=1, dp_shard_size=self.dp, tp_size=self.tp)

    def table(self, title: str | None = None) -> Any:
        """A ``rich.table.Table`` of the plan (one row per stage)."""
        from rich.table import Table

        t = Table(title=title or f"plan: {self.describe()}")
        for c in ("stage", "layers", "strategies", "pred. memory GB"):
            t.add_column(c)
        mem = self.predicted.get("memory_gb", [None] * self.pp)
        for i, ((a, b), strs) in enumerate(zip(self.stages, self.stage_strategies())):
            counts: dict[str, int] = {}
            for s in strs:
                counts[s.label] = counts.get(s.label, 0) + 1
            desc = ", ".join(f"{v}x {k}" for k, v in counts.items())
            t.add_row(str(i), f"{a}-{b - 1}", desc, "" if mem[i] is None else f"{mem[i]:.1f}")
        return t
