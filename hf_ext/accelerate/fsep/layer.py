"""The FSEP experts layer: 1/N of every expert per rank, whole experts gathered per step from the shards.

:class:`FSEPExperts` replaces a transformers fused-experts module (``gate_up_proj [E, 2I, H]``,
``down_proj [E, H, I]``, ``act_fn``; Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE / DeepSeek-V3) and keeps
its call signature ``forward(hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K]) -> [T, H]``,
so the model's router, shared experts and aux losses are untouched.

One forward, per rank ``me`` of ``N`` (layout from :mod:`hf_ext.accelerate.fsep.planner`):

1. ``all_gather`` of per-expert token counts ``[E]`` -> ``counts [N, E]`` (also the planner's input);
   every rank derives the same split ``shares[src, e, dst]`` of tokens among replicas.
2. Expert gather (FSEP mode): this rank's shard of each expert in ``slots[me]`` is copied in place and
   the other ``N - 1`` shards are received straight into ``[C_me, N * S]`` by point-to-point receives,
   while every rank sends rows of its shard parameter as they are (one ``batch_isend_irecv`` group, no
   send buffer or re-order copy; started asynchronously, or prefetched by the previous MoE layer).
3. Token dispatch: pairs (token, expert) sorted by destination (rank, slot), ``all_to_all_single``
   with uneven splits; compute one SwiGLU MLP per materialised expert; combine by the reverse
   all-to-all, weight by the router probabilities and ``index_add`` into the output.
4. Backward: the token all-to-alls are autograd Functions (their backward is the reverse all-to-all);
   the expert gather's backward sends chunk ``q`` of each materialised expert's gradient to rank ``q``
   (point-to-point, straight from the gradient rows) and each rank adds the chunks of all replicas into
   its shard gradient (a reduce-scatter), asynchronously by default, in place into
   ``expert_shards.grad`` at the end of backward.

Static EP (``mode="static_ep"``) keeps ``E/N`` full experts resident (identity layout, no gather)
and runs the same dispatch / compute / combine code.
"""

from __future__ import annotations

import inspect
import math
import time
import weakref
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.weak import WeakIdKeyDictionary

from hf_ext.accelerate.fsep.config import FSEPConfig
from hf_ext.accelerate.fsep.cost_model import PRESETS, MoEShape
from hf_ext.accelerate.fsep.planner import Layout, LoadPlanner

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


# ------------------------------------------------------------------------------ autograd collectives
class _AllToAll(torch.autograd.Function):
    """Differentiable ``all_to_all_single`` along dim 0 with uneven splits."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        out_splits: list[int],
        in_splits: list[int],
        group: Any,
        after_backward: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        ctx.after_backward = after_backward
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        out = grad.new_empty((sum(ctx.in_splits), *grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        if ctx.after_backward is not None:  # runs once this all-to-all is queued
            ctx.after_backward()
        return out, None, None, None, None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return grad * ctx.scale, None


def _peer(layer: FSEPExperts, q: int) -> int:
    """Global rank of rank ``q`` of the layer's expert-parallel group."""
    return dist.get_global_rank(layer.group, q) if layer.group is not None else q


class _GatherExperts(torch.autograd.Function):
    """Forward: finish (or run) the expert gather -> full experts ``[C_me, P]``.

    Backward: reduce-scatter of the full-expert gradient back to the shards: chunk ``q`` of every
    materialised expert goes to rank ``q`` by point-to-point sends straight from the gradient rows (no
    re-ordered send buffer), one NCCL group for the whole exchange; the receiver adds the chunks of all
    replicas into its shard gradient (async: at the end of backward).
    """

    @staticmethod
    def forward(ctx: Any, shards: torch.Tensor, layer: FSEPExperts, pending: _PendingGather) -> torch.Tensor:
        ctx.layer, ctx.layout = layer, pending.layout
        return pending.result()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        layer: FSEPExperts = ctx.layer
        lay: Layout = ctx.layout
        n, s = layer.world_size, layer.shard_size
        g = grad if grad.shape[1] == n * s else F.pad(grad, (0, n * s - grad.shape[1]))
        if layer.config.async_grad_reduce and layer.config.comm_schedule == "deferred":
            layer._state.defer_grad_exchange(layer, lay, g.contiguous())
            return None, None, None
        finish = _start_grad_exchange(layer, lay, g.contiguous())
        if layer.config.async_grad_reduce:
            layer._state.add_pending_grad(layer, finish)
            return None, None, None
        out = torch.zeros_like(layer.expert_shards)
        finish(out)
        return out, None, None


def _start_grad_exchange(
    layer: FSEPExperts, lay: Layout, g: torch.Tensor
) -> Callable[[torch.Tensor | None], None]:
    """Start the reduce-scatter of ``g [C_me, N*S]`` with the layer's weight exchange -> ``finish(out)``
    (``finish(None)`` only waits)."""
    layer._state.record("grad_exchange", layer)
    return (_grad_exchange_p2p if layer.use_p2p else _grad_exchange_all_to_all)(layer, lay, g)


def _grad_exchange_p2p(
    layer: FSEPExperts, lay: Layout, g: torch.Tensor
) -> Callable[[torch.Tensor | None], None]:
    """Start the gradient reduce-scatter of ``g [C_me, N*S]`` by point-to-point ops; returns ``finish(out)``
    that waits and adds this rank's chunks of every replica into ``out [E, S]``."""
    n, me, s = layer.world_size, layer.rank, layer.shard_size
    mine = list(lay.slots[me])
    # per peer pair the order of sends and receives is the slot order on both sides
    ops = [
        dist.P2POp(dist.isend, g[j, q * s : (q + 1) * s], _peer(layer, q), layer.group)
        for j in range(len(mine))
        for q in range(n)
        if q != me
    ]
    remote = [(r, e) for r in range(n) if r != me for e in lay.slots[r]]
    recv = g.new_empty((len(remote), s))
    ops += [dist.P2POp(dist.irecv, recv[k], _peer(layer, r), layer.group) for k, (r, _) in enumerate(remote)]
    works = dist.batch_isend_irecv(ops) if ops else []
    scale = layer.grad_scale

    def finish(out: torch.Tensor | None) -> None:
        for w in works:
            w.wait()
        if out is None:  # discarded
            return
        _add_rows(out, mine, g[:, me * s : (me + 1) * s], scale)
        _add_rows(out, [e for _, e in remote], recv, scale)

    return finish


# rows at least this long are added one ``add_`` each: on an H200 ``index_add_`` moved Mixtral's expert-shard
# rows (8.8e7 elements) at about 1 TB/s, a third of what an elementwise add reaches
_ROW_ADD_MIN_NUMEL = 1 << 20


