"""Layouts (which experts each rank materialises, how tokens pick a replica) and the load planner.

A :class:`Layout` for ``N`` ranks and ``E`` experts lists, per rank, the experts it gathers in full
for one layer and step (``slots[r]``, at most ``capacity`` each, no duplicates on a rank, every
expert at least once) and a routing tensor ``routing[src, e, dst]`` (fractions of ``src``'s tokens
for expert ``e`` sent to the replica on ``dst``; rows sum to 1 over the ranks holding ``e``).

The planner (LAER-MoE style, our own implementation):

1. loads ``L_e`` = token counts of the last ``k`` steps (their decay-weighted mean per step) summed over
   ranks; the candidates are costed at that observed size (or at a declared ``tokens_per_rank``);
2. replica counts: start at one replica each, hand the spare slots one by one to the expert with
   the highest load per replica (a heap), for several totals of slots;
3. greedy placement: replicas sorted by load per replica, each to the least-loaded rank that has a
   free slot and does not hold that expert yet;
4. routing among replicas: uniform split or local-first; every candidate is scored by the cost
   model (:mod:`hf_ext.accelerate.fsep.cost_model`) and the cheapest wins.

Example:
    >>> import numpy as np
    >>> counts = np.array([[9000, 500, 300, 200], [8000, 1000, 600, 400]])  # one step, 5,000 tokens per rank
    >>> lay = LoadPlanner(4, 2, capacity=3).plan(counts)
    >>> sorted(set(e for s in lay.slots for e in s))
    [0, 1, 2, 3]
    >>> int(lay.replicas()[0])
    2
    >>> int(LoadPlanner(4, 2, capacity=3).plan(counts // 100).replicas()[0])  # 50 tokens: a copy does not pay
    1
"""

from __future__ import annotations

import heapq
import numbers
from collections import deque
from dataclasses import dataclass, field, replace

import numpy as np

from hf_ext.accelerate.fsep.config import ROUTING_POLICIES
from hf_ext.accelerate.fsep.cost_model import PRESETS, Hardware, MoEShape, cost_from_pairs


