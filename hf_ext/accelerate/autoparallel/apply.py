"""Runtime: apply a :class:`Plan` to a transformers model with torch's own engines.

* data parallel ``ddp``: ``torch.nn.parallel.DistributedDataParallel`` (tp == 1, pp == 1) with bf16 autocast;
* data parallel ``fsdp``: FSDP2 ``fully_shard`` per decoder layer on the data-parallel mesh, with
  ``reshard_after_forward=True`` for zero3 layers and ``False`` for zero2 layers, then on the root
  (embedding / head), with ``MixedPrecisionPolicy(param_dtype, reduce_dtype=float32)``;
* tensor parallel: DTensor ``parallelize_module`` with the colwise / rowwise plan of the Llama family
  (q/k/v/gate/up colwise, o/down rowwise) on the ``tp`` mesh dimension; sequence parallelism is not
  applied at runtime (the layers run plain TP and a warning says so);
* activation checkpointing: per layer through transformers' own ``GradientCheckpointingLayer`` switch
  (``layer.gradient_checkpointing`` + ``torch.utils.checkpoint`` non-reentrant);
* pipeline: ``torch.distributed.pipelining.PipelineStage`` + ``Schedule1F1B`` over a stage module that
  reuses the model's embedding, decoder layers, norm and head (sdpa attention required).

The mesh is ``(pp, dp, tp)`` (tp innermost, as the cost model assumes).

Example (single process, world size 1):
    >>> import os, torch.distributed as dist
    >>> from hf_ext.testing import tiny_llama, free_port
    >>> os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    >>> dist.init_process_group("gloo", rank=0, world_size=1)
    >>> plan = Plan.uniform("tiny", gpus=1, dp_type="fsdp", ckpt=True, global_batch=2, seq_len=8)
    >>> runner = apply_plan(tiny_llama().train(), plan, param_dtype=None)
    >>> ids = torch.randint(0, 500, (2, 8))
    >>> runner.train_step(ids) > 0
    True
    >>> dist.destroy_process_group()
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from typing import Any

import torch

from hf_ext.accelerate.autoparallel.plan import Plan
from hf_ext.accelerate.autoparallel.profiler import _find_layers


class AppliedPlan:
    """A model prepared by :func:`apply_plan`, with a micro-batched training step.

    :func:`apply_plan` creates process groups for the mesh (one per mesh dimension that is not the whole
    world). :meth:`close` (or leaving a ``with runner:`` block) destroys them; call it on every rank once
    the runner is no longer needed, e.g. before applying another plan in the same process.

    Attributes:
        module: the prepared module (DDP wrapper, FSDP2-sharded model, or this rank's pipeline stage).
        plan: the plan.
        mesh: the ``DeviceMesh`` (dims ``pp``, ``dp``, ``tp``).
        model: the transformers model given to :func:`apply_plan` (with a pipeline plan it still holds every
            layer, but this rank trains only its stage's, and only the stage was moved to the device).
        stage_layers: ``(start, end)``, the global decoder-layer range of this rank's pipeline stage
            (``None`` when ``plan.pp == 1``).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        plan: Plan,
        mesh: Any,
        device: torch.device,
        autocast_dtype: torch.dtype | None,
        schedule: Any = None,
        stage_module: Any = None,
        pipeline_loss: Any = None,
        owned_groups: list | None = None,
        model: torch.nn.Module | None = None,
        stage_layers: tuple[int, int] | None = None,
    ) -> None:
        self.module, self.plan, self.mesh, self.device = module, plan, mesh, device
        self.model, self.stage_layers = model, stage_layers
        self.autocast_dtype, self.schedule, self.stage_module = autocast_dtype, schedule, stage_module
        self.pipeline_loss = pipeline_loss
        self._owned_groups = list(owned_groups or [])
        self.closed = False
        self._padding_warned = False
        from torch.nn.parallel import DistributedDataParallel

        inner = module.module if isinstance(module, DistributedDataParallel) else module
        self._loss_kwargs = schedule is None and _accepts_loss_kwargs(inner)

    def _warn_unplanned_padding(self, mask: torch.Tensor) -> None:
        """Warn once when a plan searched without ``padding_mask`` trains on batches with pads under sdpa: every
        layer then keeps a ``[b, 1, s, s]`` mask its memory prediction left out."""
        attn = getattr(getattr(self.model or self.module, "config", None), "_attn_implementation", "sdpa")
        if attn != "sdpa" or not bool((mask == 0).any()):
            return
        self._padding_warned = True
        warnings.warn(
            "train_step: attention_mask has pads, but the plan was searched with padding_mask=False; under sdpa "
            "every layer then keeps a [micro_batch, 1, seq, seq] mask that the plan's memory prediction leaves out. "
            "Search with padding_mask=True (hf-ext plan --padding-mask) to count it.",
            stacklevel=3,
        )

    def close(self) -> None:
        """Destroy the process groups :func:`apply_plan` created for this runner (call on every rank).

        The runner cannot train afterwards; the module keeps its (sharded) parameters. Calling it again,
        or after ``torch.distributed.destroy_process_group()``, does nothing. It also clears DTensor's
        sharding-propagation caches, which would otherwise hand a later runner with the same mesh layout specs
        on these destroyed groups."""
        groups, self._owned_groups, self.closed = self._owned_groups, [], True
        _destroy_groups(groups)

    def __enter__(self) -> AppliedPlan:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Collective (call on every rank): write the whole model in Hugging Face format (``from_pretrained``
        loads it on one process). The sharded / tensor-parallel parameters are gathered to rank 0, which saves
        them with the model's own ``save_pretrained`` (``kwargs`` are passed on). A plain ``save_pretrained`` on
        the prepared model writes no weights file under transformers 5 (the parameters are DTensors).

        With a pipeline plan each stage gathers its own parameters (every rank of the stage takes part), renames
        them from stage-local to the model's names (``layers.{i}`` -> e.g. ``model.layers.{start + i}``) and its
        first data / tensor-parallel rank sends them to rank 0 one tensor at a time; rank 0 saves the assembled
        state dict. The names must be exactly those of ``model.state_dict()``: a ``ValueError`` on every rank
        names the missing / extra ones otherwise."""
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from torch.nn.parallel import DistributedDataParallel

        if self.closed:
            raise RuntimeError("save_pretrained: this runner was closed (its process groups are gone)")
        if self.plan.pp > 1:
            state = self._gather_pipeline_state()
            if dist.get_rank() == 0:
                self.model.save_pretrained(save_directory, state_dict=state, **kwargs)
            dist.barrier()
            return
        inner = self.module.module if isinstance(self.module, DistributedDataParallel) else self.module
        state = get_model_state_dict(inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if dist.get_rank() == 0:
            inner.save_pretrained(save_directory, state_dict=state, **kwargs)
        dist.barrier()

    def _gather_pipeline_state(self) -> dict[str, torch.Tensor]:
        """Collective: the whole model's full CPU state dict on rank 0 (``{}`` elsewhere) from the pipeline stages.

        ``get_model_state_dict(full_state_dict=True, cpu_offload=True)`` keeps the values on global rank 0 only, so
        each stage gathers its (FSDP / TP) DTensors itself, tensor by tensor, and its leader (dp and tp rank 0)
        sends each full tensor to rank 0 (which leads stage 0): no rank holds more than one gathered tensor on the
        device at a time."""
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from torch.distributed.tensor import DTensor

        expected = list(self.model.state_dict())
        local = get_model_state_dict(self.stage_module, options=StateDictOptions(full_state_dict=False))
        names = _pipeline_global_names(self.stage_module, self.model, list(local), set(expected))
        leader = self.mesh["dp"].get_local_rank() == 0 and self.mesh["tp"].get_local_rank() == 0
        meta = [(names[k], local[k].shape, local[k].dtype) for k in names] if leader else []
        every: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(every, meta)  # every rank checks the names, so all raise together
        leaders = [int(self.mesh.mesh[s, 0, 0]) for s in range(self.plan.pp)]
        _check_state_names([n for r in leaders for n, _, _ in every[r]], expected)
        rank, state = dist.get_rank(), {}
        for key in names:  # this stage: gather each tensor (all its ranks), the leader sends it to rank 0
            value = local[key]
            full = value.full_tensor() if isinstance(value, DTensor) else value
            if rank == 0:
                state[names[key]] = full.detach().cpu()
            elif leader:
                dist.send(full.detach().contiguous(), dst=0)
        if rank == 0:
            for src in leaders[1:]:
                for name, shape, dtype in every[src]:
                    buf = torch.empty(shape, dtype=dtype, device=self.device)
                    dist.recv(buf, src=src)
                    state.setdefault(name, buf.cpu())
        return state

    def parameters(self) -> Any:
        """This rank's parameters (its shard / stage). With tensor parallelism some are DTensors and some
        plain tensors; give the optimizer :meth:`param_groups` instead."""
        return (self.stage_module or self.module).parameters()

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups: DTensor and plain-tensor parameters in separate groups.

        A tensor-parallel plan without FSDP leaves norms / embeddings as plain tensors beside the DTensor
        projections; a ``foreach`` optimizer (the default on CUDA) refuses one group mixing both."""
        from torch.distributed.tensor import DTensor

        groups: dict[bool, list[torch.nn.Parameter]] = {True: [], False: []}
        for p in self.parameters():
            groups[isinstance(p, DTensor)].append(p)
        return [{"params": ps} for ps in groups.values() if ps]

    @property
    def dp_rank(self) -> int:
        return self.mesh["dp"].get_local_rank()

    def local_batch(self, global_batch: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a ``[global_batch, seq]`` tensor (split over the dp dimension): the input ids, the
        labels and the attention mask of one global batch are split the same way (contiguous blocks of rows).

        Raises:
            ValueError: ``global_batch`` does not have the plan's ``global_batch`` rows (a slice of another
                batch size would drop rows or give ``train_step`` a batch the plan was not made for)."""
        rows = global_batch.shape[0] if global_batch.dim() else None
        if rows != self.plan.global_batch:
            raise ValueError(
                f"local_batch: global_batch must have plan.global_batch={self.plan.global_batch} rows, got a tensor "
                f"of shape {tuple(global_batch.shape)}"
            )
        per = global_batch.shape[0] // self.plan.dp
        return global_batch[self.dp_rank * per : (self.dp_rank + 1) * per]

    def _autocast(self) -> Any:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _dp_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.plan.dp > 1:
            torch.distributed.all_reduce(t, group=self.mesh["dp"].get_group())
        return t

    def train_step(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> float:
        """Forward + backward of this rank's local batch ``[micro_batch * num_micro_batches, seq]``.

        ``attention_mask`` (``[rows, seq]`` like ``input_ids``, bool or integer 0 / 1, 1 = attend; default ``None``:
        every token attended) is what transformers models take: pad positions (0) are not attended to, so a
        left-padded batch trains as ``model(input_ids, attention_mask=mask, labels=...)`` does on one process. Every
        plan honours it: DDP / FSDP2 / tensor-parallel / checkpointed plans pass each micro-batch's rows of it to the
        model, a pipeline plan gives it to every stage's ``step`` so the schedule splits it into the same
        micro-batches as ``input_ids`` and each stage builds the layers' mask from it with transformers'
        ``create_causal_mask``. Positions are ``0 .. seq-1`` in every row, as in the model's own forward without
        ``position_ids``. Split a global mask with :meth:`local_batch`, as the ids.

        Targets: with ``labels=None`` they are ``input_ids``, with ``-100`` where ``attention_mask == 0`` (pad tokens
        are never targets), as transformers users expect. Given ``labels`` are used as they are: the mask changes
        what is attended to, not which tokens are targets, so put ``-100`` at the pads yourself (as transformers'
        ``DataCollatorForLanguageModeling`` does).

        The loss is the token mean over the *global* batch, as one process training on the whole batch
        computes it (and as transformers' ``num_items_in_batch`` does): the target tokens (``labels[:, 1:]``
        other than ``-100``) are counted and summed over the data-parallel group, and each micro-batch's
        summed token loss is divided by that count (and multiplied by the data-parallel degree, which
        DDP / FSDP2 divide by when they average the gradients). So every plan gives the same gradient for
        the same global batch, padded or not. Gradients are accumulated over the plan's micro-batches and
        synchronised over the data-parallel group (DDP: once, on the last micro-batch; FSDP2:
        reduce-scattered every micro-batch, as the cost model assumes).

        It puts the module in training mode first, as transformers' ``Trainer`` does every step: a model from
        ``from_pretrained`` starts in eval mode, where transformers' layers skip activation checkpointing (and
        dropout), so the plan's checkpointed layers would keep all their activations.

        Example (``runner`` from :func:`apply_plan`; ``batch`` from a tokenizer with ``padding_side="left"``):
            >>> ids, mask = runner.local_batch(batch.input_ids), runner.local_batch(batch.attention_mask)  # doctest: +SKIP
            >>> loss = runner.train_step(ids, attention_mask=mask)  # doctest: +SKIP

        Returns:
            The token-mean loss of the global batch (the same on every rank; the caller steps the
            optimizer). A batch without any target token gives 0 and zero gradients.

        Raises:
            ValueError: ``input_ids`` is not ``[micro_batch * num_micro_batches, seq]``, ``labels`` (when given)
                has another shape, or ``attention_mask`` (when given) is not a tensor of the shape of ``input_ids``
                with a bool or integer dtype holding only 0 and 1 (checked on this rank before any forward or
                collective).
        """
        if self.closed:
            raise RuntimeError("this AppliedPlan was closed (its process groups are destroyed)")
        plan = self.plan
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a [rows, seq] tensor, got shape {tuple(input_ids.shape)}")
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(
                f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}"
            )
        _check_attention_mask(attention_mask, input_ids)
        if attention_mask is not None and not plan.padding_mask and not self._padding_warned:
            self._warn_unplanned_padding(attention_mask)
        want = plan.micro_batch * plan.num_micro_batches
        if input_ids.shape[0] != want:
            raise ValueError(
                f"input_ids has {input_ids.shape[0]} rows; the plan's local batch is "
                f"micro_batch*num_micro_batches = {want}"
            )
        self.module.train()  # checkpointing (and dropout) act in training mode only
        input_ids = input_ids.to(self.device)
        mask = None if attention_mask is None else attention_mask.to(self.device)
        if labels is not None:
            labels = labels.to(self.device)
        elif mask is not None:  # pad positions are not targets
            labels = input_ids.masked_fill(mask == 0, _IGNORE_INDEX)
        else:
            labels = input_ids
        num_items = self._dp_sum((labels[:, 1:] != _IGNORE_INDEX).sum().reshape(1)).clamp_min(1)
        if self.schedule is not None:
            self.pipeline_loss.num_items = num_items[0]
            return self._pipeline_step(input_ids, labels, mask)
        m = plan.num_micro_batches
        masks = mask.chunk(m) if mask is not None else [None] * m
        total = torch.zeros(1, device=self.device)
        for i, (x, y, am) in enumerate(zip(input_ids.chunk(m), labels.chunk(m), masks)):
            last = i == m - 1
            ctx = (
                self.module.no_sync()
                if (hasattr(self.module, "no_sync") and not last)
                else contextlib.nullcontext()
            )
            with ctx:
                with self._autocast():
                    if self._loss_kwargs:
                        loss = self.module(
                            input_ids=x,
                            attention_mask=am,
                            labels=y,
                            use_cache=False,
                            num_items_in_batch=num_items[0],
                        ).loss
                    else:
                        logits = self.module(input_ids=x, attention_mask=am, use_cache=False).logits
                        loss = _causal_lm_loss_sum(logits, y) / num_items[0]
                (loss * plan.dp).backward()
            total += loss.detach().float()
        return float(self._dp_sum(total).item())

    def _pipeline_step(
        self, input_ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None
    ) -> float:
        pp_rank = self.mesh["pp"].get_local_rank()
        losses: list[torch.Tensor] = []
        # keyword inputs reach every stage's forward; the schedule splits them into the micro-batches of input_ids
        extra = {} if mask is None else {"attention_mask": mask}
        with self._autocast():
            if pp_rank == 0:
                self.schedule.step(input_ids, target=labels, losses=losses, **extra)
            elif pp_rank == self.plan.pp - 1:
                self.schedule.step(target=labels, losses=losses, **extra)
            else:
                self.schedule.step(**extra)
        t = torch.zeros(1, device=self.device)
        if losses:
            t += torch.stack([x.detach().float() for x in losses]).sum() / self.plan.dp
        # The last stage holds the loss: broadcast it along the pipeline, then sum over the replicas.
        torch.distributed.all_reduce(t, group=self.mesh["pp"].get_group())
        return float(self._dp_sum(t).item())


def _check_attention_mask(mask: Any, input_ids: torch.Tensor) -> None:
    """Refuse an ``attention_mask`` that is not a ``[rows, seq]`` 0 / 1 (bool or integer) tensor like ``input_ids``."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise ValueError(
            f"attention_mask must be None or a torch.Tensor of 0 / 1 (bool or integer), got {type(mask).__name__}"
        )
    if mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool and (mask.dtype.is_floating_point or mask.dtype.is_complex):
        raise ValueError(
            f"attention_mask must be a bool or integer tensor of 0 / 1 (1 = attend, 0 = padding), got {mask.dtype}"
        )
    if mask.dtype != torch.bool:
        bad = mask[(mask != 0) & (mask != 1)]
        if bad.numel():
            shown = sorted({int(v) for v in bad.flatten()[:1000].tolist()})[:5]
            raise ValueError(
                f"attention_mask must hold only 0 (padding) and 1 (attend); got {bad.numel()} other value(s), e.g. "
                f"{shown}"
            )


