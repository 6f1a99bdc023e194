"""Functions run in 2 gloo processes by tests/autoparallel (must be importable at module level)."""

from __future__ import annotations

from typing import Any

# timing repeats of the profiler probes here (2 was too few: a busy CI box put prediction and fit 2.1x apart)
REPEATS = 5

GLOBAL_BATCH, SEQ = 4, 16


def _batch() -> Any:
    import torch

    g = torch.Generator().manual_seed(1)
    return torch.randint(3, 500, (GLOBAL_BATCH, SEQ), generator=g)


def reference_losses() -> tuple[float, float]:
    """Single-process loss before and after one SGD step on the global batch."""
    import torch

    from hf_ext.testing import tiny_llama

    model = tiny_llama(seed=0).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = _batch()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    with torch.no_grad():
        loss1 = model(input_ids=ids, labels=ids).loss
    return float(loss.detach()), float(loss1)


# left padding of each row of the masked batch (pad id 0, attention_mask 0): rows differ in target tokens
LEFT_PADS = (0, 5, 9, 14)


def _left_padded_batch() -> tuple[Any, Any]:
    """``(input_ids, attention_mask)``: :func:`_batch` left-padded by ``LEFT_PADS`` (a tokenizer's
    ``padding_side="left"`` batch; the mask is int64, as tokenizers return it)."""
    import torch

    ids = _batch().clone()
    mask = torch.ones_like(ids)
    for row, pads in enumerate(LEFT_PADS):
        ids[row, :pads] = 0
        mask[row, :pads] = 0
    return ids, mask


def masked_reference_losses(use_mask: bool = True) -> tuple[float, float]:
    """Single-process loss of the left-padded batch before and after one SGD step (lr 0.5):
    ``model(input_ids, attention_mask=mask, labels=input_ids with -100 at the pads)``; ``use_mask=False``: the same
    labels without the mask (all the old ``train_step`` could do), to show the mask changes the losses."""
    import torch

    from hf_ext.testing import tiny_llama

    model = tiny_llama(seed=0, attn_implementation="sdpa").train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ids, mask = _left_padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    kw = {"attention_mask": mask} if use_mask else {}
    loss = model(input_ids=ids, labels=labels, **kw).loss
    loss.backward()
    opt.step()
    with torch.no_grad():
        loss1 = model(input_ids=ids, labels=labels, **kw).loss
    return float(loss.detach()), float(loss1)


def _plans() -> dict[str, Any]:
    from hf_ext.accelerate.autoparallel.plan import Plan
    from hf_ext.testing import tiny_llama_config

    cfg = tiny_llama_config()
    kw = dict(gpus=2, global_batch=GLOBAL_BATCH, seq_len=SEQ)
    plans = {
        "ddp_m2": Plan.uniform(cfg, dp_type="ddp", micro_batch=1, **kw),
        "fsdp_z3": Plan.uniform(cfg, dp_type="fsdp", zero=3, **kw),
        "fsdp_ckpt": Plan.uniform(cfg, dp_type="fsdp", zero=3, ckpt=True, micro_batch=1, **kw),
        "tp2": Plan.uniform(cfg, dp_type="fsdp", tp=2, **kw),
        "tp2_ddp": Plan.uniform(cfg, dp_type="ddp", tp=2, **kw),  # plain norms beside DTensor projections
        "pp2": Plan.uniform(cfg, dp_type="fsdp", pp=2, micro_batch=2, **kw),
        "pp2_plain": Plan.uniform(cfg, dp_type="ddp", pp=2, micro_batch=2, **kw),  # stages without FSDP
    }
    mixed = Plan.uniform(cfg, dp_type="fsdp", **kw)
    mixed.layers = [{"zero": 2, "ckpt": False}, {"zero": 3, "ckpt": True}]
    plans["fsdp_mixed"] = mixed
    return plans