@dataclass(frozen=True, eq=False)
class Layout:
    """Expert placement and token routing of one MoE layer for one step.

    Attributes:
        slots: per rank, the expert ids it materialises (``len(slots) == N``).
        num_experts: E.
        routing: ``[N, E, N]`` float fractions; ``routing[s, e, r] > 0`` only where ``r`` holds ``e``.
        name: a label (``identity``, ``fsdp``, ``planned``...).
    """

    slots: tuple[tuple[int, ...], ...]
    num_experts: int
    routing: np.ndarray = field(repr=False)
    name: str = ""

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_slots(
        cls,
        slots: list[list[int]] | tuple,
        num_experts: int,
        routing: str = "uniform",
        name: str = "",
        gpus_per_node: int = 8,
    ) -> Layout:
        """Build a layout from per-rank expert lists with a ``uniform``, ``local_first`` or
        ``node_first`` routing (see :func:`routing_tensor`)."""
        slots_t = tuple(tuple(int(e) for e in s) for s in slots)
        for r, s in enumerate(slots_t):
            for e in s:
                if not 0 <= e < num_experts:
                    raise ValueError(f"slots[{r}] names expert {e}; experts are 0..{num_experts - 1}")
        hold = hold_matrix(slots_t, num_experts)
        reps = hold.sum(axis=1)
        if (reps == 0).any():
            missing = np.nonzero(reps == 0)[0].tolist()
            raise ValueError(f"layout does not cover experts {missing}: every expert needs a replica")
        return cls(slots_t, num_experts, routing_tensor(hold, routing, gpus_per_node), name or routing)

    @classmethod
    def identity(cls, num_experts: int, world_size: int) -> Layout:
        """Static-EP placement: rank ``r`` holds experts ``r*E/N .. (r+1)*E/N - 1``.

        When ``N > E`` (only meaningful for FSEP) expert ``e`` is held by ranks ``r`` with ``r % E == e``.
        """
        if num_experts >= world_size:
            c = num_experts // world_size
            slots = [list(range(r * c, (r + 1) * c)) for r in range(world_size)]
        else:
            slots = [[r % num_experts] for r in range(world_size)]
        return cls.from_slots(slots, num_experts, "local_first", name="identity")

    @classmethod
    def fsdp(cls, num_experts: int, world_size: int) -> Layout:
        """Every rank materialises every expert and keeps its own tokens (FSDP-style)."""
        slots = [list(range(num_experts)) for _ in range(world_size)]
        return cls.from_slots(slots, num_experts, "local_first", name="fsdp")

    # ------------------------------------------------------------------ queries
    @property
    def world_size(self) -> int:
        return len(self.slots)

    @property
    def max_slots(self) -> int:
        return max(len(s) for s in self.slots)

    def replicas(self) -> np.ndarray:
        """``[E]`` number of ranks holding each expert."""
        out = np.zeros(self.num_experts, dtype=np.int64)
        for s in self.slots:
            for e in s:
                out[e] += 1
        return out

    def slot_index(self) -> np.ndarray:
        """``[N, E]`` slot of expert ``e`` on rank ``r`` (``-1`` when not held)."""
        out = np.full((self.world_size, self.num_experts), -1, dtype=np.int64)
        for r, s in enumerate(self.slots):
            for c, e in enumerate(s):
                out[r, e] = c
        return out

    def validate(self, capacity: int | None = None) -> None:
        """Raise ``ValueError`` unless every expert is held, no rank holds an expert twice, rows of
        ``routing`` sum to one over holders, and each rank holds at most ``capacity`` experts."""
        for r, s in enumerate(self.slots):
            if len(set(s)) != len(s):
                raise ValueError(f"rank {r} holds an expert twice: {s}")
            if capacity is not None and len(s) > capacity:
                raise ValueError(f"rank {r} holds {len(s)} experts > capacity {capacity}")
        if (self.replicas() == 0).any():
            raise ValueError("layout leaves an expert without a replica")
        held = self.slot_index() >= 0  # [N, E]
        if (self.routing[:, ~held.T] > 0).any():
            raise ValueError("routing sends tokens to a rank that does not hold the expert")
        if not np.allclose(self.routing.sum(axis=2), 1.0):
            raise ValueError("routing fractions of some (rank, expert) do not sum to 1")

    def token_shares(self, counts: np.ndarray) -> np.ndarray:
        """Integer split ``shares[src, e, dst]`` of ``counts[src, e]`` token assignments.

        Deterministic (every rank computes the same split from the same counts): boundaries are
        ``round(count * cumsum(fractions))`` along ``dst``.
        """
        counts = np.asarray(counts, dtype=np.int64)
        cum = np.cumsum(self.routing, axis=2)
        bounds = np.rint(counts[:, :, None] * cum).astype(np.int64)
        bounds = np.minimum(bounds, counts[:, :, None])
        bounds[:, :, -1] = counts
        return np.diff(bounds, axis=2, prepend=0)


# ---------------------------------------------------------------------------------- planner pieces
ROUTINGS = ("uniform", "local_first", "node_first")


def hold_matrix(slots: tuple | list, num_experts: int) -> np.ndarray:
    """``[E, N]`` 1.0 where rank ``r`` holds expert ``e``."""
    hold = np.zeros((num_experts, len(slots)), dtype=np.float64)
    for r, s in enumerate(slots):
        hold[list(s), r] = 1.0
    return hold


def routing_tensor(hold: np.ndarray, policy: str, gpus_per_node: int = 8) -> np.ndarray:
    """Fractions ``[N(src), E, N(dst)]`` of a source's tokens for an expert sent to each replica.

    ``uniform``: evenly over all replicas. ``local_first``: all to the own replica when the source
    holds the expert, else uniform. ``node_first``: evenly over the replicas in the source's node
    when there are any, else uniform (the reference's intra-node-first routing).
    """
    if policy not in ROUTINGS:
        raise ValueError(f"routing={policy!r} is not supported; choose one of {ROUTINGS}")
    e, n = hold.shape
    uni = hold / np.maximum(hold.sum(axis=1, keepdims=True), 1.0)  # [E, N]
    rt = np.broadcast_to(uni, (n, e, n)).copy()
    if policy == "local_first":
        ss, ee = np.nonzero(hold.T > 0)
        rt[ss, ee, :] = 0.0
        rt[ss, ee, ss] = 1.0
    elif policy == "node_first":
        node = np.arange(n) // max(1, gpus_per_node)
        same = (node[:, None] == node[None, :]).astype(np.float64)  # [N(src), N(dst)]
        hn = hold[None, :, :] * same[:, None, :]  # [N, E, N]
        cnt = hn.sum(axis=2, keepdims=True)
        rt = np.where(cnt > 0, hn / np.maximum(cnt, 1.0), rt)
    return rt