class _PipelineStageModule(torch.nn.Module):
    """Layers ``[start, end)`` of a Llama-style causal LM, plus the embedding (first) / norm + head (last)."""

    def __init__(self, model: torch.nn.Module, start: int, end: int, first: bool, last: bool) -> None:
        super().__init__()
        inner = model.model
        self.embed_tokens = inner.embed_tokens if first else None
        self.layers = torch.nn.ModuleList(list(_find_layers(model))[start:end])
        self.rotary_emb = inner.rotary_emb
        self.norm = inner.norm if last else None
        self.lm_head = model.get_output_embeddings() if last else None
        self.config = model.config

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: token ids ``[b, s]`` (first stage) or hidden states ``[b, s, h]``; ``attention_mask``: this
        micro-batch's ``[b, s]`` padding mask (``None``: the kernel's causal masking alone)."""
        h = self.embed_tokens(x) if self.embed_tokens is not None else x
        pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        pe = self.rotary_emb(h, pos)
        mask = None if attention_mask is None else _causal_mask(self.config, h, attention_mask, pos)
        for layer in self.layers:
            out = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=pe, use_cache=False)
            h = out[0] if isinstance(out, tuple) else out
        if self.lm_head is not None:
            h = self.lm_head(self.norm(h))
        return h


def _causal_mask(
    config: Any, embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
) -> Any:
    """The decoder layers' mask for a ``[b, s]`` padding mask, as the model's own forward builds it (transformers'
    ``create_causal_mask`` for the config's attention implementation, no cache). The cache argument's name changed
    between transformers 5 releases (``past_key_values`` -> ``cache``), so it is passed under the name there is."""
    from transformers.masking_utils import create_causal_mask

    params = inspect.signature(create_causal_mask).parameters
    kwargs: dict[str, Any] = {"attention_mask": attention_mask, "position_ids": position_ids}
    kwargs.update({name: None for name in ("cache", "past_key_values") if name in params})
    return create_causal_mask(config, embeds, **kwargs)


def _pipeline_global_names(
    stage: torch.nn.Module, model: torch.nn.Module, keys: list[str], expected: set[str]
) -> dict[str, str]:
    """Map a stage module's state-dict ``keys`` to ``model``'s names (``{local: global}``), in ``keys``' order.

    The stage holds references to the model's own modules, so each stage-level child (``embed_tokens``,
    ``layers.{i}``, ``rotary_emb``, ``norm``, ``lm_head``) is renamed to where that module object sits in
    ``model`` (e.g. ``layers.0`` of the second stage -> ``model.layers.{start}``). Keys the model's state dict
    does not have are kept (and then reported by :func:`_check_state_names`), except the rotary embedding's
    buffers, which every stage holds."""
    where = {id(m): n for n, m in model.named_modules()}
    prefixes = {f"layers.{i}": where[id(layer)] for i, layer in enumerate(stage.layers)}
    for child, mod in stage.named_children():
        if child != "layers":
            prefixes[child] = where[id(mod)]
    out = {}
    for key in keys:
        head, _, rest = key.partition(".")
        if head == "layers":
            idx, _, rest = rest.partition(".")
            head = f"layers.{idx}"
        name = f"{prefixes[head]}.{rest}" if prefixes.get(head) else key
        if head == "rotary_emb" and name not in expected:
            continue
        out[key] = name
    return out


def _check_state_names(names: list[str], expected: list[str]) -> None:
    """Refuse an assembled pipeline state dict whose names are not exactly ``expected`` (the model's)."""
    have, want = set(names), set(expected)
    missing, extra = sorted(want - have), sorted(have - want)
    if missing or extra:
        raise ValueError(
            "save_pretrained: the pipeline stages' parameters do not map onto the model's state dict: "
            f"missing {missing}, extra {extra}"
        )


_IGNORE_INDEX = -100


def _causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross entropy (targets ``labels[:, 1:]``, ``-100`` ignored)."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=_IGNORE_INDEX,
        reduction="sum",
    )


