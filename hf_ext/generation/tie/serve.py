"""TIE in ``transformers serve``: the OpenAI-compatible server admits waiting requests in TIE order.

transformers' server (``transformers serve --continuous-batching``) builds its ``ContinuousBatchingConfig`` from
the ``--cb-*`` flags and has no scheduler option, so ``scheduler_type="tie"`` cannot be asked for there. This
module adds that, without copying the server:

* :func:`serve_tie` — Python: ``serve_tie("meta-llama/Llama-3.1-8B-Instruct", predictor="my-predictor")`` runs
  ``transformers.cli.serve.Serve`` with continuous batching and the TIE scheduler (``non_blocking=True`` returns
  the running server; ``server.kill_server()`` stops it);
* ``hf-ext serve MODEL --tie-predictor DIR [--tie-<TIEConfig field> ...] [transformers serve flags]`` — the
  same from the shell; every ``transformers serve`` flag (``--port``, ``--cb-num-blocks``, ...) passes through;
* :func:`tie_generation_state` — the one patch both use, a context manager: while it is active, the server's
  ``GenerationState`` (transformers' CB settings holder) is a subclass that hands continuous batching a copy of
  its config with ``scheduler_type="tie"``. It is undone on exit; a server built inside keeps TIE after.

Requests reach the scheduler as token ids (after the chat template). With a ``predictor``, each newly waiting
request's ids are turned into text (``tokenizer.decode``, or your ``prompt_text(ids)``) and predicted in one batch
per scheduling step; without one, TIE falls back to the prompt-length heuristic with a warning. Each request's
own ``max_tokens`` is its cap ``M`` in the score (``TIEConfig.use_request_cap``). The predictor and config are
the process-wide scheduler settings of :func:`~hf_ext.generation.tie.cb.enable_tie_scheduler` while the server
runs; once a blocking server ends (normally or not), the settings the process had before it are put back.

Needs transformers' serving extras: ``pip install "hf-ext[serve]"`` (``transformers[serving]``).

Example:
    >>> from hf_ext.generation.tie.serve import tie_cb_config
    >>> tie_cb_config(None).scheduler_type
    'tie'
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import inspect
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from hf_ext.generation.tie.cb import (
    CONTEXT,
    PRIORITY_SCHEDULER_NAME,
    SCHEDULER_NAME,
    enable_tie_scheduler,
    validate_predictor_args,
)
from hf_ext.generation.tie.config import AGING_MODES, SCORE_MODES, SUPPORT_MODES, TIEConfig
from hf_ext.utils.jsonable import to_jsonable

_SERVE_UTILS = "transformers.cli.serving.utils"
INSTALL_HINT = 'pip install "hf-ext[serve]"  (or: pip install "transformers[serving]")'
#: schedulers a served model can be given: TIE, the comparison baselines' fixed keys, transformers' FIFO
SERVE_SCHEDULERS = (SCHEDULER_NAME, PRIORITY_SCHEDULER_NAME, "fifo")
#: ``Serve`` keyword arguments that build transformers' own CB config; refused next to ``continuous_batching_config``
CB_FLAGS = (
    "cb_block_size",
    "cb_num_blocks",
    "cb_max_batch_tokens",
    "cb_max_memory_percent",
    "cb_use_cuda_graph",
)


def require_serving() -> None:
    """``ImportError`` with the install command unless transformers' server can run here."""
    from transformers.utils import is_serve_available

    if not is_serve_available():
        raise ImportError(
            f"TIE serving needs transformers' serving extras (fastapi, uvicorn, openai): {INSTALL_HINT}"
        )