def _step_losses(runner: Any, ids: Any, world_size: int, mask: Any = None) -> list[float]:
    """``runner``'s loss on ``ids`` (with the global ``attention_mask`` ``mask``, labels left to train_step) before
    and after one SGD step (lr 0.5), averaged over the ranks (tp / pp ranks of one replica hold the same loss)."""
    import torch
    import torch.distributed as dist

    # foreach=True as on CUDA: one group mixing DTensor and plain parameters would be refused
    opt = torch.optim.SGD(runner.param_groups(), lr=0.5, foreach=True)
    local = runner.local_batch(ids)
    kw = {} if mask is None else {"attention_mask": runner.local_batch(mask)}
    losses = []
    for step in range(2):
        loss = runner.train_step(local, **kw)
        if step == 0:
            opt.step()
            opt.zero_grad(set_to_none=True)
        t = torch.tensor([loss], device=runner.device)  # NCCL reduces CUDA tensors only
        dist.all_reduce(t)
        losses.append(float(t) / world_size)
    return losses


def _saved_loss(directory: str, ids: Any) -> float:
    """Loss on ``ids`` of the model saved in ``directory``, loaded on this process."""
    import torch
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(directory)
    with torch.no_grad():
        return float(back(input_ids=ids, labels=ids).loss)


