"""Search: the fastest hybrid-parallel plan under a per-GPU memory budget (Galvatron-style).

For every plan-level configuration -- tensor-parallel degree (powers of two inside a node, dividing the
KV heads), pipeline degree, data-parallel family (ddp / fsdp), micro-batch size and so micro-batch count,
sequence parallelism -- and every candidate split of the layers into pipeline stages, a dynamic program
over the layers of each stage picks one :class:`LayerStrategy` per layer (ZeRO 2/3, checkpointing) that
minimises the stage's busy time ``m * t_i + e_i`` subject to the stage's memory, discretised in
buckets of ``granularity`` bytes (rounded *up*, so a DP-feasible plan is feasible for the cost model).

Pruning (the decision tree): degrees that do not divide the GPUs / heads / batch are never built; a
1F1B pipeline needs ``m >= pp``; sequence parallelism is always taken when ``tp > 1`` (same traffic,
less memory: it dominates); a configuration whose lowest-memory
assignment exceeds the budget is skipped before its DP; a configuration whose compute-only lower
bound cannot beat the k-th best plan found so far is skipped (branch and bound).

For ``pp == 1`` the search is exact for the cost model. For ``pp > 1`` each stage is solved exactly
for its own busy time and the step time is evaluated with the 1F1B formula; stage splits are
the even split and its shifts around the embedding / head stages (all splits with
``exhaustive_partitions=True``).

Example:
    >>> res = search("llama3-8b", SearchConfig(gpus=8, memory_gb=80, global_batch=64, seq_len=4096))
    >>> res.best.predicted["step_ms"] > 0 and res.best.gpus == 8
    True
"""

from __future__ import annotations

import heapq
import itertools
import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hf_ext.accelerate.autoparallel.cost_model import (
    ATTN_IMPLEMENTATIONS,
    DP_TYPES,
    CostModel,
    LayerStrategy,
    ParallelConfig,
    PlanCost,
    TrainingSpec,
    check_attention_options,
)
from hf_ext.accelerate.autoparallel.plan import Plan
from hf_ext.accelerate.autoparallel.profiler import HardwareProfile, ModelProfile
from hf_ext.accelerate.autoparallel.shapes import ModelShape, get_shape


class NoFeasiblePlanError(ValueError):
    """No plan fits the memory budget; ``min_memory_gb`` is the smallest per-GPU memory that would."""

    def __init__(self, memory_gb: float, min_memory_gb: float, detail: str = "") -> None:
        self.memory_gb, self.min_memory_gb = memory_gb, min_memory_gb
        msg = (
            f"no feasible plan: gpu_memory={memory_gb:g} GB is too small; the smallest per-GPU memory "
            f"that fits any plan in the search space is {min_memory_gb:.2f} GB"
        )
        super().__init__(msg + (f" ({detail})" if detail else ""))


def _is_real(v: Any) -> bool:
    """A real number (numpy scalars included) that is not a ``bool`` or a string."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _check_int_field(name: str, v: Any, allowed: str = "an int >= 1") -> int:
    """``v`` as a Python int (a numpy integer is taken, and the plans built from it stay plain JSON)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise ValueError(f"SearchConfig.{name} must be {allowed}, got {v!r}")
    return int(v)


def _check_sizes_field(name: str, sizes: Any, what: str) -> Any:
    ok = (
        isinstance(sizes, (tuple, list))
        and len(sizes) > 0
        and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in sizes)
    )
    if not ok:
        raise ValueError(f"SearchConfig.{name} must be {what}: a non-empty tuple of ints >= 1, got {sizes!r}")
    return type(sizes)(int(v) for v in sizes)  # Python ints, in the container given


