"""Configuration of FSEP (fully sharded expert parallelism, LAER-MoE).

Example:
    >>> cfg = FSEPConfig(mode="fsep", history=5)
    >>> cfg.layout_policy
    'planner'
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

MODES = ("fsep", "static_ep")
LAYOUT_POLICIES = ("planner", "identity", "fsdp")
ROUTING_POLICIES = ("uniform", "local_first", "node_first", "auto")
HARDWARE_PRESETS = ("auto", "h100", "h100_2gpu_fit", "a100_ref", "cpu")
GATHER_METHODS = ("auto", "p2p", "all_to_all")
COMM_SCHEDULES = ("deferred", "eager")
EXPERT_COMPUTE = ("auto", "loop", "grouped_mm")


@dataclass
class FSEPConfig:
    """Switches and planner settings of :func:`hf_ext.accelerate.fsep.prepare_fsep`.

    Defaults follow the LAER-MoE paper / reference: re-plan every step from the token counts
    of the last 5 steps, cost = 4 x all-to-all + 3 x max-rank expert compute.
    """

    mode: str = field(
        default="fsep",
        metadata={
            "help": "'fsep': every rank keeps 1/N of every expert and gathers whole experts per step by "
            "all-to-all; 'static_ep': classic expert parallelism (E/N resident experts per rank, "
            "identity layout) on the same dispatch/combine code path (the baseline)."
        },
    )
    layout_policy: str = field(
        default="planner",
        metadata={
            "help": "FSEP only. 'planner': load-aware re-layout every step (replicas + placement + "
            "routing); 'identity': the static-EP placement (rank r gathers experts r*E/N..); "
            "'fsdp': every rank gathers all experts and computes its own tokens (FSDP-style)."
        },
    )
    capacity: int | None = field(
        default=None,
        metadata={
            "help": "Experts a rank may materialise per layer (memory bound of the layout, C >= E/N). "
            "None: ceil(E/N) + extra_capacity."
        },
    )
    extra_capacity: int = field(
        default=1,
        metadata={"help": "Spare expert slots per rank used for replicas when capacity is None."},
    )
    history: int = field(
        default=5, metadata={"help": "Planner input: per-expert token counts of the last k training steps."}
    )
    history_decay: float = field(
        default=1.0,
        metadata={
            "help": "Weight decay**age of older steps' counts (1.0: plain sum of the last `history` steps, "
            "as in the paper; e.g. 0.5 follows drifting routing a little faster)."
        },
    )
    replan_interval: int = field(
        default=1, metadata={"help": "Re-plan the layout every this many training steps (1 = every step)."}
    )
    routing_policy: str = field(
        default="auto",
        metadata={
            "help": "How a rank splits its tokens of an expert among the expert's replicas: 'uniform', "
            "'local_first' (keep tokens on the own replica), 'node_first' (replicas in the own node "
            "first), or 'auto' (the cost model picks per step)."
        },
    )
    num_perturbations: int = field(
        default=4,
        metadata={"help": "Extra replica vectors (local moves of the greedy one) the planner scores."},
    )
    planner_tokens_per_rank: int | None = field(
        default=None,
        metadata={
            "help": "Tokens per rank and step the planner costs its candidate layouts for. None: the token "
            "counts the layer observed (the decay-weighted mean of the last `history` steps), so a small batch "
            "is not planned as a large one (a replica's weight gather pays only when enough tokens reach it); "
            "an int >= 1 costs every step as if each rank routed that many tokens (e.g. to plan a short test "
            "run like the real one)."
        },
    )
    hardware: str = field(
        default="auto",
        metadata={
            "help": "Cost-model preset used by the planner: 'auto' (cpu on CPU tensors, h100 on CUDA), "
            "'h100', 'h100_2gpu_fit' (fitted to the measured 2 x H100 runs: weight traffic not hidden), "
            "'a100_ref' (the reference's measured bandwidths) or 'cpu'."
        },
    )
    gather: str = field(
        default="auto",
        metadata={
            "help": "FSEP weight exchange. 'p2p': batched point-to-point sends straight from the shard rows "
            "and receives straight into the full experts (no copies; one op per expert and peer); "
            "'all_to_all': one all-to-all through a re-ordered send buffer and a transposing copy on each "
            "side (one op per peer, two copies); 'auto': p2p when one expert shard is >= "
            "gather_p2p_min_bytes. On 2 H100s (two runs, docs/fsep.md) p2p made steps with Mixtral-sized "
            "experts (176 MB shards) 1.14-1.17x faster and with OLMoE-sized ones (6 MB shards) 0.80-1.09x."
        },
    )
    gather_p2p_min_bytes: int = field(
        default=16 * 2**20,
        metadata={"help": "gather='auto': shard size (bytes) from which the p2p exchange is used."},
    )
    prefetch: bool = field(
        default=True,
        metadata={"help": "Start the next MoE layer's expert gather (async all-to-all) during this layer."},
    )
    async_grad_reduce: bool = field(
        default=True,
        metadata={
            "help": "Run the backward reduce-scatter (all-to-all) of expert gradients asynchronously and "
            "accumulate into .grad at the end of backward (overlaps with earlier layers' backward). "
            "Set False when using torch.autograd.grad."
        },
    )
    comm_schedule: str = field(
        default="deferred",
        metadata={
            "help": "When the backward starts a layer's gradient reduce-scatter (with async_grad_reduce). "
            "'eager': in the layer's own backward, where it queues on the NCCL stream ahead of that layer's "
            "token all-to-all; 'deferred': once the next layer's combine all-to-all is queued, so it runs "
            "during that layer's expert backward (the first MoE layer's after its own dispatch all-to-all)."
        },
    )
    expert_compute: str = field(
        default="auto",
        metadata={
            "help": "How a rank computes its materialised experts. 'loop': one GEMM pair per expert in a Python "
            "loop (any device and dtype); 'grouped_mm': one grouped GEMM per projection for all experts "
            "(torch.nn.functional.grouped_mm / torch._grouped_mm; bf16 on CUDA); 'auto': grouped_mm for bf16 "
            "CUDA inputs where torch has it and a rank computes 16 experts or more (many small experts, such "
            "as OLMoE's 64, make the loop launch-bound; for a few large ones cuBLAS GEMMs were faster), "
            "else the loop."
        },
    )
    average_grads: bool = field(
        default=True,
        metadata={"help": "Divide expert gradients by the world size (the DDP / FSDP averaging convention)."},
    )
    broadcast_from_rank0: bool = field(
        default=True,
        metadata={"help": "Broadcast the full expert weights from rank 0 before sharding (ranks agree)."},
    )

    def __post_init__(self) -> None:
        # types first: a float count or a string flag would be taken silently (``average_grads="False"`` is true)
        # or fail deep inside the layer (``history=2.5``)
        for name in (
            "extra_capacity",
            "history",
            "replan_interval",
            "num_perturbations",
            "gather_p2p_min_bytes",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise ValueError(f"FSEPConfig.{name}={v!r} must be an int")
        if self.capacity is not None and (
            isinstance(self.capacity, bool) or not isinstance(self.capacity, numbers.Integral)
        ):
            raise ValueError(f"FSEPConfig.capacity={self.capacity!r} must be None or an integer >= 1")
        if isinstance(self.history_decay, bool) or not isinstance(self.history_decay, numbers.Real):
            raise ValueError(f"FSEPConfig.history_decay={self.history_decay!r} must be a number in (0, 1]")
        for name in ("prefetch", "async_grad_reduce", "average_grads", "broadcast_from_rank0"):
            v = getattr(self, name)
            if not isinstance(v, bool):
                raise ValueError(f"FSEPConfig.{name}={v!r} must be True or False")
        if self.mode not in MODES:
            raise ValueError(f"FSEPConfig.mode={self.mode!r} is not supported; choose one of {MODES}")
        if self.layout_policy not in LAYOUT_POLICIES:
            raise ValueError(
                f"FSEPConfig.layout_policy={self.layout_policy!r} is not supported; choose one of {LAYOUT_POLICIES}"
            )
        if self.routing_policy not in ROUTING_POLICIES:
            raise ValueError(
                f"FSEPConfig.routing_policy={self.routing_policy!r} is not supported; "
                f"choose one of {ROUTING_POLICIES}"
            )
        if self.hardware not in HARDWARE_PRESETS:
            raise ValueError(
                f"FSEPConfig.hardware={self.hardware!r} is not supported; choose one of {HARDWARE_PRESETS}"
            )
        if self.gather not in GATHER_METHODS:
            raise ValueError(
                f"FSEPConfig.gather={self.gather!r} is not supported; choose one of {GATHER_METHODS}"
            )
        if self.comm_schedule not in COMM_SCHEDULES:
            raise ValueError(
                f"FSEPConfig.comm_schedule={self.comm_schedule!r} is not supported; choose one of {COMM_SCHEDULES}"
            )
        if self.expert_compute not in EXPERT_COMPUTE:
            raise ValueError(
                f"FSEPConfig.expert_compute={self.expert_compute!r} is not supported; choose one of {EXPERT_COMPUTE}"
            )
        if self.gather_p2p_min_bytes < 0:
            raise ValueError(f"FSEPConfig.gather_p2p_min_bytes={self.gather_p2p_min_bytes} must be >= 0")
        if self.capacity is not None and self.capacity < 1:
            raise ValueError(f"FSEPConfig.capacity={self.capacity} must be None or an integer >= 1")
        if self.extra_capacity < 0:
            raise ValueError(f"FSEPConfig.extra_capacity={self.extra_capacity} must be >= 0")
        if self.history < 1:
            raise ValueError(f"FSEPConfig.history={self.history} must be >= 1")
        if not 0.0 < self.history_decay <= 1.0:
            raise ValueError(f"FSEPConfig.history_decay={self.history_decay} must be in (0, 1]")
        if self.replan_interval < 1:
            raise ValueError(f"FSEPConfig.replan_interval={self.replan_interval} must be >= 1")
        if self.num_perturbations < 0:
            raise ValueError(f"FSEPConfig.num_perturbations={self.num_perturbations} must be >= 0")
        t = self.planner_tokens_per_rank
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 1):
            raise ValueError(
                f"FSEPConfig.planner_tokens_per_rank={t!r} must be None (the observed token counts) or an int >= 1"
            )
        if self.mode == "static_ep" and self.layout_policy != "planner" and self.layout_policy != "identity":
            raise ValueError(
                f"FSEPConfig.layout_policy={self.layout_policy!r} needs mode='fsep'; static_ep always uses "
                "the identity layout"
            )

    def resolved_capacity(self, num_experts: int, world_size: int) -> int:
        """Expert slots per rank (``C``) for ``num_experts`` experts over ``world_size`` ranks."""
        base = -(-num_experts // world_size)
        # the fixed layouts materialise a fixed number of experts per rank: an explicit capacity (a memory
        # bound) below it is an error, not silently exceeded
        fixed = None
        if self.mode == "static_ep":
            fixed, what = base, "mode='static_ep'"
        elif self.layout_policy == "identity":
            fixed, what = base, "layout_policy='identity'"
        elif self.layout_policy == "fsdp":
            fixed, what = num_experts, "layout_policy='fsdp'"
        if fixed is not None:
            if self.capacity is not None and self.capacity < fixed:
                raise ValueError(
                    f"FSEPConfig.capacity={self.capacity} is too small: {what} materialises {fixed} of "
                    f"{num_experts} experts per rank over {world_size} ranks and needs capacity >= {fixed} "
                    "(or capacity=None)"
                )
            return fixed
        cap = self.capacity if self.capacity is not None else base + self.extra_capacity
        if cap < base:
            raise ValueError(
                f"FSEPConfig.capacity={cap} is too small: {num_experts} experts over {world_size} ranks need "
                f"capacity >= ceil(num_experts / world_size) = {base}"
            )
        return min(cap, num_experts)
