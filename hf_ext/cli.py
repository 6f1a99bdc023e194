"""The ``hf-ext`` command line: ``doctor``, ``demo``, ``bench``, ``plan``, ``serve``, ``tie-log``.

Example:
    $ hf-ext doctor
    $ hf-ext demo simulate sale
    $ hf-ext bench sale --e2e --lengths 8192 16384
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


# ---------------------------------------------------------------------------------------- doctor
def doctor_report() -> dict[str, Any]:
    """Collect what ``hf-ext doctor`` prints: versions, devices, per-component readiness."""
    from importlib import metadata

    import hf_ext
    from hf_ext.utils.imports import is_available

    # the running package's own version: package metadata describes whatever distribution is installed, which
    # is none when running from a checkout on PYTHONPATH, or another copy than the one imported
    vers: dict[str, str] = {"hf-ext": hf_ext.__version__}
    for pkg in (
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
    t.add_column("library", overflow="fold")
    t.add_column("version", overflow="fold")
    for k, v in rep["versions"].items():
        t.add_row(k, v)
    t.add_row("CUDA (torch build)", rep["cuda"])
    t.add_row("GPUs", ", ".join(rep["gpus"]) or "none")
    con.print(t)
    t2 = Table(title="hf_ext doctor: components")
    t2.add_column("component", overflow="fold")
    t2.add_column("can run here", overflow="fold")
    t2.add_column("why / note", overflow="fold")
    for c in rep["components"]:
        t2.add_row(c["name"], "yes" if c["can_run"] else "no", c["why"])
    con.print(t2)
    return 0


# ------------------------------------------------------------------------------------------ demo
def _unknown_components(cmd: str, names: Sequence[str]) -> str | None:
    """The error message for names that are neither ``all`` nor a registered component, else None."""
    bad = [n for n in names if n != "all" and n not in registry.names()]
    if bad:
        return (
            f"hf-ext {cmd}: unknown component {', '.join(map(repr, bad))}; "
            f"choose from: all, {', '.join(registry.names())}"
        )
    if "all" in names and len(names) > 1:
        return f"hf-ext {cmd}: 'all' cannot be combined with component names (got {' '.join(names)})"
    return None


def run_demos(names: Sequence[str]) -> list[dict[str, Any]]:
    """Run the demos of ``names`` (all when empty or ``["all"]``; a name given twice runs once, where it first
    appears); returns one record per component.

    A planned component is recorded as ``"not built"``; a built one whose demo fails, or cannot even be
    imported (a missing dependency), as ``"FAIL"`` with the exception.
    """
    from rich.progress import Progress

    names = list(dict.fromkeys(names))  # `hf-ext demo sale sale` ran the same demo twice
    if names == ["all"]:
        names = []
    comps = [registry.get(n) for n in names] if names else list(registry.COMPONENTS)
    out = []
    with Progress(transient=True) as progress:
        task = progress.add_task("hf_ext demo", total=len(comps))
        for c in comps:
            progress.update(task, description=f"demo {c.name}")
            rec: dict[str, Any] = {"component": c.name, "what": "", "key": "", "status": "", "seconds": 0.0}
            if c.status != "built" or not c.demo:
                rec.update(what="not built yet", status="not built")
            else:
                t0 = time.perf_counter()
                try:
                    res = _resolve(c.demo)()
                    rec.update(what=res.what, key=res.key_figure, status="pass" if res.passed else "FAIL")
                except Exception as exc:  # report (an import error included) and keep going
                    traceback.print_exc()
                    rec.update(what="error", key=f"{type(exc).__name__}: {exc}"[:120], status="FAIL")
                rec["seconds"] = time.perf_counter() - t0
            out.append(rec)
            progress.advance(task)
    return out


def cmd_demo(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    args.components = list(dict.fromkeys(args.components))  # each component once, in the order given
    err = _unknown_components("demo", args.components)
    if err:
        print(err, file=sys.stderr)
        return 2
    recs = run_demos(args.components)
    t = Table(title="hf_ext demo")
    for col in ("component", "what ran", "key figure", "result", "seconds"):
        t.add_column(col, overflow="fold")
    for r in recs:
        style = {"pass": "green", "FAIL": "red"}.get(r["status"], "dim")
        t.add_row(r["component"], r["what"], r["key"], f"[{style}]{r['status']}[/]", f"{r['seconds']:.1f}")
    Console().print(t)
    # a planned component named explicitly (not through `all`): nothing ran, so that is no success
    planned = [r["component"] for r in recs if r["status"] == "not built"]
    if planned and args.components not in ([], ["all"]):
        print(f"hf-ext demo: {', '.join(planned)}: planned, not built yet; nothing ran", file=sys.stderr)
        return 1
    return 1 if any(r["status"] == "FAIL" for r in recs) else 0


# ----------------------------------------------------------------------------------------- bench
def _bench_argv(name: str, bench_args: Sequence[str], under_all: bool) -> list[str]:
    """The arguments ``name``'s benchmark gets. Under ``bench all``, sale (which needs a mode) runs ``--e2e``
    unless a mode is given: that path also runs on CPU (a tiny model)."""
    argv = list(bench_args)
    if under_all and name == "sale" and not {"--e2e", "--kernels"} & set(argv):
        argv = ["--e2e", *argv]
    return argv


def _check_bench_runnable(name: str, argv: Sequence[str]) -> str | None:
    """Why ``name``'s benchmark cannot run with ``argv`` here (before any work), else None."""
    if name == "sale" and "--kernels" in argv:
        from hf_ext.attention.sale import bench as sale_bench

        if not sale_bench._KERNEL_BENCH.exists():
            return (
                "hf-ext bench sale --kernels needs a source checkout of hf-ext: the kernel benchmark "
                f"benchmarks/sale_kernels.py is not part of the installed package (looked for {sale_bench._KERNEL_BENCH}). "
                "Run it from a clone of the repository, or use `hf-ext bench sale --e2e`."
            )
    return None


