"""Rate published hand-tuned parallel layouts against the searched plans with the autoparallel cost model.

The published layouts (NVIDIA Megatron-Bridge H100 BF16 recipes; the Llama 3 paper's 405B layout) are
built as uniform plans (micro-batch 1, no context parallelism, which the model does not cover) in two
variants: as published with plain DDP, and with ZeRO-3 and full activation checkpointing so that they fit.
The searched plan uses the same defaults (H100, 80 GB, sequence 8,192). Prints the markdown table of
docs/autoparallel.md ("Comparison with published hand-tuned configurations"); CPU only, a few seconds.

    PYTHONPATH=$PWD:$PWD/kernels python benchmarks/autoparallel_published.py
"""

from __future__ import annotations

import time

from hf_ext.accelerate.autoparallel.plan import Plan
from hf_ext.accelerate.autoparallel.search import SearchConfig, predict, search

SEQ, MEM = 8192, 80.0
# (label, model, gpus, global batch, published tp, published pp, note)
CASES: list[tuple[str, str, int, int, int, int, str | None]] = [
    ("llama3-8b, 8 GPUs", "llama3-8b", 8, 128, 1, 1, None),
    ("llama3-70b, 64 GPUs", "llama3-70b", 64, 256, 4, 4, "GBS 256"),
    ("llama3-405b, 1024 GPUs", "llama3-405b", 1024, 1024, 8, 8, "GBS 1024"),
]


def _row(case: str, plan: str, tok_gpu: float, mfu: float, mem_gb: float, fits: bool = True) -> str:
    mem = f"{mem_gb:.1f}" + ("" if fits else " (does not fit)")
    return f"| {case} | `{plan}` | {tok_gpu:,.0f} | {mfu:.1%} | {mem} |"


def main() -> None:
    t0 = time.perf_counter()
    print("| case | plan | tok/s/GPU | MFU | mem GB |")
    print("|---|---|---|---|---|")
    for label, model, gpus, gb, tp, pp, note in CASES:
        best = search(model, SearchConfig(gpus=gpus, memory_gb=MEM, global_batch=gb, seq_len=SEQ)).best
        pr = best.predicted
        tag = f"{label}, **searched**" + (f" ({note})" if note else "")
        print(_row(tag, best.describe(), pr["tokens_per_s_per_gpu"], pr["mfu"], max(pr["memory_gb"])))
        variants = (
            (f"published TP{tp} PP{pp}, ddp", dict(dp_type="ddp", zero=0, ckpt=False)),
            ("published + zero3 + full ckpt", dict(dp_type="fsdp", zero=3, ckpt=True)),
        )
        for variant, kw in variants:
            plan = Plan.uniform(
                model, gpus=gpus, tp=tp, pp=pp, sp=tp > 1, global_batch=gb, seq_len=SEQ, micro_batch=1, **kw
            )
            cost = predict(plan, memory_gb=MEM)
            desc = plan.describe()
            if kw["dp_type"] == "ddp":  # layout and micro-batching
                desc = desc.rsplit(" zero0", 1)[0]
            else:  # layout, sharding and checkpointing
                desc = " ".join(x for x in desc.split() if not (x.startswith("b") and "x" in x))
            print(
                _row(
                    f"{label}, {variant}",
                    desc,
                    cost.tokens_per_s / gpus,
                    cost.mfu,
                    cost.max_memory_gb,
                    cost.feasible,
                )
            )
    print(f"\n{time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