def tie_cb_config(config: Any, scheduler_type: str = SCHEDULER_NAME) -> Any:
    """A copy of ``config`` (a ``ContinuousBatchingConfig``; ``None``: the default one) with ``scheduler_type`` set.

    ``scheduler_type``: ``"tie"``; benchmarks also use ``"hf_ext_priority"`` (the SSJF / LTR / SJF-oracle
    baselines) and ``"fifo"``. A config that names another scheduler is refused (``ValueError``): it would be
    silently replaced.
    """
    from transformers import ContinuousBatchingConfig

    if scheduler_type not in SERVE_SCHEDULERS:
        raise ValueError(f"scheduler_type must be one of {SERVE_SCHEDULERS}, got {scheduler_type!r}")

    if config is None:
        out = ContinuousBatchingConfig()
    elif isinstance(config, ContinuousBatchingConfig):
        out = copy.deepcopy(config)
    else:
        raise ValueError(
            f"continuous_batching_config must be a transformers ContinuousBatchingConfig, got {type(config).__name__}"
        )
    default = ContinuousBatchingConfig().scheduler_type
    if out.scheduler_type not in (default, scheduler_type):
        raise ValueError(
            f"continuous_batching_config.scheduler_type must be {scheduler_type!r} or the default {default!r} "
            f"(it is replaced), got {out.scheduler_type!r}"
        )
    out.scheduler_type = scheduler_type
    return out


@contextlib.contextmanager
def tie_generation_state(
    continuous_batching_config: Any = None, scheduler_type: str = SCHEDULER_NAME
) -> Iterator[type]:
    """While active, ``transformers serve`` servers built here run continuous batching with the TIE scheduler.

    Replaces ``transformers.cli.serving.utils.GenerationState`` by a subclass whose CB config is
    :func:`tie_cb_config` of the one the server built from its ``--cb-*`` flags, or of
    ``continuous_batching_config`` when given (then the server must get no ``--cb-*`` flag). Restored on exit.
    ``scheduler_type`` other than ``"tie"``: the same for a comparison baseline (see :func:`tie_cb_config`). The
    servers built meanwhile also answer ``GET /tie/stats`` (:func:`tie_stats`: the length log's calibration, the
    refresher's reports) as JSON and ``GET /tie/metrics`` (the same and the queues, for Prometheus).

    Yields:
        the subclass in place.
    """
    import importlib

    require_serving()
    utils = importlib.import_module(_SERVE_UTILS)
    base = utils.GenerationState
    if getattr(base, "_hf_ext_tie", False):
        raise RuntimeError("tie_generation_state is already active (it does not nest)")
    if "cb_config" not in inspect.signature(base.__init__).parameters:
        import transformers

        raise RuntimeError(
            f"transformers {transformers.__version__}: GenerationState takes no cb_config; TIE serving supports "
            "the transformers serve of 5.17 and later"
        )
    tie_cb_config(None, scheduler_type)  # a bad scheduler_type fails before the patch
    chosen = (
        None
        if continuous_batching_config is None
        else tie_cb_config(continuous_batching_config, scheduler_type)
    )

    class TIEGenerationState(base):  # type: ignore[misc, valid-type]
        """transformers' ``GenerationState`` whose continuous batching uses ``scheduler_type="tie"``."""

        _hf_ext_tie = True
        # the states built while patched: the owner of a blocking server stops them when it ends
        instances: list[Any] = []

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            bound = inspect.signature(base.__init__).bind(self, *args, **kwargs)
            given = bound.arguments.get("cb_config")
            if chosen is not None and given is not None:
                raise ValueError(
                    "continuous_batching_config and the server's --cb-* flags both set the CB config; give one"
                )
            bound.arguments["cb_config"] = (
                chosen if chosen is not None else tie_cb_config(given, scheduler_type)
            )
            super().__init__(*bound.args[1:], **bound.kwargs)
            TIEGenerationState.instances.append(self)

    server_mod = importlib.import_module(_SERVE_SERVER)
    base_build = server_mod.build_server

    def build_server(*args: Any, **kwargs: Any) -> Any:
        """transformers' app plus ``GET /tie/stats`` (:func:`tie_stats`) and ``GET /tie/metrics``
        (:func:`~hf_ext.generation.tie.metrics.tie_metrics`)."""
        from fastapi.responses import Response

        from hf_ext.generation.tie.metrics import CONTENT_TYPE, METRICS_ROUTE, tie_metrics

        app = base_build(*args, **kwargs)
        app.add_api_route(STATS_ROUTE, lambda: to_jsonable(tie_stats(), finite=True), methods=["GET"])
        app.add_api_route(
            METRICS_ROUTE, lambda: Response(tie_metrics(), media_type=CONTENT_TYPE), methods=["GET"]
        )
        return app

    utils.GenerationState = TIEGenerationState
    server_mod.build_server = build_server
    try:
        yield TIEGenerationState
    finally:
        utils.GenerationState = base
        server_mod.build_server = base_build


