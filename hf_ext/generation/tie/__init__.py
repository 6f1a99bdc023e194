"""TIE: tail-inflated-expectation shortest-job-first scheduling with log-t length prediction (issue #6).

Public names load lazily (this module imports neither torch nor transformers):

* :class:`TIEConfig`, :class:`PredictorConfig` — settings;
* :class:`LogT`, :func:`expected_length`, :func:`cvar_length`, :func:`tie_score` — the length law;
  :func:`per_token_index` (``E[X̃]/E[1/X̃]``, with :func:`expected_inverse_length`) — the order that minimises mean
  per-token latency, a yardstick for TIE's score;
* :class:`LengthPredictor` — encoder + heads, ``fit`` / ``predict`` / ``save_pretrained``;
* :class:`LengthLog`, :func:`load_length_log` — served requests' output lengths (exact or cut), recorded by the
  scheduler, to train the predictor on your own traffic (:mod:`.lengthlog`); :class:`PredictorRefresher` retrains
  it on that log in the background and swaps it in (:func:`set_tie_predictor`) when it scores better
  (:mod:`.refresh`);
* :class:`TIEScheduler`, :func:`order_batch`, :func:`annotate_requests` — simulator scheduler and offline order;
* :func:`enable_tie_scheduler`, :func:`tie_generate_batch`, :class:`TIECBScheduler` — transformers
  continuous batching (``ContinuousBatchingConfig(scheduler_type="tie")``);
* :func:`tie_batched_generate` — an offline job as ``generate`` over static (padded) batches cut from the TIE
  order (:mod:`.offline`: planning, simulator timing, forced-length real runs for benchmarks);
  :func:`plan_batches` — expected-cost batches from the predicted laws (``plan="expected"``, :mod:`.planner`);
* :func:`serve_tie`, ``hf-ext serve`` — ``transformers serve`` (OpenAI-compatible HTTP) with the TIE scheduler
  (:mod:`.serve`), whose ``GET /tie/stats`` (:func:`tie_stats`, JSON) and ``GET /tie/metrics`` (:func:`tie_metrics`,
  Prometheus text format, :mod:`.metrics`) report the scheduler, its length log and refresher;
* :func:`run_cb_replay` — timed arrivals into real transformers continuous batching, one policy per run
  (FCFS, SJF-oracle, SSJF, LTR, TIE), for benchmarks.

``import hf_ext`` installs a post-import hook (:func:`install_import_hook`) that adds ``"tie"`` to
transformers' ``SCHEDULER_MAPPING`` as soon as transformers loads its continuous-batching scheduler
module, so ``scheduler_type="tie"`` works without importing that (≈2 s) module eagerly.

Example:
    >>> from hf_ext.generation.tie import TIEConfig
    >>> TIEConfig().alpha
    0.9
"""

from __future__ import annotations

import logging
import sys

from hf_ext.utils.import_hooks import cancel, when_imported
from hf_ext.utils.lazy import lazy_exports

logger = logging.getLogger("hf_ext")

_LAZY = {
    "TIEConfig": "config",
    "PredictorConfig": "config",
    "LogT": "distribution",
    "expected_length": "distribution",
    "cvar_length": "distribution",
    "tie_score": "distribution",
    "expected_inverse_length": "distribution",
    "per_token_index": "distribution",
    "LengthPredictor": "predictor",
    "LengthLog": "lengthlog",
    "load_length_log": "lengthlog",
    "TIEScheduler": "scheduler",
    "order_batch": "scheduler",
    "annotate_requests": "scheduler",
    "heuristic_prediction": "scheduler",
    "predict_laws": "scheduler",
    "enable_tie_scheduler": "cb",
    "tie_generate_batch": "cb",
    "set_length_hints": "cb",
    "set_tie_predictor": "cb",
    "in_flight_rows": "cb",
    "PredictorRefresher": "refresh",
    "TIECBScheduler": "cb",
    "PriorityCBScheduler": "cb",
    "set_priority_keys": "cb",
    "serve_tie": "serve",
    "tie_generation_state": "serve",
    "tie_stats": "serve",
    "tie_metrics": "metrics",
    "ReplayRequest": "replay",
    "run_cb_replay": "replay",
    "summarize_replay": "replay",
    "tie_batched_generate": "offline",
    "policy_order": "offline",
    "static_batches": "offline",
    "batch_size_for_memory": "offline",
    "memory_batches": "offline",
    "simulate_static_batches": "offline",
    "run_static_generate": "offline",
    "plan_batches": "planner",
    "BatchPlan": "planner",
    "generate_workload": "data",
    "match_to_lengths": "data",
}

__all__ = [*_LAZY, "install_import_hook", "remove_import_hook"]

_CB_SCHEDULER_MODULE = "transformers.generation.continuous_batching.scheduler"


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())


def _register_now() -> None:
    if "hf_ext.generation.tie.cb" in sys.modules:
        return  # being imported right now: cb.py registers itself when it finishes
    try:
        from hf_ext.generation.tie.cb import register

        register(on_clash="warn")  # a scheduler someone else registered as "tie" is kept, with one warning
    except Exception as exc:  # pragma: no cover - depends on the installed transformers
        logger.warning("hf_ext: could not register the 'tie' continuous-batching scheduler: %s", exc)


def install_import_hook() -> None:
    """Register "tie" now if transformers' CB scheduler module is loaded, else when it gets imported (cheap)."""
    when_imported(_CB_SCHEDULER_MODULE, lambda _module: _register_now())


def remove_import_hook() -> None:
    """Forget the pending registration (the "tie" entry, if already added, stays)."""
    cancel(_CB_SCHEDULER_MODULE)
