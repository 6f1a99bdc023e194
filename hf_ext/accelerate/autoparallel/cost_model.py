"""Cost model: time and memory of a training step under a hybrid-parallel plan.

Strategy space (per plan / per layer):

* plan level (:class:`ParallelConfig`): pipeline degree ``pp``, tensor-parallel degree ``tp`` with optional
  Megatron sequence parallelism ``sp``, data-parallel degree ``dp = gpus / (pp * tp)``, data-parallel
  family ``dp_type`` (``"ddp"``: replicated states, one gradient all-reduce per step; ``"fsdp"``:
  FSDP2-sharded states), micro-batch size ``b`` and micro-batch count ``m``;
* layer level (:class:`LayerStrategy`): ZeRO stage (0 for ddp; 2 = FSDP2 ``reshard_after_forward=False``,
  3 = ``reshard_after_forward=True``) and activation checkpointing.

Layer FLOPs, parameters and activations come from the :class:`ModelShape`: q / o projections
``num_heads * head_dim`` wide and k / v ``num_kv_heads * head_dim`` (a config's explicit ``head_dim``, as in
Qwen3 and Gemma, not ``h / a``), and attention over the causal prefix or, on the layers the config windows
(``sliding_window`` with ``layer_types`` / ``use_sliding_window`` / ``max_window_layers``), over the last
``w`` keys (:meth:`ModelShape.attended_keys`), so layers of one model may differ in time. Tensor-parallel
collectives are ``b * s * h`` activations whatever ``head_dim``: they reduce the row-parallel outputs of
o_proj / down_proj and the input gradients of the column-parallel q/k/v and gate/up projections.

Time (ms) of one layer for one micro-batch of ``b`` sequences: ``fwd(b) + bwd(b) (+ recompute(b) if
checkpointed)``: ``fwd = per_layer_overhead + compute(b)``, ``bwd = bwd_overhead + bwd_fwd_ratio *
compute(b)`` with ``compute(b)`` = layer FLOPs / (profiled) achieved TFLOP/s (the profiled layer lines;
:meth:`HardwareProfile.layer_ms`), ``recompute = recompute_fwd_ratio[dp_type] * fwd`` (measured under the
runtime; 1.0, a plain forward, when not profiled), plus the runtime's per-micro-batch excess
``c0 + c1 * b`` (:meth:`CostModel.mixed_precision_ms`), plus tensor-parallel collectives (4
all-reduce-sized collectives per layer, 6 with recomputation; *not* overlapped), plus FSDP all-gathers /
reduce-scatters of every micro-batch (zero3: 2 all-gathers + 1 reduce-scatter; zero2: 1 + 1) *overlapped*
with the layer's compute:
``exposed = max(0, comm - overlap * compute) + overlap_penalty * min(comm, overlap * compute)``. DDP's
gradient all-reduce happens once per step, overlapped the same way with the last micro-batch's backward.

Pipeline (1F1B): with per-micro-batch stage times ``t_i`` and per-step tails ``e_i`` (exposed
gradient sync), ``T = sum(t_i) + (m - 1) * max(t_i) + max(e_i) + optimizer``; the bubble is
``sum(t_i) - max(t_i)``. p2p activation/gradient sends are added to every stage's ``t_i``.

Memory (bytes per GPU) of stage ``i``: model states (``state_bytes`` = 16 B/param: fp32 master weights,
fp32 grads, Adam m and v; divided by ``tp``, and by ``dp`` when sharded; zero2 also keeps the bf16
unsharded weights), activations of ``min(m, pp - i)`` in-flight micro-batches (analytic Llama formula,
scaled by a profiled calibration; checkpointed layers keep only their input), and transients
(one layer's full activations for recompute/backward, two unsharded FSDP layers, and the LM head + loss
peak of ``logit_bytes`` = 12 bytes per logit: bf16 logits, their fp32 upcast and the fp32 log-softmax and
its gradients), and under sdpa the dense attention masks transformers builds (on sliding-window layers when
``s >= w``, on every layer when ``TrainingSpec.padding_mask``): the boolean mask of each in-flight micro-batch
and, per masked layer that is not checkpointed, the ``[b, 1, s, s]`` additive mask sdpa saves for the backward
and the k / v copies transformers makes for every query head when a mask is given
(:meth:`CostModel.layer_has_mask`). Measured step costs outside the layers (embedding, AdamW per parameter, autocast or FSDP2
per-micro-batch weight handling, whole-model wrapper overhead; see :class:`ModelProfile`) are added when
the profile has them; the per-micro-batch ones are affine in ``b`` (``m * (c0 + c1 * b)`` per step), so
for ``pp = tp = dp = 1`` a measured profile predicts
``step = m * (plain(b) + W(b) + X_dp(b) + k * recompute(b)) + opt + F_dp``
with ``plain(b)`` the modelled bf16 model, ``W`` the whole-model wrapper line, ``X_dp`` the runtime's
excess line, ``F_dp`` the per-step overhead and ``k`` checkpointed layers adding ``recompute(b)`` each (see
:meth:`CostModel.breakdown` for the terms of a plan).
The usable memory is ``memory * usable_fraction - reserved`` (allocator fragmentation, CUDA context).

Example:
    >>> from hf_ext.accelerate.autoparallel.shapes import get_shape
    >>> cm = CostModel(get_shape("llama3-8b"), HardwareProfile.h100(), TrainingSpec(global_batch=64, seq_len=4096))
    >>> cfg = ParallelConfig(gpus=8, pp=1, tp=1, sp=False, micro_batch=1, num_micro_batches=8, dp_type="fsdp")
    >>> c = cm.evaluate(cfg, [[LayerStrategy(3, True)] * 32])
    >>> 0 < c.step_ms and c.max_memory_gb < 80
    True
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from hf_ext.accelerate.autoparallel.profiler import HardwareProfile, ModelProfile, analytic_layer_act_bytes
from hf_ext.accelerate.autoparallel.shapes import ModelShape

DP_TYPES = ("ddp", "fsdp")
# Attention implementations the memory model knows. Only sdpa gets a dense [b, 1, s, s] mask from transformers;
# flash-attention masks inside the kernel and flex builds a block mask of O((s / 128)^2) entries.
ATTN_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


def _is_int(v: Any) -> bool:
    """An int (numpy ints included), not a ``bool``."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


