"""Functions run in 2 gloo processes by tests/fsep (module level so spawned ranks can import them)."""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch
import torch.distributed as dist


def _step_both(ref, opt_ref, dist_model, opt, ids, rank: int, world_size: int) -> None:
    """One optimizer step of the single-process reference on the whole batch (mean of the per-rank
    losses) and of the distributed model on this rank's 2-row share."""
    opt_ref.zero_grad()
    losses = [ref(ids[r * 2 : (r + 1) * 2], labels=ids[r * 2 : (r + 1) * 2]).loss for r in range(world_size)]
    (sum(losses) / world_size).backward()
    opt_ref.step()
    opt.zero_grad()
    mine = ids[rank * 2 : (rank + 1) * 2]
    dist_model(mine, labels=mine).loss.backward()
    opt.step()


def _batch(seed: int, rows: int, seq: int = 6, vocab: int = 512) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (rows, seq), generator=g)


def _loss(model: Any, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(ids, labels=ids)
    return out.loss, out.logits


def _full_expert_grads(model: Any) -> dict[str, torch.Tensor]:
    """Gather the full-expert gradients of every FSEP layer (HF layout), keyed by module prefix."""
    from hf_ext.accelerate.fsep.plugin import _layer_names, fsep_layers

    names = _layer_names(model)
    out = {}
    for layer in fsep_layers(model):
        p = layer.expert_shards if layer.config.mode == "fsep" else layer.expert_weights
        saved = p.data.clone()
        p.data.copy_(p.grad if p.grad is not None else torch.zeros_like(p))
        gu, dn = layer.full_weights()
        p.data.copy_(saved)
        out[names[id(layer)]] = (gu, dn)
    return out


def _compare_grads(ref: Any, model: Any) -> float:
    """Max abs difference between the reference model's grads and the FSEP model's grads."""
    egrads = _full_expert_grads(model)
    worst = 0.0
    mparams = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        if p.grad is None:
            continue
        prefix, _, leaf = name.rpartition(".")
        if prefix in egrads and leaf in ("gate_up_proj", "down_proj"):
            g = egrads[prefix][0 if leaf == "gate_up_proj" else 1]
        else:
            g = mparams[name].grad
            if g is None:
                g = torch.zeros_like(p.grad)
        worst = max(worst, float((g - p.grad).abs().max()) / (float(p.grad.abs().max()) + 1e-8))
    return worst


def _tiny(kind: str) -> Any:
    """A tiny random model of ``kind`` (the hf_ext.testing ones plus DeepSeek-V3)."""
    if kind != "deepseek_v3":
        from hf_ext.testing import tiny_moe

        return tiny_moe(kind, seed=0)
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.DeepseekV3Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        max_position_embeddings=256,
    )
    return tf.DeepseekV3ForCausalLM(cfg).eval()


def equivalence(
    rank: int, world_size: int, kinds: list[str], modes: list[str], only: tuple[str, ...] = ()
) -> dict[str, Any]:
    """For each model kind: forward outputs and gradients under several layouts vs the single-process model."""
    from hf_ext.accelerate.fsep import FSEPConfig, Layout, prepare_fsep
    from hf_ext.accelerate.fsep.plugin import average_dense_gradients, fsep_layers

    res: dict[str, Any] = {}
    ids = _batch(1, 2 * world_size)
    mine = ids[rank * 2 : (rank + 1) * 2]
    for kind in kinds:
        ref = _tiny(kind).train()
        base = copy.deepcopy(ref)
        ref_losses, ref_logits = [], []
        for r in range(world_size):
            loss, logits = _loss(ref, ids[r * 2 : (r + 1) * 2])
            ref_losses.append(loss)
            ref_logits.append(logits.detach())
        (sum(ref_losses) / world_size).backward()
        for mode in modes:
            if mode == "static_ep":
                cfg = FSEPConfig(mode="static_ep")
                layouts = {"static_ep": None}
            else:
                # both weight exchanges: all-to-all (sync grads) and point-to-point (async grads)
                cfg = FSEPConfig(
                    mode="fsep",
                    layout_policy="identity",
                    async_grad_reduce=(mode == "fsep_async"),
                    gather="p2p" if mode == "fsep_async" else "all_to_all",
                )
                e = (
                    base.config.num_experts
                    if hasattr(base.config, "num_experts")
                    else base.config.num_local_experts
                )
                layouts = {
                    "identity": Layout.identity(e, world_size),
                    "replicas_uniform": Layout.from_slots([[0, 1, 3], [2, 3, 0]], e, "uniform"),
                    "replicas_local": Layout.from_slots([[3, 0, 2], [1, 2, 0]], e, "local_first"),
                    "fsdp": Layout.fsdp(e, world_size),
                    "uneven": Layout.from_slots([[0, 1, 2, 3], [1]], e, "uniform"),
                }
                if only:
                    layouts = {k: v for k, v in layouts.items() if k in only}
            model = prepare_fsep(copy.deepcopy(base).train(), cfg)
            for lname, lay in layouts.items():
                if lay is not None:
                    for layer in fsep_layers(model):
                        layer.set_layout(lay)
                model.zero_grad(set_to_none=True)
                loss, logits = _loss(model, mine)
                loss.backward()
                average_dense_gradients(model)
                fwd = float((logits.detach() - ref_logits[rank]).abs().max())
                grad = _compare_grads(ref, model)
                used = sum(int((layer.last_counts.sum(0) > 0).sum()) for layer in fsep_layers(model))
                res[f"{kind}/{mode}/{lname}"] = (fwd, grad, used)
    return res