def _run_one_bench(c: registry.Component, argv: list[str]) -> tuple[str, str]:
    """Run one benchmark for ``bench all``: (``"pass"`` | ``"FAIL"``, detail); never raises (but Ctrl-C)."""
    why = _check_bench_runnable(c.name, argv)
    if why:
        print(why, file=sys.stderr)
        return "FAIL", why
    try:
        rc = int(_resolve(c.bench)(argv) or 0)  # type: ignore[arg-type]
    except SystemExit as exc:  # argparse errors, `raise SystemExit("message")`
        if exc.code in (0, None):
            return "pass", "exited 0"
        if isinstance(exc.code, int):
            return "FAIL", f"exited with status {exc.code}"
        print(exc.code, file=sys.stderr)
        return "FAIL", str(exc.code)
    except Exception as exc:
        traceback.print_exc()
        return "FAIL", f"{type(exc).__name__}: {exc}"
    return ("pass", "") if rc == 0 else ("FAIL", f"returned {rc}")


def cmd_bench(args: argparse.Namespace) -> int:
    if args.component is None:
        args.parser.error("the following arguments are required: component")
    err = _unknown_components("bench", [args.component])
    if err:
        print(err, file=sys.stderr)
        return 2
    if args.component != "all":
        c = registry.get(args.component)
        if c.status != "built" or not c.bench:
            print(f"hf-ext bench: {c.name}: planned, not built yet; it has no benchmark", file=sys.stderr)
            return 1
        argv = _bench_argv(c.name, args.bench_args, under_all=False)
        why = _check_bench_runnable(c.name, argv)
        if why:
            print(why, file=sys.stderr)
            return 1
        print(f"hf-ext bench: {c.name}")
        return int(_resolve(c.bench)(argv) or 0)

    from rich.console import Console
    from rich.table import Table

    results: list[tuple[str, str, str, float]] = []
    for c in registry.COMPONENTS:
        if c.status != "built" or not c.bench:
            results.append((c.name, "skipped", "planned, not built yet", 0.0))
            continue
        argv = _bench_argv(c.name, args.bench_args, under_all=True)
        print(f"hf-ext bench: {c.name} {' '.join(argv)}".rstrip(), flush=True)
        t0 = time.perf_counter()
        status, detail = _run_one_bench(c, argv)
        results.append((c.name, status, detail, time.perf_counter() - t0))
    t = Table(title="hf-ext bench all")
    for col in ("component", "result", "detail", "seconds"):
        t.add_column(col, overflow="fold")
    for name, status, detail, secs in results:
        style = {"pass": "green", "FAIL": "red"}.get(status, "dim")
        t.add_row(name, f"[{style}]{status}[/]", detail, f"{secs:.1f}")
    Console().print(t)
    return 1 if any(r[1] == "FAIL" for r in results) else 0


# ------------------------------------------------------------------------------------------ plan
def cmd_plan(args: argparse.Namespace) -> int:
    if registry.get("autoparallel").status != "built":
        print("hf-ext plan: the autoparallel component is not built yet", file=sys.stderr)
        return 1
    from hf_ext.accelerate.autoparallel import cli as planner

    return int(planner.main(list(args.plan_args)) or 0)  # its arguments are checked before any search


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
    dm.add_argument(
        "components",
        nargs="*",
        help=f"'all' or any of: {', '.join(registry.names())} (default: all; a name given twice runs once)",
    )
    dm.set_defaults(func=cmd_demo)
    b = sub.add_parser(
        "bench",
        help="run a component's benchmark (on a GPU where it has one; --quick / CPU modes where the component has them)",
        usage="hf-ext bench [-h] component [bench_args ...]",
    )
    # optional here so that a missing one is reported alone (a REMAINDER counts as required in argparse's message)
    b.add_argument("component", nargs="?", help=f"'all' or one of: {', '.join(registry.names())}")
    b.add_argument(
        "bench_args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark (optional)"
    )
    b.set_defaults(func=cmd_bench, parser=b)
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
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
