"""Benchmark: searched plan vs hand-picked DDP / FSDP / FSDP+checkpointing, and prediction error.

On N GPUs (world size N, NCCL; N = 1 as a plain process, N > 1 under ``torchrun``) it: builds a random
~1B Llama (Llama-3.2-1B shape), profiles its layers on rank 0 (with N > 1 under torchrun, in a private
one-rank process group before joining the world, so the whole-runtime and FSDP probes run as on one GPU),
measures the collectives at group size N when N > 1, searches a plan for N GPUs with the measured
profile, trains a few steps with the searched plan and three hand-picked configurations through
:func:`apply_plan` on all ranks (a step's time is the slowest rank's; the median over steps is
reported), and writes (rank 0) to ``autoparallel.csv`` with case ``<model>-s<seq>-gb<batch>-<N>gpu``:

* ``metric=step_time``: ``ours`` = searched plan (ms), ``baseline`` = ``hand_ddp`` / ``hand_fsdp`` /
  ``hand_fsdp_ckpt`` (ratio > 1: the searched plan is faster). If the searched plan is one
  :func:`apply_plan` cannot run, the best-ranked plan it can run is measured instead (said in the
  output and in ``quality_value``);
* ``metric=prediction_error``: ``ours`` = predicted ms, ``baseline_value`` = measured ms,
  ``ratio = predicted / measured`` (one row per configuration);
* rows whose case ends in ``[predicted]`` (``quality_name=source``) are cost-model predictions for
  ``--predict-gpus`` GPUs (default 2; skipped when it equals N), NOT measurements.

Beside the CSV (rank 0) it writes the profile, ``autoparallel_profile_<device>.json`` (a
:class:`ModelProfile`; ``ModelProfile.load`` reads it back), and ``autoparallel_breakdown_<device>-<N>gpu.json``:
per configuration the plan, measured and predicted ms and the terms of the prediction
(:meth:`CostModel.breakdown`: layer forward / backward / recompute, runtime excess, embedding, head,
whole-model overhead, communication, bubble, optimizer, per-step overhead), also printed.

The profile times the layers at ``b`` = 1, 2, 4, 8 and the whole model and runtime (DDP-autocast and
FSDP2 through :func:`apply_plan`) at ``b = 1`` and ``b = --runtime-micro-batch`` (default 4), the latter
also with every layer checkpointed.

``--quick`` runs a tiny model on CPU (gloo) in seconds to check the pipeline end to end (also with
several processes).

Commands (GPU box)::

    PYTHONPATH=$PWD:$PWD/kernels python -m hf_ext bench autoparallel
    PYTHONPATH=$PWD:$PWD/kernels python -m torch.distributed.run --standalone --nproc-per-node 2 \\
        -m hf_ext.accelerate.autoparallel.bench
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import time
from typing import Any

from hf_ext.utils.bench import bench_main, check_flag_minimums, mark_quick_run

COMPONENT = "autoparallel"
# What apply_plan runs, told to the cost model: tensor parallelism shards the decoder layers only (the
# embedding / LM head stay whole on every tp rank) and sequence parallelism is not applied.
RUNTIME_COST_KWARGS: dict[str, Any] = {"vocab_parallel": False}
RUNTIME_SP = "off"
# Generous: with N > 1 the other ranks wait in their first collective while rank 0 profiles alone.
_PG_TIMEOUT = datetime.timedelta(minutes=30)


def _init_dist(backend: str) -> None:
    import torch.distributed as dist

    from hf_ext.testing import free_port

    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    dist.init_process_group(
        backend, rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]), timeout=_PG_TIMEOUT
    )


def _model_config(args: argparse.Namespace) -> Any:
    from transformers import LlamaConfig

    if args.quick:
        return LlamaConfig(
            vocab_size=512,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
            attn_implementation="sdpa",
        )
    from hf_ext.accelerate.autoparallel.shapes import get_shape

    s = get_shape(args.model)
    return LlamaConfig(
        vocab_size=s.vocab_size,
        hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_layers,
        num_attention_heads=s.num_heads,
        num_key_value_heads=s.num_kv_heads,
        max_position_embeddings=max(8192, args.seq_len),
        tie_word_embeddings=s.tie_word_embeddings,
        attn_implementation="sdpa",
    )


def _profile(cfg: Any, args: argparse.Namespace, device: Any, dtype: Any, shape: Any) -> Any:
    """``profile_model`` of a freshly built random model (run by rank 0 only).

    Layers at the micro-batch sizes the search tries (1, 2, 4, 8; ``--quick``: 1, 2), the whole model and
    the runtime at ``b = 1`` and ``--runtime-micro-batch``."""
    import torch
    from transformers import LlamaForCausalLM

    from hf_ext.accelerate.autoparallel.profiler import profile_model

    torch.manual_seed(0)
    with torch.device(device):
        pm = LlamaForCausalLM(cfg)
    prof = profile_model(
        pm,
        seq_len=args.seq_len,
        micro_batches=(1, 2) if args.quick else (1, 2, 4, 8),
        device=device,
        dtype=dtype or torch.float32,
        repeats=2 if args.quick else 5,
        max_layers=2,
        cache_dir=args.cache_dir,
        shape=shape,
        runtime_micro_batches=(1, args.runtime_micro_batch),
    )
    del pm
    gc.collect()
    return prof


def _profile_lines(prof: Any) -> list[str]:
    """What the profile measured, in words (printed by rank 0)."""
    from hf_ext.accelerate.autoparallel.profiler import HardwareProfile

    emb = prof.embed.fwd_ms(1) + prof.embed.bwd_ms(1) if prof.embed is not None else 0.0
    bwd0 = prof.calibrate(HardwareProfile.cpu()).layer_bwd_overhead_ms()
    lines = [
        f"layer: fwd {prof.per_layer_overhead_ms:.3f} ms + compute at {prof.achieved_tflops:.1f} TFLOP/s, bwd "
        f"{bwd0:.3f} ms + {prof.bwd_fwd_ratio:.2f} x compute; activation calibration {prof.act_calibration:.2f}; "
        f"embed {emb:.2f} ms/seq, head {prof.head.fwd_ms(1) + prof.head.bwd_ms(1):.2f} ms at b=1 "
        f"(+{prof.head.fwd_ms_per_sample + prof.head.bwd_ms_per_sample:.2f} ms/seq)",
        f"AdamW {prof.optimizer_ns_per_param:.3f} ns/param; autocast {prof.autocast_ns_per_param:.4f} ns/param "
        f"+ {prof.autocast_ns_per_param_per_sample:.4f} ns/layer-param/seq (act x{prof.autocast_act_ratio:.2f}); "
        f"FSDP {prof.fsdp_layer_overhead_ms:.3f} + {prof.fsdp_layer_overhead_ms_per_sample:.3f} ms/seq per "
        f"layer/micro-batch; whole-model overhead {prof.micro_batch_overhead_ms:.2f} + "
        f"{prof.micro_batch_overhead_ms_per_sample:.2f} ms/seq per micro-batch (sizes {prof.runtime_micro_batches})",
        "per-step overhead "
        + (", ".join(f"{k} {v:.1f} ms" for k, v in prof.step_overhead_ms.items()) or "-")
        + "; recompute / layer forward "
        + (", ".join(f"{k} {v:.2f}" for k, v in prof.recompute_fwd_ratio.items()) or "- (1.0)"),
    ]
    for k, r in prof.runtime.items():
        steps = ", ".join(
            f"{n[:-3].replace('step_', '')} {v:.1f}"
            for n, v in r.items()
            if n.startswith(("step_", "ckpt_step_"))
        )
        lines.append(
            f"runtime probe {k}: train_step(b, m) = {r['fixed_ms']:.2f} + m x ({r.get('mb_fixed_ms', r['mb_ms']):.2f}"
            f" + {r.get('mb_ms_per_sample', 0.0):.2f} b) ms, excess over the plain model "
            f"{r.get('excess_ms', float('nan')):.2f} + {r.get('excess_ms_per_sample', float('nan')):.2f} b ms, "
            f"AdamW {r['opt_ms']:.2f} ms; medians ms: {steps}"
        )
    for k, v in prof.probe_notes.items():
        lines.append(f"[yellow]profile probe {k}: {v}[/yellow]")
    return lines


# Short labels of CostModel.breakdown terms, in print order.
_BREAKDOWN_LABELS = {
    "layers_fwd": "fwd",
    "layers_bwd": "bwd",
    "recompute": "recompute",
    "layers_runtime": "layer-runtime",
    "embed": "embed",
    "head": "head",
    "micro_batch_overhead": "wrapper",
    "root_runtime": "root-runtime",
    "tp_comm": "tp",
    "fsdp_comm": "fsdp-comm",
    "p2p": "p2p",
    "pipeline_bubble": "bubble",
    "grad_sync": "grad-sync",
    "optimizer": "optimizer",
    "step_overhead": "step-overhead",
}


def _format_breakdown(bd: dict[str, float]) -> str:
    """``fwd 70.1 + bwd 150.2 + ... = 340.5`` (ms per step; zero terms left out)."""
    terms = [f"{lab} {bd[k]:.1f}" for k, lab in _BREAKDOWN_LABELS.items() if abs(bd.get(k, 0.0)) >= 0.05]
    return " + ".join(terms) + f" = {bd['total']:.1f} ms"


def _write_breakdown(
    path: Any,
    row: Any,
    case: str,
    configs: dict[str, Any],
    measured: dict[str, tuple[float, float, str]],
    predicted: dict[str, float],
    breakdowns: dict[str, dict[str, float]],
) -> None:
    """Per configuration: plan, measured / predicted ms, peak GiB and the prediction's terms (JSON; a
    measurement that failed or was not taken is ``null``)."""

    def num(x: float) -> float | None:
        return x if x == x and abs(x) != float("inf") else None

    obj = {
        "case": case,
        "device": row.device,
        "date": row.date,
        "commit": row.commit,
        "configs": {
            name: {
                "plan": plan.describe(),
                "measured_ms": num(measured[name][0]),
                "measured_peak_gib": num(measured[name][1]),
                "measured_note": measured[name][2],
                "predicted_ms": predicted[name],
                "breakdown_ms": breakdowns[name],
            }
            for name, plan in configs.items()
        },
    }
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def _measure(
    cfg: Any, plan: Any, args: argparse.Namespace, device: Any, dtype: Any
) -> tuple[float, float, str]:
    """Median step time (ms) and peak memory (GiB) of ``plan`` on all ranks; ``(nan, nan, error)`` on OOM.

    Collective: every rank calls it. Each step starts after a barrier; its time is the slowest rank's
    (all-reduce MAX), the peak memory is the largest rank's. An OOM on any rank makes every rank return
    the error (the ranks agree through an all-reduce after the steps; an OOM that strikes one rank in
    the middle of a collective can still stall the others until the process-group timeout).

    The peak is ``max_memory_allocated`` minus what was allocated before the model was built, so memory
    left behind by an earlier configuration (e.g. tensors pinned by an OOM traceback) is not billed to
    this one; the OOM is handled outside the ``except`` clause so its traceback is released first.
    """
    import torch
    import torch.distributed as dist
    from transformers import LlamaForCausalLM

    from hf_ext.accelerate.autoparallel.apply import apply_plan
    from hf_ext.accelerate.autoparallel.profiler import _sync

    torch.manual_seed(0)
    model = runner = opt = None
    err = ""
    times: list[float] = []
    peak_bytes = 0.0
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
        model.train()
        runner = apply_plan(model, plan, device=device, param_dtype=dtype)
        opt = torch.optim.AdamW(runner.param_groups(), lr=1e-5, foreach=True)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, cfg.vocab_size, (plan.global_batch, plan.seq_len), generator=g)
        local = runner.local_batch(ids).to(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for step in range(args.warmup + args.steps):
            _sync(device)
            dist.barrier()
            _sync(device)
            t0 = time.perf_counter()
            runner.train_step(local)
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)
            if step >= args.warmup:
                times.append((time.perf_counter() - t0) * 1e3)
        if device.type == "cuda":
            peak_bytes = float(torch.cuda.max_memory_allocated(device) - base)
    except torch.OutOfMemoryError as exc:
        err = f"OOM: {str(exc)[:80]}"
    finally:
        if runner is not None:
            runner.close()  # this plan's mesh process groups (the bench applies several plans)
        del model, runner, opt
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    # [step times..., peak bytes, OOM flag], maximum over ranks
    red = torch.zeros(args.steps + 2, dtype=torch.float64, device=device)
    if err:
        red[-1] = 1.0
    else:
        red[: args.steps] = torch.tensor(times, dtype=torch.float64)
        red[-2] = peak_bytes
    dist.all_reduce(red, op=dist.ReduceOp.MAX)
    vals = red.tolist()
    if vals[-1]:
        return float("nan"), float("nan"), err or "OOM on another rank"
    peak = vals[-2] / 2**30 if device.type == "cuda" else float("nan")
    note = f"({base / 2**30:.1f} GiB already allocated before build, excluded)" if base > 2**29 else ""
    return float(statistics.median(vals[: args.steps])), peak, note


def _check_hand_batches(gb: int, hb: int, world: int, predict_gpus: int, *, quick: bool) -> None:
    """Refuse, before any profiling, sizes the hand configurations cannot split: every rank of ``g`` GPUs (the world
    size, and ``predict_gpus`` where it is predicted) runs micro-batches of ``hb`` sequences (``gb // g`` for the
    checkpointed one)."""
    if hb < 1:
        raise SystemExit(f"--hand-micro-batch must be at least 1, got {hb}")
    counts = [("the world size", world)]
    if predict_gpus > 1 and predict_gpus != world:
        counts.append(("--predict-gpus", predict_gpus))
    for what, g in counts:
        if gb % (g * hb):
            fixed = " (--quick's defaults: --global-batch 4, --hand-micro-batch 1)" if quick else ""
            raise SystemExit(
                f"--global-batch {gb} must be divisible by {what} {g} x --hand-micro-batch {hb} = {g * hb}: "
                f"the hand configurations give every GPU micro-batches of {hb} sequences{fixed}"
            )


@bench_main
def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (see the module docstring) on every rank; returns 0 on success."""
    import torch
    import torch.distributed as dist
    from rich.console import Console
    from rich.progress import track

    from hf_ext.accelerate.autoparallel.apply import unsupported_reason
    from hf_ext.accelerate.autoparallel.plan import Plan
    from hf_ext.accelerate.autoparallel.profiler import HardwareProfile, profile_collectives
    from hf_ext.accelerate.autoparallel.search import SearchConfig, predict, predict_breakdown, search
    from hf_ext.accelerate.autoparallel.shapes import get_shape
    from hf_ext.simulate.calibrate import name_slug
    from hf_ext.utils.bench import Row, append_rows, device_name, plot_results, print_rows, results_dir

    ap = argparse.ArgumentParser(prog="hf-ext bench autoparallel", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama3.2-1b", help="built-in shape to build randomly (GPU mode)")
    ap.add_argument(
        "--seq-len", type=int, default=None, help="tokens per sequence (default 2048; --quick: 64)"
    )
    ap.add_argument(
        "--global-batch", type=int, default=None, help="sequences per step, all ranks (default 8; --quick: 4)"
    )
    ap.add_argument(
        "--hand-micro-batch",
        type=int,
        default=None,
        help="micro-batch of the DDP / FSDP hand configs (default 2; --quick: 1)",
    )
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 4; --quick: 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; --quick: 1)")
    ap.add_argument(
        "--predict-gpus", type=int, default=2, help="also predict this many GPUs (cost model only)"
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="tiny model on CPU (seconds); smaller defaults for the flags not given",
    )
    ap.add_argument("--cache-dir", default=None, help="profile JSON cache directory")
    ap.add_argument(
        "--runtime-micro-batch",
        type=int,
        default=None,
        help="second micro-batch size of the whole-runtime probe (with b=1; 1: b=1 only; default 4, --quick: 2)",
    )
    args = ap.parse_args(argv)
    # --quick used to overwrite these even when given; it now fills in only the ones left out
    defaults = dict(
        seq_len=2048, global_batch=8, steps=4, warmup=2, hand_micro_batch=2, runtime_micro_batch=4
    )
    if args.quick:
        defaults.update(
            seq_len=64, global_batch=4, steps=2, warmup=1, hand_micro_batch=1, runtime_micro_batch=2
        )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    check_flag_minimums(
        ap,
        args,
        {
            "steps": 1,
            "warmup": 0,
            "seq_len": 1,
            "global_batch": 1,
            "predict_gpus": 1,
            "runtime_micro_batch": 1,
        },
    )
    mark_quick_run(args.quick)
    # Big transient blocks (fp32 logits of several GiB) fragment the caching allocator; expandable
    # segments (same setting for every configuration) keep the measured peak close to what is allocated.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if args.quick:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    cuda = torch.cuda.is_available() and not args.quick
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if cuda else "gloo"
    dtype = torch.bfloat16 if cuda else None
    cfg = _model_config(args)
    shape = get_shape(cfg)
    gb, s = args.global_batch, args.seq_len
    owns_pg = not dist.is_initialized()
    world = dist.get_world_size() if not owns_pg else int(os.environ.get("WORLD_SIZE", "1"))
    if gb % world:
        raise SystemExit(f"--global-batch {gb} must be divisible by the world size {world}")
    _check_hand_batches(gb, args.hand_micro_batch, world, args.predict_gpus, quick=args.quick)

    # 1. profile (bf16 on GPU) on rank 0 ------------------------------------------------------------
    t0 = time.perf_counter()
    prof = None
    if owns_pg and world > 1:
        # The whole-runtime and FSDP probes need a one-rank world: rank 0 profiles in a private group
        # before joining the others, which wait in their first collective meanwhile.
        if int(os.environ.get("RANK", "0")) == 0:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
            try:
                prof = _profile(cfg, args, device, dtype, shape)
            finally:
                dist.destroy_process_group()
        _init_dist(backend)
    else:
        _init_dist(backend)
        if dist.get_rank() == 0:
            prof = _profile(cfg, args, device, dtype, shape)
    rank = dist.get_rank()
    con = Console(quiet=rank != 0)
    slug = name_slug(device_name())
    if prof is not None:
        prof_path = results_dir() / f"{COMPONENT}_profile_{slug}.json"
        prof.save(str(prof_path))
        con.print(
            f"profiled {shape.name} ({shape.num_params() / 1e9:.2f}B) at s={s} in {time.perf_counter() - t0:.1f}s"
        )
        for line in _profile_lines(prof):
            con.print("  " + line)
        con.print(f"  wrote {prof_path}")

    # 2. collectives at group size W (all ranks), then search on rank 0 ---------------------------
    coll: dict[str, dict[str, list[float]]] = {}
    if world > 1:
        sizes = (1 << 16, 1 << 20) if args.quick else (1 << 20, 1 << 24, 1 << 27)
        coll = profile_collectives(sizes, repeats=2 if args.quick else 5, device=device)
        for op, per_group in coll.items():
            for g_, (lat, bw) in per_group.items():
                con.print(f"  collective {op} (group {g_}): {lat:.1f} us + bus bytes / {bw:.2f} GB/s")
    configs: dict[str, Plan] = {}
    plan_note = ""  # why the measured "searched" plan differs from the search's own best / its runtime
    if rank == 0:
        if cuda:
            mem_gb = torch.cuda.get_device_properties(device).total_memory / 2**30
            hw = HardwareProfile.h100()
            hw.memory_gb = mem_gb
            hw.name = torch.cuda.get_device_name(device)
        else:
            hw = HardwareProfile.cpu()
            mem_gb = hw.memory_gb
        hw.measured = coll
        sc = SearchConfig(
            gpus=world,
            memory_gb=mem_gb,
            global_batch=gb,
            seq_len=s,
            micro_batch_sizes=(1, 2, 4, 8),
            sequence_parallel=RUNTIME_SP,
        )
        res = search(shape, sc, hardware=hw, profile=prof, cost_kwargs=RUNTIME_COST_KWARGS)
        best = next((p for p in res.ranked if not unsupported_reason(p)), None)
        if best is None:
            raise SystemExit(
                f"no plan among the {len(res.ranked)} best for {world} GPU(s) can be run by apply_plan "
                f"(best: {res.best.describe()}: {unsupported_reason(res.best)})"
            )
        notes = []
        if best is not res.best:
            notes.append(
                f"fallback: searched best {res.best.describe()} not measurable ({unsupported_reason(res.best)}); "
                f"measured rank-{res.ranked.index(best) + 1} plan"
            )
        plan_note = "; ".join(notes)
        hb = args.hand_micro_batch
        configs = {
            "searched": best,
            "hand_ddp": Plan.uniform(
                shape, gpus=world, dp_type="ddp", global_batch=gb, seq_len=s, micro_batch=hb
            ),
            "hand_fsdp": Plan.uniform(
                shape, gpus=world, dp_type="fsdp", zero=3, global_batch=gb, seq_len=s, micro_batch=hb
            ),
            "hand_fsdp_ckpt": Plan.uniform(
                shape,
                gpus=world,
                dp_type="fsdp",
                zero=3,
                ckpt=True,
                global_batch=gb,
                seq_len=s,
                micro_batch=gb // world,
            ),
        }
        con.print(
            f"searched plan for {world} GPU(s): {best.describe()} (predicted {best.predicted['step_ms']:.1f} ms)"
        )
        if plan_note:
            con.print(f"[yellow]{plan_note}[/yellow]")
    box: list[Any] = [configs]
    dist.broadcast_object_list(box, src=0)
    configs = box[0]

    # 3. measure every configuration (all ranks) ----------------------------------------------------
    measured: dict[str, tuple[float, float, str]] = {}
    predicted: dict[str, float] = {}
    breakdowns: dict[str, dict[str, float]] = {}
    for name in track(list(configs), description="measuring configurations", disable=rank != 0):
        plan = configs[name]
        measured[name] = _measure(cfg, plan, args, device, dtype)
        if rank == 0:
            pc = predict(plan, hardware=hw, profile=prof, memory_gb=mem_gb, cost_kwargs=RUNTIME_COST_KWARGS)
            predicted[name] = pc.step_ms
            breakdowns[name] = predict_breakdown(
                plan, hardware=hw, profile=prof, cost_kwargs=RUNTIME_COST_KWARGS
            )
            con.print(
                f"  {name:15s} {plan.describe():45s} measured {measured[name][0]:9.1f} ms  "
                f"predicted {predicted[name]:9.1f} ms  peak {measured[name][1]:.1f} GiB "
                f"(predicted {pc.max_memory_gb:.1f} of {pc.usable_bytes / 2**30:.1f} usable) {measured[name][2]}"
            )
            con.print(f"    predicted = {_format_breakdown(breakdowns[name])}", highlight=False)
    if rank == 0:
        # 4. rows (rank 0) -------------------------------------------------------------------------
        best = configs["searched"]
        plan_desc = best.describe() + (f" | {plan_note}" if plan_note else "")
        case = f"{shape.name}-s{s}-gb{gb}-{world}gpu"
        ours = measured["searched"][0]
        rows: list[Row] = []
        for name in ("hand_ddp", "hand_fsdp", "hand_fsdp_ckpt"):
            rows.append(
                Row.make(
                    COMPONENT,
                    case,
                    "step_time",
                    ours,
                    name,
                    measured[name][0],
                    quality_name="plan",
                    quality_value=plan_desc + (f" | {measured[name][2]}" if measured[name][2] else ""),
                )
            )
        for name in configs:
            m = measured[name][0]
            rows.append(
                Row(
                    COMPONENT,
                    case,
                    "prediction_error",
                    predicted[name],
                    name if name != "searched" else "searched_plan",
                    m,
                    predicted[name] / m if m == m and m else float("nan"),
                    quality_name="abs_error",
                    quality_value=abs(predicted[name] / m - 1) if m == m and m else "",
                )
            )
        # 5. predictions for another GPU count (cost model only; compute calibrated by this run's
        # profile, collectives measured at group size W where a group has W ranks) -----------------
        g = args.predict_gpus
        if g > 1 and g != world:
            res_g = search(
                shape,
                SearchConfig(
                    gpus=g, memory_gb=mem_gb, global_batch=gb, seq_len=s, sequence_parallel=RUNTIME_SP
                ),
                hardware=hw,
                profile=prof,
                cost_kwargs=RUNTIME_COST_KWARGS,
            )
            pcase = f"{shape.name}-s{s}-gb{gb}-{g}gpu [predicted]"
            pbest = res_g.best.predicted["step_ms"]
            hb = args.hand_micro_batch
            hands = {
                "hand_ddp": Plan.uniform(
                    shape, gpus=g, dp_type="ddp", global_batch=gb, seq_len=s, micro_batch=hb
                ),
                "hand_fsdp": Plan.uniform(
                    shape, gpus=g, dp_type="fsdp", global_batch=gb, seq_len=s, micro_batch=hb
                ),
                "hand_fsdp_ckpt": Plan.uniform(
                    shape, gpus=g, dp_type="fsdp", ckpt=True, global_batch=gb, seq_len=s, micro_batch=gb // g
                ),
            }
            for name, plan in hands.items():
                c = predict(
                    plan, hardware=hw, profile=prof, memory_gb=mem_gb, cost_kwargs=RUNTIME_COST_KWARGS
                )
                val = c.step_ms if c.feasible else float("nan")
                rows.append(
                    Row.make(
                        COMPONENT,
                        pcase,
                        "step_time",
                        pbest,
                        name,
                        val,
                        quality_name="source",
                        quality_value=f"cost-model prediction, not measured; plan {res_g.best.describe()}",
                    )
                )
        print_rows(rows, title=f"autoparallel on {world} x {rows[0].device}")
        path = append_rows(COMPONENT, rows)
        bd_path = results_dir() / f"{COMPONENT}_breakdown_{slug}-{world}gpu.json"
        _write_breakdown(bd_path, rows[0], case, configs, measured, predicted, breakdowns)
        con.print(f"wrote {bd_path}")
        try:
            png = plot_results(COMPONENT, path)
            con.print(f"wrote {path} and {png}")
        except Exception as exc:  # plotting is best effort
            con.print(f"wrote {path} (plot failed: {exc})")
    if owns_pg:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":  # pragma: no cover
    import sys

    sys.exit(main())