class _PipelineLoss:
    """The last stage's loss: a micro-batch's share of the global token mean, times dp (DDP / FSDP2
    average the gradients over dp). ``num_items`` (the global target-token count) is set every step."""

    def __init__(self, dp: int) -> None:
        self.dp, self.num_items = dp, None

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return _causal_lm_loss_sum(logits, labels) / self.num_items * self.dp


def _accepts_loss_kwargs(model: torch.nn.Module) -> bool:
    """Whether ``model.forward`` takes ``num_items_in_batch`` (as transformers' Trainer decides it)."""
    flag = getattr(model, "accepts_loss_kwargs", None)
    if flag is not None:
        return bool(flag)
    params = inspect.signature(model.forward).parameters.values()
    return any(p.kind is inspect.Parameter.VAR_KEYWORD or p.name == "num_items_in_batch" for p in params)


def _set_checkpointing(layers: Any, flags: list[bool]) -> None:
    from torch.utils.checkpoint import checkpoint

    fn = functools.partial(checkpoint, use_reentrant=False)
    for layer, on in zip(layers, flags):
        if not hasattr(layer, "gradient_checkpointing"):
            raise ValueError(f"{type(layer).__name__} is not a transformers GradientCheckpointingLayer")
        layer.gradient_checkpointing = bool(on)
        if on:
            layer._gradient_checkpointing_func = fn


