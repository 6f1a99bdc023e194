"""Analytic cost model of one MoE layer's training step under a layout (FSEP, static EP, FSDP).

Per layer and step (forward + backward)::

    t_layer = 4 * t_a2a_tokens + 3 * t_compute_max + t_weight_exposed + 3 * t_dense

* ``t_compute_max``: the slowest rank's expert forward time = sum over its materialised experts of
  ``overhead + tokens * 6*H*I / flops`` (backward = 2 x forward, hence the 3).
* ``t_a2a_tokens``: one token all-to-all (dispatch or combine; 2 forward + 2 backward): the slowest
  rank's ``max(bytes sent, bytes received) / bandwidth + latency`` (intra- vs inter-node bandwidth by
  ``gpus_per_node``).
* ``t_weight``: FSEP's expert gather (forward) + gradient reduce-scatter (backward), each moving
  ``C_r * P * (N-1)/N`` parameters per rank. It runs on its own stream, prefetched one layer ahead,
  so only the part longer than the compute it hides behind is exposed:
  ``t_weight_exposed = max(0, t_weight - overlap * (3 * t_compute_max + 3 * t_dense))``.

The relative weights (4 comm, 3 compute) are the LAER-MoE reference planner's; the overlap term is
ours. The model is a prediction tool: numbers from it are labelled "predicted" in the benchmark.

Example:
    >>> from hf_ext.accelerate.fsep.planner import Layout
    >>> import numpy as np
    >>> shape = MoEShape(hidden=64, intermediate=128, num_experts=4, top_k=2, tokens_per_rank=32)
    >>> lay = Layout.identity(4, 2)
    >>> c = layer_cost(lay, np.full((2, 4), 16), shape, PRESETS["h100"], mode="static_ep")
    >>> c.total > 0
    True
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from hf_ext.accelerate.fsep.planner import Layout


@dataclass(frozen=True)
class Hardware:
    """Throughputs of one device and its links.

    Attributes:
        name: preset name.
        flops: effective expert GEMM throughput (FLOP/s) at the layer's shapes.
        expert_overhead_s: fixed cost per materialised expert per forward pass (launches, small GEMM tail).
        intra_bw: all-to-all bandwidth per rank inside a node (bytes/s).
        inter_bw: all-to-all bandwidth per rank across nodes (bytes/s).
        gpus_per_node: ranks per node.
        latency_s: fixed latency of one all-to-all.
        overlap: fraction of compute time under which weight gathers can hide (0..1).
        dense_flops: throughput of the dense (attention) part, FLOP/s.
    """

    name: str
    flops: float
    expert_overhead_s: float
    intra_bw: float
    inter_bw: float
    gpus_per_node: int = 8
    latency_s: float = 20e-6
    overlap: float = 0.8
    dense_flops: float = 0.0

    def with_(self, **kw: float) -> Hardware:
        """A copy with some fields replaced (e.g. calibrated ``flops``)."""
        return replace(self, **kw)  # type: ignore[arg-type]


# Bandwidths: "a100_ref" uses the reference planner's measured A100 cluster values (216 / 89 GB/s);
# "h100" assumes NVLink4 all-to-all ~ 300 GB/s per GPU inside a node and 400 Gb/s IB (~45 GB/s) across.
# flops are placeholders until calibrated by `hf-ext bench fsep --calibrate` on the GPU.
PRESETS: dict[str, Hardware] = {
    "h100": Hardware(
        "h100", flops=550e12, expert_overhead_s=25e-6, intra_bw=300e9, inter_bw=45e9, dense_flops=550e12
    ),
    "a100_ref": Hardware(
        "a100_ref",
        flops=230e12,
        expert_overhead_s=30e-6,
        intra_bw=216.269e9,
        inter_bw=88.9539e9,
        dense_flops=230e12,
    ),
    # Fitted to the measured 2 x H100 FSEP runs (benchmarks/results/fsep.csv, rows *_mixtral8x7b_*_p2p_nccl2):
    # expert GEMMs at the measured Mixtral fit (640 TFLOP/s, rows mixtral8x7b_expert_*), and the weight exchange
    # NOT hidden behind compute (overlap 0) at the effective rate that reproduces the measured balanced step
    # (2 x 880 MB per layer in 10.2 ms -> 173 GB/s). Across nodes the same 173/300 efficiency is applied to
    # 45 GB/s IB (an assumption: no multi-node run was made).
    "h100_2gpu_fit": Hardware(
        "h100_2gpu_fit",
        flops=640e12,
        expert_overhead_s=25e-6,
        intra_bw=173e9,
        inter_bw=26e9,
        overlap=0.0,
        dense_flops=640e12,
    ),
    "cpu": Hardware(
        "cpu",
        flops=40e9,
        expert_overhead_s=30e-6,
        intra_bw=5e9,
        inter_bw=5e9,
        latency_s=100e-6,
        overlap=0.5,
        dense_flops=40e9,
    ),
}


@dataclass(frozen=True)
class MoEShape:
    """Shape of one MoE layer and its per-rank batch.

    Attributes:
        hidden: model width H.
        intermediate: expert FFN width I (gate/up/down SwiGLU expert: 3*H*I parameters).
        num_experts: E.
        top_k: experts per token K.
        tokens_per_rank: tokens each rank feeds into the layer per step.
        dtype_bytes: bytes per element of activations and weights on the wire.
        dense_flops_per_token: forward FLOPs of the non-MoE part of the layer per token (attention etc.).
    """

    hidden: int
    intermediate: int
    num_experts: int
    top_k: int
    tokens_per_rank: int
    dtype_bytes: int = 2
    dense_flops_per_token: float = 0.0

    @property
    def expert_params(self) -> int:
        """Parameters of one expert (gate_up [2I, H] + down [H, I])."""
        return 3 * self.hidden * self.intermediate

    @property
    def flops_per_token(self) -> float:
        """Forward FLOPs of one token through one expert."""
        return 6.0 * self.hidden * self.intermediate


@dataclass(frozen=True)
class LayerCost:
    """Seconds per layer and step (forward + backward) and the per-rank comm volume."""

    compute_max: float
    compute_mean: float
    a2a: float
    weight: float
    weight_exposed: float
    dense: float
    total: float
    token_bytes: float
    weight_bytes: float

    @property
    def imbalance(self) -> float:
        """max / mean expert compute over ranks."""
        return self.compute_max / self.compute_mean if self.compute_mean else 1.0


def token_traffic(shares: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Token-assignments sent / received per rank (off-rank only) from ``shares[src, expert, dst]``."""
    per_pair = shares.sum(axis=1).astype(np.float64)  # [src, dst]
    np.fill_diagonal(per_pair, 0.0)
    return per_pair.sum(axis=1), per_pair.sum(axis=0)