def _add_rows(out: torch.Tensor, rows: list[int], src: torch.Tensor, alpha: float) -> None:
    """``out[rows[j]] += alpha * src[j]`` for ``src [len(rows), S]`` (rows may repeat: replicas add up)."""
    if not rows:
        return
    src = src.to(out.dtype)
    if src.shape[1] >= _ROW_ADD_MIN_NUMEL:
        for j, r in enumerate(rows):
            out[r].add_(src[j], alpha=alpha)
    else:
        out.index_add_(0, torch.tensor(rows, dtype=torch.long, device=out.device), src, alpha=alpha)


def _grad_exchange_all_to_all(
    layer: FSEPExperts, lay: Layout, g: torch.Tensor
) -> Callable[[torch.Tensor | None], None]:
    """The same reduce-scatter as one ``all_to_all_single`` (chunks re-ordered by destination first)."""
    n, me, s = layer.world_size, layer.rank, layer.shard_size
    c_me = len(lay.slots[me])
    send = g.view(c_me, n, s).transpose(0, 1).reshape(n * c_me, s).contiguous()
    out_splits = [len(lay.slots[r]) for r in range(n)]
    recv = g.new_empty((sum(out_splits), s))
    rows = [e for sl in lay.slots for e in sl]
    work = dist.all_to_all_single(recv, send, out_splits, [c_me] * n, group=layer.group, async_op=True)
    scale = layer.grad_scale

    def finish(out: torch.Tensor | None) -> None:
        work.wait()
        if out is None:  # discarded
            return
        _add_rows(out, rows, recv, scale)

    return finish


# expert_compute="auto" takes the grouped GEMM from this many materialised experts on: on two H200s it made
# OLMoE's layers (32-64 experts of 2048 x 1024) 1.02-1.53x faster, and Mixtral's (4-8 experts of 4096 x 14336)
# 2-8 % slower than cuBLAS GEMMs one expert at a time
GROUPED_MM_MIN_EXPERTS = 16