def allocate_replicas(loads: np.ndarray, total_slots: int, max_replicas: int) -> np.ndarray:
    """Replica count per expert (each >= 1, <= ``max_replicas``) using at most ``total_slots``:
    spare slots go one at a time to the expert with the largest load per replica."""
    e = len(loads)
    reps = np.ones(e, dtype=np.int64)
    heap = [(-float(loads[i]), i) for i in range(e)]
    heapq.heapify(heap)
    spare = total_slots - e
    while spare > 0 and heap:
        neg, i = heapq.heappop(heap)
        if reps[i] >= max_replicas:
            continue
        reps[i] += 1
        spare -= 1
        heapq.heappush(heap, (-float(loads[i]) / reps[i], i))
    return reps


def pair_traffic(counts: np.ndarray, hold: np.ndarray, policy: str, gpus_per_node: int = 8) -> np.ndarray:
    """``[N(src), N(dst)]`` token assignments from ``counts[N, E]`` under :func:`routing_tensor`'s
    ``policy`` without building the ``[N, E, N]`` tensor (fractional, for the cost model)."""
    n = hold.shape[1]
    uni = hold / np.maximum(hold.sum(axis=1, keepdims=True), 1.0)  # [E, N]
    if policy == "uniform":
        return counts @ uni
    if policy == "local_first":
        own = hold.T  # [N(src), E]: 1 where the source holds the expert
        return (counts * (1.0 - own)) @ uni + np.diag((counts * own).sum(axis=1))
    if policy == "node_first":
        node = np.arange(n) // max(1, gpus_per_node)
        same = (node[:, None] == node[None, :]).astype(np.float64)
        cnt = same @ hold.T  # [N(src), E]: replicas of e in the source's node
        a = np.where(cnt > 0, counts / np.maximum(cnt, 1.0), 0.0)
        b = np.where(cnt > 0, 0.0, counts)
        return same * (a @ hold) + b @ uni
    raise ValueError(f"routing={policy!r} is not supported; choose one of {ROUTINGS}")


def greedy_placement(
    replicas: np.ndarray,
    loads: np.ndarray,
    world_size: int,
    capacity: int,
    gpus_per_node: int = 0,
) -> list[list[int]] | None:
    """Place replicas (heaviest load-per-replica first) on the least-loaded rank with room that does
    not hold the expert yet. With ``gpus_per_node`` > 0 (multi-node), replicas of an expert are first
    spread over nodes (the node with the fewest replicas of it wins, then the least-loaded rank).
    Returns per-rank expert lists, or ``None`` if infeasible."""
    order = np.argsort(-(loads / np.maximum(replicas, 1)), kind="stable")
    items = [(float(loads[e]) / int(replicas[e]), int(e)) for e in order for _ in range(int(replicas[e]))]
    slots: list[list[int]] = [[] for _ in range(world_size)]
    held: list[set[int]] = [set() for _ in range(world_size)]
    if gpus_per_node and world_size > gpus_per_node:
        node_of = np.arange(world_size) // gpus_per_node
        rank_load = np.zeros(world_size)
        used = np.zeros(world_size, dtype=np.int64)
        held_m = np.zeros((world_size, len(loads)), dtype=bool)
        per_node: dict[int, np.ndarray] = {}
        for per, e in items:
            cnt = per_node.setdefault(e, np.zeros(node_of[-1] + 1, dtype=np.int64))
            ok = (used < capacity) & ~held_m[:, e]
            if not ok.any():
                return None
            primary = np.where(ok, cnt[node_of], np.iinfo(np.int64).max)
            cand = ok & (primary == primary.min())
            best = int(np.argmin(np.where(cand, rank_load + 1e-9 * used, np.inf)))
            slots[best].append(e)
            held_m[best, e] = True
            rank_load[best] += per
            used[best] += 1
            cnt[node_of[best]] += 1
        return slots
    heap = [(0.0, 0, r) for r in range(world_size)]  # (load, slots used, rank): a min-heap of ranks with room
    for per, e in items:
        skipped = []
        while heap:
            load, used, r = heapq.heappop(heap)
            if e in held[r]:
                skipped.append((load, used, r))
                continue
            slots[r].append(e)
            held[r].add(e)
            if used + 1 < capacity:
                heapq.heappush(heap, (load + per, used + 1, r))
            break
        else:
            return None
        for item in skipped:
            heapq.heappush(heap, item)
    return slots


