"""Benchmark harness shared by all components.

Times callables with ``triton.testing.do_bench`` on CUDA (median, ms) and with a wall-clock
loop on CPU; appends rows with the foundation schema to ``benchmarks/results/<component>.csv``
and draws one PNG plot per component beside it.

Schema (one row per measured comparison)::

    component,case,device,metric,ours,baseline,baseline_value,ratio,
    quality_name,quality_value,versions,date,commit,command

``ratio`` > 1 means ours is better: for a time ``baseline_value / ours``; for a throughput
``ours / baseline_value`` (pass ``higher_is_better=True``).

Example:
    >>> t = time_fn(lambda: sum(range(1000)), warmup=1, rep=3)
    >>> t > 0
    True
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

COLUMNS = [
    "component",
    "case",
    "device",
    "metric",
    "ours",
    "baseline",
    "baseline_value",
    "ratio",
    "quality_name",
    "quality_value",
    "versions",
    "date",
    "commit",
    "command",
]

REPO_ROOT = Path(__file__).resolve().parents[2]


def checkout_root(root: Path = REPO_ROOT) -> Path | None:
    """``root`` (the folder holding the ``hf_ext`` package) when it is a source checkout of hf-ext (it has
    ``.git`` or a ``pyproject.toml`` naming hf-ext), else None: an installed wheel, in site-packages."""
    if (root / ".git").exists():
        return root
    try:
        text = (root / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return None
    return root if re.search(r"""^\s*name\s*=\s*["']hf[-_]ext["']""", text, re.MULTILINE) else None


CHECKOUT_ROOT = checkout_root()


QUICK_SUBDIR = "quick"
_QUICK_RUN = [False]  # set by mark_quick_run() for the benchmark main running now (see bench_main)


def mark_quick_run(quick: bool) -> None:
    """Say whether the running benchmark is a ``--quick`` smoke run: :func:`results_dir` then puts its files in
    ``quick/`` under the default folder (git-ignored), so that a smoke run never appends rows to, or redraws, the
    committed results the docs cite. ``$HF_EXT_RESULTS_DIR``, where set, is used as it is. Call it from a main that
    :func:`bench_main` wraps (which restores the previous state when the main returns)."""
    _QUICK_RUN[0] = bool(quick)


def bench_main(fn: Callable[..., int]) -> Callable[..., int]:
    """Decorator of a benchmark's ``main``: whatever it passes to :func:`mark_quick_run` holds until it returns."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> int:
        before = _QUICK_RUN[0]
        try:
            return fn(*args, **kwargs)
        finally:
            _QUICK_RUN[0] = before

    return wrapper


def check_flag_minimums(parser: Any, args: Any, minimums: dict[str, int]) -> None:
    """``parser.error`` (exit 2, naming the flag) for the first of ``minimums`` (``{dest: lowest allowed}``) whose
    parsed value is below its minimum; a flag left at ``None`` (not given, no default) passes. Call it right after
    ``parse_args``, before any work."""
    for dest, low in minimums.items():
        v = getattr(args, dest)
        if v is not None and v < low:
            parser.error(f"argument --{dest.replace('_', '-')}: must be >= {low} (got {v})")


def results_dir() -> Path:
    """``$HF_EXT_RESULTS_DIR``, else ``benchmarks/results`` of the source checkout, else (an installed
    package) ``./benchmarks/results`` under the current directory; in a ``--quick`` run (:func:`mark_quick_run`)
    the default folder's ``quick/`` subfolder."""
    env = os.environ.get("HF_EXT_RESULTS_DIR")
    if env:
        d = Path(env)
    else:
        d = (CHECKOUT_ROOT if CHECKOUT_ROOT is not None else Path.cwd()) / "benchmarks" / "results"
        if _QUICK_RUN[0]:
            d = d / QUICK_SUBDIR
    try:
        d.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # it, or a folder above it, is a file (or a broken link)
        if d.is_symlink() and not d.exists():
            what = "is a broken symbolic link, not a folder"
        elif d.exists():
            what = "is a file, not a folder" if d.is_file() else "exists and is not a folder"
        else:
            what = "cannot be made a folder: a path above it is a file"
        where = f"HF_EXT_RESULTS_DIR={env!r}" if env else f"the results folder {str(d)!r}"
        fix = "point HF_EXT_RESULTS_DIR at a folder" if env else "move it away or set HF_EXT_RESULTS_DIR"
        raise ValueError(f"{where} {what}; {fix} for the benchmark results") from None
    return d


def device_name(device: object = None) -> str:
    """Name of the GPU a benchmark runs on, else ``cpu-<machine>``.

    Args:
        device: ``None`` (the current CUDA device, the one ``torch.cuda.set_device`` / ``torch.cuda.device(...)``
            picked, when CUDA is available; else the CPU), a ``torch.device`` or its string (``"cuda:1"``,
            ``"cuda"`` = the current one, ``"cpu"``) or a CUDA device index.

    Example:
        >>> device_name("cpu").startswith("cpu-")
        True
    """
    cpu = f"cpu-{platform.machine()}"
    if device is None:
        if not _cuda():
            return cpu
        import torch

        return torch.cuda.get_device_name(torch.cuda.current_device())
    import torch

    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise ValueError(
            f"device must be None, a torch.device, a device string ('cuda:1', 'cpu') or a CUDA index, got {device!r}"
        )
    try:
        dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:<index>', got {device!r} ({exc})") from None
    if dev.type == "cpu":
        return cpu
    if dev.type != "cuda":
        raise ValueError(f"device must be a CPU or CUDA device, got {device!r}")
    if not _cuda():
        raise ValueError(f"device={device!r}: CUDA is not available here")
    index = torch.cuda.current_device() if dev.index is None else dev.index
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        raise ValueError(
            f"device={device!r}: this machine has {count} CUDA device(s) (indices 0..{count - 1})"
        )
    return torch.cuda.get_device_name(index)


def versions() -> str:
    """``name=version`` pairs of the libraries that matter, ``;``-separated."""
    from importlib import metadata

    out = [f"python={platform.python_version()}"]
    for pkg in ("torch", "triton", "transformers", "diffusers", "trl", "accelerate", "peft", "datasets"):
        try:
            out.append(f"{pkg}={metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            continue
    try:
        import torch

        if torch.version.cuda:
            out.append(f"cuda={torch.version.cuda}")
    except Exception:  # pragma: no cover
        pass
    return ";".join(out)


def git_commit() -> str:
    """Short commit of the checkout, ``+dirty`` when tracked files outside ``benchmarks/results`` have changes (a
    benchmark's own appends to its results CSV do not count), or ``$HF_EXT_COMMIT``; ``unknown``
    outside a source checkout, and in a copy of the source that the enclosing git repository does not track
    (an exported tree put inside another project): that repository's commit says nothing about this code."""
    if os.environ.get("HF_EXT_COMMIT"):
        return os.environ["HF_EXT_COMMIT"]
    if CHECKOUT_ROOT is None:  # an installed package: git would describe whatever repository encloses it
        return "unknown"

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True)

    try:
        this_file = Path(__file__).resolve().relative_to(REPO_ROOT).as_posix()
        if git("ls-files", "--error-unmatch", "--", this_file).returncode != 0:
            return "unknown"  # not a git checkout, or one that does not hold this code
        sha = git("rev-parse", "--short", "HEAD")
        if sha.returncode != 0:
            return "unknown"
        # changes to the code, not to the results files that benchmarks (this one included) append to
        dirty = git(
            "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results"
        ).stdout.strip()
        return sha.stdout.strip() + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


def time_fn(fn: Callable[[], object], *, warmup: int = 3, rep: int = 10, device: object = None) -> float:
    """Median time of ``fn()`` in milliseconds.

    On CUDA uses ``triton.testing.do_bench`` (``warmup``/``rep`` are then milliseconds of
    warm-up and measurement, at least 25/100) with ``device`` (``"cuda:1"``, a ``torch.device``) as the
    current device, so its events and synchronisation are those of the GPU ``fn`` runs on; elsewhere a
    wall-clock loop of ``warmup`` + ``rep`` calls.
    """
    device = str(device) if device is not None else ("cuda" if _cuda() else "cpu")
    if device.startswith("cuda"):
        import torch
        from triton.testing import do_bench

        with torch.cuda.device(torch.device(device)):
            return float(do_bench(fn, warmup=max(25, warmup), rep=max(100, rep), return_mode="median"))
    return time_interleaved({"fn": fn}, rounds=max(1, rep), warmup=max(0, warmup), device=device)["fn"]


def time_interleaved(
    fns: dict[str, Callable[[], object]], *, rounds: int = 10, warmup: int = 1, device: object = None
) -> dict[str, float]:
    """Median time in milliseconds of each ``fns[name]()``, the calls interleaved round by round in an order
    rotated every round (each name runs once in each position over ``len(fns)`` rounds).

    Timing one function after the other charges a slow spell of the machine to one of them, and a fixed
    interleaved order charges what the first call after a pause pays (on two H200s up to 2x for a CPU-launch-bound
    step) to the first name. Each call is timed alone: on CUDA ``device`` (``"cuda:1"``, a ``torch.device``; plain
    ``"cuda"`` is the current one) is synchronised before and after it. ``warmup`` untimed rounds run first.
    """
    if not fns:
        raise ValueError("fns: give at least one function to time")
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds must be >= 1 and warmup >= 0, got rounds={rounds}, warmup={warmup}")
    device = str(device) if device is not None else ("cuda" if _cuda() else "cpu")
    sync: Callable[[], None] = lambda: None  # noqa: E731
    if device.startswith("cuda"):
        import torch

        cuda_device = torch.device(device)
        sync = lambda: torch.cuda.synchronize(cuda_device)  # noqa: E731 - the GPU the functions run on
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            sync()
            t0 = time.perf_counter()
            fns[name]()
            sync()
            if r >= warmup:
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {n: float(statistics.median(t)) for n, t in times.items()}


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


def run_command() -> str:
    """How this process was started: ``sys.argv``, prefixed by the torchrun launch when run under torchrun."""
    cmd = " ".join(sys.argv)
    if "TORCHELASTIC_RUN_ID" in os.environ and "LOCAL_WORLD_SIZE" in os.environ:
        return f"torchrun --nproc-per-node {os.environ['LOCAL_WORLD_SIZE']} {cmd}"
    return cmd


@dataclass
class Row:
    """One result row (see the module docstring for the schema)."""

    component: str
    case: str
    metric: str
    ours: float
    baseline: str
    baseline_value: float
    ratio: float | None = None
    quality_name: str = ""
    quality_value: float | str = ""
    device: str = field(default_factory=device_name)
    versions: str = field(default_factory=versions)
    date: str = field(
        default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    )
    commit: str = field(default_factory=git_commit)
    command: str = field(default_factory=run_command)

    @classmethod
    def make(
        cls,
        component: str,
        case: str,
        metric: str,
        ours: float,
        baseline: str,
        baseline_value: float,
        *,
        higher_is_better: bool = False,
        **kw: object,
    ) -> Row:
        """Build a row, computing ``ratio`` so that > 1 means ours is better."""
        if higher_is_better:
            ratio = ours / baseline_value if baseline_value else float("nan")
        else:
            ratio = baseline_value / ours if ours else float("nan")
        return cls(component, case, metric, ours, baseline, baseline_value, ratio, **kw)  # type: ignore[arg-type]


def append_rows(component: str, rows: Sequence[Row], path: Path | None = None) -> Path:
    """Append rows to ``benchmarks/results/<component>.csv`` (header written once).

    The file's own header decides the column order: a file with the schema's columns in another order, or
    with extra columns (left empty), gets its rows in its order; a file without every schema column is
    refused with a ``ValueError`` before anything is written. A last line without its line end (an interrupted
    write) is ended first, so that the new rows do not run into it. The file is locked while it is read and
    written (``fcntl.flock`` where available), so processes that append at the same time (torchrun ranks,
    benchmarks run side by side) write one header and whole rows.
    """
    path = path or results_dir() / f"{component}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    cells = [{k: _cell(k, v) for k, v in asdict(r).items() if k in COLUMNS} for r in rows]  # before the lock
    with path.open("ab+") as f:
        _lock(f)
        try:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(0)
            # utf-8-sig: a file saved with a byte-order mark (spreadsheets do) still has "component" first
            head = f.readline().decode("utf-8-sig").strip("\r\n") if size else ""
            if not head:  # a new or empty file (a blank first line: nothing parsable was there)
                fieldnames, prefix = COLUMNS, ""
            else:
                fieldnames = next(csv.reader([head]))
                missing = [c for c in COLUMNS if c not in fieldnames]
                if missing:
                    raise ValueError(
                        f"append_rows: {path} is not a results CSV of this schema (its header lacks "
                        f"{', '.join(missing)}); expected the columns {','.join(COLUMNS)}. "
                        "Write to another file (path=) or move this one away."
                    )
                f.seek(size - 1)
                prefix = "" if f.read(1) == b"\n" else "\r\n"
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=fieldnames, restval="")
            if not head:
                w.writeheader()
            w.writerows(cells)
            f.seek(0, os.SEEK_END)
            f.write((prefix + buf.getvalue()).encode("utf-8"))
            f.flush()
        finally:
            _unlock(f)
    return path


