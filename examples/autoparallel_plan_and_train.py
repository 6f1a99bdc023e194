"""Plan a model with the Galvatron-style search, then train with the plan (FSDP2 / DDP / TP / PP by torch).

CPU, as is (1 process, tiny random Llama, a few steps):
    python examples/autoparallel_plan_and_train.py
Two CPU processes (gloo):
    torchrun --nproc-per-node 2 examples/autoparallel_plan_and_train.py
GPUs (random ~1B Llama, bf16, NCCL):
    torchrun --nproc-per-node 8 examples/autoparallel_plan_and_train.py --model llama3.2-1b --seq-len 2048 \
        --global-batch 32 --gpu-memory 80GB
Planning only, at scale:
    python examples/autoparallel_plan_and_train.py --plan-only --model llama3-70b --gpus 1024 --seq-len 8192
The training runs (not --plan-only) write the searched plan to ``autoparallel_plan.json`` in the current directory.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from hf_ext.accelerate.autoparallel import SearchConfig, apply_plan, get_shape, profile_model
from hf_ext.accelerate.autoparallel.cli import parse_memory
from hf_ext.accelerate.autoparallel.profiler import HardwareProfile
from hf_ext.accelerate.autoparallel.search import search


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--model", default="tiny", help="built-in shape or config.json (random weights are built)"
    )
    ap.add_argument("--gpus", type=int, default=None, help="plan for this many GPUs (default: world size)")
    ap.add_argument("--gpu-memory", default=None, help="memory per device (default 80GB on GPU, 64MB on CPU)")
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--global-batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--plan-only", action="store_true")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    shape = get_shape(args.model)
    if args.plan_only:
        res = search(
            shape,
            SearchConfig(
                gpus=args.gpus or 8,
                memory_gb=parse_memory(args.gpu_memory or "80GB"),
                global_batch=args.global_batch,
                seq_len=args.seq_len or 4096,
            ),
        )
        for p in res.ranked[:5]:
            print(
                f"{p.describe():50s} {p.predicted['tokens_per_s_per_gpu']:8.0f} tok/s/GPU  MFU {p.predicted['mfu']:.1%}"
            )
        return

    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", WORLD_SIZE="1")
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    seq = args.seq_len or (2048 if cuda else 32)
    gb = args.global_batch or 4 * world
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        tie_word_embeddings=shape.tie_word_embeddings,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).train()

    # 1. profile this model on this device (every rank does the same; rank 0's result is used)
    prof = profile_model(
        model,
        seq_len=seq,
        micro_batches=(1, 2),
        device=device,
        dtype=torch.bfloat16 if cuda else torch.float32,
        repeats=2,
        max_layers=1,
    )
    model.float()
    # 2. search with the measured compute
    hw = HardwareProfile.h100() if cuda else HardwareProfile.cpu()
    mem = parse_memory(args.gpu_memory or ("80GB" if cuda else "64MB"))
    res = search(
        shape,
        SearchConfig(
            gpus=args.gpus or world, memory_gb=mem, global_batch=gb, seq_len=seq, dp_types=("fsdp", "ddp")
        ),
        hardware=hw,
        profile=prof,
        cost_kwargs={} if cuda else {"reserved_gb": 0.0},
    )
    plan = res.best
    if rank == 0:
        print(f"plan: {plan.describe()}  predicted step {plan.predicted['step_ms']:.1f} ms")
        plan.save("autoparallel_plan.json")
    # 3. apply it with FSDP2 / DDP / DTensor TP / torch pipelining and train
    runner = apply_plan(model, plan, device=device, param_dtype=torch.bfloat16 if cuda else None)
    opt = torch.optim.AdamW(runner.param_groups(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    for step in range(args.steps):
        ids = torch.randint(0, shape.vocab_size, (gb, seq), generator=g)
        loss = runner.train_step(runner.local_batch(ids))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if rank == 0:
            print(f"step {step}: loss {loss:.4f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