STATS_ROUTE = "/tie/stats"
_SERVE_SERVER = "transformers.cli.serving.server"
_ACTIVE: dict[str, Any] = {"refresher": None}  # the refresher serve_tie / hf-ext serve started, for tie_stats


def tie_stats(window: int = 1000) -> dict[str, Any]:
    """What ``GET /tie/stats`` of a TIE server answers: the scheduler's predictor and config, the length log (rows,
    errors, how the newest ``window`` rows ended and the censoring-aware calibration of their laws) and the
    predictor refresher (running, installed version, errors, its last five reports). Parts not in use are ``None``.
    """
    from hf_ext.generation.tie.lengthlog import REASONS, calibration

    log = CONTEXT.length_log
    out: dict[str, Any] = {
        "predictor": None if CONTEXT.predictor is None else type(CONTEXT.predictor).__name__,
        "config": dataclasses.asdict(CONTEXT.config),
        "length_log": None,
        "refresher": None,
    }
    if log is not None:
        recent = log.newest(window)
        cal = calibration(recent, levels=(0.9,)) if recent else {"n": 0}
        out["length_log"] = {
            "count": log.count,
            "kept": len(log),
            "errors": log.errors,
            "window": len(recent),
            "reasons": {k: sum(r["reason"] == k for r in recent) for k in REASONS},
            "calibration": {
                k: cal[k] for k in ("n", "nll", "above_q0.9", "below_q0.9", "spearman_uncensored") if k in cal
            },
        }
    ref = _ACTIVE["refresher"]
    if ref is not None:
        out["refresher"] = {
            "running": ref.running,
            "version": ref.version,
            "errors": ref.errors,
            "history": ref.history[-5:],
        }
    return out


def _enable_scoring(
    model: str,
    predictor: Any,
    tokenizer: Any,
    config: TIEConfig | None,
    prompt_text: Any,
    length_log: Any = None,
    report_every: int | None = None,
) -> Any:
    """Set what the TIE scheduler scores with (:func:`~hf_ext.generation.tie.cb.enable_tie_scheduler`).

    ``predictor`` is loaded (:func:`_check_refit` loads a saved one's directory), ``length_log`` may be a JSONL path;
    the served model's tokenizer is
    loaded from ``model`` when the predictor or the log needs one and neither ``tokenizer`` nor ``prompt_text`` is
    given, after the predictor is checked. The file is opened last, once everything else has succeeded.

    Returns:
        the :class:`~hf_ext.generation.tie.lengthlog.LengthLog` opened here from a path (the caller closes it), or
        ``None``.
    """
    path = os.fspath(length_log) if isinstance(length_log, (str, os.PathLike)) else None
    validate_predictor_args(
        predictor, tokenizer, prompt_text, tokenizer_required=False, length_log=None if path else length_log
    )
    wants_text = predictor is not None or length_log is not None
    if wants_text and tokenizer is None and prompt_text is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model)
    opened = None
    if path is not None:
        from hf_ext.generation.tie.lengthlog import LengthLog

        length_log = opened = LengthLog(path, report_every=report_every)
    enable_tie_scheduler(predictor, tokenizer, config, prompt_text=prompt_text, length_log=length_log)
    return opened


_REFIT_OWN = ("log", "predictor", "install")