def training(rank: int, world_size: int, kind: str, outdir: str, steps: int = 3) -> dict[str, Any]:
    """A few AdamW steps under FSEP (planner layouts, DDP for the dense part) vs single-process
    training; then HF-format save / load round trips."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    from transformers import AutoModelForCausalLM

    from hf_ext.accelerate.fsep import (
        FSEPConfig,
        fsep_full_state_dict,
        load_fsep_state_dict,
        prepare_fsep,
        save_fsep_pretrained,
    )
    from hf_ext.accelerate.fsep.plugin import fsep_layers
    from hf_ext.testing import tiny_moe

    res: dict[str, Any] = {}
    orig = tiny_moe(kind, seed=0)
    orig_dir = f"{outdir}/orig"
    if rank == 0:
        orig.save_pretrained(orig_dir)
    dist.barrier()
    # ---- round trip without training: load HF -> prepare -> save -> identical checkpoint
    m = AutoModelForCausalLM.from_pretrained(orig_dir)
    m = prepare_fsep(m, FSEPConfig())
    rt_dir = f"{outdir}/roundtrip"
    save_fsep_pretrained(m, rt_dir)
    if rank == 0:
        back = AutoModelForCausalLM.from_pretrained(rt_dir)
        a, b = orig.state_dict(), back.state_dict()
        res["roundtrip_keys_equal"] = sorted(a) == sorted(b)
        res["roundtrip_max_diff"] = max(float((a[k] - b[k]).abs().max()) for k in a)

    # ---- training: reference single process vs FSEP (planner) + DDP dense part
    ref = copy.deepcopy(orig).train()
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    # a dozen tokens per rank do not pay for a replica: plan as for 4096, so training runs replicated layouts
    model = prepare_fsep(copy.deepcopy(orig).train(), FSEPConfig(history=2, planner_tokens_per_rank=4096))
    ddp = DDP(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    replicas_seen = []
    for step in range(steps):
        ids = _batch(100 + step, 2 * world_size)
        _step_both(ref, opt_ref, ddp, opt, ids, rank, world_size)
        replicas_seen.append([lay.layout.replicas().tolist() for lay in fsep_layers(model)])
    full = fsep_full_state_dict(model)
    rsd = ref.state_dict()
    res["train_max_diff"] = max(float((full[k] - rsd[k]).abs().max()) for k in rsd)
    res["train_max_update"] = max(float((rsd[k] - orig.state_dict()[k]).abs().max()) for k in rsd)
    res["replicas_seen"] = replicas_seen
    # ---- save the trained FSEP model in HF format, reload single-process
    tr_dir = f"{outdir}/trained"
    save_fsep_pretrained(model, tr_dir)
    if rank == 0:
        back = AutoModelForCausalLM.from_pretrained(tr_dir)
        bsd = back.state_dict()
        res["trained_reload_max_diff"] = max(float((bsd[k] - rsd[k]).abs().max()) for k in rsd)
    # ---- load an HF state dict into the prepared model: outputs equal the original model's
    load_fsep_state_dict(model, orig.state_dict())
    model.eval()
    ids = _batch(7, 2 * world_size)[rank * 2 : (rank + 1) * 2]
    with torch.no_grad():
        res["load_state_dict_fwd_diff"] = float((model(ids).logits - orig(ids).logits).abs().max())
    return res


def bad_inputs(rank: int, world_size: int) -> dict[str, str]:
    """Error messages for unsupported inputs (collected, not raised)."""
    from hf_ext.accelerate.fsep import FSEPConfig, prepare_fsep
    from hf_ext.testing import tiny_llama, tiny_moe

    out = {}
    try:
        prepare_fsep(tiny_llama(), FSEPConfig())
    except ValueError as exc:
        out["unknown_arch"] = str(exc)
    m = tiny_moe("olmoe", num_experts=3)
    try:
        prepare_fsep(m, FSEPConfig(mode="static_ep"))
    except ValueError as exc:
        out["not_divisible"] = str(exc)
    try:
        prepare_fsep(m, FSEPConfig(mode="fsep"))
    except ValueError as exc:
        out["not_divisible_fsep"] = str(exc)
    return out


def fsdp2_training(rank: int, world_size: int, kind: str = "qwen3_moe", steps: int = 2) -> float:
    """FSDP2 (fully_shard) on the dense part + FSEP experts: SGD steps match single-process training."""
    from torch.distributed.device_mesh import init_device_mesh

    from hf_ext.accelerate.fsep import FSEPConfig, FSEPPlugin, fsep_full_state_dict
    from hf_ext.testing import tiny_moe

    orig = tiny_moe(kind, seed=0).train()
    ref = copy.deepcopy(orig)
    plugin = FSEPPlugin(FSEPConfig())
    model = plugin.prepare_model(copy.deepcopy(orig))
    plugin.apply_fsdp2(model, mesh=init_device_mesh("cpu", (world_size,)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    for step in range(steps):
        ids = _batch(200 + step, 2 * world_size)
        _step_both(ref, opt_ref, model, opt, ids, rank, world_size)
    full = fsep_full_state_dict(model)
    rsd = ref.state_dict()
    return max(float((full[k] - rsd[k]).abs().max()) for k in rsd)


def suite_a(rank: int, world_size: int) -> dict[str, Any]:
    """Equivalence over model kinds and layouts, plus bad-input errors (one spawn)."""
    out: dict[str, Any] = {}
    out.update(equivalence(rank, world_size, ["qwen2_moe"], ["fsep_sync", "fsep_async", "static_ep"]))
    out.update(
        equivalence(
            rank,
            world_size,
            ["mixtral", "olmoe", "qwen3_moe", "deepseek_v3"],
            ["fsep_async"],
            ("replicas_uniform",),
        )
    )
    out["errors"] = bad_inputs(rank, world_size)
    return out


def suite_b(rank: int, world_size: int, outdir: str) -> dict[str, Any]:
    """Optimizer steps (DDP + planner; FSDP2) and HF-format save / load (one spawn)."""
    out = training(rank, world_size, "mixtral", outdir)
    out["fsdp2_max_diff"] = fsdp2_training(rank, world_size)
    return out


def grads_with_replicas(rank: int, ws: int) -> dict[str, Any]:
    """FSEP expert-shard gradients (replicas on every rank, sync and async reduce) vs dense autograd over
    all ranks' tokens: max relative error of this rank's shard."""
    import torch
    import torch.distributed as dist

    from hf_ext.accelerate.fsep import layer as layer_mod
    from hf_ext.accelerate.fsep.bench import _dense_moe
    from hf_ext.accelerate.fsep.config import FSEPConfig
    from hf_ext.accelerate.fsep.layer import FSEPExperts
    from hf_ext.accelerate.fsep.planner import Layout

    e, h, i, t, k = 2 * ws, 16, 24, 64, 2
    g = torch.Generator().manual_seed(0)
    gu = torch.randn(e, 2 * i, h, generator=g) * 0.1
    dn = torch.randn(e, h, i, generator=g) * 0.1
    out = {}
    # replicas: rank r holds experts r, r+ws and (r+1)%e as a replica
    slots = [[r, r + ws, (r + 1) % e] for r in range(ws)]
    runs = [
        (
            f"{sync}_{gather}",
            sync != "sync",
            sync.removeprefix("async_") if sync != "sync" else "eager",
            gather,
        )
        for sync in ("sync", "async_eager", "async_deferred")
        for gather in ("p2p", "all_to_all")
    ]
    runs.append(("rowadd_p2p", True, "deferred", "p2p"))  # shard rows added one add_ each
    for name, asyncg, schedule, gather in runs:
        layer_mod._ROW_ADD_MIN_NUMEL = 0 if name.startswith("rowadd") else 1 << 20
        cfg = FSEPConfig(
            mode="fsep",
            layout_policy="identity",
            async_grad_reduce=asyncg,
            comm_schedule=schedule,
            average_grads=False,
            gather=gather,
        )
        lay = FSEPExperts(gu, dn, torch.nn.functional.silu, cfg, top_k=k)
        lay.set_layout(Layout.from_slots(slots, e, "uniform"))
        gx = torch.Generator().manual_seed(10 + rank)
        x = torch.randn(t, h, generator=gx)
        idx = torch.stack([torch.randperm(e, generator=gx)[:k] for _ in range(t)])
        w = torch.softmax(torch.randn(t, k, generator=gx), -1)
        y = lay(x, idx, w)
        y.square().sum().backward()
        # dense reference over all ranks' tokens
        xs = [torch.empty_like(x) for _ in range(ws)]
        ids = [torch.empty_like(idx) for _ in range(ws)]
        ws_ = [torch.empty_like(w) for _ in range(ws)]
        dist.all_gather(xs, x)
        dist.all_gather(ids, idx)
        dist.all_gather(ws_, w)
        gu_r, dn_r = gu.clone().requires_grad_(), dn.clone().requires_grad_()
        act = torch.nn.functional.silu
        loss = sum(_dense_moe(a, b, c, gu_r, dn_r, act).square().sum() for a, b, c in zip(xs, ids, ws_))
        loss.backward()
        flat = torch.cat([gu_r.grad.reshape(e, -1), dn_r.grad.reshape(e, -1)], 1)
        s = lay.shard_size
        flat = torch.nn.functional.pad(flat, (0, s * ws - flat.shape[1]))
        ref = flat[:, rank * s : (rank + 1) * s]
        out[name] = float((lay.expert_shards.grad - ref).abs().max() / ref.abs().max())
    # gather="auto" picks the exchange by shard size (these shards are a few hundred bytes)
    act = torch.nn.functional.silu
    small = FSEPExperts(gu, dn, act, FSEPConfig(mode="fsep"), top_k=k).use_p2p
    low = FSEPExperts(gu, dn, act, FSEPConfig(mode="fsep", gather_p2p_min_bytes=0), top_k=k).use_p2p
    out["auto_picks_p2p"] = (small, low)
    return out


def checkpointed_training(
    rank: int, world_size: int, steps: int = 3, use_reentrant: bool = False
) -> dict[str, Any]:
    """AdamW steps with HF activation checkpointing on the FSEP model (its MoE blocks are recomputed in
    backward; ``use_reentrant``: the forward runs under no_grad and only the recompute builds the graph) vs
    single-process training; and the planner history length (one entry per step)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from hf_ext.accelerate.fsep import FSEPConfig, fsep_full_state_dict, prepare_fsep
    from hf_ext.accelerate.fsep.plugin import fsep_layers
    from hf_ext.testing import tiny_moe

    orig = tiny_moe("mixtral", seed=0)
    ref = copy.deepcopy(orig).train()
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    model = prepare_fsep(copy.deepcopy(orig).train(), FSEPConfig(history=10))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    ddp = DDP(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(steps):
        ids = _batch(200 + step, 2 * world_size)
        _step_both(ref, opt_ref, ddp, opt, ids, rank, world_size)
    full = fsep_full_state_dict(model)
    rsd = ref.state_dict()
    return {
        "train_max_diff": max(float((full[k] - rsd[k]).abs().max()) for k in rsd),
        "history_lengths": [len(lay.planner.history) for lay in fsep_layers(model)],
        "checkpointing": bool(model.model.layers[0].gradient_checkpointing),
    }


def comm_schedules(rank: int, ws: int, layers: int = 3) -> dict[str, Any]:
    """A stack of ``layers`` FSEP layers (planner layouts with replicas after one step), backward under
    both comm schedules: the order of the backward communication (``FSEPState.trace``) and the max
    difference of the shard gradients between the schedules."""
    import torch

    from hf_ext.accelerate.fsep.config import FSEPConfig
    from hf_ext.accelerate.fsep.layer import FSEPExperts, FSEPState

    e, h, i, t, k = 2 * ws, 16, 24, 64, 2
    g = torch.Generator().manual_seed(0)
    gus = [torch.randn(e, 2 * i, h, generator=g) * 0.1 for _ in range(layers)]
    dns = [torch.randn(e, h, i, generator=g) * 0.1 for _ in range(layers)]
    out: dict[str, Any] = {}
    grads = {}
    for schedule in ("eager", "deferred"):
        state = FSEPState()
        cfg = FSEPConfig(mode="fsep", extra_capacity=1, comm_schedule=schedule, gather="p2p")
        stack = [
            FSEPExperts(gus[j], dns[j], torch.nn.functional.silu, cfg, state=state, top_k=k)
            for j in range(layers)
        ]
        for j in range(layers - 1):
            stack[j]._next.append(stack[j + 1])
        gx = torch.Generator().manual_seed(10 + rank)
        for step in range(2):  # step 0 fills the planner history, step 1 runs the planned layout
            x = torch.randn(t, h, generator=gx).requires_grad_()
            idx = [torch.stack([torch.randperm(e, generator=gx)[:k] for _ in range(t)]) for _ in stack]
            w = [torch.softmax(torch.randn(t, k, generator=gx), -1) for _ in stack]
            for lay in stack:
                lay.expert_shards.grad = None
            state.begin_step()
            state.trace = [] if step == 1 else None
            y = x
            for j, lay in enumerate(stack):
                y = y + lay(y, idx[j], w[j])
            y.square().sum().backward()
        out[f"trace_{schedule}"] = state.trace
        out[f"slots_{schedule}"] = [list(map(list, lay.layout.slots)) for lay in stack]
        grads[schedule] = [lay.expert_shards.grad.clone() for lay in stack]
    out["grad_diff"] = max(float((a - b).abs().max()) for a, b in zip(grads["eager"], grads["deferred"]))
    return out


def _expert_snapshot(model: Any, opt: Any) -> list[tuple[torch.Tensor, ...]]:
    """This rank's rows of every FSEP layer's parameter and Adam moments."""
    from hf_ext.accelerate.fsep.plugin import fsep_layers

    out = []
    for layer in fsep_layers(model):
        p = layer.expert_shards if layer.config.mode == "fsep" else layer.expert_weights
        st = opt.state[p]
        out.append((p.detach().clone(), st["exp_avg"].clone(), st["exp_avg_sq"].clone()))
    return out


def _snapshot_diff(a: list, b: list) -> float:
    return max(float((x - y).abs().max()) for ta, tb in zip(a, b) for x, y in zip(ta, tb))


def accelerate_resume(rank: int, world_size: int, outdir: str, cpu: bool = True) -> dict[str, Any]:
    """``accelerator.save_state`` / ``load_state`` of an FSEP model and its AdamW (Accelerate writes rank 0's
    state dicts and loads them on every rank): each rank's expert rows and Adam moments after resuming,
    in place and into a fresh model / optimizer, vs those at the save. ``cpu=False``: on the GPUs (NCCL)."""
    from accelerate import Accelerator

    from hf_ext.accelerate.fsep import FSEPConfig, FSEPPlugin
    from hf_ext.accelerate.fsep.plugin import fsep_layers
    from hf_ext.testing import tiny_moe

    res: dict[str, Any] = {}
    orig = tiny_moe("mixtral", seed=0).train()
    for mode in ("fsep", "static_ep"):

        def build(acc: Any, mode: str = mode) -> tuple[Any, Any]:
            m = FSEPPlugin(FSEPConfig(mode=mode)).prepare_model(copy.deepcopy(orig), accelerator=acc)
            return acc.prepare(m, torch.optim.AdamW(m.parameters(), lr=1e-2))

        def step(acc: Any, model: Any, opt: Any, seed: int) -> None:
            ids = _batch(seed + rank, 2, seq=8).to(acc.device)
            acc.backward(model(ids, labels=ids).loss)
            opt.step()
            opt.zero_grad()

        acc = Accelerator(cpu=cpu)
        model, opt = build(acc)
        step(acc, model, opt, 0)
        inner = acc.unwrap_model(model)
        saved = _expert_snapshot(inner, opt.optimizer)
        d = f"{outdir}/{mode}"
        acc.save_state(d)
        step(acc, model, opt, 50)  # move on, then resume in place
        acc.load_state(d)
        res[f"{mode}_inplace_diff"] = _snapshot_diff(saved, _expert_snapshot(inner, opt.optimizer))
        # a fresh run resumes before its first step; one more step of both must agree
        acc2 = Accelerator(cpu=cpu)
        model2, opt2 = build(acc2)
        acc2.load_state(d)
        step(acc, model, opt, 60)
        step(acc2, model2, opt2, 60)
        a = _expert_snapshot(inner, opt.optimizer)
        b = _expert_snapshot(acc2.unwrap_model(model2), opt2.optimizer)
        res[f"{mode}_fresh_diff"] = _snapshot_diff(a, b)
        res[f"{mode}_moved"] = _snapshot_diff(saved, a)
        # the model's state dict has the keys of the HF model (full experts)
        res[f"{mode}_hf_keys"] = sorted(inner.state_dict()) == sorted(orig.state_dict())
        # a state dict with one rank's rows is refused
        layer = fsep_layers(inner)[0]
        pname = "expert_shards" if mode == "fsep" else "expert_weights"
        param = getattr(layer, pname)
        bad = {k: v for k, v in inner.state_dict().items() if "experts" not in k}
        bad[f"model.layers.0.mlp.experts.{pname}"] = param.detach().clone()  # (on the GPU with cpu=False)
        try:
            inner.load_state_dict(bad, strict=False)
        except RuntimeError as exc:
            res[f"{mode}_per_rank_error"] = str(exc)
        sd = opt.optimizer.state_dict()
        sd["state"] = {i: dict(st) for i, st in sd["state"].items()}
        idx = [id(p) for g in opt.optimizer.param_groups for p in g["params"]].index(id(param))
        sd["state"][idx]["exp_avg"] = opt.optimizer.state[param]["exp_avg"].clone()
        try:
            opt.optimizer.load_state_dict(sd)
        except RuntimeError as exc:
            res[f"{mode}_per_rank_optim_error"] = str(exc)
    return res


def fsdp2_checkpoints(rank: int, world_size: int, outdir: str) -> dict[str, Any]:
    """``save_fsep_pretrained`` / ``load_fsep_state_dict`` / ``fsep_full_state_dict`` with the dense part under
    FSDP2 (``FSEPPlugin.apply_fsdp2``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoModelForCausalLM

    from hf_ext.accelerate.fsep import FSEPConfig, FSEPPlugin, fsep_full_state_dict, load_fsep_state_dict
    from hf_ext.testing import tiny_moe

    res: dict[str, Any] = {}
    orig, other = tiny_moe("qwen3_moe", seed=0), tiny_moe("qwen3_moe", seed=1)
    plugin = FSEPPlugin(FSEPConfig())
    model = plugin.prepare_model(copy.deepcopy(orig).train())
    plugin.apply_fsdp2(model, mesh=init_device_mesh("cpu", (world_size,)))
    plugin.save_pretrained(model, f"{outdir}/fsdp2")
    if rank == 0:
        back = AutoModelForCausalLM.from_pretrained(f"{outdir}/fsdp2").state_dict()
        osd = orig.state_dict()
        res["fsdp2_saved_keys_equal"] = sorted(back) == sorted(osd)
        res["fsdp2_saved_max_diff"] = max(float((back[k] - osd[k]).abs().max()) for k in osd)
    load_fsep_state_dict(model, other.state_dict())
    full, osd = fsep_full_state_dict(model), other.state_dict()
    res["fsdp2_loaded_max_diff"] = max(float((full[k] - osd[k]).abs().max()) for k in osd)
    ids = _batch(3, 2)
    model.eval()
    with torch.no_grad():
        res["fsdp2_loaded_fwd_diff"] = float((model(ids).logits - other(ids).logits).abs().max())
    return res


def remove_restores(rank: int, world_size: int) -> dict[str, Any]:
    """``remove_fsep`` after ``prepare_fsep``: the DDP ignore list as it was (absent, or its entries in
    order) and the original outputs."""
    import gc

    from hf_ext.accelerate.fsep import FSEPConfig, prepare_fsep, remove_fsep
    from hf_ext.accelerate.fsep import layer as fsep_layer
    from hf_ext.testing import tiny_moe

    gc.collect()  # the FSEP models of the suite's earlier parts
    orig = tiny_moe("mixtral", seed=0).eval()
    ids = _batch(4, 2)
    plain = remove_fsep(prepare_fsep(copy.deepcopy(orig), FSEPConfig()))
    hook_after_first = fsep_layer._STEP_HOOK is not None
    listed = copy.deepcopy(orig)
    listed._ddp_params_and_buffers_to_ignore = ["lm_head.weight", "model.norm.weight"]
    listed = prepare_fsep(listed, FSEPConfig())
    hook_while_prepared = fsep_layer._STEP_HOOK is not None
    listed = remove_fsep(listed)
    with torch.no_grad():
        fwd = float((plain(ids).logits - orig(ids).logits).abs().max())
    return {
        "removed_has_ignore": hasattr(plain, "_ddp_params_and_buffers_to_ignore"),
        "removed_ignore_list": listed._ddp_params_and_buffers_to_ignore,
        "removed_fsep_attrs": sorted(k for k in vars(plain) if k.startswith("_fsep")),
        "removed_fwd_diff": fwd,
        "step_hook": [hook_after_first, hook_while_prepared, fsep_layer._STEP_HOOK is not None],
    }


def generate_with_early_eos(rank: int, world_size: int) -> dict[str, Any]:
    """Greedy ``generate`` on an FSEP model where rank 0's row ends at its first token (EOS) and rank 1's runs on:
    every FSEP forward is collective, so without synced_gpus rank 1 waited forever. Then ``remove_fsep`` drops
    the wrapped ``generate``."""
    from hf_ext.accelerate.fsep import FSEPConfig, prepare_fsep, remove_fsep
    from hf_ext.testing import tiny_moe

    base = tiny_moe("mixtral", seed=0).eval()
    first = _batch(0, 1)
    with torch.no_grad():
        eos = int(base.generate(first, max_new_tokens=1, do_sample=False)[0, -1])
    model = prepare_fsep(copy.deepcopy(base), FSEPConfig()).eval()
    mine = first if rank == 0 else _batch(7, 1)
    with torch.no_grad():
        out = model.generate(mine, max_new_tokens=6, do_sample=False, eos_token_id=eos, pad_token_id=0)
        ref = base.generate(mine, max_new_tokens=6, do_sample=False, eos_token_id=eos, pad_token_id=0)
    res = {"gen_len": int(out.shape[1]), "gen_equal": bool(torch.equal(out, ref))}
    remove_fsep(model)
    res["generate_left"] = "generate" in vars(model)
    return res


def checkpoint_suite(rank: int, world_size: int, outdir: str) -> dict[str, Any]:
    """Checkpoint paths, prepare / remove and generate (one spawn)."""
    out = accelerate_resume(rank, world_size, outdir)
    out.update(fsdp2_checkpoints(rank, world_size, outdir))
    out.update(remove_restores(rank, world_size))
    out.update(generate_with_early_eos(rank, world_size))
    return out


def backward_after_exception(rank: int, ws: int) -> dict[str, float]:
    """Two stacked FSEP layers; a backward that raises between them (both ranks, e.g. a caught OOM, the
    batch skipped), then clean steps: max relative difference of the shard gradients of those steps vs the
    same steps of a run without the failure, per gradient schedule."""
    import torch.nn.functional as F

    from hf_ext.accelerate.fsep.config import FSEPConfig
    from hf_ext.accelerate.fsep.layer import FSEPExperts, FSEPState

    e, h, i, t, k = 4, 16, 24, 32, 2
    g = torch.Generator().manual_seed(0)
    weights = [
        (torch.randn(e, 2 * i, h, generator=g) * 0.1, torch.randn(e, h, i, generator=g) * 0.1)
        for _ in range(2)
    ]

    def batch(seed: int) -> tuple:
        gx = torch.Generator().manual_seed(100 * seed + rank)
        x = torch.randn(t, h, generator=gx).requires_grad_()
        idx = [torch.stack([torch.randperm(e, generator=gx)[:k] for _ in range(t)]) for _ in range(2)]
        w = [torch.softmax(torch.randn(t, k, generator=gx), -1) for _ in range(2)]
        return x, idx, w

    def grads(stack: list, seed: int, fail: bool = False) -> list[torch.Tensor] | None:
        for lay in stack:
            lay.expert_shards.grad = None
        x, idx, w = batch(seed)
        y = x + stack[0](x, idx[0], w[0])
        if fail:
            y.register_hook(lambda _: (_ for _ in ()).throw(RuntimeError("simulated OOM in backward")))
        y = y + stack[1](y, idx[1], w[1])
        try:
            y.square().sum().backward()
        except RuntimeError:
            return None
        return [
            torch.zeros(0) if lay.expert_shards.grad is None else lay.expert_shards.grad.clone()
            for lay in stack
        ]

    out = {}
    for schedule, gather in (("deferred", "p2p"), ("deferred", "all_to_all"), ("eager", "p2p")):
        runs = []
        for fail in (False, True):
            cfg = FSEPConfig(mode="fsep", layout_policy="identity", comm_schedule=schedule, gather=gather)
            state = FSEPState()
            stack = [FSEPExperts(gu, dn, F.silu, cfg, state=state, top_k=k) for gu, dn in weights]
            stack[0]._next.append(stack[1])
            if fail:
                assert grads(stack, 0, fail=True) is None
            runs.append([grads(stack, s) for s in (1, 2, 3)])
        out[f"{schedule}_{gather}"] = max(
            float((a - b).abs().max() / b.abs().max()) if a.shape == b.shape else float("inf")
            for ra, rb in zip(*runs)
            for a, b in zip(ra, rb)
        )
    return out


def clipped_grads(rank: int, world_size: int) -> dict[str, float]:
    """``fsep_clip_grad_norm_`` vs ``clip_grad_norm_`` of the single-process model on the whole batch (dense
    part under DDP or FSDP2): relative error of the total norm (2 and inf) and of the clipped gradients."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel as DDP

    from hf_ext.accelerate.fsep import FSEPConfig, FSEPPlugin, fsep_clip_grad_norm_
    from hf_ext.testing import tiny_moe

    out: dict[str, float] = {}
    orig = tiny_moe("mixtral", seed=0)
    ids = _batch(5, 2 * world_size)
    for setup in ("fsep_ddp", "static_ep_ddp", "fsep_fsdp2"):
        ref = copy.deepcopy(orig).train()
        (sum(ref(b, labels=b).loss for b in ids.split(2)) / world_size).backward()
        plugin = FSEPPlugin(FSEPConfig(mode="static_ep" if setup.startswith("static") else "fsep"))
        model = plugin.prepare_model(copy.deepcopy(orig).train())
        if setup.endswith("fsdp2"):
            wrapped = plugin.apply_fsdp2(model, mesh=init_device_mesh("cpu", (world_size,)))
        else:
            wrapped = DDP(model)
        mine = ids[rank * 2 : (rank + 1) * 2]
        wrapped(mine, labels=mine).loss.backward()
        ref_inf = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1e9, norm_type="inf")
        inf = fsep_clip_grad_norm_(model, 1e9, norm_type=float("inf"))  # no clipping
        out[f"{setup}_inf_norm"] = float((inf - ref_inf).abs() / ref_inf)
        max_norm = 0.1 * float(torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()]))
        ref_total = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)  # the norm before clipping
        total = fsep_clip_grad_norm_(model, max_norm)
        out[f"{setup}_norm"] = float((total - ref_total).abs() / ref_total)
        egrads = _full_expert_grads(model)
        mparams = dict(model.named_parameters())
        worst = 0.0
        for name, p in ref.named_parameters():
            prefix, _, leaf = name.rpartition(".")
            if prefix in egrads and leaf in ("gate_up_proj", "down_proj"):
                g = egrads[prefix][0 if leaf == "gate_up_proj" else 1]
            else:
                g = mparams[name].grad
                g = g.full_tensor() if isinstance(g, DTensor) else g
            worst = max(worst, float((g - p.grad).abs().max()) / float(p.grad.abs().max()))
        out[f"{setup}_clipped_grads"] = worst
    return out