_LLAMA_TP = {
    "self_attn.q_proj": "colwise",
    "self_attn.k_proj": "colwise",
    "self_attn.v_proj": "colwise",
    "self_attn.o_proj": "rowwise",
    "mlp.gate_proj": "colwise",
    "mlp.up_proj": "colwise",
    "mlp.down_proj": "rowwise",
}


def _tp_unsupported(layer: torch.nn.Module) -> str:
    """Why ``layer`` cannot take the Llama tensor-parallel plan (``""`` when it can): a projection missing, or a
    parameter inside the attention / MLP outside the plan (Qwen3's ``q_norm`` / ``k_norm`` act on this rank's heads
    only, and their gradients would never be summed over the tp ranks)."""
    names = {n for n, _ in layer.named_modules()}
    missing = [k for k in _LLAMA_TP if k not in names]
    if missing:
        return f"tensor parallelism supports Llama-style layers; {type(layer).__name__} lacks {missing}"
    extra = sorted(
        {
            n.rpartition(".")[0]
            for n, _ in layer.named_parameters()
            if n.startswith(("self_attn.", "mlp.")) and n.rpartition(".")[0] not in _LLAMA_TP
        }
    )
    if extra:
        return (
            f"tensor parallelism supports Llama-style layers; {type(layer).__name__} has parameters outside the "
            f"tensor-parallel plan inside its attention / MLP ({extra}), which would see one rank's shard only and "
            "train differently on each rank: use a plan with tp=1"
        )
    return ""