def layer_cost(
    layout: Layout,
    counts: np.ndarray,
    shape: MoEShape,
    hw: Hardware,
    *,
    mode: str = "fsep",
    shares: np.ndarray | None = None,
) -> LayerCost:
    """Cost of one layer step with ``counts[src_rank, expert]`` token assignments under ``layout``.

    ``mode``: ``"fsep"`` (weights gathered per step), ``"static_ep"`` (resident experts, no weight
    traffic) or ``"fsdp"`` (like fsep; use with :meth:`Layout.fsdp`).
    """
    if shares is None:
        shares = layout.token_shares(counts)
    n_slots = np.array([len(s) for s in layout.slots], dtype=np.float64)
    return cost_from_pairs(shares.sum(axis=1).astype(np.float64), n_slots, shape, hw, mode=mode)


def cost_from_pairs(
    pairs: np.ndarray, n_slots: np.ndarray, shape: MoEShape, hw: Hardware, *, mode: str = "fsep"
) -> LayerCost:
    """:func:`layer_cost` from ``pairs[src, dst]`` (token assignments sent from ``src`` to experts on
    ``dst``, diagonal = kept local; may be fractional) and the experts each rank materialises."""
    n = pairs.shape[0]
    tokens_on_rank = pairs.sum(axis=0)  # [N]
    comp = n_slots * hw.expert_overhead_s + tokens_on_rank * shape.flops_per_token / hw.flops
    per_pair = pairs.copy()
    np.fill_diagonal(per_pair, 0.0)
    tok_bytes = shape.hidden * shape.dtype_bytes
    if n > hw.gpus_per_node:
        node = np.arange(n) // max(1, hw.gpus_per_node)
        inv_bw = np.where(node[:, None] == node[None, :], 1.0 / hw.intra_bw, 1.0 / hw.inter_bw)
        timed = per_pair * inv_bw
    else:
        timed = per_pair / hw.intra_bw
    send_t = timed.sum(axis=1) * tok_bytes
    recv_t = timed.sum(axis=0) * tok_bytes
    a2a = float(np.max(np.maximum(send_t, recv_t))) + (hw.latency_s if n > 1 else 0.0)
    token_bytes = float(np.max(np.maximum(per_pair.sum(1), per_pair.sum(0)))) * tok_bytes
    if mode == "static_ep":
        weight, weight_bytes = 0.0, 0.0
    else:
        frac_remote = (n - 1) / n
        # a gather touching every rank runs at the slowest (inter-node, if any) link
        eff_bw = hw.inter_bw if n > hw.gpus_per_node else hw.intra_bw
        weight_bytes = float(n_slots.max()) * shape.expert_params * shape.dtype_bytes * frac_remote
        weight = 2.0 * weight_bytes / eff_bw + 2.0 * hw.latency_s
    dense = (
        shape.tokens_per_rank * shape.dense_flops_per_token / hw.dense_flops
        if shape.dense_flops_per_token and hw.dense_flops
        else 0.0
    )
    comp_max = float(comp.max())
    exposed = max(0.0, weight - hw.overlap * (3.0 * comp_max + 3.0 * dense))
    total = 4.0 * a2a + 3.0 * comp_max + exposed + 3.0 * dense
    return LayerCost(
        compute_max=comp_max,
        compute_mean=float(comp.mean()),
        a2a=a2a,
        weight=weight,
        weight_exposed=exposed,
        dense=dense,
        total=total,
        token_bytes=token_bytes,
        weight_bytes=weight_bytes,
    )


