"""Event-driven continuous-batching engine: the simulation core of TIE, SART, PBKV and rollout shaping.

Model (vLLM v1 / transformers continuous batching style):

* Requests arrive (``Request.arrival``) and are handed to a :class:`~hf_ext.simulate.types.Scheduler`.
* Each iteration the engine admits waiting requests in the scheduler's order while a batch slot
  (``max_num_seqs``, one per branch), the token budget (``max_num_batched_tokens``) and KV memory
  (``kv_capacity_tokens``) allow; admission stops at the first request that does not fit (head-of-line,
  no skipping, like vLLM).  Then one mixed iteration runs: prefill (chunks) of the new requests plus one decode
  step of every running sequence.  Its duration comes from the :class:`~hf_ext.simulate.cost_model.CostModel`.
  The prefill iteration produces a request's first token (TTFT).
* Between events (an arrival, a sequence finishing, memory running out, a branch check) nothing changes except
  that every running sequence grows by one token per step, so the engine jumps over many decode-only steps at
  once (closed-form step-time sum); per-sequence progress is kept lazily (``generated = gen0 + step - join``),
  which makes an event O(log batch).
* KV memory: a request holds its prompt tokens (less prefix-cache hits) plus one token per generated token per
  branch.  When decode growth would exceed the capacity, unreferenced prefix-cache entries are evicted first,
  then the most recently admitted request is preempted (recompute: its KV is dropped, it goes back to the
  scheduler, and on re-admission prompt + generated tokens are prefilled again, counted as recomputed).
* Prefix cache (``req.meta["prefix_segments"] = [(key, tokens), ...]`` covering a prefix of the prompt):
  leading segments found in the cache skip prefill; GPU and CPU tiers, CPU hits are loaded at
  ``transfer_bandwidth`` (blocking), GPU evictions spill to the CPU tier; eviction / prefetch come from a
  pluggable :class:`CachePolicy` (LRU by default).  ``req.meta["output_key"]`` caches the output as a segment
  that extends the prompt's path (agent workflows).
* Multi-branch requests (``req.meta["branch_lens"] = [len_0, ..., len_{N-1}]``): the prompt is prefilled once,
  N sequences decode; the request stops once ``stop_after`` branches finished (``req.meta["stop_after"]`` or
  ``SimConfig.stop_after``), and a :class:`BranchPolicy` may prune branches every ``check_every`` steps or
  when a branch finishes (SART).

Example:
    >>> from hf_ext.simulate import Simulator, CostModel, FCFS, Request
    >>> reqs = [Request(id=i, arrival=0.01 * i, prompt_len=16, output_len=8) for i in range(4)]
    >>> res = Simulator(CostModel.constant(0.001), FCFS()).run(reqs)
    >>> res.num_finished, res.tokens_generated
    (4, 32)
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from hf_ext.simulate.cost_model import CostModel
from hf_ext.simulate.types import Request, Scheduler


# ------------------------------------------------------------------------------------------ config
@dataclass
class SimConfig:
    """Engine limits and switches."""

    max_num_seqs: int = field(
        default=256, metadata={"help": "max running sequences (branches) per iteration"}
    )
    max_num_batched_tokens: int | None = field(
        default=8192,
        metadata={"help": "token budget per iteration (decode tokens + prefill tokens); None: no limit"},
    )
    kv_capacity_tokens: int | None = field(
        default=None,
        metadata={"help": "GPU KV capacity in tokens (None: from kv_capacity_bytes, else unlimited)"},
    )
    kv_capacity_bytes: float | None = field(
        default=None,
        metadata={
            "help": "GPU KV capacity in bytes (uses CostModel.kv_bytes_per_token; not with kv_capacity_tokens)"
        },
    )
    chunked_prefill: bool = field(default=True, metadata={"help": "split long prefills across iterations"})
    admission_watermark: float = field(
        default=0.0, metadata={"help": "fraction of KV capacity kept free when admitting (vLLM watermark)"}
    )
    prefix_caching: bool = field(
        default=True, metadata={"help": "use req.meta['prefix_segments'] for cache hits"}
    )
    cpu_capacity_tokens: int = field(
        default=0, metadata={"help": "CPU KV tier capacity in tokens (0: no tier)"}
    )
    transfer_bandwidth: float = field(default=25e9, metadata={"help": "CPU<->GPU KV bandwidth in bytes/s"})
    prefetch_window_s: float = field(
        default=0.05,
        metadata={"help": "prefetches are queued on the CPU->GPU link at most this far ahead (s)"},
    )
    stop_after: int | None = field(
        default=None, metadata={"help": "multi-branch: stop a request after this many branches finish"}
    )
    check_every: int = field(
        default=0, metadata={"help": "multi-branch: BranchPolicy.on_check every N steps"}
    )
    record_timeline: bool = field(default=True, metadata={"help": "record (time, memory, batch, waiting)"})
    timeline_min_dt: float = field(default=0.0, metadata={"help": "min seconds between timeline points"})

    def __post_init__(self) -> None:
        _check_number("max_num_seqs", self.max_num_seqs, integer=True, low=1)
        _check_number(
            "max_num_batched_tokens", self.max_num_batched_tokens, integer=True, low=1, none_ok=True
        )
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens <= self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens must be None or > max_num_seqs={self.max_num_seqs} (decode tokens count "
                f"against it), got {self.max_num_batched_tokens!r}"
            )
        _check_number("kv_capacity_tokens", self.kv_capacity_tokens, integer=True, low=1, none_ok=True)
        _check_number("kv_capacity_bytes", self.kv_capacity_bytes, low=0, low_open=True, none_ok=True)
        if self.kv_capacity_tokens is not None and self.kv_capacity_bytes is not None:
            raise ValueError(
                f"give one of kv_capacity_tokens and kv_capacity_bytes (the GPU KV capacity), got both "
                f"({self.kv_capacity_tokens!r} tokens, {self.kv_capacity_bytes!r} bytes)"
            )
        _check_number("admission_watermark", self.admission_watermark, low=0)
        if not self.admission_watermark < 1.0:
            raise ValueError(f"admission_watermark must be in [0, 1), got {self.admission_watermark!r}")
        _check_number("cpu_capacity_tokens", self.cpu_capacity_tokens, integer=True, low=0)
        _check_number("transfer_bandwidth", self.transfer_bandwidth, low=0, low_open=True)
        _check_number("prefetch_window_s", self.prefetch_window_s, low=0)
        _check_number("stop_after", self.stop_after, integer=True, low=1, none_ok=True)
        _check_number("check_every", self.check_every, integer=True, low=0)
        _check_number("timeline_min_dt", self.timeline_min_dt, low=0)
        for name in ("chunked_prefill", "prefix_caching", "record_timeline"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")


def _check_number(
    name: str,
    value: Any,
    *,
    integer: bool = False,
    low: float,
    low_open: bool = False,
    none_ok: bool = False,
) -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``value`` is a finite number (an int when ``integer``; never a
    bool) ``>= low`` (``> low`` when ``low_open``), or None when ``none_ok``."""
    if value is None and none_ok:
        return
    kind = "an int" if integer else "a finite number"
    bound = f"> {low:g}" if low_open else f">= {low:g}"
    ok = (
        not isinstance(value, bool)
        and isinstance(value, (int, np.integer) if integer else (int, float, np.integer, np.floating))
        and math.isfinite(value)
        and (value > low if low_open else value >= low)
    )
    if not ok:
        extra = " or None" if none_ok else ""
        raise ValueError(f"{name} must be {kind} {bound}{extra}, got {value!r}")