def _check_refit(refit: Any, predictor: Any, length_log: Any) -> Any:
    """Check ``serve_tie``'s ``refit`` before any work: a dict of :class:`~hf_ext.generation.tie.refresh.
    PredictorRefresher` arguments, with a length log to learn from. ``predictor`` (a saved predictor's directory is
    loaded here) is returned ready for :func:`_enable_scoring`."""
    if isinstance(predictor, (str, os.PathLike)):
        from hf_ext.generation.tie.predictor import LengthPredictor

        predictor = LengthPredictor.from_pretrained(predictor)
    if refit is None:
        return predictor
    if not isinstance(refit, dict):
        raise ValueError(f"refit must be a dict of PredictorRefresher arguments, got {type(refit).__name__}")
    own = sorted(set(refit) & set(_REFIT_OWN))
    if own:
        raise ValueError(
            f"refit: {', '.join(own)} are set by serve_tie (the served log and predictor), not refit"
        )
    if length_log is None:
        raise ValueError("refit needs length_log: the refresher learns from the served requests' lengths")
    from hf_ext.generation.tie.lengthlog import LengthLog
    from hf_ext.generation.tie.refresh import PredictorRefresher

    kept = length_log._records.maxlen if isinstance(length_log, LengthLog) else 100_000
    PredictorRefresher(LengthLog(max_records=kept), predictor, **refit)  # its checks, on a throwaway log
    return predictor


def _start_refit(refit: dict | None, predictor: Any) -> Any:
    """Start a :class:`~hf_ext.generation.tie.refresh.PredictorRefresher` on the scheduler's log (``None``: no
    ``refit``)."""
    if refit is None:
        return None
    from hf_ext.generation.tie.refresh import PredictorRefresher

    _ACTIVE["refresher"] = PredictorRefresher(CONTEXT.length_log, predictor, **refit).start()
    return _ACTIVE["refresher"]


def _stop_serving_extras(refresher: Any, opened: Any) -> None:
    """Stop the refresher (a refit under way gets 10 s to finish; its thread is a daemon) and close the log."""
    if refresher is not None:
        refresher.stop(timeout=10.0)
        if _ACTIVE["refresher"] is refresher:
            _ACTIVE["refresher"] = None
    if opened is not None:
        opened.close()


