"""Core types of the simulator that policies (TIE, SART, PBKV, rollout shaping) code against.

The engine knows no policy: a scheduler is any object with the :class:`Scheduler` protocol.

Example:
    >>> r = Request(id=0, arrival=0.0, prompt_len=12, output_len=40)
    >>> r.meta["pred_len"] = 35.0
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass
class Request:
    """One generation request.

    Attributes:
        id: unique id within a workload.
        arrival: arrival time in seconds.
        prompt_len: prompt tokens.
        output_len: true output tokens the request will generate (hidden from non-oracle policies).
        prompt: optional prompt text (length predictors read it).
        max_new_tokens: generation cap, or ``None``; ``output_len`` above it is a ``ValueError``.
        meta: free-form per-request data for policies (e.g. ``pred_len``, ``pred_mu``, ``pred_sigma``,
            ``prefix_id``, ``workflow_id``, ``group_id``).
    """

    id: int
    arrival: float
    prompt_len: int
    output_len: int
    prompt: str | None = None
    max_new_tokens: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # the engine runs a request for exactly output_len tokens: a cap below it would be silently exceeded
        if self.max_new_tokens is not None and self.output_len > self.max_new_tokens:
            raise ValueError(
                f"Request {self.id!r}: output_len={self.output_len} exceeds max_new_tokens={self.max_new_tokens}; "
                "a request generates at most max_new_tokens tokens (clip output_len to the cap, or give no cap)"
            )


@runtime_checkable
class Scheduler(Protocol):
    """Admission-order policy for waiting requests (no preemption implied).

    The engine calls :meth:`add` when a request arrives (or is preempted back to waiting),
    and :meth:`pop_next` whenever it can admit one more request; ``None`` means "admit nothing now".
    :meth:`peek_next` lets the engine check memory before committing. A scheduler may also have
    ``add_many(requests, now)``: the engine then hands it requests that arrive at the same instant together
    (in arrival order), e.g. to score each against the queue they all join; and ``requeue(request, now)``: the
    engine then hands it a preempted request through it instead of :meth:`add` (e.g. to keep the priority it
    was given on arrival; ``meta["sim_generated"]`` holds the tokens it had generated).
    """

    name: str

    def add(self, req: Request, now: float) -> None: ...

    def peek_next(self, now: float) -> Request | None: ...

    def pop_next(self, now: float) -> Request | None: ...

    def __len__(self) -> int: ...
