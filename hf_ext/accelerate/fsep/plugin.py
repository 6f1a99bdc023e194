"""Switching FSEP on for transformers MoE models, and saving / loading in the original HF format.

``prepare_fsep(model, FSEPConfig())`` swaps the fused experts module inside every MoE block of a
Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE or DeepSeek-V3 model for an :class:`FSEPExperts` layer (the
router, shared experts and aux losses are kept). Call it after ``torch.distributed`` is initialised
(``torchrun`` / ``accelerate launch``) and before ``accelerator.prepare``: the expert parameters are
registered in ``model._ddp_params_and_buffers_to_ignore`` so DDP does not all-reduce shards, and
:meth:`FSEPPlugin.apply_fsdp2` shards the dense part with FSDP2 leaving the experts to FSEP.

Example (2 processes)::

    model = AutoModelForCausalLM.from_pretrained("mistralai/Mixtral-8x7B-v0.1")
    model = prepare_fsep(model, FSEPConfig())
    ...train...
    save_fsep_pretrained(model, "out")          # collective; rank 0 writes an ordinary HF checkpoint
"""

from __future__ import annotations

import contextlib
import copy
import math
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from hf_ext.accelerate.fsep.config import FSEPConfig
from hf_ext.accelerate.fsep.layer import FSEPExperts, FSEPState, _unregister_expert_params

# model_type -> the experts class name transformers uses (all: gate_up_proj [E, 2I, H], down_proj [E, H, I])
SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "mixtral": "MixtralExperts",
    "qwen2_moe": "Qwen2MoeExperts",
    "qwen3_moe": "Qwen3MoeExperts",
    "olmoe": "OlmoeExperts",
    "deepseek_v3": "DeepseekV3Experts",
}


def _find_experts(model: nn.Module, class_name: str) -> list[tuple[str, nn.Module, str, nn.Module]]:
    """``(qualified_name, parent, attr, experts_module)`` of every experts module of ``class_name``."""
    out = []
    for name, mod in model.named_modules():
        for attr, child in mod.named_children():
            if type(child).__name__ == class_name:
                out.append((f"{name}.{attr}" if name else attr, mod, attr, child))
    return out


def _top_k(config: Any) -> int:
    return int(getattr(config, "num_experts_per_tok", 2) or 2)


def _validate(model: nn.Module, config: FSEPConfig, group: Any, device_check: bool = True) -> tuple[str, int]:
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"prepare_fsep: model_type={mt!r} is not a supported MoE architecture; supported: "
            f"{sorted(SUPPORTED_MODEL_TYPES)}"
        )
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "prepare_fsep needs torch.distributed initialised with world_size >= 2 "
            "(launch with `torchrun --nproc_per_node 2` or `accelerate launch`)"
        )
    ws = dist.get_world_size(group)
    if ws < 2:
        raise ValueError(
            f"prepare_fsep: world_size={ws}; FSEP shards experts over ranks and needs world_size >= 2 "
            "(a single process should use the model unchanged)"
        )
    if group is not None and ws != dist.get_world_size():
        raise ValueError(
            f"prepare_fsep: group has {ws} of {dist.get_world_size()} ranks; FSEP over a sub-group (expert parallel "
            "inside data-parallel replicas) is not supported: the expert gradients would only be averaged inside "
            "each group and the replicas would drift apart. Use the default group (all ranks)"
        )
    param = next(model.parameters(), None) if device_check else None
    if param is not None and param.device.type == "cpu" and dist.get_backend(group) == "nccl":
        raise ValueError(
            "prepare_fsep: the model is on the CPU but the process group's backend is nccl, which only moves "
            "CUDA tensors; move the model to this rank's GPU first (model.to(accelerator.device), or pass "
            "accelerator= to FSEPPlugin.prepare_model)"
        )
    return mt, ws


