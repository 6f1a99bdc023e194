"""TIE scheduling: tail-inflated-expectation score, aging min-heap, offline batch ordering.

Score of a waiting request whose length is log-t ``(μ, σ, ν)`` (lower runs first)::

    score = E[X̃] + β · CVaR_α[X̃],      β = min(β_max, max(β_min, β_coef · L_queue / B_max))

on the bounded support ``[1, max_new_tokens]`` (:mod:`hf_ext.generation.tie.distribution`); ``β`` is
taken when the request joins the queue (``L_queue`` = requests already waiting). No preemption.
Starvation guard: a waiting score is multiplied by ``γ`` every ``τ`` seconds. With
``aging="continuous"`` the factor is ``γ^(wait/τ)``, and because ``log(score·γ^((now-t0)/τ)) =
log(score) - (t0/τ)·log γ + (now/τ)·log γ`` the order is that of the static key
``log(score) - (t0/τ)·log γ``: an exact O(log n) heap. ``aging="step"`` applies
``γ^floor(wait/τ)`` literally with an O(n) scan per pop.

Where the length distribution comes from, in priority order: ``req.meta["pred_mu"]`` /
``["pred_sigma"]`` (/ ``["pred_nu"]``) set beforehand (e.g. by :func:`annotate_requests`), else the
``predictor`` given to the scheduler (on ``req.prompt``), else a prompt-length heuristic
(:func:`heuristic_prediction`) with a warning.

Example:
    >>> from hf_ext.simulate.types import Request
    >>> s = TIEScheduler()
    >>> for i, mu in enumerate([5.0, 2.0, 3.5]):
    ...     s.add(Request(id=i, arrival=0.0, prompt_len=8, output_len=1, meta={"pred_mu": mu, "pred_sigma": 0.5}), 0.0)
    >>> [s.pop_next(0.0).id for _ in range(3)]
    [1, 2, 0]
"""

from __future__ import annotations

import heapq
import itertools
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from hf_ext.generation.tie.config import TIEConfig, tie_config_or_default
from hf_ext.generation.tie.distribution import cvar_length, expected_length, per_token_index

FALLBACK_WARNING = (
    "TIE: no length predictor and no predictions given; falling back to the prompt-length heuristic "
    "(mu = log(clip(prompt_tokens, 16, max_new_tokens/2)), sigma = 1). Pass predictor= for real gains."
)


def validate_prompts(prompts: Any, *, non_empty: bool = False) -> list[str]:
    """``prompts`` as a list of non-empty strings; ``ValueError`` naming the bad entry otherwise (call before any
    work). ``non_empty``: an empty list is an error too."""
    if isinstance(prompts, str):
        raise ValueError("prompts must be a sequence of strings, got a single str")
    out = list(prompts)
    if non_empty and not out:
        raise ValueError("prompts must be a non-empty list of strings")
    for i, p in enumerate(out):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompts[{i}] is empty or not a string; every prompt must be non-empty text")
    return out


def heuristic_prediction(
    prompt_tokens: Sequence[int] | np.ndarray, max_new_tokens: int = 1024
) -> dict[str, np.ndarray]:
    """Fallback when no predictor is given: ``μ = log(clip(prompt_tokens, 16, M/2))``, ``σ = 1``, ``ν = 3.5``.

    A weak prior ("longer prompts get longer answers") with a wide spread, so the score is dominated
    by the expectation; documented in docs/tie.md.
    """
    n = np.asarray(prompt_tokens, dtype=np.float64)
    hi = max(16.0, max_new_tokens / 2)
    mu = np.log(np.clip(n, 16.0, hi))
    return {"mu": mu, "sigma": np.ones_like(mu), "nu": np.full_like(mu, 3.5)}