# ------------------------------------------------------------------------------------ cache types
class CacheEntry:
    """One prefix-cache segment (``tokens`` KV tokens) in the ``"gpu"`` or ``"cpu"`` tier."""

    __slots__ = (
        "key",
        "tokens",
        "tier",
        "refs",
        "last_access",
        "created",
        "hits",
        "depth",
        "ready_at",
        "data",
    )

    def __init__(self, key: str, tokens: int, tier: str, now: float, depth: int) -> None:
        self.key = key
        self.tokens = tokens
        self.tier = tier
        self.refs = 0
        self.last_access = now
        self.created = now
        self.hits = 0
        self.depth = depth
        self.ready_at = now  # a CPU->GPU transfer in flight completes at this time
        self.data: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"CacheEntry({self.key!r}, tokens={self.tokens}, tier={self.tier}, refs={self.refs})"


@runtime_checkable
class CachePolicy(Protocol):
    """Eviction (and optional prefetch) policy of the prefix cache.

    Required: ``name`` and ``victim(candidates, now, tier)`` returning the entry to evict from ``candidates``
    (unreferenced entries of ``tier``).  Optional methods the engine calls when present:
    ``on_insert(entry, now)``, ``on_access(entry, now)``, ``on_request_arrival(req, now)``,
    ``on_request_finish(req, now)``, ``prefetch(sim, now) -> list[str]`` (CPU keys to bring to the GPU tier
    while idle memory and the bandwidth budget allow).
    """

    name: str

    def victim(self, candidates: list[CacheEntry], now: float, tier: str) -> CacheEntry: ...


class LRUCachePolicy:
    """Least recently used first; among equally recent entries the deeper (longer-prefix) one first."""

    name = "lru"

    def victim(self, candidates: list[CacheEntry], now: float, tier: str) -> CacheEntry:
        return min(candidates, key=lambda e: (e.last_access, -e.depth))


@dataclass
class BranchState:
    """What a :class:`BranchPolicy` sees of one branch."""

    index: int
    generated: int
    target: int
    status: str  # "running" | "finished" | "pruned" | "waiting"


class BranchPolicy(Protocol):
    """Optional hooks for multi-branch requests (both optional; return branch indices to prune, or ``"stop"``).

    ``on_check(req, states, now)`` runs every ``SimConfig.check_every`` steps for each decoding multi-branch
    request; ``on_branch_finish(req, states, now)`` runs when one of its branches finishes.
    """


# -------------------------------------------------------------------------------- internal state
class _Seq:
    __slots__ = ("rs", "branch", "target", "join", "gen0", "alive")

    def __init__(self, rs: _ReqState, branch: int, target: int, join: int, gen0: int) -> None:
        self.rs = rs
        self.branch = branch
        self.target = target
        self.join = join
        self.gen0 = gen0
        self.alive = True


