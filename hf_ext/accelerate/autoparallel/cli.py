"""``hf-ext plan``: search a parallelism plan, print it as a table and write it as JSON.

Example:
    $ hf-ext plan --model llama3-70b --gpus 64 --gpu-memory 80GB --seq-len 8192 --global-batch 512
    $ hf-ext plan --model path/to/config.json --gpus 8 --gpu-memory 40GB --out plan.json
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from hf_ext.utils.bench import check_flag_minimums


def parse_memory(text: str) -> float:
    """``"80GB"``, ``"80GiB"``, ``"80G"``, ``"80"`` -> 80.0; ``"512MB"`` -> 0.5 (GiB units)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(gib|gb|g|mib|mb|m|tib|tb|t)?\s*", str(text).lower())
    if not m:
        raise ValueError(f"--gpu-memory={text!r} is not a size; use e.g. 80GB, 40GiB, 24G or 512MB")
    val, unit = float(m.group(1)), (m.group(2) or "gb")
    factor = {"g": 1.0, "m": 1 / 1024, "t": 1024.0}[unit[0]]
    if val <= 0:
        raise ValueError(f"--gpu-memory must be positive, got {text!r}")
    return val * factor


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hf-ext plan", description="Galvatron-style automatic parallelism plan search"
    )
    p.add_argument(
        "--model",
        required=True,
        help="built-in shape (llama3-8b, llama3-70b, llama3.2-1b, ...) or config.json",
    )
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs")
    p.add_argument(
        "--gpu-memory", "--memory", dest="gpu_memory", default="80GB", help="memory per GPU (e.g. 80GB)"
    )
    p.add_argument(
        "--global-batch", type=int, default=None, help="sequences per step (default max(64, gpus))"
    )
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro-batch-sizes", default="1,2,4,8", help="comma-separated micro-batch sizes to try")
    p.add_argument("--dp-types", default="ddp,fsdp", help="comma-separated subset of ddp,fsdp")
    p.add_argument("--no-ckpt", action="store_true", help="forbid activation checkpointing")
    p.add_argument(
        "--attn-implementation",
        default="sdpa",
        help="the model's attention kernel: sdpa (default), flash_attention_2, flash_attention_3 or "
        "flex_attention; only sdpa gets dense [b, 1, s, s] masks, which the memory model counts",
    )
    p.add_argument(
        "--padding-mask",
        action="store_true",
        help="training passes a padding attention_mask with pads (train_step(..., attention_mask=)): under sdpa "
        "every layer then gets a dense mask",
    )
    p.add_argument("--top-k", type=int, default=5, help="ranked plans to print")
    p.add_argument("--hardware", default=None, help="HardwareProfile JSON (default: H100 defaults)")
    p.add_argument(
        "--profile", default=None, help="ModelProfile JSON measured by the profiler (calibrates compute)"
    )
    p.add_argument(
        "--out", default=None, help="where to write the plan JSON (default plan_<model>_<gpus>gpu.json)"
    )
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The planner's arguments, checked before any search (argparse errors name the flag)."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    check_flag_minimums(parser, args, {"top_k": 1, "gpus": 1, "seq_len": 1, "global_batch": 1})
    try:
        args.memory_gb = parse_memory(args.gpu_memory)
    except ValueError as exc:
        parser.error(f"argument --gpu-memory: {exc}")
    parts = [x.strip() for x in args.micro_batch_sizes.split(",") if x.strip()]
    if not parts or not all(x.isdigit() and int(x) >= 1 for x in parts):
        parser.error(
            f"argument --micro-batch-sizes: must be comma-separated positive integers, e.g. 1,2,4,8 "
            f"(got {args.micro_batch_sizes!r})"
        )
    args.micro_batch_list = tuple(int(x) for x in parts)
    dps = tuple(x.strip() for x in args.dp_types.split(",") if x.strip())
    if not dps or any(d not in ("ddp", "fsdp") for d in dps):
        parser.error(
            f"argument --dp-types: must be a comma-separated subset of ddp, fsdp (got {args.dp_types!r})"
        )
    args.dp_type_list = dps
    from hf_ext.accelerate.autoparallel.cost_model import ATTN_IMPLEMENTATIONS

    if args.attn_implementation not in ATTN_IMPLEMENTATIONS:
        parser.error(
            f"argument --attn-implementation: must be one of {', '.join(ATTN_IMPLEMENTATIONS)} "
            f"(got {args.attn_implementation!r})"
        )
    for flag in ("hardware", "profile"):
        path = getattr(args, flag)
        if path is not None and not os.path.isfile(path):
            parser.error(f"argument --{flag}: no such file: {path}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``hf-ext plan``; returns 0 on success, 2 on bad input / no feasible plan."""
    from rich.console import Console
    from rich.table import Table

    from hf_ext.accelerate.autoparallel.profiler import HardwareProfile, ModelProfile
    from hf_ext.accelerate.autoparallel.search import NoFeasiblePlanError, SearchConfig, search
    from hf_ext.accelerate.autoparallel.shapes import get_shape

    args = parse_args(argv)
    con = Console()
    try:
        shape = get_shape(args.model)
        memory = args.memory_gb
        cfg = SearchConfig(
            gpus=args.gpus,
            memory_gb=memory,
            global_batch=args.global_batch,
            seq_len=args.seq_len,
            micro_batch_sizes=args.micro_batch_list,
            dp_types=args.dp_type_list,
            allow_ckpt=not args.no_ckpt,
            top_k=args.top_k,
            attn_implementation=args.attn_implementation,
            padding_mask=args.padding_mask,
        )
        loaded: dict[str, Any] = {}
        for flag, cls in (("hardware", HardwareProfile), ("profile", ModelProfile)):
            path = getattr(args, flag)
            if path:
                try:
                    loaded[flag] = cls.load(path)
                except (OSError, ValueError, TypeError, KeyError) as exc:
                    raise ValueError(
                        f"--{flag}={path!r} is not a readable {cls.__name__} JSON: {exc}"
                    ) from exc
        res = search(shape, cfg, hardware=loaded.get("hardware"), profile=loaded.get("profile"))
    except NoFeasiblePlanError as exc:
        print(f"hf-ext plan: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"hf-ext plan: {exc}", file=sys.stderr)
        return 2
    t = Table(
        title=f"{shape.name} ({shape.num_params() / 1e9:.2f}B) on {cfg.gpus} GPUs x {memory:g} GB, "
        f"global batch {cfg.global_batch} x {cfg.seq_len} tokens  [cost-model predictions]"
    )
    for c in ("rank", "plan", "step s", "tokens/s", "tokens/s/GPU", "MFU", "max mem GB"):
        t.add_column(c)
    for i, p in enumerate(res.ranked):
        pr = p.predicted
        t.add_row(
            str(i + 1),
            p.describe(),
            f"{pr['step_ms'] / 1e3:.2f}",
            f"{pr['tokens_per_s']:,.0f}",
            f"{pr['tokens_per_s_per_gpu']:,.0f}",
            f"{pr['mfu']:.1%}",
            f"{max(pr['memory_gb']):.1f}",
        )
    con.print(t)
    con.print(res.best.table(title="best plan per stage"))
    out = args.out or f"plan_{re.sub(r'[^A-Za-z0-9_.-]+', '_', shape.name)}_{cfg.gpus}gpu.json"
    res.best.save(out)
    con.print(f"searched {res.evaluated} plans ({res.pruned} pruned) in {res.seconds:.2f} s; wrote {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
