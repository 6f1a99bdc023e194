"""TIE as a transformers continuous-batching scheduler (``ContinuousBatchingConfig(scheduler_type="tie")``).

:class:`TIECBScheduler` subclasses transformers' ``FIFOScheduler`` (itself the ``Scheduler`` ABC of
``transformers.generation.continuous_batching.scheduler``) and changes one thing: the order in which
*waiting* requests are offered for admission. Running requests keep FIFO's priorities (decoding
first, then split prefills), CPU-offloaded requests are restored first (they are cheap to resume),
and fresh requests go by ascending aged TIE score. No preemption is added. :class:`PriorityCBScheduler`
(``scheduler_type="hf_ext_priority"``) is the same machinery with a fixed key per request, for the
comparison baselines (SSJF, LTR, SJF with oracle lengths; keys from :func:`set_priority_keys`).

Transformers builds the scheduler itself (``cls(cache, safety_margin, max_requests_per_batch)``), so
the length information reaches it through a module-level context set by :func:`enable_tie_scheduler`
(:func:`tie_generate_batch` instead registers a subclass of its own for the length of its call, bound to a
private context, so a TIE server in the same process is not disturbed):

* hints (``(μ, σ, ν)`` keyed by request id or by the prompt token ids; :func:`set_length_hints`), computed in
  one batched predictor call by :func:`tie_generate_batch`;
* else a ``predictor`` plus the LLM ``tokenizer`` or a ``prompt_text`` function (prompt ids are turned into
  text and predicted in one batch per scheduling step for the newly arrived requests);
* else the prompt-length heuristic, with a warning.

``B_max`` in β is the batch's ``max_requests_per_batch`` and ``L_queue`` the waiting queue a new request joins,
itself excluded (the requests first seen in one step are scored together, as the simulator's
:meth:`~hf_ext.generation.tie.scheduler.TIEScheduler.add_many` does); aging uses wall-clock seconds.

Example:
    >>> from hf_ext.generation.tie.cb import enable_tie_scheduler
    >>> cls = enable_tie_scheduler()
    >>> cls.__name__
    'TIECBScheduler'
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from transformers.generation.continuous_batching import scheduler as _cb_sched
from transformers.generation.continuous_batching.requests import RequestState, RequestStatus

from hf_ext.generation.tie.config import TIEConfig, tie_config_or_default
from hf_ext.generation.tie.metrics import ADMISSION_WAITS
from hf_ext.generation.tie.scheduler import (
    FALLBACK_WARNING,
    aging_order_key,
    heuristic_prediction,
    tie_components,
    validate_prompts,
)
from hf_ext.utils.name_clash import check_on_clash, may_register, note_replaced, remove_ours

logger = logging.getLogger("hf_ext")

SCHEDULER_NAME = "tie"
PRIORITY_SCHEDULER_NAME = "hf_ext_priority"


class _Context:
    """What the scheduler instances read: predictor, tokenizer, config, per-prompt hints and baseline keys."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.predictor: Any = None
        self.tokenizer: Any = None
        self.prompt_text: Callable[[list[int]], str] | None = None
        self.length_log: Any = None  # a LengthLog: finished requests' lengths are recorded there
        self.config = TIEConfig()
        self.hints: dict[tuple[int, ...], tuple[float, float, float]] = {}
        self.rid_hints: dict[str, tuple[float, float, float]] = {}
        self.hint_sources: dict[Any, str] = {}  # where a hint came from, if not "hint" (for the length log)
        self.keys: dict[tuple[int, ...], float] = {}
        self.rid_keys: dict[str, float] = {}
        # what the newest of our schedulers did, for inspection; never the scheduler itself, which holds the
        # paged KV cache (a strong reference would keep GPU memory alive after the manager is gone)
        self.last_scheduler_type: type | None = None
        self.admission_order: list[str] = []
        # the live schedulers, weakly (see above): in_flight_rows() reads their running requests
        self.live: weakref.WeakSet[Any] = weakref.WeakSet()


CONTEXT = _Context()


def _prompt_text(ctx: _Context, ids: list[int]) -> str:
    """The text the predictor sees for prompt ``ids``: ``ctx.prompt_text(ids)`` if set, else the decoded ids."""
    if ctx.prompt_text is not None:
        text = ctx.prompt_text(ids)
        if not isinstance(text, str):
            raise TypeError(f"prompt_text must return a str, got {type(text).__name__}")
        return text
    return ctx.tokenizer.decode(ids, skip_special_tokens=True)


def _true_prompt(state: RequestState) -> list[int]:
    """The prompt ids the client sent. A request transformers soft-reset (its KV evicted, not offloaded) comes back
    with its generated tokens appended to ``initial_tokens``; ``_true_initial_tokens`` counts the real prompt."""
    n = getattr(state, "_true_initial_tokens", 0)
    return list(state.initial_tokens[:n]) if n else list(state.initial_tokens)


def _lookup_key(by_rid: dict[str, Any], state: RequestState) -> Any:
    """The key ``state`` is found under: its request id if ``by_rid`` has it, else its true prompt ids."""
    return state.request_id if state.request_id in by_rid else tuple(_true_prompt(state))