def apply_all(rank: int, world_size: int, outdir: str | None = None) -> dict[str, Any]:
    """Apply every plan on 2 ranks; return the dp-averaged loss before/after one SGD step (and, with ``outdir``,
    the loss of the model each plan saved with ``save_pretrained`` after its step, loaded on one process, and the
    tensor names in the saved safetensors files). ``<plan>:masked``: the same on a fresh model and runner for the
    left-padded batch with its attention mask (int64 for every other plan, bool for the rest; labels from
    train_step's rule), or the error train_step raised."""

    from hf_ext.accelerate.autoparallel.apply import apply_plan
    from hf_ext.accelerate.autoparallel.profiler import profile_collectives
    from hf_ext.testing import tiny_llama

    out: dict[str, Any] = {}
    ids = _batch()
    padded, mask = _left_padded_batch()
    for i, (name, plan) in enumerate(_plans().items()):
        model = tiny_llama(seed=0, attn_implementation="sdpa").train()
        runner = apply_plan(model, plan, param_dtype=None)
        out[name] = _step_losses(runner, ids, world_size)
        if outdir is not None:
            runner.save_pretrained(f"{outdir}/{name}")
            if rank == 0:
                out[name + ":saved"] = _saved_loss(f"{outdir}/{name}", ids)
                out[name + ":saved_keys"] = _saved_tensor_names(f"{outdir}/{name}")
        flags = [bool(getattr(layer, "gradient_checkpointing", False)) for layer in model.model.layers]
        out[name + ":ckpt"] = flags
        del runner, model
        model = tiny_llama(seed=0, attn_implementation="sdpa").train()
        with apply_plan(model, plan, param_dtype=None) as runner:
            try:
                out[name + ":masked"] = _step_losses(
                    runner, padded, world_size, mask.bool() if i % 2 else mask
                )
            except Exception as exc:  # the old code: train_step takes no attention_mask
                out[name + ":masked"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    out["collectives"] = profile_collectives((1 << 12, 1 << 16), repeats=1)
    return out


def _saved_tensor_names(directory: str) -> list[str]:
    """The sorted tensor names in a ``save_pretrained`` directory's safetensors files."""
    import glob

    from safetensors import safe_open

    names: list[str] = []
    for path in glob.glob(f"{directory}/*.safetensors"):
        with safe_open(path, framework="pt") as f:
            names.extend(f.keys())
    return sorted(names)


def profile_runtime(rank: int, world_size: int) -> dict[str, Any]:
    """profile_model with its whole-runtime probe (needs a one-rank group) and the cost model on top."""
    import dataclasses

    import torch

    from hf_ext.accelerate.autoparallel.plan import Plan
    from hf_ext.accelerate.autoparallel.profiler import HardwareProfile, profile_model
    from hf_ext.accelerate.autoparallel.search import predict
    from hf_ext.accelerate.autoparallel.shapes import get_shape
    from hf_ext.testing import tiny_llama

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = tiny_llama()
    prof = profile_model(model, seq_len=32, micro_batches=(1, 2), repeats=REPEATS, max_layers=1)
    shape = get_shape(model.config)
    plan = Plan.uniform(shape, gpus=1, dp_type="ddp", global_batch=2, seq_len=32, micro_batch=1)
    hw = HardwareProfile.cpu()
    with_step = predict(plan, hardware=hw, profile=prof, memory_gb=16).step_ms
    bumped = dataclasses.replace(prof, step_overhead_ms={"ddp": 7.0})
    return {
        "failed_large": _runtime_with_failing_large_phase(model, shape),
        "runtime_micro_batches": prof.runtime_micro_batches,
        "recompute_fwd_ratio": prof.recompute_fwd_ratio,
        "runtime": prof.runtime,
        "step_overhead_ms": prof.step_overhead_ms,
        "notes": prof.probe_notes,
        "optimizer_ns_per_param": prof.optimizer_ns_per_param,
        "predicted_ms": with_step,
        "bumped_delta": predict(plan, hardware=hw, profile=bumped, memory_gb=16).step_ms
        - predict(
            plan, hardware=hw, profile=dataclasses.replace(prof, step_overhead_ms={}), memory_gb=16
        ).step_ms,
    }


def _runtime_with_failing_large_phase(model: Any, shape: Any) -> dict[str, Any]:
    """The DDP runtime probe at b = 1 and 2 whose b=2 phase raises (as an out-of-memory would)."""
    import torch

    from hf_ext.accelerate.autoparallel import profiler

    real = profiler._time_train_steps

    def flaky(runner: Any, opt: Any, layers: Any, cfgs: list, *args: Any) -> Any:
        if cfgs[0][0] > 1:
            raise torch.OutOfMemoryError("synthetic: the larger micro-batch does not fit")
        return real(runner, opt, layers, cfgs, *args)

    notes: dict[str, str] = {}
    profiler._time_train_steps = flaky
    try:
        r = profiler._measure_runtime(
            model, shape, 32, torch.device("cpu"), torch.float32, "ddp", 0, 1, (1, 2), 2, notes
        )
    finally:
        profiler._time_train_steps = real
    return {"runtime": r, "notes": notes}


PAD_BATCH, PAD_SEQ, PAD_STEPS = 8, 16, 3


def padded_batches() -> list[Any]:
    """Batches whose rows have different numbers of target tokens (-100 padding; one row has none)."""
    import torch

    out = []
    for s in range(PAD_STEPS):
        g = torch.Generator().manual_seed(s)
        ids = torch.randint(3, 500, (PAD_BATCH, PAD_SEQ), generator=g)
        labels = ids.clone()
        for r in range(PAD_BATCH):
            labels[r, 2 + (r * 5) % (PAD_SEQ - 3) :] = -100
        labels[PAD_BATCH - 1] = -100
        out.append((ids, labels))
    return out


def padded_reference_losses() -> list[float]:
    """Single-process AdamW trajectory on the global padded batches (transformers' token-mean loss)."""
    import torch

    from hf_ext.testing import tiny_llama

    model = tiny_llama(seed=0, attn_implementation="sdpa").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for ids, labels in padded_batches():
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def apply_padded(rank: int, world_size: int) -> dict[str, Any]:
    """Every plan kind trained on the padded batches; each rank's train_step losses per plan."""
    import torch

    from hf_ext.accelerate.autoparallel.apply import apply_plan
    from hf_ext.accelerate.autoparallel.plan import Plan
    from hf_ext.testing import tiny_llama, tiny_llama_config

    cfg = tiny_llama_config()
    kw = dict(gpus=2, global_batch=PAD_BATCH, seq_len=PAD_SEQ)
    plans = {
        "ddp_m1": Plan.uniform(cfg, dp_type="ddp", **kw),
        "ddp_m4": Plan.uniform(cfg, dp_type="ddp", micro_batch=1, **kw),
        "ddp_m4_logits_loss": Plan.uniform(cfg, dp_type="ddp", micro_batch=1, **kw),
        "fsdp_z2_m2": Plan.uniform(cfg, dp_type="fsdp", zero=2, micro_batch=2, **kw),
        "fsdp_z3_ckpt_m4": Plan.uniform(cfg, dp_type="fsdp", zero=3, ckpt=True, micro_batch=1, **kw),
        "tp2_m2": Plan.uniform(cfg, dp_type="fsdp", tp=2, micro_batch=4, **kw),
        "pp2_m4": Plan.uniform(cfg, dp_type="fsdp", pp=2, micro_batch=2, **kw),
    }
    out: dict[str, Any] = {}
    for name, plan in plans.items():
        model = tiny_llama(seed=0, attn_implementation="sdpa").train()
        if name.endswith("logits_loss"):
            model.accepts_loss_kwargs = False  # a forward without num_items_in_batch: loss from the logits
        runner = apply_plan(model, plan, param_dtype=None)
        opt = torch.optim.AdamW(runner.param_groups(), lr=1e-2)
        losses = []
        for ids, labels in padded_batches():
            losses.append(runner.train_step(runner.local_batch(ids), runner.local_batch(labels)))
            opt.step()
            opt.zero_grad(set_to_none=True)
        if name == "ddp_m1":  # no target token anywhere: loss 0 and zero gradients, not NaN
            ids = runner.local_batch(padded_batches()[0][0])
            out["empty"] = runner.train_step(ids, torch.full_like(ids, -100))
            out["empty_grad_max"] = max(float(p.grad.abs().max()) for p in runner.parameters())
        out[name] = losses
        del runner, model, opt
    return out


def apply_close(rank: int, world_size: int) -> dict[str, Any]:
    """Process groups left behind by apply_plan: repeated calls closed by close() / with / a failure."""
    import torch
    import torch.distributed as dist

    from hf_ext.accelerate.autoparallel.apply import apply_plan
    from hf_ext.accelerate.autoparallel.plan import Plan
    from hf_ext.testing import tiny_llama, tiny_llama_config

    def n_groups() -> int:
        return len(dist.distributed_c10d._world.pg_map)

    cfg = tiny_llama_config()
    kw = dict(gpus=2, global_batch=4, seq_len=8)
    ids = torch.randint(3, 500, (4, 8), generator=torch.Generator().manual_seed(0))
    out: dict[str, Any] = {}
    n0 = n_groups()
    for dp_type, tp, pp in (("fsdp", 2, 1), ("ddp", 1, 1), ("fsdp", 1, 2)):
        plan = Plan.uniform(cfg, dp_type=dp_type, tp=tp, pp=pp, micro_batch=1 if pp > 1 else None, **kw)
        with apply_plan(tiny_llama().train(), plan, param_dtype=None) as runner:
            out.setdefault("created", []).append(n_groups() - n0)
            runner.train_step(runner.local_batch(ids))
    out["after_with"] = n_groups() - n0
    runner = apply_plan(tiny_llama().train(), Plan.uniform(cfg, dp_type="fsdp", **kw), param_dtype=None)
    runner.close()
    runner.close()  # twice: nothing more to do
    out["after_close"] = n_groups() - n0
    try:
        runner.train_step(runner.local_batch(ids))
    except RuntimeError as exc:
        out["closed_error"] = str(exc)
    # a failing apply_plan (pipeline without sdpa) does not leave its groups behind either
    try:
        apply_plan(tiny_llama(attn_implementation="eager"), Plan.uniform(cfg, pp=2, micro_batch=1, **kw))
    except ValueError as exc:
        out["failure"] = str(exc)
    out["after_failure"] = n_groups() - n0
    # what the runtime would train silently wrong is refused before any group is made
    from transformers import MistralConfig, MistralForCausalLM

    from hf_ext.testing import TINY_LM_KWARGS, tiny_qwen3

    refused = {
        "tied_pp": (
            tiny_llama(tie_word_embeddings=True, attn_implementation="sdpa"),
            dict(pp=2, micro_batch=1),
        ),
        "sliding_pp": (
            MistralForCausalLM(
                MistralConfig(**{**TINY_LM_KWARGS, "sliding_window": 3}, attn_implementation="sdpa")
            ),
            dict(pp=2, micro_batch=1),
        ),
        "qk_norm_tp": (tiny_qwen3(), dict(dp_type="fsdp", tp=2)),
        "other_shape": (tiny_llama(intermediate_size=96), dict(dp_type="fsdp")),
    }
    out["refused"] = {}
    for name, (model, extra) in refused.items():
        try:
            apply_plan(model.train(), Plan.uniform(cfg, **extra, **kw), param_dtype=None)
            out["refused"][name] = "ACCEPTED"
        except ValueError as exc:
            out["refused"][name] = str(exc)
    out["after_refusals"] = n_groups() - n0
    t = torch.ones(1)
    dist.all_reduce(t)  # the default group still works
    out["world_ok"] = float(t)
    return out


def save_pipeline(rank: int, world_size: int, outdir: str, name: str) -> dict[str, Any]:
    """Pipeline plan ``name`` with more dimensions inside the stages (4 ranks: ``pp2_dp2``, pp=2 x dp=2 FSDP, or
    ``pp2_tp2``, pp=2 x tp=2; 8 ranks: ``pp2_dp2_tp2``, FSDP over dp=2 with tp=2 in each stage): one SGD step, then
    ``AppliedPlan.save_pretrained``. Returns the rank-averaged losses and, on rank 0, the loss of the saved model
    loaded on one process and the tensor names in its safetensors files; for ``pp2_dp2_tp2`` also
    ``<name>:masked``, the losses of the left-padded batch with its attention mask on a fresh model."""

    from hf_ext.accelerate.autoparallel.apply import apply_plan
    from hf_ext.accelerate.autoparallel.plan import Plan
    from hf_ext.testing import tiny_llama, tiny_llama_config

    cfg = tiny_llama_config()
    kw = dict(gpus=world_size, dp_type="fsdp", pp=2, global_batch=GLOBAL_BATCH, seq_len=SEQ, micro_batch=1)
    plans = {"pp2_dp2": Plan.uniform(cfg, **kw), "pp2_tp2": Plan.uniform(cfg, tp=2, **kw)}
    plans["pp2_dp2_tp2"] = plans["pp2_tp2"]  # with 8 ranks: dp=2
    ids = _batch()
    out: dict[str, Any] = {}
    for plan in (plans[name],):
        model = tiny_llama(seed=0, attn_implementation="sdpa").train()
        runner = apply_plan(model, plan, param_dtype=None)
        out[name] = _step_losses(runner, ids, world_size)
        out[name + ":layout"] = (plan.pp, plan.dp, plan.tp, runner.stage_layers)
        runner.save_pretrained(f"{outdir}/{name}")
        if rank == 0:
            out[name + ":saved"] = _saved_loss(f"{outdir}/{name}", ids)
            out[name + ":saved_keys"] = _saved_tensor_names(f"{outdir}/{name}")
        runner.close()
        del runner, model
    if name == "pp2_dp2_tp2":
        padded, mask = _left_padded_batch()
        with apply_plan(
            tiny_llama(seed=0, attn_implementation="sdpa").train(), plans[name], param_dtype=None
        ) as r:
            out[name + ":masked"] = _step_losses(r, padded, world_size, mask)
    return out


def _model_state(model: Any) -> dict[str, Any]:
    """What ``apply_plan`` changes on a model: the layers' checkpointing flags and classes, DTensor parameters."""
    from torch.distributed.tensor import DTensor

    return {
        "ckpt": [bool(layer.gradient_checkpointing) for layer in model.model.layers],
        "classes": sorted({type(m).__name__ for m in model.modules()}),
        "dtensors": sum(isinstance(p, DTensor) for p in model.parameters()),
    }


def apply_refusals_unchanged(rank: int, world_size: int) -> dict[str, Any]:
    """Plans apply_plan cannot run on a model, each with checkpointing on: the error and the model's state before
    and after the refused call (it must not have changed)."""
    import torch.distributed as dist

    from hf_ext.accelerate.autoparallel.apply import apply_plan
    from hf_ext.accelerate.autoparallel.plan import Plan
    from hf_ext.testing import tiny_llama

    kw = dict(gpus=2, global_batch=4, seq_len=8, ckpt=True)
    cases = {
        # the stages pass no attention mask: eager attention would attend to the future
        "pp_eager": (tiny_llama(attn_implementation="eager"), dict(pp=2, micro_batch=1)),
        # one micro-batch for two stages: Schedule1F1B refuses it (it used to, after the model was sharded)
        "pp_one_micro_batch": (tiny_llama(attn_implementation="sdpa"), dict(pp=2)),
        # one KV head cannot be split over 2 tensor-parallel ranks (a reshape failed inside the first forward)
        "tp_kv_heads": (tiny_llama(num_key_value_heads=1, attn_implementation="sdpa"), dict(tp=2)),
    }
    out: dict[str, Any] = {}
    n0 = len(dist.distributed_c10d._world.pg_map)
    for name, (model, extra) in cases.items():
        model.train()
        plan = Plan.uniform(model.config, dp_type="fsdp", **extra, **kw)
        before = _model_state(model)
        try:
            apply_plan(model, plan, param_dtype=None)
            out[name] = ("ACCEPTED", None)
        except ValueError as exc:
            out[name] = (str(exc), before == _model_state(model) or (before, _model_state(model)))
    out["groups_left"] = len(dist.distributed_c10d._world.pg_map) - n0
    return out


def eval_mode_checkpointing(rank: int, world_size: int) -> dict[str, Any]:
    """An eval-mode model (as ``from_pretrained`` returns it) under a checkpointed plan: how often the first
    layer's MLP runs in one train_step of one micro-batch (2 with checkpointing: forward and recompute), for an
    FSDP and a DDP plan, and whether the model is in training mode after the step."""
    import torch

    from hf_ext.accelerate.autoparallel.apply import apply_plan
    from hf_ext.accelerate.autoparallel.plan import Plan
    from hf_ext.testing import tiny_llama

    ids = torch.randint(3, 500, (2, 8), generator=torch.Generator().manual_seed(0))
    out: dict[str, Any] = {}
    for dp_type in ("fsdp", "ddp"):
        model = tiny_llama()  # eval mode
        plan = Plan.uniform(model.config, gpus=1, dp_type=dp_type, ckpt=True, global_batch=2, seq_len=8)
        calls: list[int] = []
        model.model.layers[0].mlp.register_forward_pre_hook(lambda *_, c=calls: c.append(1))
        with apply_plan(model, plan, param_dtype=None) as runner:
            runner.train_step(ids)
        out[dp_type] = (len(calls), model.training)
    return out


def batch_shape_checks(rank: int, world_size: int) -> dict[str, Any]:
    """Batches of the wrong shape given to local_batch / train_step of a dp=2 DDP plan (2 micro-batches of 1 row
    per rank): the error each raises (or ``ACCEPTED``) and whether any gradient was written."""
    import torch

    from hf_ext.accelerate.autoparallel.apply import apply_plan
    from hf_ext.accelerate.autoparallel.plan import Plan
    from hf_ext.testing import tiny_llama

    model = tiny_llama().train()
    plan = Plan.uniform(model.config, gpus=2, dp_type="ddp", global_batch=4, seq_len=8, micro_batch=1)
    ids = torch.randint(3, 500, (5, 8), generator=torch.Generator().manual_seed(0))
    local = ids[2 * rank : 2 * rank + 2]
    cases = {
        "local_batch_5_rows": lambda r: r.local_batch(ids),  # one row more than plan.global_batch = 4
        "labels_fewer_rows": lambda r: r.train_step(local, local[:1]),
        "labels_longer": lambda r: r.train_step(local, torch.cat([local, local], dim=1)),
        "input_1d": lambda r: r.train_step(local[0]),
    }
    out: dict[str, Any] = {}
    with apply_plan(model, plan, param_dtype=None) as runner:
        for name, call in cases.items():
            try:
                call(runner)
                out[name] = "ACCEPTED"
            except ValueError as exc:
                out[name] = str(exc)
        out["grads"] = sum(p.grad is not None for p in runner.parameters())
    return out


def bad_param_dtype(rank: int, world_size: int) -> dict[str, Any]:
    """apply_plan with a param_dtype that is not a floating compute dtype: the error, when it comes, and whether
    the model was changed before it (checkpointing switched on by the plan)."""
    import torch

    from hf_ext.accelerate.autoparallel.apply import apply_plan
    from hf_ext.accelerate.autoparallel.plan import Plan
    from hf_ext.testing import tiny_llama

    ids = torch.randint(3, 500, (2, 8), generator=torch.Generator().manual_seed(0))
    out: dict[str, Any] = {}
    for name, dtype in (("string", "bf16"), ("int8", torch.int8)):
        model = tiny_llama().train()
        plan = Plan.uniform(model.config, gpus=1, dp_type="ddp", ckpt=True, global_batch=2, seq_len=8)
        try:
            with apply_plan(model, plan, param_dtype=dtype) as runner:
                runner.train_step(ids)
            out[name] = ("ACCEPTED", None)
        except ValueError as exc:
            out[name] = (str(exc), [bool(layer.gradient_checkpointing) for layer in model.model.layers])
        except Exception as exc:  # the old code: a TypeError / RuntimeError inside the first step
            out[name] = (f"{type(exc).__name__} in train_step: {exc}", None)
    return out


def reapply_after_close_4(rank: int, world_size: int, outdir: str) -> dict[str, Any]:
    """The same dp=2 x tp=2 FSDP plan applied twice in one process on 4 ranks, closing the first runner before
    the second is made (as the bench and the profiler do): each run's losses before / after one SGD step and,
    on rank 0, the loss of the model it saved; or the first error a run raised."""
    import torch

    from hf_ext.accelerate.autoparallel.apply import apply_plan
    from hf_ext.accelerate.autoparallel.plan import Plan
    from hf_ext.testing import tiny_llama, tiny_llama_config

    plan = Plan.uniform(
        tiny_llama_config(), gpus=world_size, dp_type="fsdp", tp=2, global_batch=GLOBAL_BATCH, seq_len=SEQ
    )
    ids = _batch()
    out: dict[str, Any] = {"layout": (plan.pp, plan.dp, plan.tp)}
    for run in range(2):
        model = tiny_llama(seed=0, attn_implementation="sdpa").train()
        try:
            with apply_plan(model, plan, param_dtype=None) as runner:
                opt = torch.optim.SGD(runner.param_groups(), lr=0.5)
                l0 = runner.train_step(runner.local_batch(ids))
                opt.step()
                opt.zero_grad(set_to_none=True)
                out[run] = (l0, runner.train_step(runner.local_batch(ids)))
                runner.save_pretrained(f"{outdir}/run{run}")
        except Exception as exc:  # the old code: a destroyed group of the first run, on every rank
            out[run] = f"{type(exc).__name__}: {str(exc)[:200]}"
            break
        if rank == 0:
            out[f"{run}:saved"] = _saved_loss(f"{outdir}/run{run}", ids)
    return out


def pipeline_other_stages_on_meta(rank: int, world_size: int, outdir: str) -> dict[str, Any]:
    """A pp=2 FSDP plan on 2 ranks where each rank holds only its own stage's weights (the other stage's modules
    are on the meta device, as a rank that materialised its stage only): losses before / after one SGD step, the
    saved model's loss on rank 0 (or the error apply_plan raised), and the device of the other stage's layer."""
    import torch

    from hf_ext.accelerate.autoparallel.apply import apply_plan
    from hf_ext.accelerate.autoparallel.plan import Plan
    from hf_ext.testing import tiny_llama

    model = tiny_llama(seed=0, attn_implementation="sdpa").train()
    plan = Plan.uniform(
        model.config, gpus=2, dp_type="fsdp", pp=2, micro_batch=2, global_batch=GLOBAL_BATCH, seq_len=SEQ
    )
    inner = model.model
    other = (
        [inner.layers[1], inner.norm, model.lm_head] if rank == 0 else [inner.embed_tokens, inner.layers[0]]
    )
    for mod in other:
        mod.to("meta")
    ids = _batch()
    try:
        runner = apply_plan(model, plan, param_dtype=None)
    except Exception as exc:  # the old code moved the whole model to the device
        return {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    with runner:
        opt = torch.optim.SGD(runner.param_groups(), lr=0.5)
        l0 = runner.train_step(runner.local_batch(ids))
        opt.step()
        opt.zero_grad(set_to_none=True)
        out: dict[str, Any] = {"losses": (l0, runner.train_step(runner.local_batch(ids)))}
        runner.save_pretrained(f"{outdir}/pp2")
    out["other_device"] = str(inner.layers[1 - rank].self_attn.q_proj.weight.device)
    if rank == 0:
        out["saved"] = _saved_loss(f"{outdir}/pp2", ids)
    return out