def _plain(name: str, v: object) -> object:
    """``v`` with a 0-d torch tensor, a numpy scalar or a 0-d numpy array made the plain Python number it holds
    (``str`` of a tensor is ``tensor(1.5000)``); a tensor or array of more than one value is a ``ValueError``
    naming the field ``name``. Anything else is returned as it is."""
    torch = sys.modules.get("torch")  # a tensor can only exist once torch is imported
    np = sys.modules.get("numpy")
    is_tensor = torch is not None and isinstance(v, torch.Tensor)
    is_array = np is not None and isinstance(v, (np.ndarray, np.generic))
    if not (is_tensor or is_array):
        return v
    if v.ndim != 0:  # type: ignore[union-attr]
        kind = "tensor" if is_tensor else "array"
        raise ValueError(
            f"Row.{name} must be a number or a string, got a {kind} of shape {tuple(v.shape)}: "  # type: ignore[union-attr]
            "give one value (a 0-d tensor or .item())"
        )
    return v.item()  # type: ignore[union-attr]


def _cell(name: str, v: object) -> str:
    """A CSV cell of field ``name`` as ``csv`` writes it: ``None`` empty, a 0-d tensor / numpy scalar the number
    it holds, anything else its ``str``."""
    v = _plain(name, v)
    return "" if v is None else str(v)