@dataclass(frozen=True)
class LayerStrategy:
    """Per-layer choice: ZeRO stage (0, 2 or 3) and activation checkpointing."""

    zero: int = 3
    ckpt: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.zero, bool) or self.zero not in (0, 2, 3):
            raise ValueError(f"LayerStrategy.zero must be one of 0, 2, 3, got {self.zero!r}")
        if not isinstance(self.ckpt, bool):
            raise ValueError(f"LayerStrategy.ckpt must be True or False, got {self.ckpt!r}")

    @property
    def label(self) -> str:
        return f"z{self.zero}" + ("+ckpt" if self.ckpt else "")


@dataclass(frozen=True)
class ParallelConfig:
    """Plan-level parallel degrees (see the module docstring)."""

    gpus: int
    pp: int
    tp: int
    sp: bool
    micro_batch: int
    num_micro_batches: int
    dp_type: str

    def __post_init__(self) -> None:
        for f in ("gpus", "pp", "tp", "micro_batch", "num_micro_batches"):
            if not _is_int(getattr(self, f)) or getattr(self, f) < 1:  # int() took 1.5 as 1
                raise ValueError(f"ParallelConfig.{f} must be an int >= 1, got {getattr(self, f)!r}")
        if not isinstance(self.sp, bool):
            raise ValueError(f"ParallelConfig.sp must be True or False, got {self.sp!r}")
        if self.gpus % (self.pp * self.tp):
            raise ValueError(
                f"ParallelConfig: gpus={self.gpus} must be divisible by pp*tp={self.pp * self.tp}"
            )
        if self.dp_type not in DP_TYPES:
            raise ValueError(f"ParallelConfig.dp_type must be one of {DP_TYPES}, got {self.dp_type!r}")

    @property
    def dp(self) -> int:
        return self.gpus // (self.pp * self.tp)

    def layer_strategies(self) -> list[LayerStrategy]:
        """The per-layer strategies this config allows."""
        if self.dp_type == "ddp" or self.dp == 1:
            zs = (0,)
        else:
            zs = (2, 3)
        return [LayerStrategy(z, c) for z in zs for c in (False, True)]


@dataclass(frozen=True)
class TrainingSpec:
    """What is trained: global batch (sequences), sequence length and byte sizes."""

    global_batch: int
    seq_len: int
    state_bytes_per_param: float = field(
        default=16.0, metadata={"help": "fp32 master + fp32 grad + Adam m, v"}
    )
    compute_bytes_per_param: float = field(default=2.0, metadata={"help": "bf16 compute copy of a weight"})
    grad_reduce_bytes: float = field(default=4.0, metadata={"help": "bytes per gradient element reduced"})
    act_bytes_per_elem: float = field(default=2.0, metadata={"help": "activation dtype size (bf16)"})
    logit_bytes: float = field(
        default=12.0,
        metadata={
            "help": "peak bytes per logit of the LM head + loss: forward bf16 logits + fp32 upcast + fp32 "
            "log-softmax (10), backward saved log-softmax + fp32 NLL grad + fp32 log-softmax grad (12)"
        },
    )
    optimizer_bytes_per_param: float = field(
        default=80.0,
        metadata={"help": "HBM traffic of a foreach AdamW step per fp32 parameter when not profiled"},
    )
    attn_implementation: str = field(
        default="sdpa",
        metadata={
            "help": "the model's attention kernel (one of ATTN_IMPLEMENTATIONS); sdpa gets dense masks"
        },
    )
    padding_mask: bool = field(
        default=False,
        metadata={
            "help": "batches come with a padding attention_mask that has pads (train_step(attention_mask=))"
        },
    )

    def __post_init__(self) -> None:
        for f in ("global_batch", "seq_len"):
            if not _is_int(getattr(self, f)) or getattr(self, f) < 1:
                raise ValueError(f"TrainingSpec.{f} must be an int >= 1, got {getattr(self, f)!r}")
        for f in (
            "state_bytes_per_param",
            "compute_bytes_per_param",
            "grad_reduce_bytes",
            "act_bytes_per_elem",
            "logit_bytes",
            "optimizer_bytes_per_param",
        ):
            v = getattr(self, f)
            if not (isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v >= 0):
                raise ValueError(f"TrainingSpec.{f} must be a finite number >= 0 (bytes), got {v!r}")
        check_attention_options(self.attn_implementation, self.padding_mask, "TrainingSpec")