def serve_tie(
    model: str,
    predictor: Any = None,
    *,
    tokenizer: Any = None,
    config: TIEConfig | None = None,
    continuous_batching_config: Any = None,
    prompt_text: Callable[[list[int]], str] | None = None,
    length_log: Any = None,
    refit: dict[str, Any] | None = None,
    **serve_kwargs: Any,
) -> Any:
    """Run ``transformers serve`` for ``model`` with continuous batching and the TIE scheduler.

    Args:
        model: model id or local path; the server preloads it (``Serve(force_model=model)``).
        predictor: a ``logt`` :class:`~hf_ext.generation.tie.predictor.LengthPredictor` or the directory it was
            saved to (``None``: the prompt-length heuristic, with a warning).
        tokenizer: the served model's tokenizer, to turn prompt ids into predictor text (default: loaded from
            ``model`` when ``predictor`` is given and ``prompt_text`` is not).
        config: :class:`TIEConfig`.
        continuous_batching_config: a ``ContinuousBatchingConfig`` for the server (its ``scheduler_type`` is set to
            ``"tie"``), instead of the ``cb_*`` keyword arguments.
        prompt_text: ``ids -> str`` for the predictor (see :func:`~hf_ext.generation.tie.cb.enable_tie_scheduler`).
        length_log: a :class:`~hf_ext.generation.tie.lengthlog.LengthLog`, or a JSONL path to append one to: each
            served request's prompt text and output length (exact, or cut at ``max_tokens`` / by a disconnect), to
            train a predictor on this server's traffic (``LengthPredictor.fit(load_length_log(path),
            censored_column="censored")``).
        refit: retrain the predictor on ``length_log`` while serving and swap it in when it scores better on the
            newest requests: a dict of :class:`~hf_ext.generation.tie.refresh.PredictorRefresher` arguments (e.g.
            ``{"every": 2000, "save_dir": "predictors/"}``; ``{}`` for its defaults). Needs ``length_log``.
        **serve_kwargs: ``transformers.cli.serve.Serve`` arguments (``port``, ``host``, ``device``, ``dtype``,
            ``cb_num_blocks``, ``non_blocking``, ...). ``continuous_batching`` is forced on; ``False`` is an error.

    Returns:
        the ``Serve`` object: running when ``non_blocking=True`` (stop it with ``kill_server()``, and its
        ``tie_refresher``, the :class:`~hf_ext.generation.tie.refresh.PredictorRefresher` or ``None``, with
        ``stop()``), else stopped.
    """
    if not isinstance(model, str) or not model:
        raise ValueError(f"model must be a non-empty model id or path, got {model!r}")
    if serve_kwargs.pop("continuous_batching", True) is not True:
        raise ValueError("continuous_batching must be True: TIE schedules transformers' continuous batching")
    if "force_model" in serve_kwargs:
        raise ValueError("give the model as serve_tie's first argument, not force_model=")
    if continuous_batching_config is not None:
        given = [k for k in CB_FLAGS if serve_kwargs.get(k) is not None]
        if given:
            raise ValueError(
                f"continuous_batching_config and {', '.join(given)} both set the CB config; give one"
            )
        tie_cb_config(continuous_batching_config)  # refuse a bad one before any work
    if config is not None and not isinstance(config, TIEConfig):
        raise ValueError(f"config must be a TIEConfig, got {type(config).__name__}")
    require_serving()
    from transformers.cli.serve import Serve

    unknown = set(serve_kwargs) - set(inspect.signature(Serve.__init__).parameters)
    if unknown:
        raise ValueError(f"unknown transformers serve argument(s): {', '.join(sorted(unknown))}")
    predictor = _check_refit(refit, predictor, length_log)
    saved = _scoring_settings()
    opened = _enable_scoring(model, predictor, tokenizer, config, prompt_text, length_log)
    refresher = None
    blocking = not serve_kwargs.get("non_blocking")
    try:
        refresher = _start_refit(refit, predictor)
        with tie_generation_state(continuous_batching_config) as state_cls:
            try:
                server = Serve(force_model=model, continuous_batching=True, **serve_kwargs)
            finally:
                if blocking:
                    # the server has stopped (Ctrl-C, which also comes back as KeyboardInterrupt): transformers
                    # leaves its CB generation thread running, which would keep the process alive
                    _shutdown(state_cls)
    except BaseException:
        # the settings made for this server go with it: the caller's come back (not a closed log, a failed config)
        _stop_serving_extras(refresher, opened)
        _restore_scoring(saved)
        raise
    if blocking:
        # the server has ended: its settings go with it, as when it fails (a later scheduler_type="tie" run in this
        # process must not score with them or log into the log just closed)
        _stop_serving_extras(refresher, opened)
        _restore_scoring(saved)
    server.tie_refresher = refresher
    if blocking:
        server.kill_server()  # and the model
    return server


def _scoring_settings() -> tuple[Any, ...]:
    """What :func:`~hf_ext.generation.tie.cb.enable_tie_scheduler` sets in the process-wide context, to put back."""
    with CONTEXT.lock:
        return (CONTEXT.predictor, CONTEXT.tokenizer, CONTEXT.prompt_text, CONTEXT.length_log, CONTEXT.config)


def _restore_scoring(saved: tuple[Any, ...]) -> None:
    """Put back what :func:`_scoring_settings` read, once the server those settings were made for is gone."""
    with CONTEXT.lock:
        CONTEXT.predictor, CONTEXT.tokenizer, CONTEXT.prompt_text, CONTEXT.length_log, CONTEXT.config = saved


def _shutdown(state_cls: type) -> None:
    for state in state_cls.instances:  # type: ignore[attr-defined]
        state.shutdown()


# ------------------------------------------------------------------------------------------------- CLI
def _bool(value: str) -> bool:
    v = value.strip().lower()
    if v not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true/false, got {value!r}")
    return v in ("true", "1", "yes")


