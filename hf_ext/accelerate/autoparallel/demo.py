"""Demo: plan Llama-3-70B on 64 GPUs, then profile, plan and train a tiny Llama on CPU with the plan."""

from __future__ import annotations

from hf_ext.utils.demo import DemoResult


def run_demo() -> DemoResult:
    """Search a 70B plan (cost model) and run a searched plan for a tiny model in a 1-rank gloo group."""
    import os

    import torch
    import torch.distributed as dist

    from hf_ext.accelerate.autoparallel.apply import apply_plan
    from hf_ext.accelerate.autoparallel.profiler import HardwareProfile, profile_model
    from hf_ext.accelerate.autoparallel.search import NoFeasiblePlanError, SearchConfig, search
    from hf_ext.testing import free_port, tiny_llama

    big = search("llama3-70b", SearchConfig(gpus=64, memory_gb=80, global_batch=256, seq_len=4096))
    ok = big.best.predicted["step_ms"] == min(p.predicted["step_ms"] for p in big.ranked)
    try:
        search("llama3-70b", SearchConfig(gpus=8, memory_gb=16, global_batch=64, seq_len=4096))
        ok = False
    except NoFeasiblePlanError:
        pass

    model = tiny_llama(attn_implementation="sdpa").train()
    prof = profile_model(model, seq_len=32, micro_batches=(1, 2), repeats=1, max_layers=1)
    hw = HardwareProfile.cpu()
    plan = search(
        model.config,
        SearchConfig(gpus=1, memory_gb=0.02, global_batch=4, seq_len=32),
        hardware=hw,
        profile=prof,
        cost_kwargs={"reserved_gb": 0.0},
    ).best
    started = not dist.is_initialized()
    if started:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        runner = apply_plan(model, plan, param_dtype=None)
        opt = torch.optim.AdamW(runner.param_groups(), lr=3e-3)
        ids = torch.randint(3, 500, (4, 32), generator=torch.Generator().manual_seed(0))
        losses = []
        for _ in range(4):
            losses.append(runner.train_step(ids))
            opt.step()
            opt.zero_grad(set_to_none=True)
        runner.close()
    finally:
        if started:
            dist.destroy_process_group()
    ok = ok and losses[-1] < losses[0]
    pr = big.best.predicted
    return DemoResult(
        what="plan llama3-70b on 64xH100 (cost model); profile+plan+train tiny Llama on CPU",
        key_figure=(
            f"70B: {big.best.describe()}, {pr['tokens_per_s_per_gpu']:.0f} tok/s/GPU, MFU {pr['mfu']:.0%} "
            f"({big.seconds:.2f}s search); tiny: {plan.describe()}, loss {losses[0]:.2f}->{losses[-1]:.2f}"
        ),
        passed=bool(ok),
    )