# attention kernels that mask causally without a mask tensor (the pipeline stages pass none without an attention_mask)
_PIPELINE_ATTN = ("sdpa", "flash_attention_2", "flash_attention_3")

_SHAPE_FIELDS = (
    "num_layers",
    "hidden_size",
    "intermediate_size",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "vocab_size",
)


def _check_model_for_plan(model: torch.nn.Module, plan: Plan, layers: Any) -> None:
    """Refuse what the runtime would run silently wrong (before :func:`apply_plan` changes anything)."""
    from hf_ext.accelerate.autoparallel.shapes import get_shape

    mine, planned = get_shape(model), plan.shape
    diff = {
        f: (getattr(planned, f), getattr(mine, f))
        for f in _SHAPE_FIELDS
        if getattr(planned, f) != getattr(mine, f)
    }
    if diff:
        raise ValueError(
            f"the plan was made for another model shape ({planned.name}): "
            + ", ".join(f"{f} {a} in the plan, {b} in the model" for f, (a, b) in diff.items())
            + "; search a plan for this model (hf-ext plan --model <its config.json>)"
        )
    cfg = model.config
    if plan.tp > 1:
        heads = {
            "num_attention_heads": mine.num_heads,
            "num_key_value_heads": mine.num_kv_heads,
        }
        for name, n in heads.items():
            if n % plan.tp:
                raise ValueError(
                    f"plan.tp={plan.tp} must divide the model's {name}={n} (each tensor-parallel rank takes whole "
                    "attention heads): use a plan whose tp divides it"
                )
        for layer in layers:
            why = _tp_unsupported(layer)
            if why:
                raise ValueError(why)
    if plan.pp > 1:
        if plan.num_micro_batches < plan.pp:
            raise ValueError(
                f"plan.num_micro_batches={plan.num_micro_batches} must be at least plan.pp={plan.pp} (the 1F1B "
                "pipeline schedule needs a micro-batch per stage): use a smaller micro_batch"
            )
        attn = getattr(cfg, "_attn_implementation", "sdpa")
        if attn not in _PIPELINE_ATTN:
            raise ValueError(
                f"pipeline plans need attn_implementation in {list(_PIPELINE_ATTN)} (without an attention_mask the "
                f"stages pass no mask and rely on the kernel's causal masking); the model has {attn!r}"
            )
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()
        if head is not None and emb is not None and head.weight is emb.weight:
            raise ValueError(
                "pipeline plans put the embedding on the first stage and the LM head on the last; this model ties "
                "them (tie_word_embeddings=True) and nothing would keep the two copies equal: use a plan with pp=1 "
                "or a model with untied embeddings"
            )
        window = getattr(cfg, "sliding_window", None)
        kinds = getattr(cfg, "layer_types", None) or ()
        if window is not None and (not kinds or "sliding_attention" in kinds):
            raise ValueError(
                f"pipeline stages run plain causal attention; this model has sliding_window={window}: use a plan "
                "with pp=1"
            )