def _whole(v: Any) -> bool:
    """A whole number (``5`` or ``5.0``; numpy scalars too), not a ``bool``: token counts are whole."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        return False
    return math.isfinite(v) and float(v).is_integer()


class _ReqState:
    __slots__ = (
        "req",
        "idx",
        "targets",
        "progress",
        "status",
        "seqs",
        "stop_after",
        "n_finished",
        "n_alive",
        "first_admit",
        "first_token",
        "finish",
        "preemptions",
        "hit_gpu",
        "hit_cpu",
        "prefill_computed",
        "recomputed",
        "evict_recomputed",
        "prefill_left",
        "prefill_off",
        "priv",
        "pins",
        "segments",
        "admitted_before",
        "computed_upto",
        "order",
        "answered",
    )

    def __init__(self, req: Request, idx: int, default_stop: int | None) -> None:
        self.req = req
        self.idx = idx
        bl = req.meta.get("branch_lens")
        if bl is not None and len(bl) == 0:
            raise ValueError(
                f"request {req.id}: meta['branch_lens'] must list at least one branch length, got []"
            )
        if bl is not None and not all(_whole(x) for x in bl):  # int() cut 2.5 to 2
            raise ValueError(
                f"request {req.id}: meta['branch_lens'] must be whole numbers of tokens, got {bl!r}"
            )
        if bl is None and not _whole(req.output_len):
            raise ValueError(
                f"request {req.id}: output_len must be a whole number of tokens >= 1, got {req.output_len!r}"
            )
        self.targets = [int(x) for x in bl] if bl is not None else [int(req.output_len)]
        n = len(self.targets)
        self.progress = [0] * n
        self.status = [0] * n  # 0 waiting/running, 1 finished, 2 pruned
        self.seqs: list[_Seq | None] = [None] * n
        sa = req.meta.get("stop_after", default_stop)
        if sa is not None and (isinstance(sa, bool) or not isinstance(sa, (int, np.integer)) or sa < 1):
            raise ValueError(f"request {req.id}: meta['stop_after'] must be None or an int >= 1, got {sa!r}")
        self.stop_after = n if sa is None else min(int(sa), n)
        self.n_finished = 0
        self.n_alive = 0
        self.first_admit = math.nan
        self.first_token = math.nan
        self.finish = math.nan
        self.preemptions = 0
        self.hit_gpu = 0
        self.hit_cpu = 0
        self.prefill_computed = 0
        self.recomputed = 0
        self.evict_recomputed = 0
        self.prefill_left = 0
        self.prefill_off = 0
        self.priv = 0
        self.pins: list[CacheEntry] = []
        self.segments = req.meta.get("prefix_segments") or ()
        self.admitted_before = False
        self.computed_upto = 0  # context offsets below this had their KV computed before a preemption
        self.order = 0
        self.answered = False


def _context_to_prefill(rs: _ReqState) -> int:
    """Tokens an admission prefills (before prefix-cache hits): the prompt plus what the branches still to run had
    generated before a preemption. Finished or pruned branches are not restored: their KV was freed when they
    ended."""
    return rs.req.prompt_len + sum(p for p, s in zip(rs.progress, rs.status) if s == 0)


# ----------------------------------------------------------------------------------- the engine
class Simulator:
    """Continuous-batching serving engine simulator (see the module docstring).

    Args:
        cost_model: iteration-time / KV-size model.
        scheduler: admission-order policy (any :class:`~hf_ext.simulate.types.Scheduler`).
        config: :class:`SimConfig` limits (keyword overrides accepted via ``**kw``).
        cache_policy: prefix-cache eviction/prefetch policy (default LRU).
        branch_policy: multi-branch hooks (``on_check`` / ``on_branch_finish``).
        preempt_victim: ``f(running_requests) -> Request`` choosing whom to preempt (default: last admitted).
        on_finish: ``f(req, now)`` called when a request completes (e.g. to release a dependent request).
    """

    def __init__(
        self,
        cost_model: CostModel,
        scheduler: Scheduler,
        config: SimConfig | None = None,
        *,
        cache_policy: CachePolicy | None = None,
        branch_policy: Any = None,
        preempt_victim: Callable[[list[Request]], Request] | None = None,
        on_finish: Callable[[Request, float], None] | None = None,
        **kw: Any,
    ) -> None:
        if not isinstance(cost_model, CostModel):
            raise ValueError(f"cost_model must be a CostModel, got {type(cost_model).__name__}")
        for m in ("add", "peek_next", "pop_next", "__len__"):
            if not callable(getattr(scheduler, m, None)):
                raise ValueError(f"scheduler must implement the Scheduler protocol (missing {m!r})")
        if config is not None and not isinstance(config, SimConfig):
            raise ValueError(
                f"config must be a SimConfig or None, got {type(config).__name__} {config!r}; pass SimConfig(...) "
                "or its fields as keywords (Simulator(cost_model, scheduler, max_num_seqs=...))"
            )
        if config is None:
            config = SimConfig(**kw)
        elif kw:
            from dataclasses import replace

            config = replace(config, **kw)
        hooks = [h for h in ("on_check", "on_branch_finish") if callable(getattr(branch_policy, h, None))]
        if branch_policy is not None and not hooks:
            raise ValueError(
                f"branch_policy {type(branch_policy).__name__} has neither on_check nor on_branch_finish: it would "
                "never be called"
            )
        if "on_check" in hooks and not config.check_every:
            raise ValueError(
                "branch_policy.on_check runs every SimConfig.check_every steps, but check_every=0 (never); set "
                "check_every to N >= 1"
            )
        if config.check_every and "on_check" not in hooks:
            raise ValueError(
                f"check_every={config.check_every} calls branch_policy.on_check every N steps, but no branch_policy "
                "with on_check is given; pass one or leave check_every=0"
            )
        self.cost = cost_model
        self.scheduler = scheduler
        self.config = config
        self.cache_policy: Any = cache_policy or LRUCachePolicy()
        self.branch_policy = branch_policy
        self.preempt_victim = preempt_victim
        self.on_finish = on_finish
        if config.cpu_capacity_tokens and not cost_model.kv_bytes_per_token > 0:
            raise ValueError(
                f"cpu_capacity_tokens={config.cpu_capacity_tokens} needs CostModel.kv_bytes_per_token > 0 (got "
                f"{cost_model.kv_bytes_per_token!r}): CPU<->GPU transfers are priced by bytes, so without it they "
                "would cost nothing"
            )
        cap = config.kv_capacity_tokens
        if cap is None and config.kv_capacity_bytes is not None:
            if cost_model.kv_bytes_per_token <= 0:
                raise ValueError("kv_capacity_bytes needs CostModel.kv_bytes_per_token > 0")
            cap = int(config.kv_capacity_bytes // cost_model.kv_bytes_per_token)
        self.capacity: float = float(cap) if cap is not None else math.inf
        self.kv_bytes = cost_model.kv_bytes_per_token

    # ------------------------------------------------------------------------ public helpers
    def gpu_free_tokens(self) -> float:
        """Free GPU KV tokens now (capacity minus sequences and cached entries)."""
        return self.capacity - self._mem_now()

    def _mem_now(self) -> float:
        return self.mem_base + self.n_dec * (self.step - self.s_sync)

    def _ctx_now(self) -> float:
        return self.ctx_base + self.n_dec * (self.step - self.s_sync)

    def _sync(self) -> None:
        d = self.step - self.s_sync
        if d:
            self.mem_base += self.n_dec * d
            self.ctx_base += self.n_dec * d
            self.s_sync = self.step

    def _new_state(self, r: Request) -> _ReqState:
        cfg = self.config
        if not _whole(r.prompt_len) or r.prompt_len < 1:  # a fractional prompt ran as fractional tokens
            raise ValueError(
                f"request {r.id}: prompt_len must be a whole number of tokens >= 1, got {r.prompt_len!r}"
            )
        rs = _ReqState(r, len(self._states), cfg.stop_after)
        if r.prompt_len < 1 or any(t < 1 for t in rs.targets):
            raise ValueError(f"request {r.id}: prompt_len and output lengths must be >= 1")
        if not math.isfinite(r.arrival) or r.arrival < 0:
            raise ValueError(f"request {r.id}: arrival must be a finite time >= 0, got {r.arrival!r}")
        seg_tokens = sum(int(t) for _, t in rs.segments)
        if seg_tokens > r.prompt_len:
            raise ValueError(
                f"request {r.id}: meta['prefix_segments'] cover {seg_tokens} tokens > prompt_len {r.prompt_len} "
                "(they must be a prefix of the prompt)"
            )
        worst = r.prompt_len + sum(rs.targets)
        if worst > self.capacity:
            raise ValueError(
                f"request {r.id} needs up to {worst} KV tokens > kv_capacity_tokens={self.capacity:g}; "
                "raise kv_capacity_tokens/kv_capacity_bytes or shorten the workload"
            )
        wm = cfg.admission_watermark * self.capacity
        if wm and r.prompt_len + len(rs.targets) + wm > self.capacity:
            raise ValueError(
                f"request {r.id} can never be admitted: its prompt ({r.prompt_len} tokens) plus the admission "
                f"watermark ({cfg.admission_watermark:g} x {self.capacity:g} tokens) exceed kv_capacity_tokens; "
                "lower admission_watermark or raise the capacity"
            )
        if len(rs.targets) > cfg.max_num_seqs:
            raise ValueError(
                f"request {r.id} has {len(rs.targets)} branches > max_num_seqs={cfg.max_num_seqs}"
            )
        if id(r) in self._by_req:
            raise ValueError(f"request {r.id} was submitted twice (same object)")
        self._states.append(rs)
        self._by_req[id(r)] = rs
        return rs

    def submit(self, req: Request) -> None:
        """Add a request while the simulation runs (from an ``on_finish`` hook: dependent workflow calls).

        Its ``arrival`` is raised to the current time if it lies in the past."""
        if not getattr(self, "_running_sim", False):
            raise RuntimeError("submit() is for hooks during run(); pass initial requests to run()")
        if req.arrival < self.now:
            req.arrival = self.now
        self._new_state(req)
        heapq.heappush(self._late, (req.arrival, len(self._states), req))

    # ------------------------------------------------------------------------------------- run
    def run(self, requests: Sequence[Request]) -> Any:
        """Simulate ``requests`` to completion; returns a :class:`~hf_ext.simulate.metrics.SimResult`."""
        from hf_ext.simulate.metrics import SimResult

        cfg = self.config
        for r in requests:  # before the sort, which compared a string arrival with a TypeError
            if isinstance(r.arrival, bool) or not isinstance(
                r.arrival, (int, float, np.integer, np.floating)
            ):
                raise ValueError(f"request {r.id}: arrival must be a finite time >= 0, got {r.arrival!r}")
        reqs = sorted(requests, key=lambda r: (r.arrival, r.id))
        self._states: list[_ReqState] = []
        self._by_req: dict[int, _ReqState] = {}
        for r in reqs:
            r.meta.pop("sim_generated", None)  # left by an earlier run of the same requests (preemptions)
            self._new_state(r)
        states = self._states
        arrivals = [r.arrival for r in reqs]
        n_req = len(reqs)
        self._late: list[tuple[float, int, Request]] = []  # requests submitted while running
        late = self._late
        inf = math.inf

        # engine state
        self.now = 0.0
        self.step = 0
        self.s_sync = 0
        self.n_dec = 0
        self.ctx_base = 0.0
        self.mem_base = 0.0
        self.heap: list[tuple[int, int, _Seq]] = []
        self._uid = 0
        self.prefilling: list[_ReqState] = []
        self.running: dict[int, _ReqState] = {}  # admission order
        self.n_slots = 0
        self.multi_running: set[_ReqState] = set()
        self.cache: dict[str, CacheEntry] = {}
        self.cpu_used = 0
        self.cache_gpu = 0
        self.seen_keys: set[str] = set()
        self.link_free = 0.0  # the CPU->GPU link is busy until this time
        self.pending_stall = 0.0  # the next iteration waits this long for KV transfers
        self.loaded_tokens = 0
        self.prefetched_tokens = 0
        self.tokens_generated = 0
        self.tokens_discarded = 0
        self.peak_mem = 0.0
        self.n_preemptions = 0
        self.n_iterations = 0
        self.n_events = 0
        self._order = 0
        tl_t: list[float] = []
        tl_mem: list[float] = []
        tl_batch: list[int] = []
        tl_wait: list[int] = []
        tl_cache: list[float] = []
        last_tl = -math.inf

        sched = self.scheduler
        cost = self.cost
        pol = self.cache_policy
        pol_arrival = getattr(pol, "on_request_arrival", None)
        add_many = getattr(sched, "add_many", None)
        pol_prefetch = getattr(pol, "prefetch", None)
        bp = self.branch_policy
        on_check = getattr(bp, "on_check", None) if bp is not None else None
        check_every = cfg.check_every if on_check is not None else 0
        max_tokens = cfg.max_num_batched_tokens if cfg.max_num_batched_tokens is not None else 1 << 62
        cap = self.capacity
        record = cfg.record_timeline
        tl_dt = cfg.timeline_min_dt

        i_arr = 0
        self.n_completed = 0
        if n_req:
            self.now = arrivals[0]
        self.start_time = self.now
        self.kv_token_seconds = 0.0  # the integral of KV tokens in use over time (mean = this / duration)
        self._running_sim = True
        while True:
            self.n_events += 1
            now = self.now
            arrived: list[Request] = []
            while True:
                if i_arr < n_req and arrivals[i_arr] <= now and (not late or arrivals[i_arr] <= late[0][0]):
                    r = reqs[i_arr]
                    i_arr += 1
                elif late and late[0][0] <= now:
                    r = heapq.heappop(late)[2]
                else:
                    break
                if pol_arrival is not None:
                    pol_arrival(r, now)
                arrived.append(r)
            # requests that arrived together reach a scheduler with add_many together
            if len(arrived) > 1 and add_many is not None:
                add_many(arrived, now)
            else:
                for r in arrived:
                    sched.add(r, now)
            next_arr = arrivals[i_arr] if i_arr < n_req else inf
            if late and late[0][0] < next_arr:
                next_arr = late[0][0]
            # memory for the next step's growth (evict cache, then preempt)
            preempted = False
            if self.n_dec:
                while self._mem_now() + self.n_dec > cap:
                    if self._evict(self._mem_now() + self.n_dec - cap, ()):
                        continue
                    self._preempt_one()
                    preempted = True
                    if not self.n_dec:
                        break
            if pol_prefetch is not None and self.cpu_used:
                self._prefetch(pol_prefetch)
            # admission
            budget = max_tokens - self.n_dec
            chunks: list[tuple[_ReqState, int]] = []
            for rs in self.prefilling:  # continue chunked prefills first
                if budget <= 0:
                    break
                n = min(rs.prefill_left, budget) if cfg.chunked_prefill else rs.prefill_left
                chunks.append((rs, n))
                budget -= n
            if not preempted:
                while self.n_slots < cfg.max_num_seqs and len(sched):
                    if budget <= 0:
                        break
                    req = sched.peek_next(now)
                    if req is None:
                        break
                    rs = self._by_req.get(id(req))
                    if rs is None:
                        raise RuntimeError(
                            f"scheduler returned request {req.id} that is not part of this run"
                        )
                    if self.n_slots + rs.status.count(0) > cfg.max_num_seqs:
                        break
                    if not cfg.chunked_prefill and chunks and _context_to_prefill(rs) > budget:
                        break  # whole prompt must fit this iteration's budget (one oversize prompt runs alone)
                    if not self._try_admit(rs, cap):
                        break
                    got = sched.pop_next(now)
                    if got is not req:
                        raise RuntimeError("scheduler.pop_next returned a different request than peek_next")
                    n = rs.prefill_left if not cfg.chunked_prefill else min(rs.prefill_left, budget)
                    chunks.append((rs, n))
                    budget -= n
            chunks = [c for c in chunks if c[1] > 0]
            if not chunks and not self.n_dec:
                if next_arr < inf:
                    self.now = max(now, next_arr)
                    self.kv_token_seconds += self._mem_now() * (self.now - now)  # the prefix cache, idle
                    continue
                if len(sched) or self.prefilling:
                    raise RuntimeError(
                        f"simulation stuck at t={now:.3f}s: {len(sched)} waiting requests cannot be admitted "
                        "(scheduler returned None or memory never frees)"
                    )
                break

            mem_start = self._mem_now()
            if chunks:
                # ---------------------------------------------------------- one mixed iteration
                p_tok = 0
                attn = 0.0
                for rs, n in chunks:
                    p_tok += n
                    attn += n * (rs.prefill_off + n / 2.0)
                t = cost.iteration_time(p_tok, attn, self.n_dec, self._ctx_now())
                if self.pending_stall:
                    t += self.pending_stall
                    self.pending_stall = 0.0
                self.tokens_generated += self.n_dec
                self.now = now + t
                self.step += 1
                self.n_iterations += 1
                for rs, n in chunks:
                    # recomputed: the part of this chunk that had been computed before a preemption (a request
                    # preempted mid-prefill had computed its chunks so far only)
                    rs.recomputed += max(0, min(rs.prefill_off + n, rs.computed_upto) - rs.prefill_off)
                    rs.prefill_left -= n
                    rs.prefill_off += n
                    rs.prefill_computed += n
                    if rs.prefill_left == 0:
                        self.prefilling.remove(rs)
                        self._join(rs)
            else:
                # ------------------------------------------------ jump over decode-only steps
                while self.heap and not self.heap[0][2].alive:
                    heapq.heappop(self.heap)
                k = self.heap[0][0] - self.step
                mem_now = self._mem_now()
                if cap != math.inf:
                    k = min(k, int((cap - mem_now) // self.n_dec))
                if check_every and self.multi_running:
                    k = min(k, check_every - self.step % check_every)
                k = max(k, 1)
                if preempted and len(sched):  # memory was freed: try admitting again after one step
                    k = 1
                ctx_now = self._ctx_now()
                if next_arr < inf:  # an arrival joins the queue at its own time, full slots or not
                    k = cost.steps_within(self.n_dec, ctx_now, next_arr - now, k)
                t = cost.decode_span(self.n_dec, ctx_now, k)
                self.tokens_generated += self.n_dec * k
                self.now = now + t
                self.step += k
                self.n_iterations += k
            mem = self._mem_now()
            # memory grows by n_dec tokens a step: linear over a decode jump (finishes free it at the end)
            self.kv_token_seconds += 0.5 * (mem_start + mem) * (self.now - now)
            if mem > self.peak_mem:
                self.peak_mem = mem
            if mem > cap + 1e-9:
                raise AssertionError(f"internal: KV memory {mem} above capacity {cap}")
            # --------------------------------------------------------------- finishes and checks
            heap = self.heap
            while heap and heap[0][0] <= self.step:
                _, _, seq = heapq.heappop(heap)
                if seq.alive:
                    self._finish_branch(seq)
            if check_every and self.multi_running and self.step % check_every == 0:
                for rs in list(self.multi_running):
                    if rs in self.multi_running:
                        self._call_branch_hook(on_check, rs)
            if record and self.now - last_tl >= tl_dt:
                last_tl = self.now
                # memory at the end of the step, then (when requests finished) after they freed theirs: joined by
                # straight lines these points trace the linear growth over decode jumps and the drops at finishes
                mem_after = self._mem_now()
                for m_point in (mem, mem_after) if mem_after != mem else (mem,):
                    tl_t.append(self.now)
                    tl_mem.append(m_point)
                    tl_batch.append(self.n_dec)
                    tl_wait.append(len(sched))
                    tl_cache.append(self.cache_gpu)

        # ------------------------------------------------------------------------- results
        self._running_sim = False
        self._sync()
        if self.n_dec or self.n_slots or self.prefilling or self.running:
            raise AssertionError("internal: sequences left running at the end")
        if abs(self.mem_base - self.cache_gpu) > 1e-6:
            raise AssertionError(
                f"internal: KV accounting leak ({self.mem_base} tokens held, {self.cache_gpu} cached)"
            )
        if self.n_completed != len(states):
            raise AssertionError(f"internal: {len(states) - self.n_completed} requests lost")
        timeline = {
            "time": np.asarray(tl_t),
            "kv_tokens": np.asarray(tl_mem),
            "batch": np.asarray(tl_batch),
            "waiting": np.asarray(tl_wait),
            "cache_gpu_tokens": np.asarray(tl_cache),
        }
        return SimResult.from_states(self, states, timeline)

    # --------------------------------------------------------------------------- admission
    def _try_admit(self, rs: _ReqState, cap: float) -> bool:
        """Reserve memory for ``rs`` (prefix hits pinned); False if it does not fit now."""
        prompt_total = _context_to_prefill(rs)
        hits: list[CacheEntry] = []
        hit_gpu = hit_cpu = 0
        evict_re = 0
        if self.config.prefix_caching and rs.segments:
            cache = self.cache
            missed = False
            for key, tok in rs.segments:
                e = None if missed else cache.get(key)
                if e is None:
                    missed = True
                    if key in self.seen_keys:
                        evict_re += int(tok)
                    continue
                hits.append(e)
                if e.tier == "gpu":
                    hit_gpu += e.tokens
                else:
                    hit_cpu += e.tokens
        n_br = rs.status.count(0)  # branches still to run
        need = prompt_total - hit_gpu + n_br + self.n_dec
        if self.config.admission_watermark:
            need += self.config.admission_watermark * cap
        free = cap - self._mem_now()
        if need > free:
            short = need - free
            if not self._evict(short, hits):
                return False
        # commit
        self._sync()
        now = self.now
        on_access = getattr(self.cache_policy, "on_access", None)
        for e in hits:
            e.refs += 1
            e.last_access = now
            e.hits += 1
            if e.tier == "cpu":  # demand load over the link
                e.tier = "gpu"
                self.cpu_used -= e.tokens
                self.cache_gpu += e.tokens
                self.mem_base += e.tokens
                start = max(now, self.link_free)
                e.ready_at = self.link_free = (
                    start + e.tokens * self.kv_bytes / self.config.transfer_bandwidth
                )
                self.loaded_tokens += e.tokens
            if e.ready_at > now:
                self.pending_stall = max(self.pending_stall, e.ready_at - now)
            if on_access is not None:
                on_access(e, now)
        rs.pins = hits
        hit = hit_gpu + hit_cpu
        rs.hit_gpu += hit_gpu
        rs.hit_cpu += hit_cpu
        rs.evict_recomputed += evict_re
        rs.priv = prompt_total - hit + n_br  # + the first new token of each branch
        self.mem_base += rs.priv
        rs.prefill_left = max(1, prompt_total - hit)
        rs.prefill_off = prompt_total - rs.prefill_left
        if math.isnan(rs.first_admit):
            rs.first_admit = now
        self._order += 1
        rs.order = self._order
        self.running[rs.idx] = rs
        self.n_slots += n_br
        self.prefilling.append(rs)
        return True

    def _join(self, rs: _ReqState) -> None:
        """Prefill of ``rs`` done at the current step: insert its segments, start its branches."""
        self._sync()
        now = self.now
        if self.config.prefix_caching and rs.segments:
            self._insert_segments(rs)
        if math.isnan(rs.first_token):
            rs.first_token = now
        rs.admitted_before = True
        req = rs.req
        keep_output = req.meta.get("output_key") is not None and len(rs.targets) == 1
        for b, target in enumerate(rs.targets):
            if rs.status[b] != 0:
                continue
            p = rs.progress[b]
            gen = p + 1
            rs.priv -= gen  # the recomputed tokens and the reserved new one move to the branch
            self.tokens_generated += 1
            if gen >= target:
                rs.progress[b] = target
                rs.status[b] = 1
                rs.n_finished += 1
                self.n_slots -= 1
                if keep_output:
                    rs.priv += gen
                else:
                    self.mem_base -= gen
                continue
            seq = _Seq(rs, b, target, self.step, gen)
            rs.seqs[b] = seq
            rs.n_alive += 1
            self.n_dec += 1
            self.ctx_base += req.prompt_len + gen
            self._uid += 1
            heapq.heappush(self.heap, (self.step + target - gen, self._uid, seq))
        if len(rs.targets) > 1 and rs.n_alive:
            self.multi_running.add(rs)
        if rs.n_alive == 0:
            self._complete(rs)

    def _insert_segments(self, rs: _ReqState) -> None:
        cache = self.cache
        now = self.now
        pinned = {e.key for e in rs.pins}
        on_insert = getattr(self.cache_policy, "on_insert", None)
        for depth, (key, tok) in enumerate(rs.segments):
            tok = int(tok)
            if key in pinned:
                continue
            e = cache.get(key)
            if e is not None:
                if e.tier == "cpu":  # recomputed although offloaded: keep the fresh GPU copy
                    self.cpu_used -= e.tokens
                    e.tier = "gpu"
                    e.ready_at = now
                    self.cache_gpu += e.tokens
                    self.mem_base += e.tokens
                self.mem_base -= tok  # deduplicate: our private copy is dropped
            else:
                e = CacheEntry(key, tok, "gpu", now, depth)
                cache[key] = e
                self.cache_gpu += tok
                self.seen_keys.add(key)
                if on_insert is not None:
                    on_insert(e, now)
            e.refs += 1
            e.last_access = now
            rs.pins.append(e)
            rs.priv -= tok

    # ---------------------------------------------------------------------------- finishing
    def _finish_branch(self, seq: _Seq) -> int:
        rs = seq.rs
        self._sync()
        seq.alive = False
        rs.seqs[seq.branch] = None
        rs.n_alive -= 1
        self.n_dec -= 1
        self.n_slots -= 1
        gen = seq.target
        self.ctx_base -= rs.req.prompt_len + gen
        rs.progress[seq.branch] = gen
        rs.status[seq.branch] = 1
        rs.n_finished += 1
        keep_output = rs.req.meta.get("output_key") is not None and len(rs.targets) == 1
        if not keep_output:
            self.mem_base -= gen
        else:
            rs.priv += gen
        fin = (
            getattr(self.branch_policy, "on_branch_finish", None) if self.branch_policy is not None else None
        )
        if rs.n_finished >= rs.stop_after or rs.n_alive == 0:
            self._complete(rs)
            return 1
        if fin is not None:
            return self._call_branch_hook(fin, rs)
        return 0

    def _call_branch_hook(self, hook: Callable[..., Any], rs: _ReqState) -> int:
        self._sync()
        states = [
            BranchState(
                b,
                self._branch_gen(rs, b),
                rs.targets[b],
                ("running" if rs.seqs[b] is not None else "waiting")
                if s == 0
                else ("finished" if s == 1 else "pruned"),
            )
            for b, s in enumerate(rs.status)
        ]
        out = hook(rs.req, states, self.now)
        if out is None:
            return 0
        if isinstance(out, str):
            if out != "stop":
                raise ValueError(
                    f"branch hook returned {out!r}; allowed: iterable of branch indices or 'stop'"
                )
            self._complete(rs)
            return 1
        for b in out:
            seq = rs.seqs[b]
            if seq is None or not seq.alive:
                continue
            self._drop_seq(seq, pruned=True)
        if rs.n_alive == 0:
            self._complete(rs)
            return 1
        return 0

    def _branch_gen(self, rs: _ReqState, b: int) -> int:
        seq = rs.seqs[b]
        if seq is not None and seq.alive:
            return seq.gen0 + self.step - seq.join
        return rs.progress[b]

    def _drop_seq(self, seq: _Seq, pruned: bool) -> None:
        rs = seq.rs
        gen = seq.gen0 + self.step - seq.join
        seq.alive = False
        rs.seqs[seq.branch] = None
        rs.n_alive -= 1
        self.n_dec -= 1
        self.n_slots -= 1
        self.ctx_base -= rs.req.prompt_len + gen
        self.mem_base -= gen
        rs.progress[seq.branch] = gen
        if pruned:
            rs.status[seq.branch] = 2
            self.tokens_discarded += gen

    def _complete(self, rs: _ReqState) -> None:
        self._sync()
        for seq in rs.seqs:
            if seq is not None and seq.alive:
                self._drop_seq(seq, pruned=True)
        for b, s in enumerate(rs.status):  # waiting branches of a stopped request
            if s == 0:
                rs.status[b] = 2
        if not math.isnan(rs.finish):
            raise AssertionError(f"internal: request {rs.req.id} completed twice")
        rs.finish = self.now
        self.n_completed += 1
        self.multi_running.discard(rs)
        self.running.pop(rs.idx, None)
        if rs in self.prefilling:
            self.prefilling.remove(rs)
        key = rs.req.meta.get("output_key")
        if key is not None and self.config.prefix_caching and len(rs.targets) == 1:
            tok = rs.targets[0]
            depth = len(rs.segments)
            e = self.cache.get(key)
            if e is None:
                e = CacheEntry(key, tok, "gpu", self.now, depth)
                self.cache[key] = e
                self.cache_gpu += tok
                self.seen_keys.add(key)
                rs.priv -= tok
                on_insert = getattr(self.cache_policy, "on_insert", None)
                if on_insert is not None:
                    on_insert(e, self.now)
        self.mem_base -= rs.priv
        rs.priv = 0
        for e in rs.pins:
            e.refs -= 1
            e.last_access = max(e.last_access, self.now)
        rs.pins = []
        fin = getattr(self.cache_policy, "on_request_finish", None)
        if fin is not None:
            fin(rs.req, self.now)
        if self.on_finish is not None:
            self.on_finish(rs.req, self.now)

    # --------------------------------------------------------------------------- preemption
    def _preempt_one(self) -> None:
        if not self.running:
            raise AssertionError("internal: nothing to preempt")
        if self.preempt_victim is not None:
            req = self.preempt_victim([rs.req for rs in self.running.values()])
            rs = self._by_req[id(req)]
        else:
            rs = next(reversed(self.running.values()))
        self._sync()
        for seq in rs.seqs:
            if seq is not None and seq.alive:
                self._drop_seq(seq, pruned=False)
        if rs in self.prefilling:  # its KV covers the chunks prefilled so far
            self.prefilling.remove(rs)
            self.n_slots -= rs.status.count(0)
            rs.prefill_left = 0
            rs.computed_upto = max(rs.computed_upto, rs.prefill_off)
        else:  # decoding: prompt and generated tokens were all computed
            rs.computed_upto = max(rs.computed_upto, _context_to_prefill(rs))
        self.multi_running.discard(rs)
        self.running.pop(rs.idx, None)
        self.mem_base -= rs.priv
        rs.priv = 0
        for e in rs.pins:
            e.refs -= 1
        rs.pins = []
        rs.preemptions += 1
        rs.admitted_before = True
        self.n_preemptions += 1
        rs.req.meta["sim_generated"] = sum(rs.progress)
        getattr(self.scheduler, "requeue", self.scheduler.add)(rs.req, self.now)

    # -------------------------------------------------------------------------------- cache
    def _evict(self, tokens: float, keep: Iterable[CacheEntry]) -> bool:
        """Free at least ``tokens`` GPU tokens from unreferenced cache entries; False if impossible
        (nothing is evicted then)."""
        if not self.cache:
            return False
        keep_ids = {id(e) for e in keep}
        cands = [e for e in self.cache.values() if e.tier == "gpu" and e.refs == 0 and id(e) not in keep_ids]
        if sum(e.tokens for e in cands) < tokens:
            return False
        self._sync()
        freed = 0
        while freed < tokens:
            v = self.cache_policy.victim(cands, self.now, "gpu")
            cands.remove(v)
            freed += v.tokens
            self.mem_base -= v.tokens
            self.cache_gpu -= v.tokens
            self._spill(v, keep_ids)
        return True

    def _spill(self, e: CacheEntry, keep_ids: set[int] | None = None) -> None:
        """Move GPU entry ``e`` to the CPU tier, evicting CPU entries not in ``keep_ids`` (e.g. the CPU hits of
        the request being admitted) for room; ``e`` is dropped when that is not enough."""
        cpu_cap = self.config.cpu_capacity_tokens
        keep_ids = keep_ids or set()
        cands = [x for x in self.cache.values() if x.tier == "cpu" and id(x) not in keep_ids]
        if e.tokens > cpu_cap or self.cpu_used - sum(x.tokens for x in cands) + e.tokens > cpu_cap:
            del self.cache[e.key]
            return
        while self.cpu_used + e.tokens > cpu_cap:
            v = self.cache_policy.victim(cands, self.now, "cpu")
            cands.remove(v)
            self.cpu_used -= v.tokens
            del self.cache[v.key]
        e.tier = "cpu"
        self.cpu_used += e.tokens

    def _prefetch(self, fn: Callable[..., Any]) -> None:
        now = self.now
        if self.link_free > now + self.config.prefetch_window_s:
            return
        keys = fn(self, now) or ()
        for key in keys:
            if self.link_free > now + self.config.prefetch_window_s:
                break
            e = self.cache.get(key)
            if e is None or e.tier != "cpu":
                continue
            if e.tokens > self.gpu_free_tokens() - self.n_dec:
                continue
            self._sync()
            start = max(now, self.link_free)
            e.ready_at = self.link_free = start + e.tokens * self.kv_bytes / self.config.transfer_bandwidth
            self.prefetched_tokens += e.tokens
            self.cpu_used -= e.tokens
            e.tier = "gpu"
            self.cache_gpu += e.tokens
            self.mem_base += e.tokens
            e.data["prefetched"] = e.data.get("prefetched", 0) + 1