def _lookup(by_rid: dict[str, Any], by_ids: dict[tuple[int, ...], Any], state: RequestState) -> Any:
    key = _lookup_key(by_rid, state)
    return (by_rid if isinstance(key, str) else by_ids).get(key)


def _ended(state: RequestState) -> str | None:
    """Why a request transformers marked FINISHED ended: ``"eos"``, ``"max_new_tokens"``, or ``None`` when it did
    not (a soft reset also marks the old state FINISHED, and the request comes back under the same id)."""
    if state.status != RequestStatus.FINISHED or not state.generated_tokens:
        return None
    if state.generated_tokens[-1] in getattr(state, "_eos_token_ids", ()):
        return "eos"
    if state.max_new_tokens is not None and len(state.generated_tokens) >= state.max_new_tokens:
        return "max_new_tokens"
    return None


# per-request records a scheduler keeps for inspection (admission_order, prediction_failures): the newest this many
KEEP_RECENT = 100_000

# why a request whose prompt text is empty or whitespace was not predicted (in prediction_failures and the log)
EMPTY_PROMPT_TEXT = (
    "empty prompt text (e.g. a prompt of special tokens only, decoded with skip_special_tokens): nothing for the "
    "predictor to read"
)


class _WaitingOrderScheduler(_cb_sched.FIFOScheduler):
    """FIFO for running requests; *fresh waiting* requests offered for admission by ascending key.

    Subclasses give ``_prepare(new_states)`` (compute what the key needs, once per request) and
    ``_key(request_id, now)``. CPU-offloaded requests are restored first (cheap to resume), as in FIFO.

    Attributes:
        admission_order: request ids in the order they left the waiting queue (for inspection/tests).
    """

    # where this class reads its predictor, tokenizer, log, config, hints and keys: the process-wide CONTEXT, or a
    # private one for the subclass tie_generate_batch registers for the length of its call
    _context: _Context | None = None

    def reset(self) -> None:
        super().reset()
        self.ctx: _Context = type(self)._context or CONTEXT
        self._known: set[str] = set()
        self._last_fresh: list[str] = []
        self.admission_order: list[str] = []
        # for the length log, kept until the request ends: the law it was scored with and its source, and the
        # predictor text already made
        self._laws: dict[str, tuple[tuple[float, float, float], str]] = {}
        self._texts: dict[str, str] = {}
        CONTEXT.last_scheduler_type = type(self)
        CONTEXT.admission_order = self.admission_order
        CONTEXT.live.add(self)

    def _prepare(self, new: list[RequestState]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _key(self, rid: str, now: float) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def _forget(self, rid: str) -> None:
        self._known.discard(rid)

    def _get_waiting_candidates(self) -> list[RequestState]:
        offloaded: list[RequestState] = []
        fresh: list[RequestState] = []
        for req_id in self.waiting_requests_order:
            state = self.waiting_requests[req_id]
            (offloaded if state.is_cpu_offloaded else fresh).append(state)
        new = [s for s in fresh if s.request_id not in self._known]
        if new:
            self._prepare(new)
            self._known.update(s.request_id for s in new)
        now = time.perf_counter()
        fresh.sort(key=lambda s: self._key(s.request_id, now))  # stable: FIFO among equal keys
        self._last_fresh = [s.request_id for s in fresh]
        return offloaded + fresh

    def schedule_batch(self, token_budget: int, cache_budget: int) -> Any:
        self._last_fresh = []
        out = super().schedule_batch(token_budget, cache_budget)
        now = time.perf_counter()
        for rid in self._last_fresh:
            if rid not in self.waiting_requests:
                self.admission_order.append(rid)
                if len(self.admission_order) > KEEP_RECENT:  # a long-running server: the newest only
                    del self.admission_order[: len(self.admission_order) - KEEP_RECENT]
                self._forget(rid)
                state = self.active_requests.get(rid)
                # first admissions only: a soft-reset request is a new state, re-created when it was reset
                if state is not None and not getattr(state, "_true_initial_tokens", 0):
                    born = getattr(state, "created_time", None)
                    if born is not None:
                        ADMISSION_WAITS.observe(type(self).__name__, now - born)
        return out

    def _done(self, rid: str) -> None:
        """``rid`` has ended (finished, failed or cancelled): drop what is kept for a comeback."""

    def clear_cancelled_requests(self) -> list[RequestState]:
        cancelled = super().clear_cancelled_requests()
        for s in cancelled:
            self._forget(s.request_id)
            self._done(s.request_id)
            self._record(s, "cancelled")
        return cancelled

    def finish_request(self, request_id: str) -> None:
        state = self.active_requests.get(request_id)
        if state is not None:
            reason = _ended(state)
            if reason is not None:
                self._record(state, reason)
                self._done(request_id)
            elif state.status >= RequestStatus.FAILED:  # failed: forget it
                self._laws.pop(request_id, None)
                self._texts.pop(request_id, None)
                self._done(request_id)
            # else it comes back under the same id: offloaded to the CPU (PENDING) or soft-reset (FINISHED, not
            # ended); its law and text are kept for its record
        super().finish_request(request_id)

    def _record(self, state: RequestState, reason: str) -> None:
        """Append ``state`` to the context's length log (if set). Runs in the engine's thread: a failure is counted
        and logged by the log, never raised."""
        rid = state.request_id
        law = self._laws.pop(rid, None)
        text = self._texts.pop(rid, None)
        log = self.ctx.length_log
        if log is None:
            return
        try:
            prompt = _true_prompt(state)
            before = len(state.initial_tokens) - len(prompt)  # tokens generated before a soft reset
            n_out = before + len(state.generated_tokens)
            if n_out < 1:  # cancelled before its first token: no information
                return
            log.add(
                prompt=text if text is not None else _prompt_text(self.ctx, prompt),
                output_len=n_out,
                reason=reason,
                max_new_tokens=None if state.max_new_tokens is None else before + int(state.max_new_tokens),
                prompt_tokens=len(prompt),
                request_id=rid,
                law=None if law is None else law[0],
                source=None if law is None else law[1],
            )
        except Exception as exc:  # noqa: BLE001 - the engine thread must not die for the log
            log._error("record", f"could not record request {rid!r}: {type(exc).__name__}: {exc}")


def _score_cap(config: TIEConfig, max_new_tokens: Any) -> int:
    """``M`` of a request whose generation is capped at ``max_new_tokens`` (``None``: none): that cap when
    ``config.use_request_cap`` (the default), else ``config.max_new_tokens``. The engine scores and falls back to the
    heuristic with it; :func:`tie_generate_batch`'s heuristic uses the same."""
    m = max_new_tokens if config.use_request_cap else None
    return int(m) if m is not None and m >= 1 else config.max_new_tokens


class TIECBScheduler(_WaitingOrderScheduler):
    """FIFO for running requests, aged TIE order for waiting ones (see the module docstring).

    A request that transformers soft-resets (its KV evicted, the request re-queued under the same id) comes back
    with the score (β included) and the aging clock of its first arrival: it is neither predicted nor priced again,
    and its wait keeps counting. CPU-offloaded requests are restored ahead of fresh ones, as in FIFO.

    Attributes:
        admission_order: request ids in the order they left the waiting queue (for inspection/tests).
        scores: request id -> un-aged TIE score (while waiting).
        prediction_failures: request id -> why its in-loop prediction failed, or was not made because its prompt
            text is empty (it was scored by the heuristic).
    """

    def reset(self) -> None:
        super().reset()
        # the config this scheduler (one manager / server run) scores with: a later enable_tie_scheduler(...)
        # elsewhere in the process (tie_generate_batch does one) must not change its keys mid-run
        self.tie_config: TIEConfig = self.ctx.config
        self.scores: dict[str, float] = {}
        self._t0: dict[str, float] = {}
        self._static: dict[str, float] = {}
        # admitted requests until they end: (score, t0, static key) for a comeback after a soft reset
        self._admitted: dict[str, tuple[float, float, float | None]] = {}
        self._epoch = time.perf_counter()
        self._warned = False
        self.prediction_failures: dict[str, str] = {}

    def _prepare(self, new: list[RequestState]) -> None:
        back = [s for s in new if s.request_id in self._admitted]
        for s in back:  # a soft-reset request: the score and clock of its first arrival
            rid = s.request_id
            self.scores[rid], self._t0[rid], static = self._admitted.pop(rid)
            if static is not None:
                self._static[rid] = static
        if back:
            came_back = {s.request_id for s in back}
            new = [s for s in new if s.request_id not in came_back]
            if not new:
                return
        cfg = self.tie_config
        caps = np.asarray([self._cap(s) for s in new], dtype=np.float64)
        mu = np.empty(len(new))
        sigma = np.empty(len(new))
        nu = np.empty(len(new))
        missing: list[int] = []
        source = ["hint"] * len(new)
        ctx = self.ctx
        for i, s in enumerate(new):
            hint = _lookup(ctx.rid_hints, ctx.hints, s)
            if hint is None:
                missing.append(i)
                source[i] = "predictor"
            else:
                mu[i], sigma[i], nu[i] = hint
                source[i] = ctx.hint_sources.get(_lookup_key(ctx.rid_hints, s), "hint")
        if missing:
            predictor = ctx.predictor  # read once: set_tie_predictor may swap it from another thread
            if predictor is not None and (ctx.prompt_text is not None or ctx.tokenizer is not None):
                missing = self._predict(predictor, new, missing, mu, sigma, nu)  # left: failed predictions
            elif not self._warned:
                warnings.warn(FALLBACK_WARNING, UserWarning, stacklevel=2)
                self._warned = True
            for i in missing:  # each request's own cap (not the largest of the requests that came with it)
                h = heuristic_prediction([len(_true_prompt(new[i]))], int(caps[i]))
                mu[i], sigma[i], nu[i] = h["mu"][0], h["sigma"][0], h["nu"][0]
                source[i] = "heuristic"
        if ctx.length_log is not None:
            for i, s in enumerate(new):
                self._laws[s.request_id] = ((float(mu[i]), float(sigma[i]), float(nu[i])), source[i])
        e, c = tie_components(mu, sigma, nu, cfg, caps)
        # L_queue: the waiting queue each new request joins, itself excluded (TIEScheduler.add / add_many's count)
        beta = cfg.beta(max(0, len(self.waiting_requests) - 1), max(1, self.max_requests_per_batch))
        t0 = time.perf_counter() - self._epoch  # from the scheduler's start: keeps the keys small (precision)
        for i, s in enumerate(new):
            score = float(e[i] + beta * c[i])
            self.scores[s.request_id] = score
            self._t0[s.request_id] = t0
            if cfg.aging == "continuous":  # its key does not change while waiting: computed once
                self._static[s.request_id] = aging_order_key(cfg, score, t0, t0)

    def _predict(
        self,
        predictor: Any,
        new: list[RequestState],
        idx: list[int],
        mu: np.ndarray,
        sigma: np.ndarray,
        nu: np.ndarray,
    ) -> list[int]:
        """Predict requests ``new[i]`` for ``i in idx`` into ``mu/sigma/nu``; returns the ``i`` whose prediction
        failed (the predictor raised, or gave a non-finite value or σ, ν <= 0) or was not made: a request whose
        prompt text is empty or whitespace (e.g. a prompt of special tokens only, decoded with
        ``skip_special_tokens``) gives the predictor nothing to read, and is never sent to it.

        This runs inside the engine's generation thread, where an exception would fail every request in flight
        (and stop a server for good), so a failed prediction is logged (``logging`` "hf_ext", naming the request
        ids and why), kept in :attr:`prediction_failures`, and its request is scored by the prompt-length heuristic.
        """
        empty: list[int] = []
        try:
            texts = [_prompt_text(self.ctx, _true_prompt(new[i])) for i in idx]
            if self.ctx.length_log is not None:
                self._texts.update((new[i].request_id, t) for i, t in zip(idx, texts))
            empty = [i for i, t in zip(idx, texts) if not t.strip()]
            if empty:  # outside the engine an empty prompt is a ValueError; here, the heuristic (see above)
                self._failed(new, empty, EMPTY_PROMPT_TEXT)
                idx, texts = [i for i, t in zip(idx, texts) if t.strip()], [t for t in texts if t.strip()]
                if not idx:
                    return empty
            out = predictor.predict(texts)
            got = [np.asarray(out[k], dtype=np.float64).reshape(-1) for k in ("mu", "sigma", "nu")]
            if any(a.shape != (len(idx),) for a in got):
                raise ValueError(f"predictor returned {[a.shape for a in got]} for {len(idx)} prompts")
        except Exception as exc:  # noqa: BLE001 - reported per request, see the docstring
            return empty + self._failed(new, idx, f"the predictor raised {type(exc).__name__}: {exc}")
        ok = np.isfinite(got[0]) & np.isfinite(got[1]) & np.isfinite(got[2]) & (got[1] > 0) & (got[2] > 0)
        good = [i for i, k in zip(idx, ok) if k]
        mu[good], sigma[good], nu[good] = got[0][ok], got[1][ok], got[2][ok]
        bad = [i for i, k in zip(idx, ok) if not k]
        return empty + (self._failed(new, bad, "non-finite prediction or sigma/nu <= 0") if bad else [])

    def _failed(self, new: list[RequestState], idx: list[int], why: str) -> list[int]:
        rids = [new[i].request_id for i in idx]
        for rid in rids:
            self.prediction_failures[rid] = why
        while len(self.prediction_failures) > KEEP_RECENT:  # a long-running server: the newest only
            del self.prediction_failures[next(iter(self.prediction_failures))]
        logger.warning(
            "TIE: length prediction failed for %d request(s) %s: %s; scoring them by the prompt-length heuristic",
            len(rids),
            rids[:5],
            why,
        )
        return idx

    def _cap(self, state: RequestState) -> int:
        return _score_cap(self.tie_config, state.max_new_tokens)

    def _key(self, rid: str, now: float) -> float:
        cfg = self.tie_config
        if cfg.aging == "continuous":
            return self._static[rid]
        return aging_order_key(cfg, self.scores[rid], self._t0[rid], now - self._epoch)

    def _forget(self, rid: str) -> None:
        super()._forget(rid)
        score, t0 = self.scores.pop(rid, None), self._t0.pop(rid, None)
        if score is not None and t0 is not None:
            self._admitted[rid] = (score, t0, self._static.pop(rid, None))

    def _done(self, rid: str) -> None:
        self._admitted.pop(rid, None)
        # a hint given under this request id served its request: transformers reuses ids (req_0, req_1, ... in
        # every generate_batch), so a leftover would score an unrelated later request
        with self.ctx.lock:
            if self.ctx.rid_hints.pop(rid, None) is not None:
                self.ctx.hint_sources.pop(rid, None)


class PriorityCBScheduler(_WaitingOrderScheduler):
    """Baseline admission orders for comparisons (SSJF, LTR, SJF with oracle lengths): a fixed key per request,
    lower first, no aging; keys come from :func:`set_priority_keys`. A waiting request without a key is an
    error (``KeyError`` naming it), never silently put last. A key given by request id is dropped when its request
    ends (finished, failed or cancelled), as TIE's request-id hints are."""

    def reset(self) -> None:
        super().reset()
        self.keys: dict[str, float] = {}

    def _prepare(self, new: list[RequestState]) -> None:
        for s in new:
            k = _lookup(self.ctx.rid_keys, self.ctx.keys, s)
            if k is None:
                raise KeyError(
                    f"{PRIORITY_SCHEDULER_NAME!r} scheduler: no priority key for request {s.request_id!r}; "
                    "call set_priority_keys(...) with its request id or prompt ids first"
                )
            self.keys[s.request_id] = k

    def _key(self, rid: str, now: float) -> float:
        return self.keys[rid]

    def _forget(self, rid: str) -> None:
        super()._forget(rid)
        self.keys.pop(rid, None)

    def _done(self, rid: str) -> None:
        # a key given under this request id served its request: transformers reuses ids (req_0, req_1, ... in every
        # generate_batch), so a leftover would order an unrelated later request instead of failing loudly
        with self.ctx.lock:
            self.ctx.rid_keys.pop(rid, None)


# ------------------------------------------------------------------------------------ public API
_REGISTRY = "transformers' continuous-batching SCHEDULER_MAPPING"
_FIX = "hf_ext.generation.tie.cb.register(overwrite=True)"
# foreign schedulers that register(overwrite=True) replaced, put back by unregister()
_REPLACED: dict[str, Any] = {}


def register(*, overwrite: bool = False, on_clash: str = "raise") -> type[TIECBScheduler]:
    """Add ``"tie"`` (and the comparison baseline ``"hf_ext_priority"``) to transformers' ``SCHEDULER_MAPPING``
    (idempotent; :func:`unregister` removes both).

    Args:
        overwrite: replace a scheduler someone else registered under one of these names (:func:`unregister` puts
            it back). By default such an entry is left in place: see ``on_clash``.
        on_clash: what to do when a foreign entry holds one of the names and ``overwrite`` is off: ``"raise"`` a
            ``ValueError`` naming it before anything is registered (explicit calls, :func:`enable_tie_scheduler`),
            or ``"warn"`` once and register only the free names (the automatic registration at import).
    """
    check_on_clash(on_clash)
    if not isinstance(overwrite, bool):
        raise ValueError(f"overwrite must be True or False, got {overwrite!r}")
    mapping = _cb_sched.SCHEDULER_MAPPING
    entries = ((SCHEDULER_NAME, TIECBScheduler), (PRIORITY_SCHEDULER_NAME, PriorityCBScheduler))
    free = {
        name: overwrite or may_register(_REGISTRY, name, mapping.get(name), cls, fix=_FIX, on_clash=on_clash)
        for name, cls in entries
    }  # every name checked before any is written
    for name, cls in entries:
        if not free[name]:
            continue
        note_replaced(_REPLACED, name, mapping.get(name), cls)
        mapping[name] = cls
    return TIECBScheduler


def unregister() -> None:
    """Remove the names :func:`register` added (only where they still point to our classes), putting back a
    scheduler that ``register(overwrite=True)`` replaced."""
    for name, cls in ((SCHEDULER_NAME, TIECBScheduler), (PRIORITY_SCHEDULER_NAME, PriorityCBScheduler)):
        remove_ours(_cb_sched.SCHEDULER_MAPPING, name, cls, _REPLACED, name)


def enable_tie_scheduler(
    predictor: Any = None,
    tokenizer: Any = None,
    config: TIEConfig | None = None,
    *,
    prompt_text: Callable[[list[int]], str] | None = None,
    length_log: Any = None,
) -> type[TIECBScheduler]:
    """Register ``"tie"`` and set what it scores with; then use ``ContinuousBatchingConfig(scheduler_type="tie")``.

    Args:
        predictor: a ``logt`` :class:`~hf_ext.generation.tie.predictor.LengthPredictor` (``None``: hints or
            the prompt-length heuristic with a warning).
        tokenizer: the served model's tokenizer, used to turn prompt ids back into text for ``predictor``.
        config: :class:`TIEConfig` (α, β bounds, aging, support).
        prompt_text: ``ids -> str``, the text ``predictor`` sees for a request's prompt ids, instead of
            ``tokenizer.decode(ids, skip_special_tokens=True)`` (e.g. the last user turn of a chat prompt,
            if that is what the predictor was trained on).
        length_log: a :class:`~hf_ext.generation.tie.lengthlog.LengthLog`: every request our schedulers finish is
            recorded there (its prompt text, output length, whether that length is exact or cut, the law it was
            scored with), to train a predictor on your own traffic. Needs ``tokenizer`` or ``prompt_text``.

    Raises ``ValueError`` (before anything is set) when another scheduler holds ``"tie"`` or ``"hf_ext_priority"``
    in ``SCHEDULER_MAPPING``: it is never replaced silently (``register(overwrite=True)`` replaces it on purpose).
    """
    config = tie_config_or_default(config)
    validate_predictor_args(predictor, tokenizer, prompt_text, length_log=length_log)
    cls = register()  # a foreign "tie" scheduler raises here, before the context changes
    with CONTEXT.lock:
        CONTEXT.predictor = predictor
        CONTEXT.tokenizer = tokenizer
        CONTEXT.prompt_text = prompt_text
        CONTEXT.length_log = length_log
        CONTEXT.config = config
    return cls


def _reread(read: Callable[[], Any], tries: int = 3) -> Any:
    """``read()`` of a container the engine's thread may change meanwhile, again on "changed size during
    iteration" (``RuntimeError``), up to ``tries`` times; ``None`` if it never got a stable read."""
    for _ in range(tries):
        try:
            return read()
        except RuntimeError:
            continue
    return None


def live_schedulers() -> list[Any]:
    """Our CB schedulers alive in this process (held weakly by ``CONTEXT.live``). Safe from any thread: a set that
    changes while read (a server starting its engine) is read again."""
    return _reread(lambda: list(CONTEXT.live)) or []


def in_flight_rows() -> list[dict[str, Any]]:
    """The requests our live CB schedulers are generating now, as ``{"request_id", "prompt", "output_len",
    "prompt_tokens", "max_new_tokens"}`` rows (``output_len``: tokens so far, a lower bound of the final length), for
    :class:`~hf_ext.generation.tie.refresh.PredictorRefresher`'s ``in_flight=``.

    Safe to call from another thread while the engine runs: a scheduler whose requests change while they are read
    is read again (up to three times, then skipped). ``prompt`` is the predictor's text for the request (needs the
    tokenizer or ``prompt_text`` of :func:`enable_tie_scheduler`; without either, ``[]``).
    """
    if CONTEXT.prompt_text is None and CONTEXT.tokenizer is None:
        return []
    rows: list[dict[str, Any]] = []
    for sched in live_schedulers():
        if getattr(sched, "ctx", CONTEXT) is not CONTEXT:  # a tie_generate_batch call's: not logged there
            continue
        got = _reread(lambda s=sched: (list(s.active_requests.values()), dict(s._texts)))
        if got is None:
            continue
        states, texts = got
        for state in states:
            n = len(state.generated_tokens)
            if n >= 1:
                text = texts.get(state.request_id)
                ids = _true_prompt(state)
                rows.append(
                    {
                        "request_id": state.request_id,
                        "prompt": text if text is not None else _prompt_text(CONTEXT, ids),
                        "output_len": n,
                        "prompt_tokens": len(ids),
                        "max_new_tokens": getattr(state, "max_new_tokens", None),
                    }
                )
    return rows


def set_tie_predictor(predictor: Any) -> Any:
    """Swap the predictor the TIE scheduler scores new requests with, keeping everything else
    :func:`enable_tie_scheduler` set (tokenizer or ``prompt_text``, config, length log, hints).

    Safe while an engine or server runs: requests already scored keep their scores; the next request admitted to the
    waiting queue is predicted by ``predictor``. ``None`` goes back to hints and the prompt-length heuristic.
    :class:`~hf_ext.generation.tie.refresh.PredictorRefresher` uses this to install a predictor retrained on the
    served length log.

    Returns:
        the predictor it replaced.
    """
    validate_predictor_args(predictor, None, None, tokenizer_required=False)
    with CONTEXT.lock:
        if predictor is not None and CONTEXT.tokenizer is None and CONTEXT.prompt_text is None:
            raise ValueError(
                "predictor: the TIE scheduler has no tokenizer or prompt_text to turn prompt ids into text; call "
                "enable_tie_scheduler(predictor, tokenizer) first"
            )
        old, CONTEXT.predictor = CONTEXT.predictor, predictor
    return old


def validate_predictor_args(
    predictor: Any,
    tokenizer: Any,
    prompt_text: Any,
    *,
    tokenizer_required: bool = True,
    length_log: Any = None,
) -> None:
    """The checks :func:`enable_tie_scheduler` makes before changing any state (``ValueError`` naming the argument).

    ``tokenizer_required=False``: all but the missing-tokenizer check, for a caller that loads the tokenizer next.
    """
    if predictor is not None and getattr(predictor, "kind", "logt") != "logt":
        raise ValueError(f"predictor must be a 'logt' LengthPredictor, got kind={predictor.kind!r}")
    if prompt_text is not None and not callable(prompt_text):
        raise ValueError(f"prompt_text must be a callable ids -> str, got {type(prompt_text).__name__}")
    if length_log is not None:
        from hf_ext.generation.tie.lengthlog import LengthLog

        if not isinstance(length_log, LengthLog):
            raise ValueError(f"length_log must be a LengthLog or None, got {type(length_log).__name__}")
    needs_text = predictor is not None or length_log is not None
    if tokenizer_required and needs_text and tokenizer is None and prompt_text is None:
        raise ValueError(
            "tokenizer (of the served model) or prompt_text is required with predictor= or length_log= to turn "
            "prompt ids into text"
        )


def _targets(
    who: str, n_values: int, prompt_ids: Sequence[Sequence[int]] | None, request_ids: Sequence[str] | None
) -> tuple[str, list[Any]]:
    if (prompt_ids is None) == (request_ids is None):
        raise ValueError(f"{who}: give exactly one of prompt_ids or request_ids")
    if request_ids is not None:
        if isinstance(request_ids, str) or any(not isinstance(r, str) or not r for r in request_ids):
            raise ValueError(f"{who}: request_ids must be a sequence of non-empty strings")
        keys: list[Any] = list(request_ids)
        kind = "rid"
    else:
        keys = [tuple(int(t) for t in ids) for ids in prompt_ids]  # type: ignore[union-attr]
        kind = "ids"
    if len(keys) != n_values:
        raise ValueError(f"{who}: {len(keys)} prompts/request ids but {n_values} values")
    return kind, keys


def set_length_hints(
    prompt_ids: Sequence[Sequence[int]] | None,
    mu: Sequence[float],
    sigma: Sequence[float],
    nu: Sequence[float] | float = 3.5,
    *,
    request_ids: Sequence[str] | None = None,
    source: str = "hint",
) -> None:
    """Give the TIE scheduler log-t parameters per prompt (token id lists) or per request id.

    Pass ``prompt_ids`` (then ``request_ids=None``) or ``prompt_ids=None, request_ids=[...]`` (ids given to
    ``add_request``; looked up first). NaN/inf or non-positive σ/ν raise ``ValueError``. ``source`` is what a
    :class:`~hf_ext.generation.tie.lengthlog.LengthLog` records as the law's origin: ``"hint"``, or
    ``"predictor"`` / ``"heuristic"`` when you computed the hints with one of those.
    """
    _put_length_hints(CONTEXT, prompt_ids, mu, sigma, nu, request_ids=request_ids, source=source)


def _put_length_hints(
    ctx: _Context,
    prompt_ids: Sequence[Sequence[int]] | None,
    mu: Sequence[float],
    sigma: Sequence[float],
    nu: Sequence[float] | float,
    *,
    request_ids: Sequence[str] | None,
    source: str,
) -> None:
    """:func:`set_length_hints` into ``ctx`` (the process-wide context, or a :func:`tie_generate_batch` call's)."""
    if source not in ("hint", "predictor", "heuristic"):
        raise ValueError(f"source must be one of ('hint', 'predictor', 'heuristic'), got {source!r}")
    mu_a = np.asarray(mu, dtype=np.float64).reshape(-1)
    n = mu_a.shape[0]
    kind, keys = _targets("set_length_hints", n, prompt_ids, request_ids)
    sigma_a = np.asarray(sigma, dtype=np.float64)
    nu_a = np.broadcast_to(np.asarray(nu, dtype=np.float64), (n,))
    if sigma_a.shape != (n,):
        raise ValueError(
            f"mu and sigma must have one value per prompt ({n}), got {mu_a.shape}, {sigma_a.shape}"
        )
    for name, a in (("mu", mu_a), ("sigma", sigma_a), ("nu", nu_a)):
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} contains NaN/inf; TIE needs finite length predictions")
    if np.any(sigma_a <= 0) or np.any(nu_a <= 0):
        raise ValueError("sigma and nu must be > 0")
    table = ctx.rid_hints if kind == "rid" else ctx.hints
    with ctx.lock:
        for k, m, s, v in zip(keys, mu_a, sigma_a, nu_a):
            table[k] = (float(m), float(s), float(v))
            if source == "hint":
                ctx.hint_sources.pop(k, None)
            else:
                ctx.hint_sources[k] = source