def _grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``x [T, K]`` rows grouped by ``offs`` (cumulative ends, int32), ``w [G, K, N]`` -> ``[T, N]``."""
    fn = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return fn(x, w, offs=offs)


def _grouped_mm_unsupported(x: torch.Tensor, w: torch.Tensor, hidden: int, inter: int) -> str | None:
    """Why the grouped GEMM cannot compute these experts here (``None``: it can)."""
    if not (hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")):
        return f"torch {torch.__version__} has no grouped_mm"
    if x.device.type != "cuda":
        return f"the inputs are on {x.device.type}, not CUDA"
    if x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16:
        return f"it needs bfloat16 inputs and weights, got {x.dtype} / {w.dtype}"
    if torch.cuda.get_device_capability(x.device) < (8, 0):
        return "it needs a GPU of compute capability 8.0 or newer"
    # 16-byte aligned strides and base pointers (bf16: multiples of 8 elements)
    if hidden % 8 or inter % 8 or w.stride(0) % 8 or w.data_ptr() % 16 or x.data_ptr() % 16:
        return f"hidden ({hidden}), intermediate ({inter}) and the weight rows must be 16-byte aligned"
    return None


# ------------------------------------------------------------------------------ activation checkpointing
def _checkpoint_frame() -> tuple[Any, bool]:
    """``(frame, replaying)`` of the non-reentrant ``torch.utils.checkpoint`` region this code runs in.

    ``frame`` is the object a checkpointed forward and its recompute in backward share, found through the
    saved-tensor hooks torch's checkpoint pushes around both; ``replaying``: this is the recompute. ``(None,
    False)`` outside such a region, and where these torch internals are not recognised (a recompute then runs
    the layer's current layout, as it did before layouts were kept per forward)."""
    top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top_hooks is None:
        return None, False
    try:
        top = top_hooks(False)
    except TypeError:  # a torch without the argument
        top = top_hooks()
    if not top:
        return None, False
    pack = inspect.unwrap(top[0])  # the recompute's hook is wrapped (dynamo disabled)
    code, closure = getattr(pack, "__code__", None), getattr(pack, "__closure__", None)
    if code is None or not closure or getattr(pack, "__module__", "") != "torch.utils.checkpoint":
        return None, False
    cells = dict(zip(code.co_freevars, closure))
    name = pack.__qualname__
    try:
        if name.startswith("_checkpoint_hook.") and "frame" in cells:
            return cells["frame"].cell_contents, False
        if name.startswith("_recomputation_hook.") and "target_frame_ref" in cells:
            return cells["target_frame_ref"].cell_contents(), True
    except ValueError:  # an empty cell
        pass
    return None, False


class _FrameLayouts:
    """The layouts one layer's forwards ran inside one checkpoint frame (in call order), and where its recompute
    (graph task ``task``) has got to in them."""

    def __init__(self) -> None:
        self.layouts: list[Layout] = []
        self.task = -2
        self.next = 0


class _PendingGather:
    """An expert gather in flight for one layout -> full experts ``[C_me, N * S]``.

    ``p2p``: this rank's shard of each of its experts is copied in place and the other shards are received
    straight into their rows by point-to-point receives, while every rank sends rows of its shard
    parameter as they are (one ``batch_isend_irecv`` group, no send buffer). ``all_to_all``: the shards
    for each destination are gathered into a send buffer, exchanged by one ``all_to_all_single`` and
    re-ordered from ``[N, C_me, S]`` to ``[C_me, N * S]`` when the result is taken.
    """

    def __init__(self, layer: FSEPExperts, layout: Layout, async_op: bool) -> None:
        self.layout = layout
        self.layer = layer
        self.version = layer.expert_shards._version
        n, me, s = layer.world_size, layer.rank, layer.shard_size
        mine = list(layout.slots[me])
        self.c_me = len(mine)
        self.p2p = layer.use_p2p
        with torch.no_grad():
            shards = layer.expert_shards.detach()
            if self.p2p:
                self.buf = shards.new_empty((self.c_me, n * s))
                ops = []
                for j, e in enumerate(mine):
                    self.buf[j, me * s : (me + 1) * s].copy_(shards[e])
                    ops += [
                        dist.P2POp(dist.irecv, self.buf[j, q * s : (q + 1) * s], _peer(layer, q), layer.group)
                        for q in range(n)
                        if q != me
                    ]
                for r in range(n):
                    if r != me:
                        ops += [
                            dist.P2POp(dist.isend, shards[e], _peer(layer, r), layer.group)
                            for e in layout.slots[r]
                        ]
                self.works = dist.batch_isend_irecv(ops) if ops else []
            else:
                idx = torch.tensor(
                    [e for sl in layout.slots for e in sl], dtype=torch.long, device=shards.device
                )
                send = shards.index_select(0, idx)
                self.buf = shards.new_empty((n * self.c_me, s))
                in_splits = [len(layout.slots[r]) for r in range(n)]
                work = dist.all_to_all_single(
                    self.buf, send, [self.c_me] * n, in_splits, group=layer.group, async_op=True
                )
                self.works = [work]
        if not async_op:
            self._wait()

    def _wait(self) -> None:
        for w in self.works:
            w.wait()
        self.works = []

    def valid_for(self, layout: Layout) -> bool:
        return layout is self.layout and self.layer.expert_shards._version == self.version

    def result(self) -> torch.Tensor:
        self._wait()
        n, s, p = self.layer.world_size, self.layer.shard_size, self.layer.expert_numel
        full = (
            self.buf if self.p2p else self.buf.view(n, self.c_me, s).transpose(0, 1).reshape(self.c_me, n * s)
        )
        return full if full.shape[1] == p else full[:, :p].contiguous()


class FSEPState:
    """What the FSEP layers of one model share: step counter, pending async gradient reductions.

    With ``comm_schedule="deferred"`` a layer's gradient exchange is not started in its own backward
    (where it would queue on the one NCCL stream ahead of that layer's token all-to-all) but once the
    next layer's combine all-to-all is queued (:meth:`start_deferred`), so that it runs during that
    layer's expert backward; the first MoE layer's starts after its own dispatch all-to-all. Exchanges
    started before such a point are finished there (bounded memory), under either schedule: ``"eager"``
    starts them as before, in the layer's own backward, but no longer holds them all to the end.
    ``trace`` (a list, ``None`` by default) records the order of the backward communication for tests.
    """

    def __init__(self) -> None:
        self.layers: list[FSEPExperts] = []
        self.step = 0
        self._pending: list[tuple[FSEPExperts, Callable[[torch.Tensor | None], None]]] = []
        self._deferred: list[tuple[FSEPExperts, Layout, torch.Tensor]] = []
        self._callback_queued = False
        self.trace: list[tuple[str, int]] | None = None

    def record(self, event: str, layer: FSEPExperts) -> None:
        """Append ``(event, index of layer)`` to :attr:`trace` when tracing."""
        if self.trace is not None:
            self.trace.append((event, self.layers.index(layer)))

    def drop_stale(self) -> None:
        """Drop what a backward that raised (e.g. a caught OOM, the batch skipped) left behind: autograd
        drops its end-of-backward callback, so its held gradients and exchanges would be added into a later
        step's gradients and no callback would be queued again. Called by every forward outside backward
        (a backward that completed left nothing). Exchanges in flight are waited for (the peers posted
        them too) and discarded."""
        if not self._callback_queued:
            return
        stale, self._pending, self._deferred = self._pending, [], []
        self._callback_queued = False
        for _, finish in stale:
            finish(None)

    def _queue_finish(self) -> None:
        if not self._callback_queued:
            self._callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self.finish_grads)

    def add_pending_grad(self, layer: FSEPExperts, finish: Callable[[torch.Tensor | None], None]) -> None:
        """Queue ``finish(expert_shards.grad)`` (waits for the layer's gradient exchange) for the end of backward."""
        self._pending.append((layer, finish))
        self._queue_finish()

    def defer_grad_exchange(self, layer: FSEPExperts, lay: Layout, grad: torch.Tensor) -> None:
        """Hold ``grad [C_me, N*S]`` of ``layer`` until :meth:`start_deferred` (or the end of backward)."""
        self._deferred.append((layer, lay, grad))
        self._queue_finish()

    def start_deferred(self) -> None:
        """Finish the exchanges in flight, then start the held ones (called after a combine all-to-all's
        backward is queued, and at the end of backward)."""
        self._finish_pending()
        deferred, self._deferred = self._deferred, []
        for layer, lay, grad in deferred:
            self._pending.append((layer, _start_grad_exchange(layer, lay, grad)))

    def _finish_pending(self) -> None:
        pending, self._pending = self._pending, []
        for layer, finish in pending:
            p = layer.expert_shards
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            finish(p.grad)

    def finish_grads(self) -> None:
        """Start what is held, wait for every gradient exchange and accumulate into ``expert_shards.grad``
        in place (the end-of-backward callback)."""
        if self.trace is not None:
            self.trace.append(("backward_end", -1))
        self.start_deferred()
        self._finish_pending()
        self._callback_queued = False

    def begin_step(self) -> None:
        """Called before each training forward of the root model: re-plan layouts."""
        self.step += 1
        for layer in self.layers:
            layer.replan(self.step)
        if self.layers and self.layers[0].config.prefetch:
            self.layers[0].prefetch()  # overlaps with the embedding and the first attention block