def _apply_tp(layers: Any, tp_mesh: Any) -> None:
    """Shard ``layers`` with the Llama tp plan (``_check_model_for_plan`` has refused layers it does not fit)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    for layer in layers:
        parallelize_module(layer, tp_mesh, {k: styles[v]() for k, v in _LLAMA_TP.items()})


def unsupported_reason(plan: Plan) -> str:
    """Why :func:`apply_plan` cannot run ``plan`` (``""`` when it can)."""
    if plan.dp_type == "ddp" and plan.dp > 1 and plan.pp > 1:
        return "pipeline + ddp: use dp_type='fsdp' for pipeline plans"
    if plan.dp_type == "ddp" and plan.dp > 1 and plan.tp > 1:
        return "ddp with tensor parallelism: use dp_type='fsdp' (HSDP) for tp plans"
    return ""


# compute dtypes apply_plan takes (autocast for ddp, FSDP2's param_dtype)
_PARAM_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def apply_plan(
    model: torch.nn.Module,
    plan: Plan,
    *,
    device: str | torch.device | None = None,
    param_dtype: torch.dtype | None = torch.bfloat16,
) -> AppliedPlan:
    """Prepare ``model`` for training with ``plan`` on the current ``torch.distributed`` world.

    Args:
        model: a transformers causal LM with ``model.layers`` (Llama family for tp / pp).
        plan: from :func:`~hf_ext.accelerate.autoparallel.search.search` or :meth:`Plan.uniform`;
            ``plan.gpus`` must equal the world size.
        device: where to run (default: ``cuda:<local rank>`` with NCCL, else ``cpu``).
        param_dtype: compute dtype (bf16 autocast for ddp, FSDP2 ``param_dtype``): ``torch.bfloat16``,
            ``torch.float16`` or ``torch.float32``; ``None`` keeps fp32.

    Returns:
        An :class:`AppliedPlan` (``.module``, ``.param_groups()`` for the optimizer, ``.train_step(ids)``;
        ``.close()`` or ``with`` destroys the process groups this call created).

    A call that raises destroys the process groups it created and puts the layers' activation checkpointing back
    as it was (a model already moved to ``device`` stays there, and FSDP2 / tensor-parallel sharding applied before
    the error is not undone).
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if param_dtype is not None and param_dtype not in _PARAM_DTYPES:
        raise ValueError(
            "apply_plan: param_dtype must be None, "
            + ", ".join(f"torch.{str(d).rpartition('.')[2]}" for d in _PARAM_DTYPES)
            + f"; got {param_dtype!r}"
        )
    if not dist.is_initialized():
        raise RuntimeError("apply_plan needs torch.distributed initialised (torchrun / accelerate launch)")
    world = dist.get_world_size()
    if world != plan.gpus:
        raise ValueError(f"plan.gpus={plan.gpus} but the torch.distributed world size is {world}")
    layers = _find_layers(model)
    if len(layers) != len(plan.layers):
        raise ValueError(f"the plan has {len(plan.layers)} layers, the model has {len(layers)}")
    reason = unsupported_reason(plan)
    if reason:
        raise NotImplementedError(reason)
    _check_model_for_plan(model, plan, layers)  # before any state change
    attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if attn is not None and attn != plan.attn_implementation:
        from hf_ext.accelerate.autoparallel.cost_model import ATTN_IMPLEMENTATIONS

        if attn in ATTN_IMPLEMENTATIONS:
            fix = "Search with the model's attn_implementation (hf-ext plan --attn-implementation)."
        else:  # eager, sale, ...: nothing to search with
            fix = (
                f"The memory model knows {', '.join(ATTN_IMPLEMENTATIONS)} only, not {attn!r}: its prediction may be "
                "off for this model."
            )
        warnings.warn(
            f"apply_plan: the plan was searched for attn_implementation={plan.attn_implementation!r} but the model "
            f"runs {attn!r}; its memory prediction counts dense attention masks for 'sdpa' only. {fix}",
            stacklevel=2,
        )
    if device is None:
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
    device = torch.device(device)
    before = set(dist.distributed_c10d._world.pg_map)
    mesh = init_device_mesh(device.type, (plan.pp, plan.dp, plan.tp), mesh_dim_names=("pp", "dp", "tp"))
    # the groups this call created (a dimension spanning the whole world reuses the default group)
    owned = [g for g in dist.distributed_c10d._world.pg_map if g not in before]
    checkpointing = _checkpointing_state(layers)
    try:
        return _apply_on_mesh(model, plan, layers, mesh, device, param_dtype, owned)
    except BaseException:
        _destroy_groups(owned)
        # a plan that failed to apply (e.g. DDP refusing a model without trainable parameters) leaves the layers'
        # activation checkpointing as it was
        _restore_checkpointing(layers, checkpointing)
        raise


