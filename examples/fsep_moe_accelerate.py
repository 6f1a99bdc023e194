"""Train a transformers MoE model with FSEP (LAER-MoE fully sharded experts) under Accelerate.

Runs as-is on CPU: without a launcher it starts 2 local gloo processes with a tiny random Mixtral.

    python examples/fsep_moe_accelerate.py                                   # 2 CPU processes, tiny model
    torchrun --nproc_per_node 2 examples/fsep_moe_accelerate.py --steps 5    # same, via torchrun
    accelerate launch --config_file examples/fsep_accelerate_config.yaml examples/fsep_moe_accelerate.py \
        --model mistralai/Mixtral-8x7B-v0.1 --dtype bfloat16 --seq-len 4096 --save-dir out/  # GPUs

FSEP swaps only the experts of each MoE block (router, shared experts and aux loss stay), before
``accelerator.prepare``; DDP skips the expert shards (FSEP reduce-scatters their gradients itself).
"""

from __future__ import annotations

import argparse
import os
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        default="tiny-mixtral",
        help="HF model id/path, or tiny-<kind> with kind in mixtral, qwen2_moe, qwen3_moe, olmoe",
    )
    p.add_argument(
        "--mode", default="fsep", choices=["fsep", "static_ep"], help="FSEP or the static-EP baseline"
    )
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=2, help="sequences per rank")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--save-dir", default=None, help="write an HF-format checkpoint here at the end")
    p.add_argument("--nproc", type=int, default=2, help="processes to spawn when not launched by torchrun")
    return p.parse_args(argv)


def train(args: argparse.Namespace) -> None:
    import torch
    from accelerate import Accelerator

    from hf_ext.accelerate.fsep import FSEPConfig, FSEPPlugin, fsep_layers

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    dtype = getattr(torch, args.dtype)
    if args.model.startswith("tiny-"):
        from hf_ext.testing import tiny_moe

        model = tiny_moe(args.model.removeprefix("tiny-"), seed=0).to(dtype)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    model.to(accelerator.device).train()

    plugin = FSEPPlugin(FSEPConfig(mode=args.mode))
    model = plugin.prepare_model(model)  # before accelerator.prepare
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    model, optimizer = accelerator.prepare(model, optimizer)

    vocab = accelerator.unwrap_model(model).config.vocab_size
    g = torch.Generator().manual_seed(1000 + accelerator.process_index)  # each rank its own data
    for step in range(args.steps):
        ids = torch.randint(3, vocab, (args.batch_size, args.seq_len), generator=g).to(accelerator.device)
        t0 = time.perf_counter()
        loss = model(ids, labels=ids).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        dt = time.perf_counter() - t0
        layouts = [layer.layout.replicas().tolist() for layer in fsep_layers(accelerator.unwrap_model(model))]
        accelerator.print(
            f"step {step}: loss {loss.item():.4f}  {dt * 1e3:.0f} ms  replicas per layer {layouts}"
        )
    if args.save_dir:
        plugin.save_pretrained(accelerator.unwrap_model(model), args.save_dir)
        accelerator.print(f"saved an HF-format checkpoint to {args.save_dir}")


def _spawned(rank: int, world_size: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    import torch

    torch.set_num_threads(1)
    train(args)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if "WORLD_SIZE" in os.environ:  # torchrun / accelerate launch
        train(args)
        return
    import torch.multiprocessing as mp

    from hf_ext.testing import free_port

    mp.spawn(_spawned, args=(args.nproc, free_port(), args), nprocs=args.nproc, join=True)


if __name__ == "__main__":
    main()