# ---------------------------------------------------------------------------------------- the layer
class FSEPExperts(nn.Module):
    """Fully sharded experts (or static-EP experts) of one MoE layer.

    Args:
        gate_up_proj: ``[E, 2I, H]`` full weights (identical on all ranks).
        down_proj: ``[E, H, I]``.
        act_fn: the expert activation (``act_fn(gate) * up``).
        config: :class:`FSEPConfig`.
        group: the process group of the expert-parallel ranks (default: WORLD).
        state: shared :class:`FSEPState` (one per model).
        top_k: router top-k (cost model input).

    Parameters (what the optimizer sees):
        ``expert_shards [E, ceil(3*I*H / N)]`` in FSEP mode: rank ``q`` holds elements
        ``q*S .. (q+1)*S`` of every expert's flattened ``(gate_up, down)``;
        ``expert_weights [E/N, 3*I*H]`` in static-EP mode (rank ``r``'s resident experts).
    """

    def __init__(
        self,
        gate_up_proj: torch.Tensor,
        down_proj: torch.Tensor,
        act_fn: Callable[[torch.Tensor], torch.Tensor],
        config: FSEPConfig,
        group: Any = None,
        state: FSEPState | None = None,
        top_k: int = 2,
    ) -> None:
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "FSEPExperts needs torch.distributed initialised (torchrun / accelerate launch)"
            )
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        e, two_i, h = gate_up_proj.shape
        self.num_experts, self.hidden, self.intermediate = e, h, two_i // 2
        if tuple(down_proj.shape) != (e, h, self.intermediate):
            raise ValueError(
                f"down_proj has shape {tuple(down_proj.shape)}, expected {(e, h, self.intermediate)} "
                "(transposed expert layouts are not supported)"
            )
        self.config = config
        self.act_fn = act_fn
        self.expert_numel = 3 * h * self.intermediate
        self.top_k = top_k
        self._state = state if state is not None else FSEPState()
        self._state.layers.append(self)
        self._next: list[FSEPExperts] = []  # plain list: not a registered submodule
        self._prefetched: _PendingGather | None = None
        n = self.world_size
        flat = torch.cat([gate_up_proj.detach().reshape(e, -1), down_proj.detach().reshape(e, -1)], dim=1)
        self.capacity = config.resolved_capacity(e, n)
        if config.mode == "static_ep":
            c = e // n
            self.shard_size = 0
            self.use_p2p = False  # no weight exchange
            self.expert_weights = nn.Parameter(flat[self.rank * c : (self.rank + 1) * c].clone())
            self.layout = Layout.identity(e, n)
            self.planner = None
        else:
            self.shard_size = math.ceil(self.expert_numel / n)
            shard_bytes = self.shard_size * gate_up_proj.element_size()
            self.use_p2p = config.gather == "p2p" or (
                config.gather == "auto" and shard_bytes >= config.gather_p2p_min_bytes
            )
            pad = self.shard_size * n - self.expert_numel
            if pad:
                flat = F.pad(flat, (0, pad))
            q = self.rank
            self.expert_shards = nn.Parameter(
                flat[:, q * self.shard_size : (q + 1) * self.shard_size].clone()
            )
            if config.layout_policy == "fsdp":
                self.layout = Layout.fsdp(e, n)
            else:
                self.layout = Layout.identity(e, n)
            hw_name = config.hardware
            if hw_name == "auto":
                hw_name = "h100" if gate_up_proj.is_cuda else "cpu"
            self.planner = (
                LoadPlanner(
                    e,
                    n,
                    self.capacity,
                    history=config.history,
                    routing_policy=config.routing_policy,
                    num_perturbations=config.num_perturbations,
                    hardware=PRESETS[hw_name],
                    history_decay=config.history_decay,
                    # costed at the token counts each step observes, unless the config declares a batch
                    tokens_per_rank=config.planner_tokens_per_rank,
                    shape=MoEShape(
                        h,
                        self.intermediate,
                        e,
                        top_k,
                        tokens_per_rank=config.planner_tokens_per_rank or 1,  # the planner sets it per plan
                        dtype_bytes=gate_up_proj.element_size(),
                    ),
                )
                if config.layout_policy == "planner"
                else None
            )
        self._layout_pinned = False  # set_layout pins a layout until release_layout
        # the layouts run by checkpointed forwards, per non-reentrant checkpoint frame (freed with its graph): the
        # recompute in backward runs its forward's layout, even where the layer was re-planned in between
        self._frame_layouts: weakref.WeakKeyDictionary[Any, _FrameLayouts] = weakref.WeakKeyDictionary()
        self.last_counts: np.ndarray | None = None
        # counts of a training-mode forward run without grad, for the recompute in backward to observe: reentrant
        # activation checkpointing runs the forward under no_grad and builds the graph only in that recompute
        self._unobserved_counts: np.ndarray | None = None
        self.last_compute_cpu_s = float("nan")
        self.last_tokens = 0
        # state dicts carry full experts under the HF keys (rank-independent; see _experts_state_dict_hook)
        self.register_state_dict_post_hook(_experts_state_dict_hook)
        self.register_load_state_dict_pre_hook(_experts_load_state_dict_pre_hook)
        self.register_load_state_dict_post_hook(_experts_load_state_dict_post_hook)
        _register_expert_param(self)

    @property
    def grad_scale(self) -> float:
        """Factor on the expert gradients: 1/N with ``average_grads`` (the DDP / FSDP convention), else 1."""
        return 1.0 / self.world_size if self.config.average_grads else 1.0

    @property
    def comm_dtype(self) -> torch.dtype:
        """dtype of the expert weights on the wire (the parameter dtype)."""
        p = self.expert_weights if self.config.mode == "static_ep" else self.expert_shards
        return p.dtype

    # ------------------------------------------------------------------ layout
    def set_layout(self, layout: Layout) -> None:
        """Use ``layout`` from the next forward on, and keep it (FSEP mode; all ranks must pass the same one).

        The layout is pinned: under ``layout_policy="planner"`` the training steps that follow do not re-plan
        this layer (the planner still records their token counts) until :meth:`release_layout` hands the
        layout back to the planner. A forward already run keeps the layout it ran: its backward and, under
        non-reentrant activation checkpointing, its recompute use that one."""
        if self.config.mode == "static_ep":
            raise ValueError("set_layout: static_ep keeps the identity layout; use mode='fsep'")
        if layout.num_experts != self.num_experts or layout.world_size != self.world_size:
            raise ValueError(
                f"layout is for {layout.num_experts} experts x {layout.world_size} ranks, layer has "
                f"{self.num_experts} x {self.world_size}"
            )
        layout.validate(max(self.capacity, layout.max_slots))
        self.layout = layout
        self._layout_pinned = True
        self._prefetched = None

    @property
    def layout_pinned(self) -> bool:
        """Whether the layout was set by :meth:`set_layout` and is kept until :meth:`release_layout`."""
        return self._layout_pinned

    def release_layout(self) -> None:
        """Hand the layout set by :meth:`set_layout` back to ``FSEPConfig.layout_policy``: ``"planner"``
        re-plans at its next re-plan step (the next training forward with ``replan_interval=1``), from the
        counts it recorded meanwhile; ``"identity"`` / ``"fsdp"`` take their fixed layout from the next forward
        on. A no-op when no layout is pinned."""
        if not self._layout_pinned:
            return
        self._layout_pinned = False
        if self.planner is None and self.config.mode == "fsep":
            n, e = self.world_size, self.num_experts
            self.layout = Layout.fsdp(e, n) if self.config.layout_policy == "fsdp" else Layout.identity(e, n)
            self._prefetched = None

    def replan(self, step: int) -> None:
        """Re-plan from the planner's history (called at the start of each training step); a layout pinned by
        :meth:`set_layout` is kept."""
        if self.planner is None or not self.planner.history or self._layout_pinned:
            return
        if step % self.config.replan_interval:
            return
        self.layout = self.planner.plan()
        self._prefetched = None

    # ------------------------------------------------------------------ gather
    def prefetch(self) -> None:
        """Start this layer's expert gather for the current layout (async all-to-all)."""
        if self.config.mode == "static_ep" or self._prefetched is not None:
            return
        self._prefetched = _PendingGather(self, self.layout, async_op=True)

    def _full_weights(self, layout: Layout, pending: _PendingGather | None = None) -> torch.Tensor:
        """``[C_me, 3*I*H]`` full weights of this rank's materialised experts under ``layout`` (autograd-tracked),
        from ``pending`` or else the prefetched gather where it fits."""
        if self.config.mode == "static_ep":
            return _ScaleGrad.apply(self.expert_weights, self.grad_scale)
        if pending is None:
            pending, self._prefetched = self._prefetched, None
        if pending is None or not pending.valid_for(layout):
            pending = _PendingGather(self, layout, async_op=False)
        return _GatherExperts.apply(self.expert_shards, self, pending)

    def _forward_layout(self, frame: Any, replaying: bool) -> Layout:
        """The layout a forward runs: the current one (recorded for the recompute when inside checkpoint
        ``frame``); in the recompute of ``frame`` (``replaying``), the one its forward ran."""
        if frame is None:
            return self.layout
        rec = self._frame_layouts.get(frame)
        if not replaying:
            if rec is None:
                rec = self._frame_layouts[frame] = _FrameLayouts()
            rec.layouts.append(self.layout)
            return self.layout
        if rec is None or not rec.layouts:  # the forward ran outside this frame's records: nothing kept
            return self.layout
        task = torch._C._current_graph_task_id()
        if task != rec.task:  # a new recompute (a second backward with retain_graph=True starts again)
            rec.task, rec.next = task, 0
        layout = rec.layouts[rec.next % len(rec.layouts)]
        rec.next += 1
        return layout

    def _after_a2a_backward(self, which: str) -> Callable[[], None]:
        """Hook run once the backward of this layer's ``which`` (dispatch / combine) all-to-all is queued:
        records it, and starts the gradient exchanges held by the deferred schedule after a combine, and
        after the first MoE layer's dispatch (no token all-to-all follows it: its exchange then overlaps
        whatever backward precedes that layer, e.g. its attention block)."""
        state = self._state
        flush = which == "combine" or (bool(state.layers) and state.layers[0] is self)

        def hook() -> None:
            state.record(f"{which}_a2a_backward", self)
            if flush:
                state.start_deferred()

        return hook

    # ------------------------------------------------------------------ forward
    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """``hidden_states [T, H]``, ``top_k_index [T, K]`` (ids outside ``[0, E)``, e.g. -1 padding, are ignored), ``top_k_weights [T, K]``
        -> ``[T, H]`` = sum_k weight_k * expert_{index_k}(hidden)."""
        n, me, e = self.world_size, self.rank, self.num_experts
        t, h = hidden_states.shape
        k = top_k_index.shape[1]
        dev = hidden_states.device
        # a non-reentrant checkpoint's recompute runs the layout its forward ran, which a re-plan between the two
        # (two forwards before one backward, gradient accumulation) may have replaced since
        frame, replaying = _checkpoint_frame() if torch.is_grad_enabled() else (None, False)
        layout = self._forward_layout(frame, replaying)
        # the recompute of activation checkpointing (in backward, or a non-reentrant one triggered outside)
        recompute = replaying or torch._C._current_graph_task_id() != -1
        if not recompute:
            self._state.drop_stale()
        pending = None
        if self.config.mode == "fsep":
            # overlap the gather with the count exchange and token dispatch; a recompute gathers its own layout's
            # experts and leaves a gather prefetched for a coming forward alone
            if replaying:
                pending = _PendingGather(self, layout, async_op=True)
            elif self._prefetched is None:
                self.prefetch()
        flat_e = top_k_index.reshape(-1).long()
        pair_ids = torch.arange(flat_e.numel(), device=dev)
        valid = (flat_e >= 0) & (flat_e < e)
        if not bool(valid.all()):
            flat_e, pair_ids = flat_e[valid], pair_ids[valid]
        local_counts = torch.bincount(flat_e, minlength=e)
        gathered = local_counts.new_empty((n * e,))
        _all_gather_single(gathered, local_counts, group=self.group)
        counts = gathered.view(n, e).cpu().numpy()
        self.last_counts = counts
        if self.planner is not None and self.training:
            if not torch.is_grad_enabled():
                # no graph: reentrant checkpointing's forward (observed by its recompute) or a no_grad forward
                self._unobserved_counts = None if recompute else counts
            elif not recompute or (
                self._unobserved_counts is not None and np.array_equal(self._unobserved_counts, counts)
            ):
                # a recompute in backward observes only what its forward could not (reentrant checkpointing);
                # non-reentrant checkpointing's forward ran with grad and observed this step already
                self.planner.observe(counts)
                self._unobserved_counts = None
        shares = layout.token_shares(counts)  # [N(src), E, N(dst)]
        slot_of = torch.as_tensor(layout.slot_index(), device=dev)
        c_max = max(1, layout.max_slots)

        # ---- send side: destination (rank, slot) of each of my pairs
        mine = shares[me]  # [E, N]
        in_splits = mine.sum(axis=0).tolist()
        order = torch.argsort(flat_e, stable=True)
        e_sorted = flat_e[order]
        offsets = torch.cumsum(local_counts, 0) - local_counts
        pos = torch.arange(e_sorted.numel(), device=dev) - offsets[e_sorted]
        cum = torch.as_tensor(np.cumsum(mine, axis=1), device=dev)  # [E, N]
        dest = torch.searchsorted(cum[e_sorted], pos.unsqueeze(1), right=True).squeeze(1)
        key = dest * c_max + slot_of[dest, e_sorted]
        order2 = torch.argsort(key, stable=True)
        send_pairs = pair_ids[order[order2]]
        token_idx = torch.div(send_pairs, k, rounding_mode="floor")
        x_send = hidden_states.index_select(0, token_idx)

        # ---- receive side: rows arrive grouped by source, then by my slot
        my_slots = list(layout.slots[me])
        c_me = len(my_slots)
        cnt = shares[:, my_slots, me] if c_me else np.zeros((n, 0), dtype=np.int64)  # [N, C_me]
        out_splits = cnt.sum(axis=1).tolist()
        x_recv = _AllToAll.apply(
            x_send, out_splits, in_splits, self.group, self._after_a2a_backward("dispatch")
        )
        labels = np.repeat(np.tile(np.arange(c_me), n), cnt.reshape(-1))
        perm = torch.as_tensor(np.argsort(labels, kind="stable"), device=dev)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel(), device=dev)
        xg = x_recv.index_select(0, perm)

        # ---- prefetch the next MoE layer while this one computes
        if self.config.prefetch and self._next and not recompute:  # no next layer runs during backward
            self._next[0].prefetch()

        # ---- expert compute, one SwiGLU MLP per materialised expert
        w = self._full_weights(layout, pending)  # [C_me, 3*I*H]
        per_slot = cnt.sum(axis=0).tolist()
        c0 = time.thread_time() if not xg.is_cuda else 0.0
        if self._use_grouped_mm(xg, w, per_slot):
            yg = self._experts_grouped(xg, w, per_slot)
            self.last_expert_compute = "grouped_mm"
        else:
            yg = self._experts_loop(xg, w, per_slot)
            self.last_expert_compute = "loop"
        # CPU time of this rank's expert forward (CPU tensors only; immune to an oversubscribed machine)
        self.last_compute_cpu_s = time.thread_time() - c0 if not xg.is_cuda else float("nan")
        self.last_tokens = int(sum(per_slot))
        y_recv = yg.index_select(0, inv)

        # ---- combine
        y_send = _AllToAll.apply(
            y_recv, in_splits, out_splits, self.group, self._after_a2a_backward("combine")
        )
        wts = top_k_weights.reshape(-1).index_select(0, send_pairs)
        contrib = (y_send * wts.unsqueeze(1)).to(hidden_states.dtype)
        return torch.zeros_like(hidden_states).index_add(0, token_idx, contrib)

    def _experts_loop(self, xg: torch.Tensor, w: torch.Tensor, per_slot: list[int]) -> torch.Tensor:
        """``xg [T, H]`` rows grouped by slot (``per_slot`` rows each), ``w [C_me, 3*I*H]`` -> ``[T, H]``, one
        GEMM pair per expert."""
        c_me, h, i_sz = w.shape[0], self.hidden, self.intermediate
        # split / unbind (not slicing): their backward is one cat / stack instead of a zero-filled
        # full-size gradient per slice
        w_gu_all, w_d_all = w.split([2 * i_sz * h, i_sz * h], dim=1)
        w_gu_list = w_gu_all.reshape(c_me, 2 * i_sz, h).unbind(0)
        w_d_list = w_d_all.reshape(c_me, h, i_sz).unbind(0)
        ys = []
        for xs, w_gu, w_d in zip(xg.split(per_slot, dim=0), w_gu_list, w_d_list):
            gate, up = F.linear(xs, w_gu).chunk(2, dim=-1)
            ys.append(F.linear(self.act_fn(gate) * up, w_d))
        if ys:
            return torch.cat(ys, 0)
        # no materialised expert: keep both inputs in the graph, so that this rank's backward still runs the
        # dispatch all-to-all (through xg) and the gradient exchange (through w) its peers take part in
        return xg.new_zeros((0, h)) + 0.0 * w.sum() + 0.0 * xg.sum()

    def _experts_grouped(self, xg: torch.Tensor, w: torch.Tensor, per_slot: list[int]) -> torch.Tensor:
        """The same as :meth:`_experts_loop` with one grouped GEMM per projection for all experts."""
        c_me, h, i_sz = w.shape[0], self.hidden, self.intermediate
        w_gu_all, w_d_all = w.split([2 * i_sz * h, i_sz * h], dim=1)
        # [C, K, N] operands: transposed views of the row-major [C, N, K] weights (no copy)
        w_gu = w_gu_all.reshape(c_me, 2 * i_sz, h).transpose(1, 2)
        w_d = w_d_all.reshape(c_me, h, i_sz).transpose(1, 2)
        offs = torch.as_tensor(np.cumsum(per_slot), dtype=torch.int32, device=xg.device)
        gate, up = _grouped_mm(xg, w_gu, offs).chunk(2, dim=-1)
        return _grouped_mm(self.act_fn(gate) * up, w_d, offs)

    def _use_grouped_mm(self, xg: torch.Tensor, w: torch.Tensor, per_slot: list[int]) -> bool:
        """Whether this forward computes the experts with grouped GEMMs (``config.expert_compute``)."""
        choice = self.config.expert_compute
        if choice == "loop" or not per_slot or sum(per_slot) == 0:
            return False
        if choice == "auto" and len(per_slot) < GROUPED_MM_MIN_EXPERTS:
            return False
        why = _grouped_mm_unsupported(xg, w, self.hidden, self.intermediate)
        if why is None:
            return True
        if choice == "grouped_mm":
            raise RuntimeError(
                f"FSEPConfig.expert_compute='grouped_mm' cannot run here: {why}; use 'auto' or 'loop'"
            )
        return False

    # ------------------------------------------------------------------ checkpoint helpers
    @property
    def expert_param(self) -> nn.Parameter:
        """The parameter this rank holds: ``expert_shards`` (FSEP) or ``expert_weights`` (static EP)."""
        return self.expert_weights if self.config.mode == "static_ep" else self.expert_shards

    @property
    def expert_param_name(self) -> str:
        return "expert_weights" if self.config.mode == "static_ep" else "expert_shards"

    @torch.no_grad()
    def gather_flat(self, local: torch.Tensor) -> torch.Tensor:
        """Collective: from this rank's rows ``local`` (shaped like :attr:`expert_param`: the parameter, its
        gradient or an optimizer state of it) the full flattened experts ``[E, 3*I*H]`` (gate_up then down;
        the same on every rank, independent of the world size and the mode)."""
        n, e = self.world_size, self.num_experts
        local = local.detach().contiguous()
        out = local.new_empty((n * local.shape[0], local.shape[1]))
        _all_gather_single(out, local, group=self.group)
        if self.config.mode == "static_ep":
            return out
        return (
            out.view(n, e, self.shard_size)
            .permute(1, 0, 2)
            .reshape(e, n * self.shard_size)[:, : self.expert_numel]
        )

    @torch.no_grad()
    def local_from_flat(self, flat: torch.Tensor) -> torch.Tensor:
        """This rank's rows (shaped like :attr:`expert_param`) of full flattened experts ``flat [E, 3*I*H]``."""
        e, n = self.num_experts, self.world_size
        if tuple(flat.shape) != (e, self.expert_numel):
            raise ValueError(
                f"expected full flattened experts of shape {(e, self.expert_numel)}, got {tuple(flat.shape)}"
            )
        if self.config.mode == "static_ep":
            c = e // n
            return flat[self.rank * c : (self.rank + 1) * c].clone()
        pad = self.shard_size * n - self.expert_numel
        if pad:
            flat = F.pad(flat, (0, pad))
        q = self.rank
        return flat[:, q * self.shard_size : (q + 1) * self.shard_size].clone()

    def _split_flat(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e, h, i = self.num_experts, self.hidden, self.intermediate
        gu = flat[:, : 2 * i * h].reshape(e, 2 * i, h).clone()
        dn = flat[:, 2 * i * h :].reshape(e, h, i).clone()
        return gu, dn

    def _join_flat(self, gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> torch.Tensor:
        e, h, i = self.num_experts, self.hidden, self.intermediate
        if tuple(gate_up_proj.shape) != (e, 2 * i, h) or tuple(down_proj.shape) != (e, h, i):
            raise ValueError(
                f"expert weights of shapes {tuple(gate_up_proj.shape)} / {tuple(down_proj.shape)} do not fit "
                f"this layer (gate_up_proj {(e, 2 * i, h)}, down_proj {(e, h, i)})"
            )
        return torch.cat([gate_up_proj.reshape(e, -1), down_proj.reshape(e, -1).to(gate_up_proj)], dim=1)

    @torch.no_grad()
    def full_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Collective: gather the full ``(gate_up_proj [E, 2I, H], down_proj [E, H, I])`` on every rank."""
        return self._split_flat(self.gather_flat(self.expert_param))

    @torch.no_grad()
    def load_full_weights(self, gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> None:
        """Load full expert weights (same on all ranks) into this rank's shard / resident experts."""
        self.expert_param.copy_(self.local_from_flat(self._join_flat(gate_up_proj, down_proj)))
        self._prefetched = None

    def __getstate__(self) -> dict[str, Any]:
        # a gather in flight (left by a forward that raised after prefetching this layer) holds communication
        # handles, which cannot be copied or pickled; a copy gathers its own experts
        state = super().__getstate__()
        state["_prefetched"] = None
        state["_frame_layouts"] = None  # the graphs whose recomputes these serve are not copied
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:  # copy.deepcopy: register the copy's parameter
        state.setdefault("_layout_pinned", False)  # pickled before layouts could be pinned
        state["_frame_layouts"] = weakref.WeakKeyDictionary()
        super().__setstate__(state)
        _register_expert_param(self)

    def extra_repr(self) -> str:
        return (
            f"mode={self.config.mode}, experts={self.num_experts}, hidden={self.hidden}, "
            f"intermediate={self.intermediate}, world_size={self.world_size}, capacity={self.capacity}"
        )


# ------------------------------------------------------------------------------ checkpoints
# A layer's parameter holds different rows on every rank under the same name and shape, so a state dict
# written by one rank (``accelerator.save_state`` writes rank 0's) and loaded on all would hand rank 0's
# rows to every rank. Module and optimizer state dicts therefore carry the full experts instead:
# ``<prefix>.gate_up_proj [E, 2I, H]`` / ``<prefix>.down_proj [E, H, I]`` (the keys of the original HF
# module) and, for optimizer states shaped like the parameter (Adam's moments), the full flattened experts
# ``[E, 3*I*H]``; loading keeps this rank's rows. Producing them is collective (every rank must call
# ``state_dict()``, as Accelerate does).


def _experts_state_dict_hook(module: FSEPExperts, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    state_dict.pop(prefix + module.expert_param_name, None)
    gu, dn = module.full_weights()  # collective
    if gu.device.type != "cpu":  # one layer's full experts on the device at a time
        gu, dn = gu.cpu(), dn.cpu()
    state_dict[prefix + "gate_up_proj"] = gu
    state_dict[prefix + "down_proj"] = dn


def _experts_load_state_dict_pre_hook(
    module: FSEPExperts,
    state_dict: dict,
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    name = prefix + module.expert_param_name
    if name in state_dict:
        raise RuntimeError(
            f"load_state_dict: {name!r} holds one rank's rows of the experts (every rank has different ones "
            "under this name), so loading it could hand one rank's rows to all. FSEP state dicts carry the "
            f"full experts as {prefix}gate_up_proj / {prefix}down_proj: save with model.state_dict() on "
            "every rank (accelerator.save_state does) or save_fsep_pretrained."
        )
    gk, dk = prefix + "gate_up_proj", prefix + "down_proj"
    if gk in state_dict and dk in state_dict:
        flat = module._join_flat(state_dict.pop(gk), state_dict.pop(dk))
        state_dict[name] = module.local_from_flat(flat)
        module._prefetched = None


def _experts_load_state_dict_post_hook(module: FSEPExperts, incompatible_keys: Any) -> None:
    # load_state_dict(assign=True) put a new parameter in place: the optimizer hooks must know it
    _register_expert_param(module)


# expert parameter -> weakref to its layer (for the optimizer state-dict hooks)
_EXPERT_PARAMS: WeakIdKeyDictionary = WeakIdKeyDictionary()
_STEP_HOOK: Any = None


def _register_expert_param(layer: FSEPExperts) -> None:
    global _STEP_HOOK
    _EXPERT_PARAMS[layer.expert_param] = weakref.ref(layer)
    if _STEP_HOOK is None:
        _STEP_HOOK = register_optimizer_step_pre_hook(_optimizer_step_pre_hook)


def _unregister_expert_params(layers: Iterable[FSEPExperts]) -> None:
    """Forget ``layers`` (``remove_fsep``); once no FSEP layer is alive, the process-wide optimizer step
    pre-hook goes too (the state-dict hooks already put on an optimizer stay, and skip non-FSEP parameters)."""
    global _STEP_HOOK
    for layer in layers:
        _EXPERT_PARAMS.pop(layer.expert_param, None)
    if _STEP_HOOK is not None and not any(_expert_layer(p) is not None for p in list(_EXPERT_PARAMS.keys())):
        _STEP_HOOK.remove()
        _STEP_HOOK = None


def _expert_layer(p: Any) -> FSEPExperts | None:
    ref = _EXPERT_PARAMS.get(p) if isinstance(p, torch.Tensor) else None
    layer = ref() if ref is not None else None
    return layer if layer is not None and layer.expert_param is p else None


def _expert_entries(optimizer: torch.optim.Optimizer, groups: list[dict]) -> list[tuple[Any, FSEPExperts]]:
    """``(state-dict index, layer)`` of the FSEP expert parameters of ``optimizer``, whose ``param_groups``
    correspond to ``groups`` (a state dict's packed groups) in order, as ``Optimizer.load_state_dict`` pairs them."""
    ids = chain.from_iterable(g["params"] for g in groups)
    params = chain.from_iterable(g["params"] for g in optimizer.param_groups)
    return [(i, layer) for i, p in zip(ids, params) if (layer := _expert_layer(p)) is not None]


def _is_full(value: Any, layer: FSEPExperts) -> bool:
    return isinstance(value, torch.Tensor) and tuple(value.shape) == (layer.num_experts, layer.expert_numel)


def _is_local(value: Any, layer: FSEPExperts) -> bool:
    return isinstance(value, torch.Tensor) and value.shape == layer.expert_param.shape


def _map_expert_states(
    optimizer: torch.optim.Optimizer, state_dict: dict, fn: Callable[[str, Any, FSEPExperts], Any]
) -> dict:
    """``state_dict`` with every state ``v`` (named ``k``) of an FSEP expert parameter replaced by
    ``fn(k, v, layer)``, in sorted key order on every rank (``fn`` may be collective); the caller's dicts are
    not changed."""
    state = dict(state_dict["state"])
    for idx, layer in _expert_entries(optimizer, state_dict["param_groups"]):
        if idx in state:
            st = dict(state[idx])
            for k in sorted(st):
                st[k] = fn(k, st[k], layer)
            state[idx] = st
    state_dict["state"] = state
    return state_dict


# key of a saved optimizer state that only each rank's own value can restore (e.g. Adafactor's factored moments):
# ``{PER_RANK_KEY: [N, *shape] every rank's value, STATIC_EP_KEY: 0 / 1}``
PER_RANK_KEY = "fsep_per_rank"
STATIC_EP_KEY = "fsep_static_ep"


def _is_per_rank(value: Any, layer: FSEPExperts) -> bool:
    """A non-scalar tensor state shaped neither like the parameter nor like the full experts: it is computed
    from this rank's rows (Adafactor's ``row_var [E, 1]`` / ``col_var [1, S]``) and differs between ranks."""
    return (
        isinstance(value, torch.Tensor)
        and value.dim() > 0
        and not _is_local(value, layer)
        and not _is_full(value, layer)
    )


def _state_to_full(k: str, v: Any, layer: FSEPExperts) -> Any:
    if _is_local(v, layer):
        return layer.gather_flat(v)
    if _is_per_rank(v, layer):  # no rank-independent form: every rank's value, stacked (collective)
        v = v.detach().contiguous()
        out = v.new_empty((layer.world_size * v.shape[0], *v.shape[1:]))  # concatenated: what gloo takes
        _all_gather_single(out, v, group=layer.group)
        return {
            PER_RANK_KEY: out.view(layer.world_size, *v.shape),
            STATIC_EP_KEY: int(layer.config.mode == "static_ep"),
        }
    return v


def _state_to_local(k: str, v: Any, layer: FSEPExperts) -> Any:
    if _is_full(v, layer):
        return layer.local_from_flat(v)
    if isinstance(v, dict) and PER_RANK_KEY in v:
        stacked, static_ep = v[PER_RANK_KEY], bool(v.get(STATIC_EP_KEY, 0))
        if stacked.shape[0] != layer.world_size or static_ep != (layer.config.mode == "static_ep"):
            saved = "static_ep" if static_ep else "fsep"
            raise RuntimeError(
                f"optimizer load_state_dict: the state {k!r} of an FSEP expert parameter was saved per rank "
                f"(it depends on each rank's rows, e.g. a factored second moment) by {stacked.shape[0]} ranks in "
                f"mode {saved!r}; it can only be resumed on as many ranks in the same mode, not on "
                f"{layer.world_size} in mode {layer.config.mode!r}"
            )
        return stacked[layer.rank].clone()
    if _is_local(v, layer) or _is_per_rank(v, layer):
        raise RuntimeError(
            f"optimizer load_state_dict: the state {k!r} of an FSEP expert parameter holds one rank's "
            f"rows (shape {tuple(v.shape)}); every rank holds different ones, so loading it could hand "
            "one rank's rows to all. Save with optimizer.state_dict() on every rank after a step "
            "(accelerator.save_state does): it writes the full experts (states of other shapes: every "
            "rank's own)."
        )
    return v


def fsep_optimizer_state_dict_hook(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
    """Optimizer ``state_dict`` post-hook (collective): the states of FSEP expert parameters shaped like the
    parameter (e.g. Adam's ``exp_avg`` / ``exp_avg_sq``) become the full flattened experts ``[E, 3*I*H]``; other
    non-scalar states (e.g. Adafactor's ``row_var`` / ``col_var``, computed from this rank's rows) become
    ``{PER_RANK_KEY: [N, *shape], STATIC_EP_KEY: 0 / 1}``, every rank's own value."""
    return _map_expert_states(optimizer, state_dict, _state_to_full)


def fsep_optimizer_load_state_dict_pre_hook(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
    """Optimizer ``load_state_dict`` pre-hook: keep this rank's rows of the full expert states written by
    :func:`fsep_optimizer_state_dict_hook` (and this rank's value of a per-rank state, which needs the same
    world size and mode); a state with one rank's rows raises (it would be loaded on all)."""
    return _map_expert_states(optimizer, state_dict, _state_to_local)


def prepare_fsep_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Register the FSEP state-dict hooks on ``optimizer`` (once; returns it). Done automatically before an
    optimizer's first ``step`` that holds an FSEP expert parameter (one added by ``add_param_group`` too); a
    state loaded earlier is cut to this rank's rows at that step."""
    inner = getattr(optimizer, "optimizer", None)  # accelerate's AcceleratedOptimizer wraps one
    if isinstance(inner, torch.optim.Optimizer) and inner is not optimizer:
        prepare_fsep_optimizer(inner)
        return optimizer
    if optimizer.__dict__.get("_fsep_hooked"):
        return optimizer
    experts = [
        (p, layer)
        for g in optimizer.param_groups
        for p in g["params"]
        if (layer := _expert_layer(p)) is not None
    ]
    if (
        not experts
    ):  # not marked: the step pre-hook looks again (expert parameters may come by add_param_group)
        return optimizer
    optimizer._fsep_hooked = True
    optimizer.register_state_dict_post_hook(fsep_optimizer_state_dict_hook)
    optimizer.register_load_state_dict_pre_hook(fsep_optimizer_load_state_dict_pre_hook)
    for p, layer in experts:
        st = optimizer.state.get(p) or {}
        for k, v in list(st.items()):
            if _is_full(v, layer) or (isinstance(v, dict) and PER_RANK_KEY in v):  # loaded before the hooks
                st[k] = _state_to_local(k, v, layer)
    return optimizer


def _optimizer_step_pre_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    if not optimizer.__dict__.get("_fsep_hooked"):
        prepare_fsep_optimizer(optimizer)