def _config_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("TIE score (TIEConfig; default: the paper's values)")
    choices = {"aging": AGING_MODES, "support": SUPPORT_MODES, "score": SCORE_MODES}
    for f in dataclasses.fields(TIEConfig):
        kind = type(f.default)
        group.add_argument(
            f"--tie-{f.name.replace('_', '-')}",
            dest=f"tie_{f.name}",
            type=_bool if kind is bool else kind,
            choices=choices.get(f.name),
            default=None,
            metavar=None if f.name in choices else kind.__name__.upper(),
            help=f"{f.metadata.get('help', '')} (default: {f.default})",
        )


def build_parser() -> argparse.ArgumentParser:
    """``hf-ext serve``'s own flags; everything else goes to ``transformers serve``."""
    p = argparse.ArgumentParser(
        prog="hf-ext serve",
        allow_abbrev=False,
        description="transformers serve with continuous batching and the TIE scheduler. Flags not listed here "
        "go to `transformers serve` (see `transformers serve --help`): --port, --host, --device, --cb-num-blocks, ...",
        epilog="Besides the OpenAI routes, the server answers GET /tie/stats (JSON) and GET /tie/metrics (Prometheus "
        "text format): the predictor, the queues, the length log's calibration and the refresher's refits.",
    )
    p.add_argument("model", help="model id or path to preload and serve")
    p.add_argument("--tie-predictor", default=None, help="directory of a saved logt LengthPredictor")
    p.add_argument(
        "--tie-length-log",
        default=None,
        metavar="FILE",
        help="append every served request's prompt and output length (exact or cut) to this JSONL file, to train "
        "a predictor on this traffic: LengthPredictor.fit(load_length_log(FILE), censored_column='censored')",
    )
    p.add_argument(
        "--tie-length-log-report",
        type=int,
        default=None,
        metavar="N",
        help="with --tie-length-log: every N requests, log how well the served laws matched the last N "
        "(a warning when the traffic has drifted from what the predictor learned)",
    )
    refit = p.add_argument_group("retraining the predictor while serving (PredictorRefresher)")
    refit.add_argument(
        "--tie-refit-every",
        type=int,
        default=None,
        metavar="N",
        help="with --tie-length-log: after every N served requests, retrain the predictor on the log in the "
        "background and swap it in when it predicts the newest requests better",
    )
    refit.add_argument(
        "--tie-refit-min",
        type=int,
        default=None,
        metavar="N",
        help="no retraining before N logged requests (500)",
    )
    refit.add_argument(
        "--tie-refit-window",
        type=int,
        default=None,
        metavar="N",
        help="train on the newest N logged requests only (default: all kept, up to 100,000)",
    )
    refit.add_argument(
        "--tie-refit-dir",
        default=None,
        metavar="DIR",
        help="save each installed predictor to DIR/v1, DIR/v2, ... (serve it after a restart with --tie-predictor)",
    )
    p.add_argument(
        "--tie-config",
        default=None,
        help="JSON file of TIEConfig fields (the --tie-<field> flags override it)",
    )
    _config_flags(p)
    return p


def _flag_of(message: str) -> str:
    """The ``--tie-<field>`` flag a :class:`TIEConfig` error message is about (it starts with the field's name)."""
    names = sorted((f.name for f in dataclasses.fields(TIEConfig)), key=len, reverse=True)
    for name in names:
        if message.startswith(name):
            return f"--tie-{name.replace('_', '-')}"
    return "--tie-config / --tie-* flags"


def config_from_args(args: argparse.Namespace) -> TIEConfig:
    """The :class:`TIEConfig` of ``hf-ext serve``'s flags: ``--tie-config`` file, then ``--tie-<field>`` flags."""
    values: dict[str, Any] = {}
    if args.tie_config:
        with open(args.tie_config) as fh:
            values = json.load(fh)
        names = {f.name for f in dataclasses.fields(TIEConfig)}
        if not isinstance(values, dict) or set(values) - names:
            bad = sorted(set(values) - names) if isinstance(values, dict) else values
            raise ValueError(f"--tie-config: unknown TIEConfig field(s) {bad}; allowed: {sorted(names)}")
    for f in dataclasses.fields(TIEConfig):
        v = getattr(args, f"tie_{f.name}")
        if v is not None:
            values[f.name] = v
    return TIEConfig(**values)