def _check(
    model: nn.Module, config: FSEPConfig | None, group: Any, device_check: bool = True
) -> tuple[FSEPConfig, list[tuple[str, nn.Module, str, nn.Module]]]:
    """Every check of :func:`prepare_fsep` (``device_check=False``: all but the one on where the model is), before
    anything is changed: the config and the experts modules found."""
    if config is not None and not isinstance(config, FSEPConfig):
        raise ValueError(
            f"prepare_fsep: config must be an FSEPConfig or None, got {type(config).__name__} {config!r}; build one "
            "with FSEPConfig(**fields)"
        )
    config = config or FSEPConfig()
    if getattr(model, "_fsep_state", None) is not None:
        raise ValueError("prepare_fsep: model is already prepared (call remove_fsep first)")
    mt, ws = _validate(model, config, group, device_check)
    found = _find_experts(model, SUPPORTED_MODEL_TYPES[mt])
    if not found:
        raise ValueError(f"prepare_fsep: no {SUPPORTED_MODEL_TYPES[mt]} modules found in the {mt} model")
    for qname, _, _, mod in found:
        gu, dn = getattr(mod, "gate_up_proj", None), getattr(mod, "down_proj", None)
        if gu is None or dn is None or gu.dim() != 3 or dn.dim() != 3 or getattr(mod, "has_bias", False):
            raise ValueError(f"prepare_fsep: {qname} is not a fused 3-D gate_up/down experts module")
        if gu.requires_grad != dn.requires_grad:
            raise ValueError(
                f"prepare_fsep: {qname}.gate_up_proj has requires_grad={gu.requires_grad} but "
                f"{qname}.down_proj has requires_grad={dn.requires_grad}; FSEP keeps both in one parameter, so "
                "freeze both or neither"
            )
        e = gu.shape[0]
        if config.mode == "static_ep" and e % ws:
            raise ValueError(
                f"prepare_fsep: num_experts={e} is not divisible by world_size={ws}; mode='static_ep' needs "
                "num_experts % world_size == 0"
            )
        if config.mode == "fsep" and e % ws and ws % e:
            raise ValueError(
                f"prepare_fsep: num_experts={e} and world_size={ws}: mode='fsep' needs num_experts % world_size "
                "== 0 or world_size % num_experts == 0"
            )
        config.resolved_capacity(e, ws)  # a capacity too small for the layout: before any collective
    return config, found


def prepare_fsep(model: nn.Module, config: FSEPConfig | None = None, group: Any = None) -> nn.Module:
    """Replace the experts of every MoE block of ``model`` by FSEP layers (in place; returns ``model``).

    Args:
        model: a transformers Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE / DeepSeek-V3 model (any head),
            with the same weights on every rank (or ``config.broadcast_from_rank0``).
        config: :class:`FSEPConfig` (``mode="static_ep"`` gives the static expert-parallel baseline).
        group: expert-parallel process group: all ranks (default: WORLD); a sub-group is refused (its expert
            gradients would not be synchronised across the groups).

    Raises:
        ValueError: unknown architecture, world size 1, expert count not divisible as required.
    """
    config, found = _check(model, config, group)
    state = FSEPState()
    layers: list[FSEPExperts] = []
    templates: dict[str, nn.Module] = {}
    ignore: list[str] = []
    top_k = _top_k(model.config)
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for qname, parent, attr, mod in found:
            gu, dn = mod.gate_up_proj.detach(), mod.down_proj.detach()
            if config.broadcast_from_rank0:
                src = dist.get_global_rank(group, 0) if group is not None else 0
                gu, dn = gu.contiguous().clone(), dn.contiguous().clone()
                dist.broadcast(gu, src, group=group)
                dist.broadcast(dn, src, group=group)
            layer = FSEPExperts(gu, dn, mod.act_fn, config, group=group, state=state, top_k=top_k)
            layers.append(layer)
            layer.to(gu.device)
            layer.expert_param.requires_grad_(mod.gate_up_proj.requires_grad)  # frozen experts stay frozen
            layer.train(mod.training)
            if len(layers) > 1:
                layers[-2]._next.append(layer)
            templates[qname] = copy.deepcopy(mod).to("meta")
            setattr(parent, attr, layer)
            swapped.append((parent, attr, mod))
            pname = "expert_weights" if config.mode == "static_ep" else "expert_shards"
            ignore.append(f"{qname}.{pname}")
    except BaseException:
        # a block that fails half-way (out of memory, a failed broadcast): put the original experts modules back and
        # forget the layers built so far, so the model is as it was (nothing else has been changed yet)
        for parent, attr, mod in swapped:
            setattr(parent, attr, mod)
        _unregister_expert_params(layers)
        raise
    hook = model.register_forward_pre_hook(_begin_step_hook)
    model._fsep_state = state
    model._fsep_templates = templates
    model._fsep_hook = hook
    model._fsep_config = config
    had_ignore = hasattr(model, "_ddp_params_and_buffers_to_ignore")
    prev = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    model._ddp_params_and_buffers_to_ignore = prev + ignore
    model._fsep_had_ddp_ignore = had_ignore  # remove_fsep restores the model as it was
    if callable(getattr(type(model), "generate", None)) and "generate" not in vars(model):
        # a bound method on the instance (remove_fsep deletes it; copy.deepcopy rebinds it to the copy)
        model.generate = types.MethodType(_fsep_generate, model)
    return model