@dataclass
class SearchConfig:
    """What to search over. Every field has a default except ``gpus``."""

    gpus: int = field(metadata={"help": "number of GPUs (world size)"})
    memory_gb: float = field(default=80.0, metadata={"help": "memory per GPU in GiB"})
    global_batch: int | None = field(
        default=None, metadata={"help": "sequences per step (default max(64, gpus))"}
    )
    seq_len: int = field(default=4096, metadata={"help": "tokens per sequence"})
    micro_batch_sizes: tuple[int, ...] = field(
        default=(1, 2, 4, 8), metadata={"help": "micro-batch sizes tried"}
    )
    tp_sizes: tuple[int, ...] | None = field(
        default=None, metadata={"help": "tp degrees (default: powers of 2 in a node)"}
    )
    pp_sizes: tuple[int, ...] | None = field(
        default=None, metadata={"help": "pp degrees (default: all that divide)"}
    )
    dp_types: tuple[str, ...] = field(
        default=DP_TYPES, metadata={"help": "data-parallel families: ddp, fsdp"}
    )
    sequence_parallel: str = field(default="auto", metadata={"help": "auto (with tp>1) | on | off | both"})
    allow_ckpt: bool = field(default=True, metadata={"help": "allow activation checkpointing"})
    top_k: int = field(default=10, metadata={"help": "how many ranked plans to keep"})
    exhaustive_partitions: bool = field(default=False, metadata={"help": "try every pipeline stage split"})
    granularity_bytes: float | None = field(
        default=None,
        metadata={"help": "DP memory bucket (default: params*16/65536, at most 1% of the budget per layer)"},
    )
    attn_implementation: str = field(
        default="sdpa",
        metadata={
            "help": f"the model's attention kernel: {', '.join(ATTN_IMPLEMENTATIONS)} (sdpa: dense masks)"
        },
    )
    padding_mask: bool = field(
        default=False,
        metadata={
            "help": "True when training passes a padding attention_mask with pads (train_step(attention_mask=)): "
            "under sdpa every layer then gets a dense [b, 1, s, s] mask"
        },
    )

    def __post_init__(self) -> None:
        # types first: int() / truthiness used to turn 2.5 into 2, "false" into True and 0 into the default
        self.gpus = _check_int_field("gpus", self.gpus)
        if not (_is_real(self.memory_gb) and math.isfinite(self.memory_gb) and self.memory_gb > 0):
            raise ValueError(
                f"SearchConfig.memory_gb must be a finite number of GiB > 0, got {self.memory_gb!r}"
            )
        self.memory_gb = float(self.memory_gb)
        if self.global_batch is None:
            self.global_batch = max(64, self.gpus)
        self.global_batch = _check_int_field(
            "global_batch", self.global_batch, "None (max(64, gpus)) or an int >= 1"
        )
        self.seq_len = _check_int_field("seq_len", self.seq_len)
        bad = [d for d in self.dp_types if d not in DP_TYPES]
        if bad or not self.dp_types:
            raise ValueError(
                f"SearchConfig.dp_types must be a non-empty subset of {DP_TYPES}, got {self.dp_types!r}"
            )
        if self.sequence_parallel not in ("auto", "on", "off", "both"):
            raise ValueError(
                f"SearchConfig.sequence_parallel must be auto, on, off or both, got {self.sequence_parallel!r}"
            )
        self.micro_batch_sizes = _check_sizes_field(
            "micro_batch_sizes", self.micro_batch_sizes, "the micro-batch sizes to try"
        )
        for name in ("tp_sizes", "pp_sizes"):
            sizes = getattr(self, name)
            if sizes is not None:
                setattr(self, name, _check_sizes_field(name, sizes, "None (auto) or the degrees to try"))
        for name in ("allow_ckpt", "exhaustive_partitions"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"SearchConfig.{name} must be True or False, got {getattr(self, name)!r}")
        self.top_k = _check_int_field("top_k", self.top_k)
        g = self.granularity_bytes
        if g is not None and not (_is_real(g) and math.isfinite(g) and g > 0):
            raise ValueError(
                f"SearchConfig.granularity_bytes must be None (the default bucket) or a finite number of bytes "
                f"> 0, got {g!r}"
            )
        check_attention_options(self.attn_implementation, self.padding_mask, "SearchConfig")


@dataclass
class SearchResult:
    """Best plan, ranked alternatives (best first) and search statistics."""

    best: Plan
    ranked: list[Plan]
    evaluated: int
    pruned: int
    seconds: float


