"""Admission-order schedulers for the simulator (and reusable by any engine speaking the Scheduler protocol).

* :class:`FCFS` - arrival order (preempted requests keep their place).
* :class:`ScoreScheduler` - generic min-heap by ``key(req, now)`` computed when the request is added;
  ties broken by arrival order.  Reuse it for any static-score policy.
* :class:`SJFOracle` - shortest true remaining output first (``output_len - meta["sim_generated"]``).
* :class:`SSJF` - shortest predicted output first (``req.meta["pred_len"]``, a point prediction).
* :class:`LJF` - longest (true) first, a reference for offline throughput packing.

Example:
    >>> from hf_ext.simulate.types import Request
    >>> s = SJFOracle()
    >>> for i, n in enumerate([30, 10, 20]):
    ...     s.add(Request(id=i, arrival=0.0, prompt_len=4, output_len=n), now=0.0)
    >>> [s.pop_next(0.0).output_len for _ in range(3)]
    [10, 20, 30]
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable

from hf_ext.simulate.types import Request


class FCFS:
    """First come, first served by arrival time; a preempted request returns to its arrival position (the
    front of the queue, as vLLM re-queues preempted requests first)."""

    name = "fcfs"

    def __init__(self) -> None:
        self._h: list[tuple[float, int, Request]] = []
        self._tie = itertools.count()

    def add(self, req: Request, now: float) -> None:
        # the tie-break number among requests of the same arrival time lives on the request (``meta["fcfs_seq"]``),
        # so a reused scheduler holds nothing from earlier runs
        seq = next(self._tie)
        req.meta["fcfs_seq"] = seq
        heapq.heappush(self._h, (req.arrival, seq, req))

    def requeue(self, req: Request, now: float) -> None:
        """A preempted request back in the queue with the number of its arrival: ahead of the waiting requests of
        the same arrival time."""
        seq = req.meta.get("fcfs_seq")
        if seq is None:
            raise ValueError(f"request {req.id}: requeue() of a request this scheduler never added")
        heapq.heappush(self._h, (req.arrival, seq, req))

    def peek_next(self, now: float) -> Request | None:
        return self._h[0][2] if self._h else None

    def pop_next(self, now: float) -> Request | None:
        return heapq.heappop(self._h)[2] if self._h else None

    def __len__(self) -> int:
        return len(self._h)


class ScoreScheduler:
    """Smallest score first; ``key(req, now) -> float`` is evaluated once, when the request is added.

    Args:
        key: score function (lower runs first).
        name: label used in results.
    """

    def __init__(self, key: Callable[[Request, float], float], name: str = "score") -> None:
        if not callable(key):
            raise ValueError(f"key must be callable (req, now) -> float, got {type(key).__name__}")
        self.key = key
        self.name = name
        self._h: list[tuple[float, float, int, Request]] = []
        self._tie = itertools.count()

    def add(self, req: Request, now: float) -> None:
        heapq.heappush(self._h, (float(self.key(req, now)), req.arrival, next(self._tie), req))

    def peek_next(self, now: float) -> Request | None:
        return self._h[0][3] if self._h else None

    def pop_next(self, now: float) -> Request | None:
        return heapq.heappop(self._h)[3] if self._h else None

    def __len__(self) -> int:
        return len(self._h)


def remaining_tokens(req: Request) -> int:
    """True output tokens still to generate (longest branch for multi-branch requests)."""
    bl = req.meta.get("branch_lens")
    total = max(bl) if bl else req.output_len
    return int(total) - int(req.meta.get("sim_generated", 0) if not bl else 0)


class SJFOracle(ScoreScheduler):
    """Shortest job first with the true (oracle) remaining output length."""

    def __init__(self) -> None:
        super().__init__(lambda r, now: remaining_tokens(r), name="sjf-oracle")


class LJF(ScoreScheduler):
    """Longest (true) job first."""

    def __init__(self) -> None:
        super().__init__(lambda r, now: -remaining_tokens(r), name="ljf-oracle")


def _pred(req: Request, now: float) -> float:
    try:
        p = float(req.meta["pred_len"])
    except KeyError:
        raise ValueError(
            f"SSJF needs req.meta['pred_len'] (point prediction); request {req.id} has none"
        ) from None
    return p - float(req.meta.get("sim_generated", 0))


class SSJF(ScoreScheduler):
    """Speculative shortest job first: shortest predicted output (``req.meta["pred_len"]``) first."""

    def __init__(self) -> None:
        super().__init__(_pred, name="ssjf")


SCHEDULERS: dict[str, Callable[[], object]] = {
    "fcfs": FCFS,
    "sjf": SJFOracle,
    "sjf-oracle": SJFOracle,
    "ssjf": SSJF,
    "ljf": LJF,
}


def make_scheduler(name: str) -> object:
    """Build a scheduler by name (``fcfs``, ``sjf``/``sjf-oracle``, ``ssjf``, ``ljf``)."""
    try:
        return SCHEDULERS[name]()
    except KeyError:
        raise ValueError(f"unknown scheduler {name!r}; allowed: {', '.join(SCHEDULERS)}") from None