def set_priority_keys(
    values: Sequence[float],
    *,
    prompt_ids: Sequence[Sequence[int]] | None = None,
    request_ids: Sequence[str] | None = None,
) -> None:
    """Fixed admission keys (lower first) for ``scheduler_type="hf_ext_priority"``, the comparison baselines:
    SSJF (predicted length), LTR (rank score), SJF with oracle lengths. Finite floats only."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    kind, keys = _targets("set_priority_keys", v.shape[0], prompt_ids, request_ids)
    if not np.all(np.isfinite(v)):
        raise ValueError("set_priority_keys: values contain NaN/inf")
    table = CONTEXT.rid_keys if kind == "rid" else CONTEXT.keys
    with CONTEXT.lock:
        for k, x in zip(keys, v):
            table[k] = float(x)


def clear_priority_keys() -> None:
    """Forget all baseline priority keys."""
    with CONTEXT.lock:
        CONTEXT.keys.clear()
        CONTEXT.rid_keys.clear()


def clear_length_hints() -> None:
    """Forget all per-prompt and per-request length hints."""
    with CONTEXT.lock:
        CONTEXT.hints.clear()
        CONTEXT.rid_hints.clear()
        CONTEXT.hint_sources.clear()


def tie_generate_batch(
    model: Any,
    prompts: Sequence[str],
    tokenizer: Any,
    predictor: Any = None,
    generation_config: Any = None,
    continuous_batching_config: Any = None,
    config: TIEConfig | None = None,
    length_log: Any = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """``model.generate_batch`` with the TIE scheduler, predicting all prompt lengths in one batch first.

    Args:
        model: a transformers causal LM.
        prompts: N non-empty prompt strings.
        tokenizer: the model's tokenizer.
        predictor: ``logt`` length predictor (``None``: prompt-length heuristic with a warning).
        generation_config / continuous_batching_config: as for ``generate_batch``; the latter's
            ``scheduler_type`` is set to a TIE scheduler name registered for this call only (a copy is made).
        config: :class:`TIEConfig`.
        length_log: a :class:`~hf_ext.generation.tie.lengthlog.LengthLog` to record each request's output length
            in (see :func:`enable_tie_scheduler`).

    The call scores with its own predictions, config and length log only: the process-wide ones of
    :func:`enable_tie_scheduler` (a TIE server or manager running meanwhile) are neither read nor changed.
    ``persistent_manager=True`` and a model with a cached manager are refused (``ValueError``): the kept manager
    would schedule with something other than this call's TIE scheduler.

    Returns:
        ``generate_batch``'s dict ``request_id -> GenerationOutput`` (``req_<i>`` is prompt ``i``).
    """
    import copy

    from transformers import ContinuousBatchingConfig

    if isinstance(prompts, str):
        raise ValueError("prompts must be a non-empty list of strings")
    prompts = validate_prompts(prompts, non_empty=True)
    config = tie_config_or_default(config)
    # the predictor's kind too: a point predictor is refused before it runs
    validate_predictor_args(predictor, tokenizer, None, length_log=length_log)
    if kwargs.get("persistent_manager"):
        raise ValueError(
            "persistent_manager=True is not supported by tie_generate_batch (the kept manager would outlive the "
            "call's scheduler); use enable_tie_scheduler(...) and model.generate_batch(...) for a persistent manager"
        )
    if getattr(model, "_cached_continuous_batching_manager", None) is not None:
        raise ValueError(
            "model: it has a cached continuous batching manager, which generate_batch would reuse with its own "
            "scheduler instead of TIE; call model.destroy_cached_continuous_batching_manager() first"
        )
    mnt = kwargs.get("max_new_tokens", getattr(generation_config, "max_new_tokens", None))
    if mnt is not None and (not isinstance(mnt, int) or mnt <= 0):
        raise ValueError(f"max_new_tokens must be an int > 0, got {mnt!r}")
    if mnt is None and generation_config is None:
        # what generate_batch caps each request at then: the model's generation config's max_new_tokens
        mnt = getattr(getattr(model, "generation_config", None), "max_new_tokens", None)
    ids = [tokenizer(p).input_ids for p in prompts]
    if predictor is not None:
        out = predictor.predict(list(prompts))
        if "sigma" not in out:
            raise ValueError(f"predictor must be a 'logt' LengthPredictor, got kind={predictor.kind!r}")
    else:
        warnings.warn(FALLBACK_WARNING, UserWarning, stacklevel=2)
        # the cap the engine's own fallback and score use for these requests (each request's effective cap)
        out = heuristic_prediction([len(x) for x in ids], _score_cap(config, mnt))
    cb = (
        copy.deepcopy(continuous_batching_config)
        if continuous_batching_config is not None
        else ContinuousBatchingConfig()
    )
    # a private context and a scheduler name of its own for this call: a TIE server or manager running in this
    # process keeps its predictor, log and hints (they used to be swapped out for the length of the call)
    ctx = _Context()
    ctx.config = config
    if length_log is not None:  # the log records each request under the caller's own prompt text
        texts = {tuple(x): p for x, p in zip(ids, prompts)}
        ctx.tokenizer = tokenizer
        ctx.prompt_text = lambda x: texts.get(tuple(x)) or tokenizer.decode(x, skip_special_tokens=True)
        ctx.length_log = length_log
    source = "predictor" if predictor is not None else "heuristic"
    _put_length_hints(ctx, ids, out["mu"], out["sigma"], out["nu"], request_ids=None, source=source)
    name = f"{SCHEDULER_NAME}@call-{uuid.uuid4().hex}"
    cb.scheduler_type = name
    _cb_sched.SCHEDULER_MAPPING[name] = type(TIECBScheduler.__name__, (TIECBScheduler,), {"_context": ctx})
    try:
        return model.generate_batch(
            ids, generation_config=generation_config, continuous_batching_config=cb, **kwargs
        )
    finally:
        _cb_sched.SCHEDULER_MAPPING.pop(name, None)


@contextlib.contextmanager
def preserved_context() -> Iterator[None]:
    """Run a block that sets its own predictor/config/hints/keys, then put back what the caller had set."""
    with CONTEXT.lock:
        saved = (
            CONTEXT.predictor,
            CONTEXT.tokenizer,
            CONTEXT.prompt_text,
            CONTEXT.length_log,
            CONTEXT.config,
        )
        tables = (CONTEXT.hints, CONTEXT.rid_hints, CONTEXT.hint_sources, CONTEXT.keys, CONTEXT.rid_keys)
        copies = [dict(t) for t in tables]
    try:
        yield
    finally:
        with CONTEXT.lock:
            CONTEXT.predictor, CONTEXT.tokenizer, CONTEXT.prompt_text, CONTEXT.length_log, CONTEXT.config = (
                saved
            )
            for table, old in zip(tables, copies):
                table.clear()
                table.update(old)


# importing this module means transformers' CB scheduler module is loaded: add "tie" (a scheduler someone else
# registered under one of our names is kept, with a warning)
register(on_clash="warn")