def zipf_probs(
    num_experts: int, alpha: float, rng: np.random.Generator | None = None, perm: np.ndarray | None = None
) -> np.ndarray:
    """Expert popularity ``p_e ∝ 1 / rank(e)^alpha`` (``alpha=0``: balanced), experts permuted by ``perm``."""
    ranks = np.arange(1, num_experts + 1, dtype=np.float64)
    p = ranks ** (-float(alpha))
    p /= p.sum()
    if perm is None:
        perm = rng.permutation(num_experts) if rng is not None else np.arange(num_experts)
    out = np.empty_like(p)
    out[perm] = p
    return out


def inclusion_probs(p: np.ndarray, k: int) -> np.ndarray:
    """Per-token probability that each expert is among the token's ``k`` distinct experts.

    ``pi_e = min(1, c * p_e)`` with ``c`` chosen so that ``sum(pi) = k`` (a token picks an expert at
    most once, so no expert can receive more than one assignment per token).
    """
    p = np.asarray(p, dtype=np.float64)
    k = min(k, len(p))
    pi = np.zeros_like(p)
    free = np.ones(len(p), dtype=bool)
    budget = float(k)
    for _ in range(len(p)):
        pi[free] = budget * p[free] / p[free].sum()
        over = free & (pi >= 1.0)
        if not over.any():
            break
        pi[over] = 1.0
        free &= ~over
        budget = k - float((~free).sum())
        if budget <= 0 or not free.any():
            break
    return np.minimum(pi, 1.0)


def routing_trace(
    num_experts: int,
    world_size: int,
    tokens_per_rank: int,
    top_k: int,
    alpha: float,
    steps: int,
    *,
    drift: float = 0.0,
    seed: int = 0,
    rank_noise: float = 0.1,
) -> list[np.ndarray]:
    """Synthetic per-step counts ``[world_size, num_experts]`` of token assignments.

    Popularity is Zipf(``alpha``) over a random expert order; with ``drift`` > 0 the log-popularities
    follow a random walk (std ``drift`` per step), so the hot experts change over steps. Each rank
    sees the global popularity times log-normal noise (``rank_noise``); a token takes ``top_k``
    distinct experts, so expert ``e`` on a rank gets ``Binomial(tokens_per_rank, pi_e)`` assignments
    with the inclusion probabilities of :func:`inclusion_probs` (at most one per token).
    """
    rng = np.random.default_rng(seed)
    logp = np.log(zipf_probs(num_experts, alpha, rng))
    out = []
    for _ in range(steps):
        if drift:
            logp = logp + rng.normal(0.0, drift, size=num_experts)
        p = np.exp(logp - logp.max())
        p /= p.sum()
        counts = np.empty((world_size, num_experts), dtype=np.int64)
        for r in range(world_size):
            pr = p * np.exp(rng.normal(0.0, rank_noise, size=num_experts))
            counts[r] = rng.binomial(tokens_per_rank, inclusion_probs(pr / pr.sum(), top_k))
        out.append(counts)
    return out