def _lock(f: IO[bytes]) -> None:
    """Take an exclusive lock on ``f`` (blocking); nothing where ``fcntl`` is missing (Windows)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)


def _unlock(f: IO[bytes]) -> None:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return
    fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def read_rows(path: Path) -> list[dict[str, str]]:
    """Rows of a results CSV as dicts (a UTF-8 byte-order mark before the header is skipped)."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        return list(csv.DictReader(f))


def plot_results(
    component: str,
    path: Path | None = None,
    out: Path | None = None,
    max_cases: int = 8,
    max_series: int = 4,
    max_panels: int = 10,
) -> Path:
    """Draw ``<component>.png`` beside the CSV: one panel per metric, a horizontal bar per
    (case, baseline) with the ratio (> 1: hf_ext better), log-scaled when ratios span a wide range.

    Only the latest row of each (case, metric, baseline, device) is drawn. The figure stays readable
    however long the CSV grows: at most ``max_panels`` metrics, and per panel ``max_series``
    baselines and ``max_cases`` cases, the most recently measured ones; a panel's title says what it
    leaves out, and a note under the figure names the metrics not drawn (the CSV has everything).
    """
    import math
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter
    from matplotlib.transforms import offset_copy

    for name, v in (("max_cases", max_cases), ("max_series", max_series), ("max_panels", max_panels)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"plot_results: {name} must be an int >= 1, got {v!r}")
    path = path or results_dir() / f"{component}.csv"
    out = out or path.with_suffix(".png")
    with path.open(newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f), [])
    needed = ("case", "metric", "baseline", "device", "ratio")
    missing = [c for c in needed if c not in header]
    if header and missing:
        raise ValueError(
            f"plot_results: {path} is not a results CSV of this schema (its header lacks {', '.join(missing)})"
        )
    latest: dict[tuple[str, str, str, str], dict[str, str]] = {}
    for r in read_rows(path):
        key = (r["case"], r["metric"], r["baseline"], r["device"])
        latest.pop(key, None)  # keep insertion order = recency
        latest[key] = r
    # metric -> series -> case -> (ratio, recency); recency: position in `latest` (larger = newer)
    data: dict[str, dict[str, dict[str, tuple[float, int]]]] = {}
    for i, ((case, metric, baseline, device), r) in enumerate(latest.items()):
        try:
            ratio = float(r["ratio"])
        except (TypeError, ValueError):
            continue
        if not math.isfinite(ratio) or ratio <= 0:
            continue
        data.setdefault(metric, {}).setdefault(f"vs {baseline} ({device})", {})[case] = (ratio, i)

    def newest(items: dict[str, float], k: int) -> list[str]:
        """The ``k`` keys of ``items`` with the largest recency, in their first-seen order."""
        keep = set(sorted(items, key=items.__getitem__)[-k:])
        return [x for x in items if x in keep]

    metric_age = {m: max(v[1] for s in ser.values() for v in s.values()) for m, ser in data.items()}
    metrics = newest(metric_age, max_panels)
    skipped_metrics = [m for m in data if m not in metrics]
    panels = []  # (metric, {series: {case: ratio}}, cases, title note)
    for m in metrics:
        ser_age = {s: max(v[1] for v in vals.values()) for s, vals in data[m].items()}
        series = newest(ser_age, max_series)
        case_age: dict[str, int] = {}
        for s in series:
            for c, (_, i) in data[m][s].items():
                case_age[c] = max(case_age.get(c, -1), i)
        cases = newest(case_age, max_cases)
        all_cases = {c for vals in data[m].values() for c in vals}
        left = []
        if len(all_cases) > len(cases):
            left.append(f"latest {len(cases)} of {len(all_cases)} cases")
        if len(data[m]) > len(series):
            left.append(f"latest {len(series)} of {len(data[m])} baselines")
        vals = {s: {c: data[m][s][c][0] for c in cases if c in data[m][s]} for s in series}
        panels.append((m, vals, cases, f" [{'; '.join(left)}]" if left else ""))
    if not panels:
        panels = [("(no finite ratios)", {}, [], "")]

    ncols = 2 if len(panels) > 3 else 1
    nrows = math.ceil(len(panels) / ncols)

    def label(case: str) -> str:  # wrapped, so cases differing at the end stay apart; cut past 6 lines
        return "\n".join(textwrap.wrap(case, 40, break_on_hyphens=False, max_lines=6, placeholder=" ..."))

    def panel_height(p: tuple) -> float:
        lines = max((label(c).count("\n") + 1 for c in p[2]), default=1)
        per_case = max(0.3 * max(1, len(p[1])) ** 0.5, 0.12 * lines + 0.06)  # bars, or the label's lines
        return max(1.6, per_case * len(p[2]) + 1.2)

    heights = [max(panel_height(p) for p in panels[r * ncols : (r + 1) * ncols]) for r in range(nrows)]
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(8 * ncols if ncols > 1 else 11, sum(heights) + 0.8),
        squeeze=False,
        gridspec_kw={"height_ratios": heights},
        layout="constrained",
    )
    for k, ax in enumerate(axes.flat):
        if k >= len(panels):
            ax.set_visible(False)
            continue
        metric, series, cases, note = panels[k]
        n = max(1, len(series))
        h = 0.8 / n
        all_vals = [v for vals in series.values() for v in vals.values()]
        for i, (name, vals) in enumerate(series.items()):
            ys = [j + i * h for j, c in enumerate(cases) if c in vals]
            xs = [vals[c] for c in cases if c in vals]
            ax.barh(ys, xs, height=h, label=name)
        ax.axvline(1.0, color="k", lw=0.8, ls="--")
        if all_vals and max(all_vals) / min(all_vals) > 30:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels (2x10^-1, 3x10^-1, ...) overlapped
        ax.set_yticks([j + 0.4 - h / 2 for j in range(len(cases))])
        ax.set_yticklabels([label(c) for c in cases], fontsize=6)
        ax.invert_yaxis()
        ax.set_title(textwrap.fill(f"{metric}: ratio (> 1 means hf_ext better){note}", 90), fontsize=8)
        if series:
            # under the panel, not over its bars
            below = offset_copy(ax.transAxes, fig=fig, y=-16, units="points")  # below the tick labels
            ax.legend(
                fontsize=6,
                loc="upper center",
                bbox_to_anchor=(0.5, 0),
                bbox_transform=below,
                ncol=2,
                frameon=False,
            )
    fig.suptitle(f"hf_ext {component}", fontsize=11)
    if skipped_metrics:
        msg = f"not drawn (older; see {path.name}): metrics " + ", ".join(skipped_metrics)
        fig.supxlabel(textwrap.fill(msg, 160), fontsize=7)
        print(f"plot_results: {out.name}: {msg}")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def print_rows(rows: Sequence[Row], title: str = "") -> None:
    """Print rows as a rich table."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title or None)
    hidden = ("component", "device", "versions", "date", "commit", "command")  # same for every row of a run
    for c in (c for c in COLUMNS if c not in hidden):
        # fold, never truncate: rows that differ only past the column width must not print the same
        t.add_column(c, overflow="fold", no_wrap=False)
    for r in rows:
        t.add_row(
            r.case,
            r.metric,
            _fmt(r.ours, "ours"),
            r.baseline,
            _fmt(r.baseline_value, "baseline_value"),
            _fmt(r.ratio, "ratio"),
            r.quality_name,
            _fmt(r.quality_value, "quality_value"),
        )
    Console().print(t)


def _fmt(v: object, name: str = "value") -> str:
    v = _plain(name, v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)