def planner_token_scale(rank: int, ws: int) -> dict[str, Any]:
    """Replica counts the in-layer planner picks after one training step of the same skewed routing (every
    token to expert 0 plus one other) at 32 and at 4096 tokens per rank, with the observed counts and with
    ``planner_tokens_per_rank=4096`` declared; and the tokens per rank each plan was costed for."""
    from hf_ext.accelerate.fsep.config import FSEPConfig
    from hf_ext.accelerate.fsep.layer import FSEPExperts

    e, h, i, k = 2 * ws, 16, 24, 2
    g = torch.Generator().manual_seed(0)
    gu = torch.randn(e, 2 * i, h, generator=g) * 0.1
    dn = torch.randn(e, h, i, generator=g) * 0.1
    out: dict[str, Any] = {}
    for name, t, declared in (("small", 32, None), ("large", 4096, None), ("small_declared", 32, 4096)):
        cfg = FSEPConfig(mode="fsep", hardware="cpu", planner_tokens_per_rank=declared)
        lay = FSEPExperts(gu, dn, torch.nn.functional.silu, cfg, top_k=k).train()
        gx = torch.Generator().manual_seed(10 + rank)
        x = torch.randn(t, h, generator=gx)
        other = torch.randint(1, e, (t,), generator=gx)
        idx = torch.stack([torch.zeros_like(other), other], 1)
        w = torch.softmax(torch.randn(t, k, generator=gx), -1)
        lay(x, idx, w).square().sum().backward()
        lay.replan(0)
        out[name] = lay.layout.replicas().tolist()
        out[f"{name}_tokens"] = lay.planner.last_tokens_per_rank
    return out