def dp_over_layers(costs: np.ndarray, mems: np.ndarray, budget: int) -> tuple[float, list[int]] | None:
    """Min-cost choice of one strategy per layer with total memory <= ``budget``.

    Args:
        costs: ``[L, S]`` cost of strategy ``s`` on layer ``l``.
        mems: ``[L, S]`` non-negative integer memory (buckets).
        budget: integer memory budget (buckets).

    Returns:
        ``(cost, choices)`` or ``None`` when infeasible. ``O(L * S * budget)`` with numpy.
    """
    n_l, n_s = costs.shape
    if budget < 0:
        return None
    f = np.zeros(budget + 1)
    arg = np.zeros((n_l, budget + 1), dtype=np.int16)
    for li in range(n_l):
        new = np.full(budget + 1, np.inf)
        for s in range(n_s):
            m = int(mems[li, s])
            if m > budget:
                continue
            cand = f[: budget + 1 - m] + costs[li, s]
            better = cand < new[m:]
            new[m:][better] = cand[better]
            arg[li, m:][better] = s
        f = new
    if not np.isfinite(f[budget]):
        return None
    choices = [0] * n_l
    v = budget
    for li in range(n_l - 1, -1, -1):
        s = int(arg[li, v])
        choices[li] = s
        v -= int(mems[li, s])
    return float(f[budget]), choices