def check_attention_options(attn_implementation: Any, padding_mask: Any, owner: str) -> None:
    """``ValueError`` naming ``{owner}.attn_implementation`` / ``{owner}.padding_mask`` and their allowed values."""
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"{owner}.attn_implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, got "
            f"{attn_implementation!r}"
        )
    if not isinstance(padding_mask, bool):
        raise ValueError(
            f"{owner}.padding_mask must be True (batches carry a padding attention_mask with pads) or False, "
            f"got {padding_mask!r}"
        )


@dataclass(frozen=True)
class LayerTerms:
    """Cost contributions of one layer: per micro-batch time, per step time, static and per-micro-batch memory."""

    mb_ms: float
    step_ms: float
    static_bytes: float
    act_bytes: float


@dataclass
class PlanCost:
    """Result of :meth:`CostModel.evaluate`."""

    step_ms: float
    stage_mb_ms: list[float]
    stage_step_ms: list[float]
    stage_memory_bytes: list[float]
    usable_bytes: float
    tokens_per_s: float
    mfu: float
    bubble_ms: float
    optimizer_ms: float

    @property
    def max_memory_gb(self) -> float:
        return max(self.stage_memory_bytes) / 2**30

    @property
    def feasible(self) -> bool:
        return max(self.stage_memory_bytes) <= self.usable_bytes