def _perturb(reps: np.ndarray, rng: np.random.Generator, count: int, max_replicas: int) -> list[np.ndarray]:
    out, seen = [], {tuple(reps.tolist())}
    if len(reps) < 2:  # moving a replica needs two experts
        return out
    for _ in range(count * 3):
        if len(out) >= count:
            break
        a, b = rng.choice(len(reps), size=2, replace=False)
        if reps[a] <= 1 or reps[b] >= max_replicas:
            continue
        new = reps.copy()
        new[a] -= 1
        new[b] += 1
        key = tuple(new.tolist())
        if key not in seen:
            seen.add(key)
            out.append(new)
    return out


class LoadPlanner:
    """Plans a :class:`Layout` per step from the per-expert token counts of the last ``history`` steps.

    Args:
        num_experts: E.
        world_size: N.
        capacity: experts a rank may materialise (memory bound), ``>= ceil(E/N)``.
        history: steps of counts kept.
        shape: layer shape for the cost model (a generic one when ``None``).
        hardware: cost-model hardware.
        routing_policy: ``uniform``, ``local_first``, ``node_first`` or ``auto`` (the cost model picks).
        num_perturbations: extra replica vectors scored around the greedy one.
        history_decay: weight ``decay**age`` of a step's counts (1.0: plain sum of the last ``history``
            steps, as in LAER-MoE; < 1 follows drifting routing faster).
        tokens_per_rank: tokens per rank and step the candidates are costed for. ``None`` (default): the
            observed counts as they are, i.e. one step of the recorded history (its decay-weighted mean) or the
            ``counts`` given to :meth:`plan`; an int ``>= 1`` rescales the counts to
            ``tokens_per_rank * top_k * world_size`` assignments (a declared batch, e.g. to cost a tiny test run
            as a real one). Either way it replaces ``shape.tokens_per_rank``, which the planner does not read.

    Attributes:
        last_cost: the cost-model total of the last plan.
        last_tokens_per_rank: the tokens per rank the last plan was costed for.
    """

    def __init__(
        self,
        num_experts: int,
        world_size: int,
        capacity: int,
        *,
        history: int = 5,
        shape: MoEShape | None = None,
        hardware: Hardware | None = None,
        routing_policy: str = "auto",
        num_perturbations: int = 4,
        seed: int = 0,
        history_decay: float = 1.0,
        tokens_per_rank: int | None = None,
    ) -> None:
        if routing_policy not in ROUTING_POLICIES:
            raise ValueError(
                f"LoadPlanner: routing_policy={routing_policy!r} is not supported; choose one of {ROUTING_POLICIES}"
            )
        for name, value, low in (
            ("num_experts", num_experts, 1),
            ("world_size", world_size, 1),
            ("capacity", capacity, 1),
            ("history", history, 1),
            ("num_perturbations", num_perturbations, 0),
            ("seed", seed, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ValueError(f"LoadPlanner: {name}={value!r} must be an int >= {low}")
        if not 0.0 < history_decay <= 1.0:
            raise ValueError(f"LoadPlanner: history_decay={history_decay} must be in (0, 1]")
        if tokens_per_rank is not None and (
            isinstance(tokens_per_rank, bool) or not isinstance(tokens_per_rank, int) or tokens_per_rank < 1
        ):
            raise ValueError(
                f"LoadPlanner: tokens_per_rank={tokens_per_rank!r} must be None (the observed counts) or an int >= 1"
            )
        if capacity * world_size < num_experts:
            raise ValueError(
                f"capacity={capacity} x world_size={world_size} < num_experts={num_experts}: "
                "the layout cannot hold every expert"
            )
        self.num_experts, self.world_size, self.capacity = num_experts, world_size, capacity
        self.history: deque[np.ndarray] = deque(maxlen=history)
        self.shape = shape or MoEShape(
            hidden=4096, intermediate=14336, num_experts=num_experts, top_k=2, tokens_per_rank=4096
        )
        self.hardware = hardware or PRESETS["h100"]
        self.routing_policy = routing_policy
        self.num_perturbations = num_perturbations
        self.history_decay = history_decay
        self.tokens_per_rank = tokens_per_rank
        self._rng = np.random.default_rng(seed)
        self.last_cost: float | None = None
        self.last_tokens_per_rank: float | None = None

    def observe(self, counts: np.ndarray) -> None:
        """Record one step's ``counts[src_rank, expert]``."""
        self.history.append(np.asarray(counts, dtype=np.int64).reshape(self.world_size, self.num_experts))

    def plan(self, counts: np.ndarray | None = None) -> Layout:
        """Best layout for the recorded history (or the given ``counts[N, E]`` of one step).

        The history enters as its decay-weighted mean, one step's worth of the observed token assignments;
        candidates are costed at that size unless ``tokens_per_rank`` was given (see the class docstring).
        """
        if counts is None:
            if not self.history:
                return Layout.identity(self.num_experts, self.world_size)
            hist = np.stack(list(self.history))  # oldest first
            w = self.history_decay ** np.arange(len(hist) - 1, -1, -1, dtype=np.float64)
            counts = np.tensordot(w, hist, axes=1) / w.sum()
        counts = np.asarray(counts, dtype=np.float64)
        loads = counts.sum(axis=0)
        n, e, cap = self.world_size, self.num_experts, self.capacity
        # the tie-breaker matters when loads are zero: a tiny uniform load keeps the placement balanced
        loads = loads + 1e-6 * max(1.0, loads.sum())
        totals = sorted({e, min(n * cap, e + (n * cap - e) // 2), n * cap})
        cand_reps: list[np.ndarray] = []
        for tot in totals:
            cand_reps.append(allocate_replicas(loads, tot, n))
        cand_reps += _perturb(cand_reps[-1], self._rng, self.num_perturbations, n)
        if e % n == 0 and e >= n:
            cand_layouts = [Layout.identity(e, n)]
        else:
            cand_layouts = []
        if self.routing_policy == "auto":
            policies = ("uniform", "local_first") + (
                ("node_first",) if n > self.hardware.gpus_per_node else ()
            )
        else:
            policies = (self.routing_policy,)
        gpn = self.hardware.gpus_per_node
        placements: list[list[list[int]]] = []
        seen: set = set()
        for reps in cand_reps:
            for spread in (0, gpn) if n > gpn else (0,):
                slots = greedy_placement(reps, loads, n, cap, gpus_per_node=spread)
                key = None if slots is None else tuple(tuple(sorted(x)) for x in slots)
                if slots is None or key in seen:
                    continue
                seen.add(key)
                placements.append(slots)
        # the cost model wants one step's worth of token assignments: the observed ones, or a declared batch
        if self.tokens_per_rank is None:
            scaled = counts
            tokens = float(counts.sum()) / (self.shape.top_k * n)
        else:
            scaled = counts * (self.tokens_per_rank * self.shape.top_k * n / max(1.0, float(counts.sum())))
            tokens = float(self.tokens_per_rank)
        shape = replace(self.shape, tokens_per_rank=max(1, round(tokens)))  # its dense-compute term
        best, best_cost = None, float("inf")
        for lay in cand_layouts:  # identity (static-EP placement inside FSEP; one replica each: local_first)
            # the fractional traffic like the planned candidates (token_shares would truncate ``scaled``)
            pairs = pair_traffic(scaled, hold_matrix(lay.slots, e), "local_first", gpn)
            n_slots = np.array([len(s) for s in lay.slots], dtype=np.float64)
            cost = cost_from_pairs(pairs, n_slots, shape, self.hardware, mode="fsep").total
            if cost < best_cost - 1e-12:
                best, best_cost = lay, cost
        for slots in placements:
            hold = hold_matrix(slots, e)
            n_slots = hold.sum(axis=0)
            for pol in policies:
                pairs = pair_traffic(scaled, hold, pol, gpn)
                cost = cost_from_pairs(pairs, n_slots, shape, self.hardware, mode="fsep").total
                if cost < best_cost - 1e-12:
                    best, best_cost = (slots, pol), cost
        if isinstance(best, tuple):
            best = Layout.from_slots(best[0], e, best[1], name=f"planned-{best[1]}", gpus_per_node=gpn)
        assert best is not None
        self.last_cost = best_cost
        self.last_tokens_per_rank = tokens
        return best
