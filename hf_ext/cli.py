"""The ``hf-ext`` command line: ``doctor``, ``demo``, ``bench``, ``plan``, ``serve``, ``tie-log``.

Example:
    $ hf-ext doctor
    $ hf-ext demo simulate sale
    $ hf-ext bench sale -- --lengths 8192 16384
    $ hf-ext serve meta-llama/Llama-3.1-8B-Instruct --tie-predictor ./predictor --port 8000
    $ hf-ext tie-log lengths.jsonl --fit ./predictor
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from hf_ext import registry


def _resolve(target: str) -> Callable[..., Any]:
    module, _, fn = target.partition(":")
    return getattr(importlib.import_module(module), fn)


def _module_available(target: str | None) -> bool:
    import importlib.util

    if not target:
        return False
    try:
        return importlib.util.find_spec(target.partition(":")[0]) is not None
    except ModuleNotFoundError:
        return False


# ---------------------------------------------------------------------------------------- doctor
def doctor_report() -> dict[str, Any]:
    """Collect what ``hf-ext doctor`` prints: versions, devices, per-component readiness."""
    from importlib import metadata

    from hf_ext.utils.imports import is_available

    vers: dict[str, str] = {}
    for pkg in (
        "hf-ext",
        "torch",
        "triton",
        "transformers",
        "diffusers",
        "trl",
        "accelerate",
        "peft",
        "datasets",
    ):
        try:
            vers[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            vers[pkg] = "not installed"
    import torch

    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpus = [torch.cuda.get_device_name(i) for i in range(n_gpu)]
    cuda = torch.version.cuda or "none (CPU build)"
    comps = []
    for c in registry.COMPONENTS:
        reasons = []
        if c.status != "built":
            reasons.append("not built yet")
        missing = [m for m in c.requires if not is_available(m)]
        if missing:
            reasons.append("missing " + ", ".join(missing))
        note = ""
        if c.needs_gpu and n_gpu == 0:
            note = "CPU reference path only (no CUDA GPU)"
        if c.min_gpus > max(n_gpu, 1):
            note = f"real path needs {c.min_gpus} GPUs; gloo/CPU simulation available"
        absent = [what for modules, what in c.optional if not all(is_available(m) for m in modules)]
        if absent:
            note = "; ".join([note or "ok", *absent])
        comps.append({"name": c.name, "can_run": not reasons, "why": "; ".join(reasons) or note or "ok"})
    return {"versions": vers, "cuda": cuda, "gpus": gpus, "components": comps}


def cmd_doctor(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    rep = doctor_report()
    con = Console()
    t = Table(title="hf_ext doctor: libraries")
    t.add_column("library")
    t.add_column("version")
    for k, v in rep["versions"].items():
        t.add_row(k, v)
    t.add_row("CUDA (torch build)", rep["cuda"])
    t.add_row("GPUs", ", ".join(rep["gpus"]) or "none")
    con.print(t)
    t2 = Table(title="hf_ext doctor: components")
    t2.add_column("component")
    t2.add_column("can run here")
    t2.add_column("why / note")
    for c in rep["components"]:
        t2.add_row(c["name"], "yes" if c["can_run"] else "no", c["why"])
    con.print(t2)
    return 0


# ------------------------------------------------------------------------------------------ demo
def run_demos(names: Sequence[str]) -> list[dict[str, Any]]:
    """Run the demos of ``names`` (all when empty); returns one record per component."""
    from rich.progress import Progress

    comps = [registry.get(n) for n in names] if names else list(registry.COMPONENTS)
    out = []
    with Progress(transient=True) as progress:
        task = progress.add_task("hf_ext demo", total=len(comps))
        for c in comps:
            progress.update(task, description=f"demo {c.name}")
            rec: dict[str, Any] = {"component": c.name, "what": "", "key": "", "status": "", "seconds": 0.0}
            if c.status != "built" or not _module_available(c.demo):
                rec.update(what="not built yet", status="not built")
            else:
                t0 = time.perf_counter()
                try:
                    res = _resolve(c.demo)()  # type: ignore[arg-type]
                    rec.update(what=res.what, key=res.key_figure, status="pass" if res.passed else "FAIL")
                except Exception as exc:  # report and keep going
                    traceback.print_exc()
                    rec.update(what="error", key=f"{type(exc).__name__}: {exc}"[:120], status="FAIL")
                rec["seconds"] = time.perf_counter() - t0
            out.append(rec)
            progress.advance(task)
    return out


def cmd_demo(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    for n in args.components:
        registry.get(n)  # fail early on a typo, listing known names
    recs = run_demos(args.components)
    t = Table(title="hf_ext demo")
    for col in ("component", "what ran", "key figure", "result", "seconds"):
        t.add_column(col)
    for r in recs:
        style = {"pass": "green", "FAIL": "red"}.get(r["status"], "dim")
        t.add_row(r["component"], r["what"], r["key"], f"[{style}]{r['status']}[/]", f"{r['seconds']:.1f}")
    Console().print(t)
    return 1 if any(r["status"] == "FAIL" for r in recs) else 0


# ----------------------------------------------------------------------------------------- bench
def cmd_bench(args: argparse.Namespace) -> int:
    names = registry.names() if args.component == "all" else [args.component]
    rc = 0
    for n in names:
        c = registry.get(n)
        if c.status != "built" or not _module_available(c.bench):
            print(f"hf-ext bench: {n}: no benchmark (not built yet)")
            if args.component != "all":
                rc = 1
            continue
        print(f"hf-ext bench: {n}")
        rc |= int(_resolve(c.bench)(list(args.bench_args)) or 0)  # type: ignore[arg-type]
    return rc


# ------------------------------------------------------------------------------------------ plan
def cmd_plan(args: argparse.Namespace) -> int:
    target = "hf_ext.accelerate.autoparallel.cli:main"
    if registry.get("autoparallel").status != "built" or not _module_available(target):
        print("hf-ext plan: the autoparallel component is not built yet")
        return 1
    return int(_resolve(target)(list(args.plan_args)) or 0)


# ----------------------------------------------------------------------------------------- serve
def cmd_serve(args: argparse.Namespace) -> int:
    from hf_ext.generation.tie.serve import main as serve_main

    return int(serve_main(list(args.serve_args)) or 0)


def cmd_tie_log(args: argparse.Namespace) -> int:
    from hf_ext.generation.tie.lengthlog import main as tie_log_main

    return int(tie_log_main(list(args.tie_log_args)) or 0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hf-ext", description="hf_ext: systems-paper components for the HF stack"
    )
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("doctor", help="versions, devices, and which components can run here")
    d.set_defaults(func=cmd_doctor)
    dm = sub.add_parser("demo", help="run components end-to-end on tiny CPU models")
    dm.add_argument("components", nargs="*", help=f"any of: {', '.join(registry.names())} (default: all)")
    dm.set_defaults(func=cmd_demo)
    b = sub.add_parser("bench", help="run a component's benchmark (GPU machine)")
    b.add_argument("component", help=f"'all' or one of: {', '.join(registry.names())}")
    b.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    b.set_defaults(func=cmd_bench)
    pl = sub.add_parser("plan", help="search a parallelism plan (autoparallel)")
    pl.add_argument("plan_args", nargs=argparse.REMAINDER)
    pl.set_defaults(func=cmd_plan)
    sv = sub.add_parser(
        "serve",
        help="transformers serve with the TIE scheduler (MODEL, --tie-* flags, then any transformers serve flag)",
        add_help=False,
    )
    sv.add_argument("serve_args", nargs=argparse.REMAINDER)
    sv.set_defaults(func=cmd_serve)
    tl = sub.add_parser(
        "tie-log",
        help="summarise a TIE length log (hf-ext serve --tie-length-log); --fit DIR trains a predictor on it",
        add_help=False,
    )
    tl.add_argument("tie_log_args", nargs=argparse.REMAINDER)
    tl.set_defaults(func=cmd_tie_log)
    return p


# sub-command -> (handler, the Namespace field that holds its arguments)
_PASSTHROUGH = {
    "serve": (cmd_serve, "serve_args"),
    "tie-log": (cmd_tie_log, "tie_log_args"),
    "plan": (cmd_plan, "plan_args"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hf-ext`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Commands whose flags (and --help) are their own (serve's also transformers serve's): handed over whole.
    # An argparse REMAINDER after a sub-command does not take arguments that start with "--"
    # (`hf-ext plan --model ...` failed).
    if argv[:1] and argv[0] in _PASSTHROUGH:
        cmd, dest = _PASSTHROUGH[argv[0]]
        return cmd(argparse.Namespace(**{dest: argv[1:]}))
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyError as exc:
        print(f"hf-ext: {exc.args[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