def candidate_partitions(
    n_layers: int, pp: int, exhaustive: bool = False, head_layers: float = 0.0
) -> list[list[int]]:
    """Stage sizes to try: even split, shifts of up to 2 layers off the first/last stage, a head-balanced split."""
    if pp == 1:
        return [[n_layers]]
    if exhaustive:
        out = []
        for cuts in itertools.combinations(range(1, n_layers), pp - 1):
            b = (0, *cuts, n_layers)
            out.append([b[i + 1] - b[i] for i in range(pp)])
        return out
    cands: set[tuple[int, ...]] = set()

    def spread(total: int, k: int) -> list[int]:
        return [total // k + (1 if i < total % k else 0) for i in range(k)]

    base = spread(n_layers, pp)
    cands.add(tuple(base))
    for a in range(3):
        for c in range(3):
            first, last = base[0] - a, base[-1] - c
            if first < 1 or last < 1:
                continue
            rest = n_layers - first - last
            if pp == 2:
                if rest == 0:
                    cands.add((first, last))
                continue
            mid = spread(rest, pp - 2)
            if min(mid) >= 1:
                cands.add((first, *mid, last))
    if head_layers > 0:  # balance compute counting the head as extra layers on the last stage
        tot = n_layers + head_layers
        per = tot / pp
        sizes = [max(1, round(per))] * (pp - 1)
        last = n_layers - sum(sizes)
        while last < 1:
            sizes[sizes.index(max(sizes))] -= 1
            last += 1
        cands.add((*sizes, last))
    return [list(c) for c in sorted(cands) if min(c) >= 1 and sum(c) == n_layers]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def search(
    model: str | ModelShape | Any,
    config: SearchConfig,
    *,
    hardware: HardwareProfile | None = None,
    profile: ModelProfile | None = None,
    cost_kwargs: dict[str, Any] | None = None,
) -> SearchResult:
    """Search the best plan for ``model`` (shape name, config.json path, transformers config or shape).

    Raises:
        NoFeasiblePlanError: nothing fits ``config.memory_gb`` (the message gives the smallest memory needed).
        ValueError: unknown model shape or inconsistent settings.
    """
    t0 = time.perf_counter()
    shape = get_shape(model)
    hw = hardware or HardwareProfile.h100()
    if profile is not None:
        hw = profile.calibrate(hw)
    spec = TrainingSpec(
        global_batch=int(config.global_batch),
        seq_len=int(config.seq_len),
        attn_implementation=config.attn_implementation,
        padding_mask=config.padding_mask,
    )
    cm = CostModel(shape, hw, spec, profile, **(cost_kwargs or {}))
    n_layers, gpus = shape.num_layers, config.gpus
    usable = cm.usable_bytes(config.memory_gb)
    # Each layer's memory is rounded up to a bucket, so a stage can lose up to (its layers) x bucket of the
    # budget: the default bucket keeps that under 1% of it (params*16/65536 alone lost up to 12 GB on 405B).
    gran = config.granularity_bytes or max(
        1.0, min(shape.num_params() * 16.0 / 65536, 0.01 * usable / max(n_layers, 1))
    )

    if config.tp_sizes is not None:
        tps = sorted({int(t) for t in config.tp_sizes})
    else:
        tps = [t for t in (1, 2, 4, 8, 16) if t <= hw.gpus_per_node and shape.num_kv_heads % t == 0]

    def why_not(t: int) -> str:
        if gpus % t:
            return f"tp={t} does not divide gpus={gpus}"
        if shape.num_heads % t:
            return f"tp={t} does not divide the {shape.num_heads} attention heads of {shape.name}"
        if shape.num_kv_heads % t:  # the k / v projections would be split inside a head
            return f"tp={t} does not divide the {shape.num_kv_heads} key/value heads of {shape.name}"
        return ""

    reasons = {t: why_not(t) for t in tps}
    rejected = [r for r in reasons.values() if r]
    tps = [t for t, r in reasons.items() if not r]
    if not tps:
        raise ValueError(
            f"no usable tensor-parallel degree in tp_sizes={config.tp_sizes}: "
            + "; ".join(rejected)
            + "; pick tp sizes that divide the GPU count and the attention and key/value heads"
        )
    heap: list[tuple[float, int, Plan]] = []  # max-heap by -step_ms of the top_k
    counter = itertools.count()
    evaluated = pruned = 0
    min_need = math.inf
    stage_cache: dict[tuple, tuple[float, list[LayerStrategy], float] | None] = {}

    def kth_best() -> float:
        return -heap[0][0] if len(heap) >= config.top_k else math.inf

    for tp in tps:
        pps = config.pp_sizes if config.pp_sizes is not None else _divisors(gpus // tp)
        for pp in sorted({int(p) for p in pps}):
            if (gpus // tp) % pp or pp > n_layers:
                continue
            dp = gpus // (tp * pp)
            # ddp and fsdp stay distinct at dp == 1: the runtimes differ (autocast over fp32 weights vs FSDP2
            # bf16 params, no autocast weight copies held), and so do their cost-model times and memory
            dtypes = tuple(config.dp_types)
            sps = {"auto": (tp > 1,), "on": (True,), "off": (False,), "both": (False, True)}[
                config.sequence_parallel
            ]
            for dtype, b, sp in itertools.product(
                dtypes, sorted(set(config.micro_batch_sizes)), sorted(set(sps))
            ):
                if sp and tp == 1:
                    continue
                if spec.global_batch % (dp * b):
                    continue
                m = spec.global_batch // (dp * b)
                if pp > 1 and m < pp:
                    continue
                cfg = ParallelConfig(gpus, pp, tp, sp, b, m, dtype)
                strats = [s for s in cfg.layer_strategies() if config.allow_ckpt or not s.ckpt]
                terms = _layer_terms(cm, cfg, strats)
                head_layers = cm.head_fwd_ms(b, tp) * 3 / max(terms[0][0][0].mb_ms, 1e-12) if pp > 1 else 0.0
                for sizes in candidate_partitions(n_layers, pp, config.exhaustive_partitions, head_layers):
                    res = _solve_partition(
                        cm, cfg, strats, terms, sizes, usable, gran, stage_cache, kth_best()
                    )
                    kind = res[0]
                    if kind == "infeasible":
                        min_need = min(min_need, res[1])
                        pruned += 1
                        continue
                    if kind == "bound":
                        pruned += 1
                        continue
                    stages = res[1]
                    evaluated += 1
                    cost = cm.evaluate(cfg, stages, config.memory_gb)
                    if not cost.feasible:  # cannot happen: buckets round up
                        continue
                    plan = _make_plan(shape, cfg, stages, cost, spec, hw, config.memory_gb)
                    # the heap's top is the slowest plan kept, and of equally slow ones the last found
                    item = (-cost.step_ms, -next(counter), plan)
                    if len(heap) < config.top_k:
                        heapq.heappush(heap, item)
                    elif cost.step_ms < -heap[0][0]:
                        heapq.heapreplace(heap, item)
    if not heap:
        if not math.isfinite(min_need):
            raise ValueError(
                f"no configuration in the search space: gpus={gpus}, global_batch={spec.global_batch}, "
                f"micro_batch_sizes={config.micro_batch_sizes}, tp_sizes={tps}; make global_batch a multiple of "
                "the data-parallel degree times a micro-batch size"
            )
        need_gb = (min_need + cm.reserved_gb * 2**30) / cm.usable_fraction / 2**30
        raise NoFeasiblePlanError(
            config.memory_gb,
            need_gb,
            f"{shape.name} on {gpus} GPUs, global_batch={spec.global_batch}, seq_len={spec.seq_len}",
        )
    ranked = [p for _, _, p in sorted(heap, key=lambda x: (-x[0], -x[1]))]  # ties: first found first
    return SearchResult(ranked[0], ranked, evaluated, pruned, time.perf_counter() - t0)


def _layer_terms(cm: CostModel, cfg: ParallelConfig, strats: list[LayerStrategy]) -> list[list[list[Any]]]:
    """terms[layer][strategy] = [LayerTerms]; layers with equal parameter counts, attention spans (a
    sliding-window layer attends to fewer keys) and sdpa masks (a masked layer keeps its mask) share entries."""
    by_kind: dict[tuple[float, float, bool], list[Any]] = {}
    out = []
    for li, p in enumerate(cm.layer_params):
        key = (p, cm.shape.attended_keys(cm.spec.seq_len, li), cm.layer_has_mask(li))
        if key not in by_kind:
            by_kind[key] = [[cm.layer_terms(cfg, s, li)] for s in strats]
        out.append(by_kind[key])
    return out


def _solve_partition(
    cm: CostModel,
    cfg: ParallelConfig,
    strats: list[LayerStrategy],
    terms: list,
    sizes: list[int],
    usable: float,
    gran: float,
    cache: dict,
    bound: float,
) -> tuple:
    m = cfg.num_micro_batches
    # Lower bounds first: min time and min memory per stage ignoring the coupling.
    start = 0
    lb_mb, lb_step, need = [], [], 0.0
    consts = []
    for i, n in enumerate(sizes):
        idx = list(range(start, start + n))
        start += n
        c = cm.stage_constant(cfg, i, idx)
        consts.append((idx, c))
        k = cm.inflight(cfg, i)
        lb_mb.append(c.mb_ms + sum(min(t[0].mb_ms for t in terms[li]) for li in idx))
        lb_step.append(c.step_ms + sum(min(t[0].step_ms for t in terms[li]) for li in idx))
        need = max(
            need,
            c.static_bytes
            + sum(min(t[0].static_bytes + k * t[0].act_bytes for t in terms[li]) for li in idx),
        )
    if need > usable:
        return ("infeasible", need)
    lb, _ = cm.pipeline_ms(lb_mb, lb_step, m)
    if lb >= bound:
        return ("bound",)
    stages = []
    for i, (idx, c) in enumerate(consts):
        k = cm.inflight(cfg, i)
        key = (cfg, idx[0], idx[-1], k)
        if key not in cache:
            budget = int(math.floor((usable - c.static_bytes) / gran))
            costs = np.array([[m * t[0].mb_ms + t[0].step_ms for t in terms[li]] for li in idx])
            mems = np.array(
                [
                    [math.ceil((t[0].static_bytes + k * t[0].act_bytes) / gran) for t in terms[li]]
                    for li in idx
                ]
            )
            budget = min(budget, int(mems.max(axis=1).sum()))  # a larger budget changes nothing
            sol = dp_over_layers(costs, mems, budget)
            cache[key] = None if sol is None else [strats[s] for s in sol[1]]
        if cache[key] is None:
            return ("infeasible", need)
        stages.append(cache[key])
    return ("ok", stages)


def _make_plan(
    shape: ModelShape,
    cfg: ParallelConfig,
    stages: list[list[LayerStrategy]],
    cost: PlanCost,
    spec: TrainingSpec,
    hw: HardwareProfile,
    memory_gb: float,
) -> Plan:
    predicted = {
        "step_ms": cost.step_ms,
        "tokens_per_s": cost.tokens_per_s,
        "tokens_per_s_per_gpu": cost.tokens_per_s / cfg.gpus,
        "mfu": cost.mfu,
        "bubble_ms": cost.bubble_ms,
        "optimizer_ms": cost.optimizer_ms,
        "memory_gb": [m / 2**30 for m in cost.stage_memory_bytes],
        "usable_memory_gb": cost.usable_bytes / 2**30,
    }
    hardware = {"name": hw.name, "memory_gb": memory_gb, "achieved_tflops": hw.achieved_tflops}
    return Plan.from_config(
        shape,
        cfg,
        stages,
        global_batch=spec.global_batch,
        seq_len=spec.seq_len,
        predicted=predicted,
        hardware=hardware,
        attn_implementation=spec.attn_implementation,
        padding_mask=spec.padding_mask,
    )


search_plans = search  # package-level name (``autoparallel.search`` is this module)


def search_plan(
    model: str | ModelShape | Any,
    gpus: int,
    memory_gb: float = 80.0,
    *,
    hardware: HardwareProfile | None = None,
    profile: ModelProfile | None = None,
    **config: Any,
) -> Plan:
    """Convenience: the best :class:`Plan` (``config`` are :class:`SearchConfig` fields)."""
    return search(
        model, SearchConfig(gpus=gpus, memory_gb=memory_gb, **config), hardware=hardware, profile=profile
    ).best


def predict(
    plan: Plan,
    *,
    hardware: HardwareProfile | None = None,
    profile: ModelProfile | None = None,
    memory_gb: float | None = None,
    cost_kwargs: dict[str, Any] | None = None,
) -> PlanCost:
    """Cost-model prediction for any plan (e.g. a hand-written baseline).

    Memory (``PlanCost.feasible``, ``usable_bytes``) is checked against, in order: ``memory_gb`` when given,
    else the memory the plan was made for (``plan.hardware["memory_gb"]``, which :func:`search` records from
    ``SearchConfig.memory_gb``), else the hardware profile's ``memory_gb`` (80 for the H100 defaults; a
    hand-written :meth:`Plan.uniform` plan records none). A searched plan therefore predicts exactly its
    ``predicted`` figures, ``usable_memory_gb`` included.
    """
    if memory_gb is not None and not (_is_real(memory_gb) and math.isfinite(memory_gb) and memory_gb > 0):
        # -1 / NaN made every plan infeasible without a word
        raise ValueError(f"predict: memory_gb must be None or a finite number of GiB > 0, got {memory_gb!r}")
    cm = _plan_cost_model(plan, hardware, profile, cost_kwargs)
    if memory_gb is None:
        memory_gb = plan.hardware.get("memory_gb") if isinstance(plan.hardware, dict) else None
        if memory_gb is not None and not (
            isinstance(memory_gb, (int, float)) and not isinstance(memory_gb, bool) and memory_gb > 0
        ):
            raise ValueError(
                f'Plan.hardware["memory_gb"] must be a positive number of GiB, got {memory_gb!r}'
            )
    if memory_gb is None:
        memory_gb = cm.hw.memory_gb
    return cm.evaluate(plan.config, plan.stage_strategies(), memory_gb)


def predict_breakdown(
    plan: Plan,
    *,
    hardware: HardwareProfile | None = None,
    profile: ModelProfile | None = None,
    cost_kwargs: dict[str, Any] | None = None,
) -> dict[str, float]:
    """The terms of :func:`predict`'s step time for ``plan`` (ms per step; see :meth:`CostModel.breakdown`)."""
    cm = _plan_cost_model(plan, hardware, profile, cost_kwargs)
    return cm.breakdown(plan.config, plan.stage_strategies())


def _plan_cost_model(
    plan: Plan,
    hardware: HardwareProfile | None,
    profile: ModelProfile | None,
    cost_kwargs: dict[str, Any] | None,
) -> CostModel:
    hw = hardware or HardwareProfile.h100()
    if profile is not None:
        hw = profile.calibrate(hw)
    spec = TrainingSpec(
        global_batch=plan.global_batch,
        seq_len=plan.seq_len,
        attn_implementation=plan.attn_implementation,
        padding_mask=plan.padding_mask,
    )
    return CostModel(plan.shape, hw, spec, profile, **(cost_kwargs or {}))