def _fsep_generate(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``generate`` with ``synced_gpus=True`` by default: every FSEP layer's forward is collective, so a rank that
    finished its sequences must keep stepping until all ranks have (transformers turns this on by itself only for
    DeepSpeed ZeRO-3 / FSDP; without it a rank that hits EOS first leaves the others waiting forever)."""
    if kwargs.get("synced_gpus") is None:
        kwargs["synced_gpus"] = True
    return type(self).generate(self, *args, **kwargs)


def _begin_step_hook(module: nn.Module, args: Any) -> None:
    if module.training and torch.is_grad_enabled():
        module._fsep_state.begin_step()


def fsep_layers(model: nn.Module) -> list[FSEPExperts]:
    """The FSEP layers of a prepared model, in forward order."""
    state = getattr(model, "_fsep_state", None)
    if state is None:
        raise ValueError("model has no FSEP layers; call prepare_fsep(model) first")
    return list(state.layers)


def fsep_expert_parameters(model: nn.Module) -> set[nn.Parameter]:
    """Expert shard / resident parameters (for FSDP2 ``ignored_params`` or separate optimizer groups)."""
    out = set()
    for layer in fsep_layers(model):
        out.update(layer.parameters())
    return out


def average_dense_gradients(model: nn.Module, group: Any = None) -> None:
    """All-reduce (mean) the gradients of every non-expert parameter: the data-parallel step for the
    dense part when neither DDP nor FSDP2 wraps the model. Expert shards are left alone (their
    reduce-scatter already happened in backward)."""
    skip = {id(p) for p in fsep_expert_parameters(model)}
    ws = dist.get_world_size(group)
    for p in model.parameters():
        if id(p) in skip or p.grad is None:
            continue
        dist.all_reduce(p.grad, group=group)
        p.grad.div_(ws)


def fsep_clip_grad_norm_(
    model: nn.Module,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> torch.Tensor:
    """Collective ``clip_grad_norm_`` for a prepared model: the total gradient norm of the whole,
    unsharded model, the same on every rank, then every gradient scaled by
    ``min(1, max_norm / (total + 1e-6))``; returns the total norm.

    ``torch.nn.utils.clip_grad_norm_`` / ``accelerator.clip_grad_norm_`` see only this rank's expert
    shards (each rank clips by another norm and the replicated dense part drifts apart). Here the
    experts' ``norm_type``-th powers of the local shard norms (disjoint parts of the experts) are summed
    (max for ``inf``) over the expert-parallel group, and the dense (replicated, after DDP's all-reduce)
    part is counted once; FSDP2 ``DTensor`` gradients give their full norm. Call it after the gradients
    are reduced (under Accelerate: ``if accelerator.sync_gradients``, after
    ``accelerator.unscale_gradients()`` with fp16), with the unwrapped model."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.experimental import implicit_replication

    # checked before any collective (every rank gets the same arguments, so every rank raises)
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)

    if not number(max_norm) or max_norm < 0:
        raise ValueError(
            f"fsep_clip_grad_norm_: max_norm={max_norm!r} must be a number >= 0 (inf: only compute the norm)"
        )
    if not (number(norm_type) or norm_type == "inf") or not float(norm_type) > 0:
        raise ValueError(f"fsep_clip_grad_norm_: norm_type={norm_type!r} must be a number > 0 or inf")
    if not isinstance(error_if_nonfinite, bool):
        raise ValueError(
            f"fsep_clip_grad_norm_: error_if_nonfinite={error_if_nonfinite!r} must be True or False"
        )
    if foreach is not None and not isinstance(foreach, bool):
        raise ValueError(f"fsep_clip_grad_norm_: foreach={foreach!r} must be None, True or False")
    layers = fsep_layers(model)
    experts = [p for layer in layers for p in layer.parameters() if p.grad is not None]
    skip = {id(p) for layer in layers for p in layer.parameters()}
    dense = [p for p in model.parameters() if id(p) not in skip and p.grad is not None]
    device = layers[0].expert_param.device
    norm_type = float(norm_type)

    def local_norm(grads: list[torch.Tensor]) -> torch.Tensor:
        if not grads:
            return torch.zeros((), device=device)
        n = torch.nn.utils.get_total_norm(grads, norm_type, error_if_nonfinite=False, foreach=foreach)
        if isinstance(n, DTensor):  # FSDP2: a partial norm, reduced over its mesh
            n = n.full_tensor()
        return n.to(device=device, dtype=torch.float32)

    expert_norm = local_norm([p.grad for p in experts])
    dense_norm = local_norm([p.grad for p in dense])
    if norm_type == math.inf:
        dist.all_reduce(expert_norm, op=dist.ReduceOp.MAX, group=layers[0].group)
        total = torch.maximum(expert_norm, dense_norm)
    else:
        expert_pow = expert_norm.pow(norm_type)
        dist.all_reduce(expert_pow, group=layers[0].group)
        total = (expert_pow + dense_norm.pow(norm_type)).pow(1.0 / norm_type)
    if error_if_nonfinite and not bool(torch.isfinite(total)):
        raise RuntimeError(
            f"fsep_clip_grad_norm_: the total norm of order {norm_type} of the gradients is non-finite"
        )
    with implicit_replication():  # DTensor gradients times the plain clip coefficient
        torch.nn.utils.clip_grads_with_norm_(experts + dense, max_norm, total, foreach=foreach)
    return total


def _layer_names(model: nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules() if isinstance(m, FSEPExperts)}


def fsep_full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the model's state dict with every FSEP layer as the original HF
    ``<prefix>.gate_up_proj [E, 2I, H]`` / ``<prefix>.down_proj [E, H, I]`` (the module state-dict
    keys of the unconverted model; full experts on the CPU when the shards are on an accelerator) and
    FSDP2 ``DTensor`` entries as full tensors. ``model.state_dict()`` alone gives the same keys (it
    gathers the experts too, so it is collective) with the ``DTensor`` entries as they are."""
    sd = {}
    for k, v in model.state_dict().items():
        full_tensor = getattr(v, "full_tensor", None)  # DTensor (FSDP2 dense part): collective
        sd[k] = full_tensor() if callable(full_tensor) else v
    return sd


@contextlib.contextmanager
def _hf_modules_restored(model: nn.Module, full: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily put the original HF experts modules (with full weights) back into ``model``."""
    swapped = []
    for qname, tmpl in model._fsep_templates.items():
        parent_name, _, attr = qname.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        fsep = getattr(parent, attr)
        orig = copy.deepcopy(tmpl).to_empty(device=full[f"{qname}.gate_up_proj"].device)
        with torch.no_grad():
            orig.gate_up_proj.copy_(full[f"{qname}.gate_up_proj"])
            orig.down_proj.copy_(full[f"{qname}.down_proj"])
        setattr(parent, attr, orig)
        swapped.append((parent, attr, fsep))
    try:
        yield
    finally:
        for parent, attr, fsep in swapped:
            setattr(parent, attr, fsep)


def save_fsep_pretrained(model: nn.Module, save_directory: str, **kwargs: Any) -> None:
    """Collective: gather the expert shards (and, under FSDP2, the dense ``DTensor`` entries) and write an
    ordinary HF checkpoint from rank 0 (``model.save_pretrained(..., state_dict=<the gathered state
    dict>)`` with the original experts modules put back); loads with ``from_pretrained``. An error on
    rank 0 is raised on every rank."""
    full = fsep_full_state_dict(model)
    failed = None
    if dist.get_rank() == 0:
        hook_attrs = {}
        try:
            with _hf_modules_restored(model, full):
                # the DDP ignore list names FSEP parameters that do not exist in the HF modules
                hook_attrs["_ddp_params_and_buffers_to_ignore"] = model.__dict__.pop(
                    "_ddp_params_and_buffers_to_ignore", None
                )
                try:
                    # the gathered state dict: the model's own holds FSDP2 DTensors
                    model.save_pretrained(save_directory, state_dict=full, **kwargs)
                finally:
                    if hook_attrs["_ddp_params_and_buffers_to_ignore"] is not None:
                        model._ddp_params_and_buffers_to_ignore = hook_attrs[
                            "_ddp_params_and_buffers_to_ignore"
                        ]
        except Exception as exc:
            failed = exc
    # doubles as the barrier; the other ranks learn that rank 0 failed instead of waiting for it
    flag = torch.tensor([0.0 if failed is None else 1.0], device=fsep_layers(model)[0].expert_param.device)
    dist.all_reduce(flag)
    if failed is not None:
        raise failed
    if flag.item():
        raise RuntimeError("save_fsep_pretrained: saving failed on rank 0 (see its error)")


def load_fsep_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Load an HF-format state dict (full tensors, the same on every rank) into a prepared model: each rank
    keeps its expert shard, and entries of FSDP2-sharded (``DTensor``) parameters are cut to this rank's
    part (``distribute_tensor`` with the parameter's mesh and placements, no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    names = _layer_names(model)
    for layer in fsep_layers(model):
        for leaf in ("gate_up_proj", "down_proj"):
            if f"{names[id(layer)]}.{leaf}" not in state_dict:
                raise KeyError(f"load_fsep_state_dict: {names[id(layer)]}.{leaf} missing from the state dict")
    current = dict(model.named_parameters(remove_duplicate=False))
    current.update(model.named_buffers(remove_duplicate=False))
    sd = dict(state_dict)
    for k, v in sd.items():
        cur = current.get(k)
        if isinstance(cur, DTensor) and not isinstance(v, DTensor):
            v = v.to(device=cur.device, dtype=cur.dtype)
            sd[k] = distribute_tensor(v, cur.device_mesh, cur.placements, src_data_rank=None)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if strict and (missing or unexpected):
        raise KeyError(f"load_fsep_state_dict: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")


def remove_fsep(model: nn.Module) -> nn.Module:
    """Collective: undo :func:`prepare_fsep` (original HF experts modules with the full weights, on the device and in
    the dtype the FSEP layers have now, with their ``requires_grad`` and train / eval mode).

    Raises:
        ValueError: ``model`` is not prepared (never, or removed already); nothing is changed.
    """
    if getattr(model, "_fsep_state", None) is None:
        raise ValueError(
            "remove_fsep: model has no FSEP layers (prepare_fsep was never called on it, or remove_fsep already undid it)"
        )
    full = fsep_full_state_dict(model)
    removed = [model.get_submodule(q) for q in model._fsep_templates]
    for qname in model._fsep_templates:
        parent_name, _, attr = qname.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        tmpl = model._fsep_templates[qname]
        layer = getattr(parent, attr)
        # the device and dtype of the shards (the gathered experts of a state dict may be on the CPU; the template
        # keeps the dtype of prepare_fsep's time, and the model may have been cast since)
        orig = (
            copy.deepcopy(tmpl).to(dtype=layer.expert_param.dtype).to_empty(device=layer.expert_param.device)
        )
        with torch.no_grad():
            orig.gate_up_proj.copy_(full[f"{qname}.gate_up_proj"])
            orig.down_proj.copy_(full[f"{qname}.down_proj"])
        # as the FSEP layer is now (the template keeps the flags of prepare_fsep's time)
        orig.gate_up_proj.requires_grad_(layer.expert_param.requires_grad)
        orig.down_proj.requires_grad_(layer.expert_param.requires_grad)
        orig.train(layer.training)
        setattr(parent, attr, orig)
    model._fsep_hook.remove()
    _unregister_expert_params(removed)
    fsep_names = {f"{q}.{p}" for q in model._fsep_templates for p in ("expert_shards", "expert_weights")}
    rest = [n for n in getattr(model, "_ddp_params_and_buffers_to_ignore", []) if n not in fsep_names]
    if rest or model._fsep_had_ddp_ignore:
        model._ddp_params_and_buffers_to_ignore = rest  # the list it had, in its order
    elif hasattr(model, "_ddp_params_and_buffers_to_ignore"):
        del model._ddp_params_and_buffers_to_ignore  # prepare_fsep added it
    for attr in ("_fsep_state", "_fsep_templates", "_fsep_hook", "_fsep_config", "_fsep_had_ddp_ignore"):
        delattr(model, attr)
    if getattr(vars(model).get("generate"), "__func__", None) is _fsep_generate:
        del model.generate
    return model


@dataclass
class FSEPPlugin:
    """Accelerate-facing wrapper: ``model = FSEPPlugin(FSEPConfig()).prepare_model(model)`` before
    ``accelerator.prepare(model, optimizer)``.

    Accelerate has no third-party plugin registry; this object carries the config and offers the
    FSEP-aware steps (prepare, FSDP2 for the dense part, HF-format save).
    """

    config: FSEPConfig = field(default_factory=FSEPConfig)

    def __post_init__(self) -> None:
        if self.config is None:
            self.config = FSEPConfig()
        elif not isinstance(self.config, FSEPConfig):
            raise ValueError(
                f"FSEPPlugin: config must be an FSEPConfig or None, got {type(self.config).__name__} "
                f"{self.config!r}; build one with FSEPConfig(**fields)"
            )

    def prepare_model(self, model: nn.Module, accelerator: Any = None, group: Any = None) -> nn.Module:
        """:func:`prepare_fsep` (DDP launched by ``accelerator.prepare`` will skip the expert params); with
        ``accelerator``, the model is first moved to ``accelerator.device`` (the experts are sharded there)."""
        if accelerator is not None:
            _check(
                model, self.config, group, device_check=False
            )  # a model that would be refused is not moved
            model = model.to(accelerator.device)
        return prepare_fsep(model, self.config, group=group)

    def apply_fsdp2(
        self, model: nn.Module, mesh: Any = None, layer_attr: str = "layers", **kwargs: Any
    ) -> nn.Module:
        """Shard the dense part with FSDP2 ``fully_shard`` (each decoder layer, then the root), leaving
        the FSEP expert parameters to FSEP (``ignored_params``)."""
        from torch.distributed.fsdp import fully_shard

        ignored = fsep_expert_parameters(model)
        inner = getattr(model, "model", model)
        for block in getattr(inner, layer_attr, []):
            fully_shard(block, mesh=mesh, ignored_params=ignored, **kwargs)
        fully_shard(model, mesh=mesh, ignored_params=ignored, **kwargs)
        return model

    def save_pretrained(self, model: nn.Module, save_directory: str, **kwargs: Any) -> None:
        """Collective HF-format save (see :func:`save_fsep_pretrained`)."""
        save_fsep_pretrained(model, save_directory, **kwargs)

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Collective HF-format state dict (see :func:`fsep_full_state_dict`)."""
        return fsep_full_state_dict(model)

    @staticmethod
    def layouts(model: nn.Module) -> list[Any]:
        """The current layout of every FSEP layer."""
        return [layer.layout for layer in fsep_layers(model)]
