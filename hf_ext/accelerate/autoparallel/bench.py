"""Benchmark: searched plan vs hand-picked DDP / FSDP / FSDP+checkpointing, and prediction error.

On one GPU (world size 1, NCCL) it: builds a random ~1B Llama (Llama-3.2-1B shape), profiles its layers,
searches a plan with the measured profile, trains a few steps with the searched plan and three
hand-picked configurations through :func:`apply_plan`, and writes to ``autoparallel.csv``:

* ``metric=step_time``: ``ours`` = searched plan (ms), ``baseline`` = ``hand_ddp`` / ``hand_fsdp`` /
  ``hand_fsdp_ckpt`` (ratio > 1: the searched plan is faster);
* ``metric=prediction_error``: ``ours`` = predicted ms, ``baseline_value`` = measured ms,
  ``ratio = predicted / measured`` (one row per configuration);
* rows whose case ends in ``[predicted]`` (``quality_name=source``) are cost-model predictions for
  ``--predict-gpus`` GPUs (default 2), NOT measurements.

``--quick`` runs a tiny model on CPU (gloo) in seconds to check the pipeline end to end.

Command (GPU box)::

    PYTHONPATH=$PWD:$PWD/kernels python -m hf_ext bench autoparallel
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from typing import Any

COMPONENT = "autoparallel"


def _init_dist(backend: str) -> None:
    import torch.distributed as dist

    from hf_ext.testing import free_port

    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    dist.init_process_group(backend, rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))


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


def _measure(
    cfg: Any, plan: Any, args: argparse.Namespace, device: Any, dtype: Any
) -> tuple[float, float, str]:
    """Median step time (ms) and peak memory (GiB) of ``plan``; ``(nan, nan, error)`` on OOM.

    The peak is ``max_memory_allocated`` minus what was allocated before the model was built, so memory
    left behind by an earlier configuration (e.g. tensors pinned by an OOM traceback) is not billed to
    this one; the OOM is handled outside the ``except`` clause so its traceback is released first.
    """
    import torch
    from transformers import LlamaForCausalLM

    from hf_ext.accelerate.autoparallel.apply import apply_plan

    torch.manual_seed(0)
    model = runner = opt = None
    err = ""
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
        model.train()
        runner = apply_plan(model, plan, device=device, param_dtype=dtype)
        opt = torch.optim.AdamW(runner.parameters(), lr=1e-5, foreach=True)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, cfg.vocab_size, (plan.global_batch, plan.seq_len), generator=g)
        local = runner.local_batch(ids).to(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for step in range(args.warmup + args.steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            runner.train_step(local)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step >= args.warmup:
                times.append((time.perf_counter() - t0) * 1e3)
        peak = (
            (torch.cuda.max_memory_allocated(device) - base) / 2**30
            if device.type == "cuda"
            else float("nan")
        )
        note = f"({base / 2**30:.1f} GiB already allocated before build, excluded)" if base > 2**29 else ""
        return float(statistics.median(times)), peak, note
    except torch.OutOfMemoryError as exc:
        err = f"OOM: {str(exc)[:80]}"
    finally:
        del model, runner, opt
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return float("nan"), float("nan"), err


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (see the module docstring); returns 0 on success."""
    import torch
    from rich.console import Console
    from rich.progress import track
    from transformers import LlamaForCausalLM

    from hf_ext.accelerate.autoparallel.plan import Plan
    from hf_ext.accelerate.autoparallel.profiler import HardwareProfile, profile_model
    from hf_ext.accelerate.autoparallel.search import SearchConfig, predict, search
    from hf_ext.accelerate.autoparallel.shapes import get_shape
    from hf_ext.utils.bench import Row, append_rows, plot_results, print_rows

    ap = argparse.ArgumentParser(prog="hf-ext bench autoparallel", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama3.2-1b", help="built-in shape to build randomly (GPU mode)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--global-batch", type=int, default=8, help="sequences per step")
    ap.add_argument(
        "--hand-micro-batch", type=int, default=2, help="micro-batch of the DDP / FSDP hand configs"
    )
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument(
        "--predict-gpus", type=int, default=2, help="also predict this many GPUs (cost model only)"
    )
    ap.add_argument("--quick", action="store_true", help="tiny model on CPU (seconds)")
    ap.add_argument("--cache-dir", default=None, help="profile JSON cache directory")
    args = ap.parse_args(argv)
    con = Console()
    # Big transient blocks (fp32 logits of several GiB) fragment the caching allocator; expandable
    # segments (same setting for every configuration) keep the measured peak close to what is allocated.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if args.quick:
        args.seq_len, args.global_batch, args.steps, args.warmup, args.hand_micro_batch = 64, 4, 2, 1, 1
        torch.set_num_threads(min(2, torch.get_num_threads()))
    cuda = torch.cuda.is_available() and not args.quick
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    _init_dist("nccl" if cuda else "gloo")
    dtype = torch.bfloat16 if cuda else None
    cfg = _model_config(args)
    shape = get_shape(cfg)
    gb, s = args.global_batch, args.seq_len

    # 1. profile (bf16 on GPU) -------------------------------------------------------------------
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        pm = LlamaForCausalLM(cfg)
    mbs = (1, 2) if args.quick else (1, 2, 4)
    prof = profile_model(
        pm,
        seq_len=s,
        micro_batches=mbs,
        device=device,
        dtype=dtype or torch.float32,
        repeats=2 if args.quick else 5,
        max_layers=2,
        cache_dir=args.cache_dir,
        shape=shape,
    )
    del pm
    gc.collect()
    con.print(
        f"profiled {shape.name} ({shape.num_params() / 1e9:.2f}B) at s={s} in {time.perf_counter() - t0:.1f}s: "
        f"{prof.achieved_tflops:.1f} TFLOP/s per layer, bwd/fwd {prof.bwd_fwd_ratio:.2f}, "
        f"activation calibration {prof.act_calibration:.2f}; embed {prof.embed.fwd_ms(1) + prof.embed.bwd_ms(1):.2f}"
        f" ms/seq, head {prof.head.fwd_ms(1) + prof.head.bwd_ms(1):.2f} ms/seq, AdamW "
        f"{prof.optimizer_ns_per_param:.3f} ns/param, autocast {prof.autocast_ns_per_param:.4f} ns/param "
        f"(act x{prof.autocast_act_ratio:.2f}), FSDP {prof.fsdp_layer_overhead_ms:.2f} ms/layer/micro-batch, "
        f"whole-model overhead {prof.micro_batch_overhead_ms:.2f} ms/micro-batch, per-step overhead "
        + ", ".join(f"{k} {v:.1f} ms" for k, v in prof.step_overhead_ms.items())
    )
    for k, r in prof.runtime.items():
        con.print(
            f"  runtime probe {k}: train_step(b=1) = {r['fixed_ms']:.2f} + m x {r['mb_ms']:.2f} ms, "
            f"AdamW {r['opt_ms']:.2f} ms"
        )
    for k, v in prof.probe_notes.items():
        con.print(f"  [yellow]profile probe {k}: {v}[/yellow]")

    # 2. search with the measured profile ----------------------------------------------------------
    if cuda:
        mem_gb = torch.cuda.get_device_properties(device).total_memory / 2**30
        hw = HardwareProfile.h100()
        hw.memory_gb = mem_gb
        hw.name = torch.cuda.get_device_name(device)
    else:
        hw = HardwareProfile.cpu()
        mem_gb = hw.memory_gb
    if not cuda:  # fp32 on CPU: 4-byte activations and compute copies
        cost_kwargs: dict[str, Any] = {}
    else:
        cost_kwargs = {}
    sc = SearchConfig(gpus=1, memory_gb=mem_gb, global_batch=gb, seq_len=s, micro_batch_sizes=(1, 2, 4, 8))
    res = search(shape, sc, hardware=hw, profile=prof, cost_kwargs=cost_kwargs)
    best = res.best
    hb = args.hand_micro_batch
    configs: dict[str, Plan] = {
        "searched": best,
        "hand_ddp": Plan.uniform(shape, gpus=1, dp_type="ddp", global_batch=gb, seq_len=s, micro_batch=hb),
        "hand_fsdp": Plan.uniform(
            shape, gpus=1, dp_type="fsdp", zero=3, global_batch=gb, seq_len=s, micro_batch=hb
        ),
        "hand_fsdp_ckpt": Plan.uniform(
            shape, gpus=1, dp_type="fsdp", zero=3, ckpt=True, global_batch=gb, seq_len=s, micro_batch=gb
        ),
    }
    con.print(f"searched plan: {best.describe()} (predicted {best.predicted['step_ms']:.1f} ms)")

    # 3. measure every configuration ---------------------------------------------------------------
    measured: dict[str, tuple[float, float, str]] = {}
    predicted: dict[str, float] = {}
    for name in track(list(configs), description="measuring configurations"):
        plan = configs[name]
        pc = predict(plan, hardware=hw, profile=prof, memory_gb=mem_gb)
        predicted[name] = pc.step_ms
        measured[name] = _measure(cfg, plan, args, device, dtype)
        con.print(
            f"  {name:15s} {plan.describe():45s} measured {measured[name][0]:9.1f} ms  "
            f"predicted {predicted[name]:9.1f} ms  peak {measured[name][1]:.1f} GiB "
            f"(predicted {pc.max_memory_gb:.1f} of {pc.usable_bytes / 2**30:.1f} usable) {measured[name][2]}"
        )

    # 4. rows ------------------------------------------------------------------------------------
    case = f"{shape.name}-s{s}-gb{gb}-1gpu"
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
                quality_value=best.describe() + (f" | {measured[name][2]}" if measured[name][2] else ""),
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
    # 5. predictions for more GPUs (cost model only; compute calibrated by this run's profile) --------
    g = args.predict_gpus
    if g > 1:
        hw_g = HardwareProfile.h100()
        hw_g.memory_gb = mem_gb
        res_g = search(
            shape,
            SearchConfig(gpus=g, memory_gb=mem_gb, global_batch=gb, seq_len=s),
            hardware=hw_g,
            profile=prof,
        )
        pcase = f"{shape.name}-s{s}-gb{gb}-{g}gpu [predicted]"
        pbest = res_g.best.predicted["step_ms"]
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
            c = predict(plan, hardware=hw_g, profile=prof, memory_gb=mem_gb)
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
    print_rows(rows, title=f"autoparallel on {rows[0].device}")
    path = append_rows(COMPONENT, rows)
    try:
        png = plot_results(COMPONENT, path)
        con.print(f"wrote {path} and {png}")
    except Exception as exc:  # plotting is best effort
        con.print(f"wrote {path} (plot failed: {exc})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    import sys

    sys.exit(main())