def main(argv: Sequence[str] | None = None) -> int:
    """``hf-ext serve MODEL [--tie-...] [transformers serve flags]``: blocks until the server stops."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    unknown = [a.split("=", 1)[0] for a in rest if a.startswith("--tie-")]
    if unknown:  # a mistyped flag of ours: refused before anything loads (not handed to transformers serve)
        parser.error(f"unknown flag(s) {', '.join(unknown)} (see hf-ext serve --help for the --tie-* flags)")
    if "--force-model" in rest or "--no-continuous-batching" in rest:
        raise SystemExit("hf-ext serve: MODEL is the served model and continuous batching is always on")
    try:
        config = config_from_args(args)
    except (OSError, json.JSONDecodeError) as exc:
        parser.error(f"--tie-config: cannot read {args.tie_config!r}: {exc}")
    except ValueError as exc:
        parser.error(f"{_flag_of(str(exc))}: {exc}")
    if args.tie_length_log_report is not None and (not args.tie_length_log or args.tie_length_log_report < 1):
        raise SystemExit("hf-ext serve: --tie-length-log-report N needs --tie-length-log FILE and N >= 1")
    refit = None
    settings = [f for f in ("min", "window", "dir") if getattr(args, f"tie_refit_{f}") is not None]
    if settings and args.tie_refit_every is None:  # served without any retraining: the settings were dropped
        flags = ", ".join(f"--tie-refit-{f}" for f in settings)
        raise SystemExit(
            f"hf-ext serve: {flags} {'needs' if len(settings) == 1 else 'need'} --tie-refit-every N (they set how "
            "the predictor is retrained; without it nothing is)"
        )
    if args.tie_refit_every is not None:
        if not args.tie_length_log:
            raise SystemExit("hf-ext serve: --tie-refit-every N needs --tie-length-log FILE to learn from")
        refit = {
            "every": args.tie_refit_every,
            "min_records": 500 if args.tie_refit_min is None else args.tie_refit_min,
            "window": args.tie_refit_window,
        }
        refit["save_dir"] = args.tie_refit_dir
    require_serving()
    try:
        predictor = _check_refit(refit, args.tie_predictor, args.tie_length_log)
    except ValueError as exc:
        raise SystemExit(f"hf-ext serve: --tie-refit-*: {exc}") from None
    saved = _scoring_settings()
    opened = _enable_scoring(
        args.model,
        predictor,
        None,
        config,
        None,
        args.tie_length_log,
        report_every=args.tie_length_log_report,
    )
    refresher = None
    code = 0
    try:
        refresher = _start_refit(refit, predictor)
        from transformers.cli.transformers import app

        with tie_generation_state() as state_cls:
            try:
                app(["serve", args.model, "--continuous-batching", *rest], prog_name="hf-ext")
            except SystemExit as exc:
                code = int(exc.code or 0)
            finally:
                _shutdown(state_cls)  # see serve_tie
    finally:
        # however the server ended, its settings go with it (see serve_tie): the process's come back
        _stop_serving_extras(refresher, opened)
        _restore_scoring(saved)
    return code


# ------------------------------------------------------------------------------------ HTTP replay
def wait_until_serving(url: str, timeout: float = 600.0, poll: float = 0.2) -> None:
    """Block until ``{url}/health`` answers (the server preloads its model first); ``TimeoutError`` after
    ``timeout`` seconds."""
    import urllib.request

    t_end = time.time() + timeout
    while time.time() < t_end:
        with contextlib.suppress(OSError):
            urllib.request.urlopen(f"{url}/health", timeout=2).read()
            return
        time.sleep(poll)
    raise TimeoutError(f"{url} did not come up in {timeout:.0f}s")


def _stream_completion(url: str, model: str, prompt: str, max_tokens: int, rid: str, timeout: float) -> dict:
    """One streamed ``/v1/completions`` call; client-side ``first_token`` / ``finish`` (perf_counter) and tokens."""
    import urllib.request

    body = {"model": model, "prompt": prompt, "max_tokens": int(max_tokens), "stream": True}
    req = urllib.request.Request(
        f"{url}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "X-Request-ID": rid},
    )
    first = None
    n_tokens = None
    error = None
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        for raw in resp:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                error = str(chunk["error"])
                break
            choices = chunk.get("choices") or []
            if first is None and any(c.get("text") for c in choices):
                first = time.perf_counter()
            usage = chunk.get("usage")
            if usage:
                n_tokens = int(usage["completion_tokens"])
    return {"first_token": first, "finish": time.perf_counter(), "n_tokens": n_tokens, "error": error}


def replay_over_http(
    url: str,
    model: str,
    requests: Sequence[Any],
    prompts: dict[str, str],
    *,
    time_scale: float = 1.0,
    timeout: float = 900.0,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Send timed requests to a running OpenAI-compatible server, streamed, one thread per request.

    Each :class:`~hf_ext.generation.tie.replay.ReplayRequest` ``r`` is posted to ``{url}/v1/completions`` at
    ``r.arrival * time_scale`` seconds with ``prompt=prompts[r.request_id]``, ``max_tokens=r.output_len`` and
    header ``X-Request-ID: r.request_id`` (so length hints and priority keys set by request id apply). Times are
    the client's: submit, first streamed text, end of stream.

    Returns:
        :func:`~hf_ext.generation.tie.replay.run_cb_replay`'s records (input order), for
        :func:`~hf_ext.generation.tie.replay.summarize_replay`; ``n_tokens`` is the server's ``completion_tokens``.
        A request that fails raises ``RuntimeError`` naming it once all have ended.
    """
    import threading

    from hf_ext.generation.tie.replay import validate_replay

    # unique ids, lengths >= 1, arrivals and time_scale finite and >= 0: what the engine replay checks. The
    # policy is the server's business; "fcfs" asks for no predictions on the requests.
    validate_replay(requests, "fcfs", time_scale)
    missing = [r.request_id for r in requests if not prompts.get(r.request_id)]
    if missing:
        raise ValueError(f"prompts has no non-empty text for request(s) {missing[:5]}")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(requests), desc="http replay", leave=False)
    got: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    lock = threading.Lock()
    t0 = time.perf_counter()

    def one(r: Any, submit: float) -> None:
        try:
            out = _stream_completion(url, model, prompts[r.request_id], r.output_len, r.request_id, timeout)
        except Exception as exc:  # noqa: BLE001 - reported with the request id below
            out = {"error": f"{type(exc).__name__}: {exc}"}
        with lock:
            if out.get("error"):
                failed[r.request_id] = out["error"]
            else:
                got[r.request_id] = {**out, "submit": submit}
            if bar is not None:
                bar.update(1)

    threads = []
    for r in sorted(requests, key=lambda x: x.arrival):
        delay = t0 + r.arrival * time_scale - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        th = threading.Thread(target=one, args=(r, time.perf_counter()), daemon=True)
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    if bar is not None:
        bar.close()
    if failed:
        rid, err = next(iter(failed.items()))
        raise RuntimeError(f"{len(failed)}/{len(requests)} requests failed over HTTP, e.g. {rid!r}: {err}")
    records = []
    for r in requests:
        g = got[r.request_id]
        first = g["first_token"] if g["first_token"] is not None else g["finish"]
        records.append(
            {
                "request_id": r.request_id,
                "submit": g["submit"] - t0,
                "first_token": first - t0,
                "finish": g["finish"] - t0,
                "n_tokens": g["n_tokens"],
                "output_len": int(r.output_len),
                "error": None,
            }
        )
    return records