def optimizer_hooks_for_later_experts(rank: int, world_size: int) -> dict[str, Any]:
    """The shape of an FSEP expert parameter's Adam moment in ``optimizer.state_dict()`` (full experts ``[E, 3IH]``
    when the hooks apply) for expert parameters that reach an optimizer after its first step
    (``add_param_group``) and that ``load_state_dict(assign=True)`` put in place."""
    from hf_ext.accelerate.fsep import FSEPConfig, prepare_fsep
    from hf_ext.accelerate.fsep.plugin import fsep_layers
    from hf_ext.testing import tiny_moe

    ids = _batch(5, 2 * world_size)[rank * 2 : (rank + 1) * 2]
    out: dict[str, Any] = {}
    model = prepare_fsep(tiny_moe("mixtral", seed=0).train(), FSEPConfig())
    layer = fsep_layers(model)[0]
    out["full_shape"] = (layer.num_experts, layer.expert_numel)
    experts = [lay.expert_param for lay in fsep_layers(model)]
    dense = [p for p in model.parameters() if all(p is not q for q in experts)]
    opt = torch.optim.Adam(dense, lr=1e-2)
    model(ids, labels=ids).loss.backward()
    opt.step()  # the dense part alone
    opt.add_param_group({"params": experts, "lr": 1e-3})
    model(ids, labels=ids).loss.backward()
    opt.step()
    out["add_param_group"] = tuple(opt.state_dict()["state"][len(dense)]["exp_avg"].shape)

    model = prepare_fsep(tiny_moe("mixtral", seed=0).train(), FSEPConfig())
    model.load_state_dict(model.state_dict(), assign=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(ids, labels=ids).loss.backward()
    opt.step()
    pos = [i for i, p in enumerate(model.parameters()) if p is fsep_layers(model)[0].expert_param]
    out["assign"] = tuple(opt.state_dict()["state"][pos[0]]["exp_avg"].shape)
    return out


def factored_optimizer_resume(rank: int, world_size: int) -> dict[str, Any]:
    """``torch.optim.Adafactor`` on an FSEP model, its ``state_dict()`` written by rank 0 and loaded on every rank
    (as ``accelerator.save_state`` / ``load_state`` do): the max difference between each rank's factored second
    moments (``row_var`` / ``col_var``, computed from the rank's own rows) before and after; and the error for a
    state saved by another number of ranks."""
    from hf_ext.accelerate.fsep import FSEPConfig, prepare_fsep
    from hf_ext.accelerate.fsep.layer import prepare_fsep_optimizer
    from hf_ext.accelerate.fsep.plugin import fsep_layers
    from hf_ext.testing import tiny_moe

    out: dict[str, Any] = {}
    for mode in ("fsep", "static_ep"):
        model = prepare_fsep(tiny_moe("mixtral", seed=0).train(), FSEPConfig(mode=mode))
        ids = _batch(5, 2 * world_size)[rank * 2 : (rank + 1) * 2]
        opt = torch.optim.Adafactor(model.parameters(), lr=1e-2)
        for _ in range(2):
            model(ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        saved = [opt.state_dict()]  # collective
        dist.broadcast_object_list(saved, src=0)  # rank 0's file, loaded on every rank
        fresh = prepare_fsep_optimizer(torch.optim.Adafactor(model.parameters(), lr=1e-2))
        fresh.load_state_dict(saved[0])
        experts = [lay.expert_param for lay in fsep_layers(model)]
        out[f"{mode}_diff"] = max(
            float((fresh.state[p][k] - opt.state[p][k]).abs().max())
            for p in experts
            for k in ("row_var", "col_var")
        )
        out[f"{mode}_differs_between_ranks"] = float(opt.state[experts[0]]["row_var"].sum())
        bad = copy.deepcopy(saved[0])
        for st in bad["state"].values():
            for k, v in st.items():
                if isinstance(v, dict):
                    st[k] = {**v, "fsep_per_rank": torch.cat([v["fsep_per_rank"], v["fsep_per_rank"][:1]])}
        try:
            prepare_fsep_optimizer(torch.optim.Adafactor(model.parameters(), lr=1e-2)).load_state_dict(bad)
            out[f"{mode}_other_world_size"] = "no error"
        except RuntimeError as exc:
            out[f"{mode}_other_world_size"] = str(exc)
    return out


def copy_after_a_failed_forward(rank: int, world_size: int) -> dict[str, Any]:
    """A training forward that raises in the second decoder layer (after the first MoE layer prefetched the second
    one's experts), then ``copy.deepcopy`` and ``pickle`` of the model: the error text, if any, and the max
    difference of the copy's logits from the original's."""
    import pickle

    from hf_ext.accelerate.fsep import FSEPConfig, prepare_fsep
    from hf_ext.testing import tiny_moe

    model = prepare_fsep(tiny_moe("mixtral", seed=0).train(), FSEPConfig())
    ids = _batch(5, 2 * world_size)[rank * 2 : (rank + 1) * 2]

    def fail(*_: Any) -> None:
        raise RuntimeError("simulated OOM")

    handle = model.model.layers[1].self_attn.register_forward_pre_hook(fail)
    with contextlib.suppress(RuntimeError):
        model(ids, labels=ids)
    handle.remove()
    out: dict[str, Any] = {"left_prefetched": model.model.layers[1].mlp.experts._prefetched is not None}
    try:
        copied = copy.deepcopy(model)
        pickle.dumps(model.model.layers[1].mlp.experts)
        out["error"] = ""
    except Exception as exc:  # the old code: "cannot pickle ... Work object"
        out["error"] = repr(exc)
        return out
    model.eval()
    copied.eval()
    with torch.no_grad():
        out["logits_diff"] = float((copied(ids).logits - model(ids).logits).abs().max())
    return out


def pinned_layout(rank: int, world_size: int) -> dict[str, Any]:
    """A layout given to ``set_layout`` under ``layout_policy="planner"`` (and ``"identity"``), then training
    steps (``FSEPState.begin_step`` + forward + backward) before and after ``release_layout``: per step, the slots
    each forward ran with, whether the layout is pinned, and the planner's history length."""
    from hf_ext.accelerate.fsep.config import FSEPConfig
    from hf_ext.accelerate.fsep.layer import FSEPExperts, FSEPState
    from hf_ext.accelerate.fsep.planner import Layout

    e, h, i, t, k = 2 * world_size, 16, 24, 32, 2
    g = torch.Generator().manual_seed(0)
    gu = torch.randn(e, 2 * i, h, generator=g) * 0.1
    dn = torch.randn(e, h, i, generator=g) * 0.1
    mine = Layout.from_slots([[r, (r + 1) % e, (r + 2) % e] for r in range(e)][:world_size], e, "uniform")
    out: dict[str, Any] = {}
    for policy in ("planner", "identity"):
        state = FSEPState()
        layer = FSEPExperts(gu, dn, torch.nn.functional.silu, FSEPConfig(layout_policy=policy), state=state)
        layer.train()
        gx = torch.Generator().manual_seed(10 + rank)
        steps = []
        for step in range(5):
            if step == 1:
                layer.set_layout(mine)
            if step == 3:
                getattr(layer, "release_layout", lambda: None)()  # (absent from the old code)
            state.begin_step()
            x = torch.randn(t, h, generator=gx)
            idx = torch.stack([torch.randperm(e, generator=gx)[:k] for _ in range(t)])
            idx[: t // 2, 0] = 0  # skewed: the planner replicates expert 0
            w = torch.softmax(torch.randn(t, k, generator=gx), -1)
            layer(x, idx, w).square().sum().backward()
            steps.append(
                {
                    "slots": [list(s) for s in layer.layout.slots],
                    "pinned": getattr(layer, "layout_pinned", None),
                    "history": len(layer.planner.history) if layer.planner is not None else None,
                }
            )
        out[policy] = steps
    out["mine"] = [list(s) for s in mine.slots]
    return out


def checkpointed_replan_between_forwards(rank: int, world_size: int, comm_schedule: str) -> dict[str, Any]:
    """Two training forwards of a tiny Mixtral under HF (non-reentrant) activation checkpointing before one
    backward (gradient accumulation), the planner re-planning every layer between them (identity layout, then one
    with replicas): the max relative difference of the gradients from the single-process model's, or the error
    the backward raised, and every layer's slots in each forward."""
    from hf_ext.accelerate.fsep import FSEPConfig, prepare_fsep
    from hf_ext.accelerate.fsep.plugin import average_dense_gradients, fsep_layers
    from hf_ext.testing import tiny_moe

    orig = tiny_moe("mixtral", seed=0)
    ref = copy.deepcopy(orig).train()
    batches = [_batch(300 + j, 2 * world_size) for j in range(2)]
    shares = [ids[r * 2 : (r + 1) * 2] for ids in batches for r in range(world_size)]
    (sum(ref(x, labels=x).loss for x in shares) / world_size).backward()
    # costed as a large batch, so that the skewed routing of the first forward earns replicas
    cfg = FSEPConfig(comm_schedule=comm_schedule, planner_tokens_per_rank=1 << 16, hardware="h100")
    model = prepare_fsep(copy.deepcopy(orig).train(), cfg)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    losses, slots = [], []
    for ids in batches:
        mine = ids[rank * 2 : (rank + 1) * 2]
        losses.append(model(mine, labels=mine).loss)
        slots.append([[list(s) for s in layer.layout.slots] for layer in fsep_layers(model)])
    out: dict[str, Any] = {
        "slots": slots,
        "checkpointing": bool(model.model.layers[0].gradient_checkpointing),
    }
    try:
        sum(losses).backward()
    except Exception as exc:  # the old code: torch.utils.checkpoint's recomputed-tensor check
        out["error"] = f"{type(exc).__name__}: {exc}"[:600]
        return out
    average_dense_gradients(model)
    out["grad_diff"] = _compare_grads(ref, model)
    return out