class CostModel:
    """Step time / memory of plans for one model shape on one hardware profile.

    Args:
        shape: the model.
        hardware: device + interconnect (use ``profile.calibrate(hw)`` to use measured compute).
        spec: global batch and sequence length.
        profile: optional measured :class:`ModelProfile` (activation calibration, head activations).
        overlap: fraction of a layer's compute that can hide data-parallel communication.
        overlap_penalty: slowdown of overlapped communication (shared SMs / memory bandwidth).
        usable_fraction, reserved_gb: usable memory = ``memory * usable_fraction - reserved_gb``.
        vocab_parallel: under ``tp > 1`` the embedding and LM head are split over the tp ranks (Megatron's
            vocab-parallel head and loss). ``False``: every tp rank holds and computes them whole, as
            :func:`~hf_ext.accelerate.autoparallel.apply.apply_plan` runs them (it shards the decoder layers
            only).
    """

    def __init__(
        self,
        shape: ModelShape,
        hardware: HardwareProfile,
        spec: TrainingSpec,
        profile: ModelProfile | None = None,
        *,
        overlap: float = 1.0,
        overlap_penalty: float = 0.1,
        usable_fraction: float = 0.92,
        reserved_gb: float = 1.0,
        vocab_parallel: bool = True,
    ) -> None:
        if not 0.0 <= overlap <= 1.0:
            raise ValueError(f"overlap must be in [0, 1], got {overlap}")
        self.shape, self.hw, self.spec, self.profile = shape, hardware, spec, profile
        self.overlap, self.overlap_penalty = overlap, overlap_penalty
        self.usable_fraction, self.reserved_gb = usable_fraction, reserved_gb
        self.vocab_parallel = vocab_parallel
        self.act_calibration = profile.act_calibration if profile is not None else 1.0
        # Measured step costs outside the layers' compute (0 = not measured; see ModelProfile). getattr on a
        # missing profile (None) or on a field an older profile lacks gives the default.
        prof = profile
        # Per-micro-batch terms are c0 + c1 * b' with b' = b * seq_len / profiled seq_len (per token).
        self.optimizer_ns = getattr(prof, "optimizer_ns_per_param", 0.0)
        self.autocast_ns = getattr(prof, "autocast_ns_per_param", 0.0)
        self.autocast_ns_ps = getattr(prof, "autocast_ns_per_param_per_sample", 0.0)
        self.autocast_act = getattr(prof, "autocast_act_ratio", 1.0)
        self.fsdp_ms = getattr(prof, "fsdp_layer_overhead_ms", 0.0)
        self.fsdp_ms_ps = getattr(prof, "fsdp_layer_overhead_ms_per_sample", 0.0)
        self.fsdp_ref_params = float(prof.layers[0].params) if prof is not None and prof.layers else 1.0
        self.mb_overhead = getattr(prof, "micro_batch_overhead_ms", 0.0)
        self.mb_overhead_ps = getattr(prof, "micro_batch_overhead_ms_per_sample", 0.0)
        self.step_overhead = dict(getattr(prof, "step_overhead_ms", None) or {})
        self.recompute_ratio = dict(getattr(prof, "recompute_fwd_ratio", None) or {})
        self.profile_seq_len = getattr(prof, "seq_len", spec.seq_len)
        sizes = getattr(prof, "runtime_micro_batches", None)
        # the largest whole-model probe (profiled sequences); a term that falls with b is held there
        self.probe_max_samples = float(max(sizes)) if sizes else math.inf
        self.layer_params = [float(shape.layer_params())] * shape.num_layers
        if profile is not None and len(profile.layers) == shape.num_layers:
            self.layer_params = [float(lp.params) for lp in profile.layers]

    # -------------------------------------------------------------------------------- primitives
    def usable_bytes(self, memory_gb: float) -> float:
        return memory_gb * 2**30 * self.usable_fraction - self.reserved_gb * 2**30

    def _vocab_tp(self, tp: int) -> int:
        """How many ways the embedding / LM head are split under tensor parallelism ``tp``."""
        return tp if self.vocab_parallel else 1

    def _tp_eff(self, tp: int) -> float:
        # Smaller GEMMs per GPU run less efficiently: -5% per doubling of tp (assumption).
        return 1.0 - 0.05 * math.log2(tp)

    def layer_ms(self, b: int, tp: int, layer: int | None = None) -> tuple[float, float]:
        """Forward and backward ms of decoder layer ``layer`` (``None``: the mean layer; layers differ only
        in their attention window) for ``b`` sequences on a ``tp``-way shard (the profiled lines; without a
        profile the backward is ``bwd_fwd_ratio * fwd``)."""
        return self.hw.layer_ms(self.shape, b, self.spec.seq_len, tp, self._tp_eff(tp), layer)

    def recompute_ms(self, cfg: ParallelConfig, fwd: float) -> float:
        """Recompute time of a checkpointed layer whose plain forward takes ``fwd`` ms: the forward scaled
        by the profiled ``recompute_fwd_ratio[dp_type]`` (recompute under autocast / FSDP hooks and the
        checkpoint bookkeeping, measured; 1.0 when not profiled)."""
        return fwd * self.recompute_ratio.get(cfg.dp_type, 1.0)

    def _samples(self, b: int) -> float:
        """``b`` sequences in units of profiled sequences (per-sample coefficients scale per token)."""
        return b * self.spec.seq_len / max(self.profile_seq_len, 1)

    def _affine(self, c0: float, c1: float, n: float) -> float:
        """``c0 + c1 * n`` for a runtime term fitted between the whole-model probes; a term that falls with
        ``n`` (``c1 < 0``) is not extrapolated past the largest probe but held at its value there (an
        overhead does not keep shrinking: on an H200 the FSDP excess fell from b=1 to b=4, and its line
        went negative at b=8)."""
        return c0 + c1 * (min(n, self.probe_max_samples) if c1 < 0 else n)

    def head_fwd_ms(self, b: int, tp: int) -> float:
        flops = self.shape.head_flops_fwd(b * self.spec.seq_len) / tp
        return flops / (self.hw.achieved_tflops * 1e12 * self._tp_eff(tp)) * 1e3

    def _crosses(self, span: int) -> bool:
        return span > self.hw.gpus_per_node

    def _exposed(self, comm: float, compute: float) -> float:
        hidden = min(comm, self.overlap * compute)
        return comm - hidden + self.overlap_penalty * hidden

    def layer_act_bytes(self, cfg: ParallelConfig, ckpt: bool, layer: int | None = None) -> float:
        """Saved activation bytes of one layer for one micro-batch under ``cfg``.

        ``ddp`` runs bf16 autocast over fp32 weights (fp32 residual stream, per-op casts): its activations
        are scaled by the profiled ``autocast_act_ratio``; checkpointed layers keep only their input. A layer
        that gets a dense sdpa mask (:meth:`layer_has_mask`; ``layer=None``: none) also keeps the additive
        mask sdpa makes from it (:meth:`mask_bias_bytes`) and, for GQA, the k / v copies made for it
        (:meth:`mask_repeat_kv_bytes`) unless it is checkpointed.
        """
        tokens = cfg.micro_batch * self.spec.seq_len
        ac = self.autocast_act if cfg.dp_type == "ddp" else 1.0
        if ckpt:
            x = self.shape.hidden_size * tokens * self.spec.act_bytes_per_elem / (cfg.tp if cfg.sp else 1)
            return x * (2.0 if ac > 1.0 else 1.0)  # autocast keeps the residual stream in fp32
        rep, shd = analytic_layer_act_bytes(self.shape, tokens)
        act = ac * self.act_calibration * (rep / (cfg.tp if cfg.sp else 1) + shd / cfg.tp)
        if layer is not None and self.layer_has_mask(layer):
            act += self.mask_bias_bytes(cfg) + self.mask_repeat_kv_bytes(cfg)
        return act

    # ------------------------------------------------------------------------------ attention masks
    def _sliding(self, layer: int) -> bool:
        return self.shape.sliding_window is not None and layer in self.shape.sliding_layers

    def layer_has_mask(self, layer: int) -> bool:
        """Whether transformers gives decoder layer ``layer`` a dense ``[b, 1, s, s]`` mask for one micro-batch
        (no cache, queries = keys = ``s``). Only under sdpa (``TrainingSpec.attn_implementation``), as
        ``masking_utils.sdpa_mask`` decides: with a padding mask that has pads (``TrainingSpec.padding_mask``) on
        every layer; without one on a sliding-window layer when ``s >= w``; otherwise sdpa runs with
        ``is_causal=True`` and no mask tensor."""
        if self.spec.attn_implementation != "sdpa":
            return False
        if self.spec.padding_mask:
            return True
        return self._sliding(layer) and self.spec.seq_len >= int(self.shape.sliding_window)

    def mask_bool_bytes(self, cfg: ParallelConfig, stage_layers: list[int]) -> float:
        """Bytes of the boolean masks built for one micro-batch's forward of a stage with ``stage_layers``.

        One mask per kind of masked layer on the stage (full causal, sliding window), shared by all layers of
        that kind, 1 byte per element. With a padding mask it is a real ``[b, 1, s, s]`` tensor. Without one
        (a sliding-window mask) transformers builds ``[1, 1, s, s]`` and expands it over the batch (a view),
        so it holds ``s * s`` bytes whatever ``b``. The pipeline stage module builds its own, per micro-batch,
        with ``create_causal_mask``: counted on every stage the same way.
        """
        s = float(self.spec.seq_len)
        kinds = {self._sliding(i) for i in stage_layers if self.layer_has_mask(i)}
        rows = cfg.micro_batch if self.spec.padding_mask else 1
        return len(kinds) * rows * s * s

    def mask_bias_bytes(self, cfg: ParallelConfig) -> float:
        """Bytes one masked layer keeps for the backward: torch's sdpa turns a boolean mask into an additive
        one in the query's dtype (bf16 under the runtime's autocast and FSDP2 alike), ``[b, 1, s, s]``
        materialised over the batch, and its fused kernels save it for the backward. Not split by ``tp`` or
        ``sp`` (every rank attends over the whole sequence with the same mask)."""
        s = float(self.spec.seq_len)
        return cfg.micro_batch * s * s * self.spec.act_bytes_per_elem

    def mask_repeat_kv_bytes(self, cfg: ParallelConfig) -> float:
        """Extra bytes one masked layer of a GQA model keeps: given a mask, transformers' sdpa path does not use
        sdpa's ``enable_gqa`` (``use_gqa_in_sdpa`` needs ``attention_mask is None`` on CUDA) but copies k and v
        to every query head (``repeat_kv``), and sdpa saves those copies: ``2 * (q_dim - kv_dim)`` more
        elements per token than the analytic formula's k / v, split by ``tp`` like the heads."""
        extra = 2.0 * (self.shape.q_dim - self.shape.kv_dim) * self.spec.act_bytes_per_elem
        return cfg.micro_batch * self.spec.seq_len * extra / cfg.tp

    def mixed_precision_ms(
        self, cfg: ParallelConfig, params: float, unit_zero: int = 3, layer: bool = True
    ) -> float:
        """Per-micro-batch runtime excess of a unit of ``params`` local parameters (profiled; 0 if not).

        ``c0 + c1 * b'`` (``b'``: ``cfg.micro_batch`` in profiled sequences), the per-sequence part ``c1``
        only for decoder layers (``layer=True``). ``ddp``: autocast casts every fp32 weight to bf16 and
        accumulates fp32 gradients each micro-batch (``autocast_ns_per_param``), casts activations and keeps
        the residual stream in fp32 (``autocast_ns_per_param_per_sample``). ``fsdp``: FSDP2 copy-in/out of
        the all-gathers, the reduce-scatter copy, gradient accumulation and hooks, scaled from the profiled
        layer by parameter count (``fsdp_layer_overhead_ms`` is for ``reshard_after_forward=True``: 2
        all-gathers + 1 reduce-scatter; units without reshard do 1 + 1, i.e. 2/3 of it), plus
        ``fsdp_layer_overhead_ms_per_sample``. Not clamped: the coefficients come from a line through
        non-negative measured excesses, so their sum over a model is exact at the profiled sizes; past the
        largest probe a falling line is held (:meth:`_affine`).
        """
        n = self._samples(cfg.micro_batch) if layer else 0.0
        if cfg.dp_type == "ddp":
            return params * self._affine(self.autocast_ns, self.autocast_ns_ps, n) * 1e-6
        frac = 1.0 if unit_zero != 2 else 2.0 / 3.0
        return self._affine(self.fsdp_ms * frac, self.fsdp_ms_ps, n) * params / max(self.fsdp_ref_params, 1.0)

    def layer_terms(
        self, cfg: ParallelConfig, strat: LayerStrategy, layer: int = 0, parts: dict[str, float] | None = None
    ) -> LayerTerms:
        """Costs of decoder layer ``layer`` under ``cfg`` and ``strat``.

        ``parts``, if given, accumulates the per-micro-batch ms by term (see :meth:`breakdown`)."""
        sp_, t, d, b = self.spec, cfg.tp, cfg.dp, cfg.micro_batch
        p_local = self.layer_params[layer] / t
        fwd, bwd = self.layer_ms(b, t, layer)
        rec = self.recompute_ms(cfg, fwd) if strat.ckpt else 0.0
        comp = fwd + bwd + rec
        extra = self.mixed_precision_ms(cfg, p_local, strat.zero)
        mb = comp + extra
        _add(parts, layers_fwd=fwd, layers_bwd=bwd, recompute=rec, layers_runtime=extra)
        if t > 1:  # o_proj / down_proj outputs and q/k/v, gate/up input grads: h wide whatever head_dim
            msg = b * sp_.seq_len * self.shape.hidden_size * sp_.act_bytes_per_elem
            n = 4 + (2 if strat.ckpt else 0)
            tpc = n * self.hw.collective_ms("all_reduce", msg, t, self._crosses(t))
            mb += tpc
            _add(parts, tp_comm=tpc)
        step = 0.0
        dp_cross = self._crosses(t * d)
        if strat.zero == 0:
            static = sp_.state_bytes_per_param * p_local
            act = self.layer_act_bytes(cfg, strat.ckpt, layer)
            if not strat.ckpt and cfg.dp_type == "ddp":  # autocast keeps a bf16 copy of each weight
                act += sp_.compute_bytes_per_param * p_local
            if d > 1:
                ar = self.hw.collective_ms("all_reduce", sp_.grad_reduce_bytes * p_local, d, dp_cross)
                step = self._exposed(ar, bwd)
        else:
            static = sp_.state_bytes_per_param * p_local / d
            if strat.zero == 2:
                static += sp_.compute_bytes_per_param * p_local
            act = self.layer_act_bytes(cfg, strat.ckpt, layer)
            if d > 1:
                ag = self.hw.collective_ms("all_gather", sp_.compute_bytes_per_param * p_local, d, dp_cross)
                rs = self.hw.collective_ms("reduce_scatter", sp_.grad_reduce_bytes * p_local, d, dp_cross)
                comm = (2 if strat.zero == 3 else 1) * ag + rs
                exposed = self._exposed(comm, comp)
                mb += exposed
                _add(parts, fsdp_comm=exposed)
        return LayerTerms(mb, step, static, act)

    def stage_constant(
        self, cfg: ParallelConfig, stage: int, stage_layers: list[int], parts: dict[str, float] | None = None
    ) -> LayerTerms:
        """Costs of stage ``stage`` that do not depend on per-layer choices (embedding, head, p2p, transients).

        ``parts``, if given, accumulates the per-micro-batch ms by term (see :meth:`breakdown`)."""
        sp_, t, d, b, p = self.spec, cfg.tp, cfg.dp, cfg.micro_batch, cfg.pp
        first, last = stage == 0, stage == p - 1
        ve = self.shape.vocab_size * self.shape.hidden_size
        params = 0.0
        if first:
            params += ve
        if last:
            if not (first and self.shape.tie_word_embeddings):
                params += ve
            params += self.shape.hidden_size
        vt = self._vocab_tp(t)
        p_local = params / vt
        zero = 0 if cfg.dp_type == "ddp" or d == 1 else 3
        mb = step = 0.0
        static = sp_.state_bytes_per_param * p_local / (1 if zero == 0 else d)
        transient = 0.0
        prof = self.profile
        same = (
            prof is not None
            and prof.seq_len == sp_.seq_len
            and prof.shape.vocab_size == self.shape.vocab_size
        )
        if first and same and prof.embed is not None:  # dense [V, h] embedding gradient every micro-batch
            emb = (prof.embed.fwd_ms(b) + prof.embed.bwd_ms(b)) / vt
            mb += emb
            _add(parts, embed=emb)
        if first and same:
            # Whole-model wrapper overhead per micro-batch (a line in b); a negative value (isolated-layer
            # launch overhead hidden in the full model) may cancel at most the fitted per-layer fixed overhead.
            cap = (
                (self.hw.per_layer_overhead_ms + self.hw.layer_bwd_overhead_ms()) * self.shape.num_layers / p
            )
            wrap = max(self._affine(self.mb_overhead, self.mb_overhead_ps, self._samples(b)), -cap)
            mb += wrap
            _add(parts, micro_batch_overhead=wrap)
        if last:
            if same:
                head_comp = (prof.head.fwd_ms(b) + prof.head.bwd_ms(b)) / (vt * self._tp_eff(vt))
            else:
                head_comp = self.head_fwd_ms(b, vt) * (1 + self.hw.bwd_fwd_ratio)
            mb += head_comp
            _add(parts, head=head_comp)
            # LM head + loss peak, live on top of every saved activation: logits in bf16, their fp32
            # upcast and the fp32 log-softmax / gradients (``logit_bytes`` per logit), plus the head input.
            tokens = b * sp_.seq_len
            logits = tokens * self.shape.vocab_size / vt
            transient += logits * sp_.logit_bytes
            transient += tokens * self.shape.hidden_size * 6.0 / (t if cfg.sp else 1)
            if vt > 1:  # vocab-parallel loss: small all-reduces of max / sum-exp, and the input all-reduce
                msg = b * sp_.seq_len * self.shape.hidden_size * sp_.act_bytes_per_elem
                vc = 2 * self.hw.collective_ms("all_reduce", msg, t, self._crosses(t))
                mb += vc
                _add(parts, tp_comm=vc)
        else:
            head_comp = 0.0
        if d > 1 and params:
            cross = self._crosses(t * d)
            if zero == 0:
                ar = self.hw.collective_ms("all_reduce", sp_.grad_reduce_bytes * p_local, d, cross)
                step += self._exposed(ar, head_comp * 0.67)
            else:
                ag = self.hw.collective_ms("all_gather", sp_.compute_bytes_per_param * p_local, d, cross)
                rs = self.hw.collective_ms("reduce_scatter", sp_.grad_reduce_bytes * p_local, d, cross)
                # the root unit is not resharded after forward (FSDP2's root default): one all-gather
                exposed = self._exposed(ag + rs, head_comp)
                mb += exposed
                _add(parts, fsdp_comm=exposed)
        # autocast copy (ddp) / unsharded root (fsdp: FSDP2 keeps the root gathered from its forward to the end
        # of its backward, whatever dp) of embedding / head
        transient += sp_.compute_bytes_per_param * p_local
        root = self.mixed_precision_ms(cfg, p_local, 2, layer=False)
        mb += root
        _add(parts, root_runtime=root)
        if p > 1:
            msg = b * sp_.seq_len * self.shape.hidden_size * sp_.act_bytes_per_elem / (t if cfg.sp else 1)
            p2p = 2 * self.hw.collective_ms("p2p", msg, 2, self._crosses(t * d * 2))
            mb += p2p
            _add(parts, p2p=p2p)
        # Transients: one layer's full activations (recompute / backward), two unsharded FSDP layers.
        if stage_layers:
            transient += max(self.layer_act_bytes(cfg, False, i) for i in stage_layers)
            # sdpa's boolean masks of each in-flight micro-batch: a checkpointed layer's recompute keeps them
            # until its backward (counted whether or not a layer is checkpointed: the DP prices layers one by one)
            transient += self.inflight(cfg, stage) * self.mask_bool_bytes(cfg, stage_layers)
            if cfg.dp_type == "fsdp":
                pl = max(self.layer_params[i] for i in stage_layers) / t
                transient += 2 * pl * (sp_.compute_bytes_per_param + sp_.grad_reduce_bytes)
        return LayerTerms(mb, step, static + transient, 0.0)

    def optimizer_ms(
        self,
        cfg: ParallelConfig,
        stage_layers: list[int],
        strategies: list[LayerStrategy],
        stage: int | None = None,
    ) -> float:
        """AdamW step on the local shard (layers, plus embedding / head on the first / last stage).

        Uses the profiled ``optimizer_ns_per_param`` (a timed ``AdamW(foreach=True)`` step) when
        available, else ``optimizer_bytes_per_param`` of HBM traffic (the foreach kernels read and write
        parameters, gradients, both moments and a temporary: ~80 bytes per fp32 parameter).
        """
        local = 0.0
        for i, st in zip(stage_layers, strategies):
            local += self.layer_params[i] / cfg.tp / (1 if st.zero == 0 else cfg.dp)
        if stage is not None:
            ve = self.shape.vocab_size * self.shape.hidden_size
            extra = (ve if stage == 0 else 0.0) + (
                (0.0 if stage == 0 and self.shape.tie_word_embeddings else ve) + self.shape.hidden_size
                if stage == cfg.pp - 1
                else 0.0
            )
            shard = 1 if cfg.dp_type == "ddp" or cfg.dp == 1 else cfg.dp
            local += extra / self._vocab_tp(cfg.tp) / shard
        if self.optimizer_ns > 0:
            return local * self.optimizer_ns * 1e-6
        return local * self.spec.optimizer_bytes_per_param / (self.hw.hbm_GBps * 1e9) * 1e3

    @staticmethod
    def inflight(cfg: ParallelConfig, stage: int) -> int:
        """Micro-batches whose activations stage ``stage`` holds at once under 1F1B."""
        return min(cfg.num_micro_batches, cfg.pp - stage)

    @staticmethod
    def pipeline_ms(stage_mb: list[float], stage_step: list[float], m: int) -> tuple[float, float]:
        """1F1B step time and bubble from per-micro-batch stage times and per-step tails."""
        busy = sum(stage_mb) + (m - 1) * max(stage_mb)
        return busy + max(stage_step), sum(stage_mb) - max(stage_mb)

    # ----------------------------------------------------------------------------------- evaluate
    def evaluate(
        self, cfg: ParallelConfig, stages: list[list[LayerStrategy]], memory_gb: float | None = None
    ) -> PlanCost:
        """Cost of a full plan: ``stages[i]`` lists the strategies of the consecutive layers of stage ``i``."""
        if len(stages) != cfg.pp:
            raise ValueError(f"stages has {len(stages)} entries but pp={cfg.pp}")
        if sum(len(s) for s in stages) != self.shape.num_layers:
            raise ValueError(
                f"stages cover {sum(len(s) for s in stages)} layers, model has {self.shape.num_layers}"
            )
        memory_gb = self.hw.memory_gb if memory_gb is None else memory_gb
        start = 0
        mb_ms, step_ms, mem, opt = [], [], [], []
        for i, strs in enumerate(stages):
            idx = list(range(start, start + len(strs)))
            start += len(strs)
            const = self.stage_constant(cfg, i, idx)
            k = self.inflight(cfg, i)
            t_mb, t_step, m_b = const.mb_ms, const.step_ms, const.static_bytes
            for li, st in zip(idx, strs):
                lt = self.layer_terms(cfg, st, li)
                t_mb += lt.mb_ms
                t_step += lt.step_ms
                m_b += lt.static_bytes + k * lt.act_bytes
            mb_ms.append(t_mb)
            step_ms.append(t_step)
            mem.append(m_b)
            opt.append(self.optimizer_ms(cfg, idx, strs, i))
        pipe, bubble = self.pipeline_ms(mb_ms, step_ms, cfg.num_micro_batches)
        # Profiled per-step runtime cost that does not grow with micro-batches (0 if not measured).
        total = pipe + max(opt) + self.step_overhead.get(cfg.dp_type, 0.0)
        tokens = self.spec.global_batch * self.spec.seq_len
        flops = 3 * (
            self.shape.layer_flops_fwd(tokens, self.spec.seq_len) * self.shape.num_layers  # the mean layer
            + self.shape.head_flops_fwd(tokens)
        )
        mfu = flops / (total * 1e-3) / (cfg.gpus * self.hw.peak_tflops * 1e12)
        return PlanCost(
            total,
            mb_ms,
            step_ms,
            mem,
            self.usable_bytes(memory_gb),
            tokens / (total * 1e-3),
            mfu,
            bubble,
            max(opt),
        )

    def breakdown(self, cfg: ParallelConfig, stages: list[list[LayerStrategy]]) -> dict[str, float]:
        """The terms of :meth:`evaluate`'s step time (ms per step), to diagnose a prediction.

        Per-micro-batch terms of the slowest stage times ``m``: ``layers_fwd``, ``layers_bwd``,
        ``recompute`` (checkpointed layers), ``layers_runtime`` (the runtime's excess on the layers:
        autocast / FSDP2), ``embed``, ``head``, ``micro_batch_overhead`` (whole-model wrapper),
        ``root_runtime`` (runtime excess of embedding / head), ``tp_comm``, ``fsdp_comm`` (exposed), ``p2p``;
        then ``pipeline_bubble`` (1F1B), ``grad_sync`` (exposed DDP all-reduce tail), ``optimizer``,
        ``step_overhead`` (profiled per-step runtime cost) and ``total`` (= ``evaluate(...).step_ms``).
        """
        cost = self.evaluate(cfg, stages)
        slow = max(range(cfg.pp), key=lambda i: cost.stage_mb_ms[i])
        start = sum(len(s) for s in stages[:slow])
        idx = list(range(start, start + len(stages[slow])))
        per_mb: dict[str, float] = {}
        self.stage_constant(cfg, slow, idx, per_mb)
        for li, st in zip(idx, stages[slow]):
            self.layer_terms(cfg, st, li, per_mb)
        m = cfg.num_micro_batches
        out = {k: m * v for k, v in per_mb.items()}
        out["pipeline_bubble"] = cost.bubble_ms
        out["grad_sync"] = max(cost.stage_step_ms)
        out["optimizer"] = cost.optimizer_ms
        out["step_overhead"] = self.step_overhead.get(cfg.dp_type, 0.0)
        out["total"] = cost.step_ms
        return out


def _add(parts: dict[str, float] | None, **terms: float) -> None:
    """Accumulate ``terms`` into ``parts`` (no-op for ``None``)."""
    if parts is not None:
        for k, v in terms.items():
            parts[k] = parts.get(k, 0.0) + v