_MISSING = object()


def _checkpointing_state(layers: Any) -> list[tuple[Any, Any]]:
    """Each layer's own ``gradient_checkpointing`` and ``_gradient_checkpointing_func`` (``_MISSING`` where the
    layer's ``__dict__`` has none), as :func:`_set_checkpointing` will change them."""
    return [
        (
            vars(layer).get("gradient_checkpointing", _MISSING),
            vars(layer).get("_gradient_checkpointing_func", _MISSING),
        )
        for layer in layers
    ]


def _restore_checkpointing(layers: Any, state: list[tuple[Any, Any]]) -> None:
    """Put back what :func:`_checkpointing_state` read."""
    for layer, values in zip(layers, state):
        for name, value in zip(("gradient_checkpointing", "_gradient_checkpointing_func"), values):
            if value is _MISSING:
                vars(layer).pop(name, None)
            else:
                vars(layer)[name] = value


def _destroy_groups(groups: list) -> None:
    """Destroy ``groups`` (those still alive), then forget DTensor's cached sharding decisions.

    DTensor caches sharding propagation by op schema, and a ``DeviceMesh`` hashes and compares by its layout and
    dimension names only, not by its process groups. A later :func:`apply_plan` with the same mesh layout would
    get cached output specs holding this mesh, whose groups are gone: its first collective on them (e.g.
    ``save_pretrained``'s gather of a dp x tp plan) failed with "Could not resolve the process group"."""
    import torch.distributed as dist

    if not dist.is_initialized():  # destroy_process_group() already took every group
        return
    live = dist.distributed_c10d._world.pg_map
    destroyed = False
    for g in groups:
        if g in live:
            dist.destroy_process_group(g)
            destroyed = True
    if destroyed:
        _clear_dtensor_sharding_cache()