def _finite(name: str, value: Any, who: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{who}: {name} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{who}: {name} is {v} (NaN/inf predictions are not allowed; check the predictor)")
    return v


def tie_components(
    mu: Any, sigma: Any, nu: Any, config: TIEConfig, max_new_tokens: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(E[X̃], CVaR_α[X̃])`` arrays for broadcast ``mu``, ``sigma``, ``nu``: the score is ``E + β·CVaR``.

    With ``config.score == "per_token_index"`` the pair is ``(E[X̃]/E[1/X̃], 0)``, so the same ``E + β·CVaR`` is
    that index. ``max_new_tokens`` may be an array (one cap per request) or ``None`` (``config.max_new_tokens``).
    """
    mu_a, sigma_a, nu_a = (np.asarray(x, dtype=np.float64) for x in (mu, sigma, nu))
    for name, arr in (("mu", mu_a), ("sigma", sigma_a), ("nu", nu_a)):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"predicted {name} contains NaN/inf; TIE needs finite length predictions")
    if np.any(sigma_a <= 0):
        raise ValueError("predicted sigma must be > 0")
    caps = np.asarray(config.max_new_tokens if max_new_tokens is None else max_new_tokens, dtype=np.float64)
    if np.any(~np.isfinite(caps)) or np.any(caps < 1):
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens!r}")
    mu_a, sigma_a, nu_a, caps = np.broadcast_arrays(mu_a, sigma_a, nu_a, caps)
    e = np.empty(mu_a.shape)
    c = np.empty(mu_a.shape)
    for cap in np.unique(caps):
        m = caps == cap
        args = (mu_a[m], sigma_a[m], nu_a[m])
        if config.score == "per_token_index":
            e[m], c[m] = per_token_index(*args, float(cap), config.support, config.quad_nodes), 0.0
            continue
        e[m] = expected_length(*args, float(cap), config.support, config.quad_nodes)
        c[m] = cvar_length(*args, config.alpha, float(cap), config.support, config.quad_nodes)
    return e, c


def annotate_requests(requests: Sequence[Any], predictor: Any, batch_size: int = 256) -> None:
    """Run ``predictor`` once over ``req.prompt`` of all requests and store its outputs in ``req.meta``.

    ``logt`` → ``pred_mu``, ``pred_sigma``, ``pred_nu``; ``point`` → ``pred_len`` (= exp μ̂, what
    :class:`hf_ext.simulate.SSJF` reads); ``ltr`` → ``ltr_score``. Each kind writes only its own keys, so one
    request list can carry all three predictors' outputs, in any order of calls: the point predictor's μ̂ never
    replaces the log-t law's ``pred_mu``, which TIE scores with.
    """
    if not callable(getattr(predictor, "predict", None)):
        raise ValueError(
            f"predictor must be a LengthPredictor (an object with .predict), got {type(predictor).__name__}; "
            "load one with LengthPredictor.from_pretrained(path)"
        )
    prompts = [r.prompt for r in requests]
    for r, p in zip(requests, prompts):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"request {r.id}: prompt is empty; length predictors need prompt text")
    out = predictor.predict(prompts, batch_size=batch_size)
    for i, r in enumerate(requests):
        if "sigma" in out:
            r.meta["pred_mu"] = float(out["mu"][i])
            r.meta["pred_sigma"] = float(out["sigma"][i])
            r.meta["pred_nu"] = float(out["nu"][i])
        elif "mu" in out:
            r.meta["pred_len"] = float(math.exp(out["mu"][i]))
        if "score" in out:
            r.meta["ltr_score"] = float(out["score"][i])


def _req_cap(config: TIEConfig, req: Any) -> Any:
    cap = getattr(req, "max_new_tokens", None) if config.use_request_cap else None
    return config.max_new_tokens if cap is None else cap


def _cache_key(config: TIEConfig, req: Any) -> tuple:
    cap = _req_cap(config, req)
    m = req.meta
    return (
        config.score,
        config.alpha,
        config.support,
        config.quad_nodes,
        cap,
        m.get("pred_mu"),
        m.get("pred_sigma"),
        m.get("pred_nu", config.nu),
    )


def precompute_scores(requests: Sequence[Any], config: TIEConfig) -> None:
    """Vectorised ``E[X̃]`` / ``CVaR`` for requests that carry ``meta["pred_mu"]``/``["pred_sigma"]`` (fast path
    for large simulations; :class:`TIEScheduler` reuses them while the config and predictions are unchanged)."""
    reqs = [r for r in requests if "pred_mu" in r.meta and "pred_sigma" in r.meta]
    if not reqs:
        return
    mu = np.asarray([r.meta["pred_mu"] for r in reqs], dtype=np.float64)
    sigma = np.asarray([r.meta["pred_sigma"] for r in reqs], dtype=np.float64)
    nu = np.asarray([r.meta.get("pred_nu", config.nu) for r in reqs], dtype=np.float64)
    caps = np.asarray([_req_cap(config, r) for r in reqs])
    e, c = tie_components(mu, sigma, nu, config, caps)
    for r, ei, ci in zip(reqs, e, c):
        r.meta["tie_expect"], r.meta["tie_cvar"] = float(ei), float(ci)
        r.meta["tie_cache_key"] = _cache_key(config, r)


def aging_order_key(config: TIEConfig, score: float, t0: float, now: float) -> float:
    """Sort key (lower first) of a waiting request with un-aged ``score`` queued at ``t0``, at time ``now``.

    ``aging="continuous"``: ``log(score) - (t0/τ)·log γ``, which orders like ``score·γ^((now-t0)/τ)`` and does
    not depend on ``now`` (a heap stays valid); ``"step"``: ``score·γ^⌊(now-t0)/τ⌋``; ``"none"``: ``score``.
    ``t0`` and ``now`` may be measured from any common origin.
    """
    if config.aging == "continuous":
        return math.log(score) - (t0 / config.aging_tau) * math.log(config.aging_gamma)
    if config.aging == "none":
        return score
    return score * config.aging_gamma ** math.floor(max(0.0, now - t0) / config.aging_tau)


class TIEScheduler:
    """TIE admission order for the shared simulator (:class:`hf_ext.simulate.types.Scheduler` protocol).

    Args:
        config: :class:`TIEConfig` (ν, α, β bounds, aging, support, ``max_new_tokens``).
        predictor: optional ``logt`` :class:`~hf_ext.generation.tie.predictor.LengthPredictor` used for
            requests without ``meta["pred_mu"]``.
        name: label in results.
    """

    def __init__(self, config: TIEConfig | None = None, predictor: Any = None, name: str = "tie") -> None:
        self.config = tie_config_or_default(config)
        if predictor is not None and getattr(predictor, "kind", "logt") != "logt":
            raise ValueError(
                f"predictor must be a 'logt' LengthPredictor for TIE, got kind={predictor.kind!r}"
            )
        self.predictor = predictor
        self.name = name
        self._heap: list[tuple[float, int, Any]] = []
        self._items: list[tuple[float, float, int, Any]] = []  # step mode: (score, t0, seq, req)
        self._seq = itertools.count()
        self._warned = False

    # ------------------------------------------------------------------------------- scoring
    def _params(self, req: Any) -> tuple[float, float, float]:
        who = f"request {getattr(req, 'id', '?')}"
        meta = req.meta
        if "pred_mu" in meta and "pred_sigma" in meta:
            mu = _finite("pred_mu", meta["pred_mu"], who)
            sigma = _finite("pred_sigma", meta["pred_sigma"], who)
            nu = _finite("pred_nu", meta.get("pred_nu", self.config.nu), who)
            if sigma <= 0 or nu <= 0:
                raise ValueError(f"{who}: pred_sigma and pred_nu must be > 0, got {sigma}, {nu}")
            return mu, sigma, nu
        if self.predictor is not None and getattr(req, "prompt", None):
            out = self.predictor.predict([req.prompt])
            meta["pred_mu"], meta["pred_sigma"] = float(out["mu"][0]), float(out["sigma"][0])
            meta["pred_nu"] = float(out["nu"][0])
            return self._params(req)
        if not self._warned:
            warnings.warn(FALLBACK_WARNING, UserWarning, stacklevel=3)
            self._warned = True
        h = heuristic_prediction([req.prompt_len], max(1, _req_cap(self.config, req)))
        return float(h["mu"][0]), float(h["sigma"][0]), float(h["nu"][0])

    def score_of(self, req: Any, queue_len: int) -> float:
        """Un-aged TIE score of ``req`` with β for a queue of ``queue_len`` (caches E and CVaR in ``req.meta``)."""
        meta = req.meta
        cap = _req_cap(self.config, req)
        # before any work: a bad cap must not call the predictor, fill meta or spend the one fallback warning
        if (
            isinstance(cap, bool)
            or not isinstance(cap, (int, float, np.integer, np.floating))
            or not cap >= 1
        ):
            raise ValueError(f"request {req.id}: max_new_tokens must be a number >= 1, got {cap!r}")
        if meta.get("tie_cache_key") != _cache_key(self.config, req):
            mu, sigma, nu = self._params(req)
            e, c = tie_components(mu, sigma, nu, self.config, cap)
            meta["tie_expect"], meta["tie_cvar"] = float(e), float(c)
            meta["tie_cache_key"] = _cache_key(self.config, req)
        beta = self.config.beta(queue_len)
        return meta["tie_expect"] + beta * meta["tie_cvar"]

    # ------------------------------------------------------------------------ protocol
    def add(self, req: Any, now: float) -> None:
        self._push(req, now, len(self))

    def add_many(self, reqs: Sequence[Any], now: float) -> None:
        """Requests arriving at the same instant: each is scored with β for the queue they all join (the others
        of the group included), not for the queue as it was part-way through adding them one by one — as the
        transformers CB scheduler scores a step's new requests (:mod:`.cb`)."""
        queue_len = len(self) + len(reqs) - 1
        for r in reqs:
            self._push(r, now, queue_len)

    def requeue(self, req: Any, now: float) -> None:
        """A preempted request back in the queue: it keeps the score (β included) and the aging clock of its
        arrival, so preemption neither re-prices it nor restarts its wait."""
        meta = req.meta
        if "tie_score" not in meta or "tie_t0" not in meta:
            raise ValueError(
                f"request {getattr(req, 'id', '?')}: requeue() of a request this run never added"
            )
        self._enqueue(req, float(meta["tie_score"]), float(meta["tie_t0"]))

    def _push(self, req: Any, now: float, queue_len: int) -> None:
        score = self.score_of(req, queue_len)
        req.meta["tie_score"] = score
        req.meta["tie_t0"] = float(now)
        self._enqueue(req, score, float(now))

    def _enqueue(self, req: Any, score: float, t0: float) -> None:
        if self.config.aging == "step":
            self._items.append((score, t0, next(self._seq), req))
            return
        heapq.heappush(self._heap, (aging_order_key(self.config, score, t0, t0), next(self._seq), req))

    def _step_best(self, now: float) -> int | None:
        if not self._items:
            return None
        best, best_key = 0, math.inf
        for i, (score, t0, seq, _) in enumerate(self._items):
            k = aging_order_key(self.config, score, t0, now)
            if k < best_key or (k == best_key and seq < self._items[best][2]):
                best, best_key = i, k
        return best

    def peek_next(self, now: float) -> Any:
        if self.config.aging == "step":
            i = self._step_best(now)
            return None if i is None else self._items[i][3]
        return self._heap[0][2] if self._heap else None

    def pop_next(self, now: float) -> Any:
        if self.config.aging == "step":
            i = self._step_best(now)
            return None if i is None else self._items.pop(i)[3]
        return heapq.heappop(self._heap)[2] if self._heap else None

    def __len__(self) -> int:
        return len(self._items) if self.config.aging == "step" else len(self._heap)


def predict_laws(
    prompts: Sequence[str],
    predictor: Any = None,
    max_new_tokens: int = 1024,
    prompt_tokens: Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
    """``{"mu", "sigma", "nu"}`` (each ``[N]``) of the prompts' log-t length laws: from a ``logt`` predictor, or
    the prompt-length heuristic (``prompt_tokens``, else whitespace word counts ×1.3) with a warning.
    ``ValueError`` unless ``prompt_tokens`` and the predictor's outputs hold one value per prompt."""
    n = len(prompts)
    if prompt_tokens is not None and np.shape(prompt_tokens) != (n,):
        raise ValueError(
            f"prompt_tokens must hold one token count per prompt ({n}), got shape {np.shape(prompt_tokens)}"
        )
    if predictor is not None:
        out = predictor.predict(list(prompts))
        if "sigma" not in out:
            raise ValueError(
                f"predictor must be a 'logt' LengthPredictor for TIE, got kind={predictor.kind!r}"
            )
        mu, sigma, nu = out["mu"], out["sigma"], out["nu"]
    else:
        warnings.warn(FALLBACK_WARNING, UserWarning, stacklevel=3)
        n_tok = prompt_tokens if prompt_tokens is not None else [1.3 * len(p.split()) for p in prompts]
        h = heuristic_prediction(n_tok, max_new_tokens)
        mu, sigma, nu = h["mu"], h["sigma"], h["nu"]
    out = {k: np.asarray(v, dtype=np.float64) for k, v in (("mu", mu), ("sigma", sigma), ("nu", nu))}
    for k, v in out.items():  # one law per prompt: a predictor's single value is not spread over the job
        if v.shape != (n,) and not (k == "nu" and v.ndim == 0):
            raise ValueError(
                f"predictor returned {k} of shape {v.shape} for {n} prompts; one value per prompt"
            )
    return {k: np.broadcast_to(v, (n,)).copy() for k, v in out.items()}


def order_batch(
    prompts: Sequence[str],
    predictor: Any = None,
    config: TIEConfig | None = None,
    max_new_tokens: int | None = None,
    prompt_tokens: Sequence[int] | None = None,
    laws: dict[str, np.ndarray] | None = None,
) -> list[int]:
    """Offline TIE order of a batch job: indices of ``prompts`` sorted by ascending TIE score.

    β uses ``L_queue = len(prompts)`` (everything is queued at once). Without ``predictor`` the
    prompt-length heuristic is used (``prompt_tokens``, else whitespace word counts ×1.3) with a warning.
    ``laws``: the prompts' laws from :func:`predict_laws` already (then ``predictor`` is not called again).

    Example:
        >>> order_batch(["Write a detailed essay about Rome.", "Hi"], max_new_tokens=256)  # doctest: +SKIP
        [1, 0]
    """
    cfg = tie_config_or_default(config)
    if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens < 1):
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    cap = max_new_tokens or cfg.max_new_tokens
    prompts = validate_prompts(prompts)
    if not prompts:
        return []
    if laws is None:
        laws = predict_laws(prompts, predictor, cap, prompt_tokens)
    mu, sigma, nu = laws["mu"], laws["sigma"], laws["nu"]
    e, c = tie_components(mu, sigma, nu, cfg, cap)
    score = e + cfg.beta(len(prompts)) * c
    return [int(i) for i in np.argsort(score, kind="stable")]