def _clear_dtensor_sharding_cache() -> None:
    """Clear DTensor's sharding-propagation caches (the Python LRU cache and the C++ fast-path cache)."""
    from torch.distributed.tensor import DTensor

    prop = DTensor._op_dispatcher.sharding_propagator
    clear = getattr(prop.propagate_op_sharding, "cache_clear", None)
    if clear is not None:
        clear()
    native = getattr(torch._C, "_clear_DTensor_sharding_propagator_cache", None)
    if native is not None:
        native()


def _apply_on_mesh(
    model: torch.nn.Module,
    plan: Plan,
    layers: Any,
    mesh: Any,
    device: torch.device,
    param_dtype: torch.dtype | None,
    owned: list,
) -> AppliedPlan:
    strategies = plan.layer_strategies()
    stage_module = None
    stage_layers: tuple[int, int] | None = None
    if plan.pp > 1:
        # only this rank's stage goes to the device (and is tensor-parallelised): the other stages' layers, the
        # embedding or the head stay where they are, so a stage holds what the plan's memory model counts
        pp_rank = mesh["pp"].get_local_rank()
        a, b = plan.stages[pp_rank]
        stage_layers = (a, b)
        stage_module = _PipelineStageModule(model, a, b, pp_rank == 0, pp_rank == plan.pp - 1)
        stage_module.to(device)
        tp_layers = list(stage_module.layers)
    else:
        model.to(device)
        tp_layers = list(layers)
    _set_checkpointing(layers, [s.ckpt for s in strategies])
    if plan.tp > 1:
        if plan.sp:
            warnings.warn(
                "apply_plan: sequence parallelism is not applied at runtime; running plain tensor "
                "parallelism (activation memory will exceed the plan's prediction)",
                stacklevel=3,
            )
        _apply_tp(tp_layers, mesh["tp"])

    autocast = None
    schedule = loss_fn = None
    if stage_module is not None:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B

        local_strats = strategies[a:b]
        _wrap_dp(stage_module, list(stage_module.layers), local_strats, plan, mesh, param_dtype)
        stage = PipelineStage(stage_module, pp_rank, plan.pp, device, group=mesh["pp"].get_group())
        # loss_fn divides by the global token count train_step sets; no 1/m scaling of the gradients
        loss_fn = _PipelineLoss(plan.dp)
        schedule = Schedule1F1B(
            stage, n_microbatches=plan.num_micro_batches, loss_fn=loss_fn, scale_grads=False
        )
        module = stage_module
        if plan.dp_type == "ddp" and param_dtype is not None:
            autocast = param_dtype
    elif plan.dp_type == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        kwargs: dict[str, Any] = {"gradient_as_bucket_view": True}
        if device.type == "cuda":
            kwargs["device_ids"] = [device.index]
        module = DDP(model, process_group=mesh["dp"].get_group(), **kwargs) if plan.tp == 1 else model
        autocast = param_dtype
    else:
        _wrap_dp(model, list(layers), strategies, plan, mesh, param_dtype)
        module = model
    return AppliedPlan(
        module, plan, mesh, device, autocast, schedule, stage_module, loss_fn, owned, model, stage_layers
    )


def _wrap_dp(
    root: torch.nn.Module,
    layers: list,
    strategies: list,
    plan: Plan,
    mesh: Any,
    param_dtype: torch.dtype | None,
) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if plan.dp_type != "fsdp":
        return
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    dp_mesh = mesh["dp"]
    for layer, st in zip(layers, strategies):
        fully_shard(layer, mesh=dp_mesh, reshard_after_forward=st.zero != 2, mp_policy=mp)
    fully_shard(root, mesh=dp_mesh, mp_policy=mp)
