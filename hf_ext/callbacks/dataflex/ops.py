"""Model-dependent operations shared by the DataFlex methods.

* :func:`per_sample_loss` – batched inference, token-mean loss per sample, ``[N]``.
* :func:`per_sample_excess_loss` – DoReMi's per-token clipped excess loss over a reference model, ``[N, 2]``.
* :func:`embeddings` – mean-pooled hidden states per sample, ``[N, H]``.
* :func:`grad_features` – per-sample gradients of the trainable parameters (LoRA ones under
  PEFT), optionally Adam-preconditioned (LESS), randomly projected to ``proj_dim``: ``[N, k]``.

All three accept a plain module, a DDP-wrapped module, an FSDP2 (``fully_shard``) module or a
PEFT model, and run under ``torch.distributed`` (gloo or NCCL):

* replicated parameters (single process, DDP): every rank takes a contiguous shard of the
  samples, results are all-gathered, every rank returns the full ``[N, ...]`` tensor;
* sharded parameters (FSDP2 ``DTensor``): forward passes are collective, so ranks run the same
  number of batches (shards are padded); for gradients every rank processes every sample in
  lockstep, projects the gradient shard it owns (with the projection rows of its global offset)
  and the projections are summed with ``all_reduce`` — the result equals the single-process one.
* DeepSpeed ZeRO-3 (parameters with ``ds_id``): forward-only ops work as for FSDP2; gradients
  use ``deepspeed.utils.safe_get_full_grad`` after an engine backward (GPU path, untested here).

Example:
    >>> from hf_ext.testing import tiny_llama
    >>> model = tiny_llama()
    >>> data = [{"input_ids": [1, 5, 6, 7]}, {"input_ids": [1, 9, 9]}]
    >>> per_sample_loss(model, data, [0, 1]).shape
    torch.Size([2])
    >>> grad_features(model, data, [0, 1], proj_dim=16).shape
    torch.Size([2, 16])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]


# ------------------------------------------------------------------------------------ helpers
def dist_info() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` when torch.distributed is not initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / DataParallel wrappers (FSDP2 and PEFT models are used as they are)."""
    while isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        model = model.module
    return model


def _is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, DTensor)


def is_sharded(model: torch.nn.Module) -> str | None:
    """``"fsdp"`` when parameters are DTensors, ``"zero3"`` for DeepSpeed ZeRO-3, else ``None``."""
    for p in model.parameters():
        if _is_dtensor(p):
            return "fsdp"
        if hasattr(p, "ds_id"):
            return "zero3"
    return None


def reshard(model: torch.nn.Module) -> None:
    """Put every FSDP2 module back in its sharded state (no-op otherwise).

    A no-grad forward leaves the root's parameters unsharded; ``model.parameters()`` would then
    list the temporary unsharded tensors instead of the sharded ``DTensor`` parameters.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return
    for mod in model.modules():
        if isinstance(mod, FSDPModule):
            mod.reshard()


def model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _comm_device(model_dev: torch.device) -> torch.device:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "nccl":
        return model_dev
    return torch.device("cpu")


def default_collate(features: Sequence[dict[str, Any]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids`` into a batch with ``attention_mask`` and ``labels``.

    ``labels`` come from the features when present (padded with -100); else from
    ``completion_mask`` (prompt tokens ignored) when present; else the input ids. A scalar
    ``labels``/``label`` becomes a ``[B]`` tensor (integer: class ids; float: regression targets, kept as floats), a
    float vector (multi-label targets, multi-output regression) a ``[B, C]`` float tensor.
    """
    ids = [list(map(int, f["input_ids"])) for f in features]
    length = max(1, max(len(x) for x in ids))
    bsz = len(ids)
    input_ids = torch.full((bsz, length), pad_id, dtype=torch.long)
    attn = torch.zeros((bsz, length), dtype=torch.long)
    labels = torch.full((bsz, length), IGNORE_INDEX, dtype=torch.long)
    rows: list[torch.Tensor] = []  # one label (vector) per sample: classification / regression
    for i, (f, x) in enumerate(zip(features, ids)):
        n = len(x)
        input_ids[i, :n] = torch.tensor(x, dtype=torch.long)
        if "attention_mask" in f and f["attention_mask"] is not None:
            attn[i, :n] = torch.tensor(list(f["attention_mask"]), dtype=torch.long)[:n]
        else:
            attn[i, :n] = 1
        lab = f.get("labels", f.get("label"))
        lab_t = None if lab is None else torch.as_tensor(lab)
        if lab_t is not None and (lab_t.dim() == 0 or lab_t.is_floating_point()):
            rows.append(lab_t)
        elif lab_t is not None:
            labels[i, :n] = lab_t.long()[:n]
        elif f.get("completion_mask") is not None:
            m = torch.tensor(list(f["completion_mask"]), dtype=torch.bool)[:n]
            labels[i, :n] = torch.where(m, input_ids[i, :n], IGNORE_INDEX)
        else:
            labels[i, :n] = torch.where(attn[i, :n].bool(), input_ids[i, :n], IGNORE_INDEX)
    out = {"input_ids": input_ids, "attention_mask": attn, "labels": labels}
    if rows:
        if len(rows) != bsz or len({r.shape for r in rows}) != 1:
            raise ValueError(
                "default_collate: every sample of a batch needs a label of the same shape (a class id, a regression "
                "target or a multi-label vector)"
            )
        lab = torch.stack(rows)
        out["labels"] = lab.float() if lab.is_floating_point() else lab.long()
    return out


def loss_shifts_labels(model: torch.nn.Module) -> bool:
    """Whether ``model``'s loss predicts token ``t + 1`` at position ``t`` (causal LM).

    transformers models: the rule ``Trainer`` uses for ``num_items_in_batch``
    (``Trainer._loss_shifts_labels``): the model's ``loss_type`` maps to ``ForCausalLMLoss`` and
    it is not an encoder-decoder; token classification and seq2seq models do not shift. Modules
    without ``loss_type`` (not a transformers model) are treated as causal LMs.
    """
    m = unwrap(model)
    if not hasattr(m, "loss_type"):
        return True
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

    is_enc_dec = bool(getattr(getattr(m, "config", None), "is_encoder_decoder", False))
    return LOSS_MAPPING.get(m.loss_type) is ForCausalLMLoss and not is_enc_dec


def sequence_loss_terms(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    label_smoothing: float = 0.0,
    shift: bool = True,
    problem_type: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample loss sum and item count.

    Args:
        logits: ``[B, S, V]`` (per token) or ``[B, C]`` (sequence classification / regression).
        labels: ``[B, S]`` with -100 ignored, ``[B]`` (class ids; regression targets), or ``[B, C]`` (multi-label
            targets; multi-output regression).
        shift: for ``[B, S, V]``: causal LM, position ``t`` predicts label ``t + 1`` (see
            :func:`loss_shifts_labels`); False for token classification / seq2seq.
        label_smoothing: ``eps``; each item's loss is ``(1 - eps) * nll + eps * mean_v(-log p_v)``,
            the per-item form of transformers' ``LabelSmoother`` (ignored items stay 0).
        problem_type: for ``[B, C]`` logits, the model config's ``problem_type``; None infers it as transformers'
            sequence-classification heads do (``C == 1``: regression, float labels: multi-label, else single-label).

    Returns:
        ``(loss_sum [B], count [B])`` in fp32; ``loss_sum / count`` is the token-mean loss.
    """
    tok, mask = token_loss_terms(
        logits, labels, label_smoothing=label_smoothing, shift=shift, problem_type=problem_type
    )
    return (tok * mask).sum(-1), mask.sum(-1)


def token_loss_terms(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    label_smoothing: float = 0.0,
    shift: bool = True,
    problem_type: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-item loss and mask (fp32): ``[B, S']`` for ``[B, S, V]`` logits (``S' = S - 1`` when ``shift``),
    ``[B, 1]`` for ``[B, C]`` single-label classification, ``[B, C]`` for multi-label classification (binary
    cross-entropy per label) and regression (squared error per output). Ignored items have loss 0 and mask 0."""
    if logits.dim() == 2:
        if problem_type is None:  # transformers' rule (e.g. LlamaForSequenceClassification.forward)
            if logits.shape[-1] == 1:
                problem_type = "regression"
            elif labels.is_floating_point():
                problem_type = "multi_label_classification"
        if problem_type == "regression":
            err = (logits.float().reshape(len(logits), -1) - labels.float().reshape(len(labels), -1)) ** 2
            return err, torch.ones_like(err)
        if problem_type == "multi_label_classification":
            bce = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")
            return bce, torch.ones_like(bce)
        tok = F.cross_entropy(
            logits.float(),
            labels,
            reduction="none",
            ignore_index=IGNORE_INDEX,
            label_smoothing=label_smoothing,
        )
        return tok.unsqueeze(-1), (labels != IGNORE_INDEX).float().unsqueeze(-1)
    shift_logits = logits[:, :-1, :].float() if shift else logits.float()
    shift_labels = (labels[:, 1:] if shift else labels).to(shift_logits.device)
    tok = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        reduction="none",
        ignore_index=IGNORE_INDEX,
        label_smoothing=label_smoothing,
    ).view(shift_labels.shape)
    mask = (shift_labels != IGNORE_INDEX).float()
    return tok * mask, mask


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Token-mean loss of a batch (mean over samples of each sample's token mean)."""
    out = model(**_model_inputs(batch))
    s, c = sequence_loss_terms(out.logits, batch["labels"], shift=loss_shifts_labels(model))
    return (s / c.clamp(min=1)).mean()


def _get_items(dataset: Any, idx: Sequence[int]) -> list[dict[str, Any]]:
    return [dataset[int(i)] for i in idx]


def _pad_id(model: torch.nn.Module) -> int:
    cfg = getattr(unwrap(model), "config", None)
    pid = getattr(cfg, "pad_token_id", None)
    return int(pid) if isinstance(pid, int) else 0


# ------------------------------------------------------------------------------- sharded maps
def _split(n: int, rank: int, world: int) -> tuple[int, int, int]:
    """Contiguous shard ``[lo, hi)`` of ``n`` items for ``rank`` and the padded shard length."""
    chunk = math.ceil(n / world) if n else 0
    lo = min(n, rank * chunk)
    hi = min(n, lo + chunk)
    return lo, hi, chunk


def _gather_rows(local: torch.Tensor, n: int, chunk: int, dev: torch.device) -> torch.Tensor:
    """All-gather per-rank ``[chunk, ...]`` rows (padded) and return the first ``n`` rows in order."""
    import torch.distributed as dist

    _, world = dist_info()
    if world == 1:
        return local[:n]
    t = local.to(dev).contiguous()
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t)
    return torch.cat(parts, 0)[:n].cpu()


def _training_flags(model: torch.nn.Module) -> list[tuple[torch.nn.Module, bool]]:
    """Every module's own ``training`` flag (a model in training mode may hold sub-modules kept in eval mode)."""
    return [(m, m.training) for m in model.modules()]


def _restore_training(flags: list[tuple[torch.nn.Module, bool]]) -> None:
    """Put back what :func:`_training_flags` read (``model.train(was_training)`` would set every module alike)."""
    for m, flag in flags:
        m.training = flag


@torch.no_grad()
def _map_forward(
    model: torch.nn.Module,
    dataset: Any,
    indices: Sequence[int],
    fn: Callable[[dict], torch.Tensor],
    *,
    collate_fn: Callable | None,
    batch_size: int,
) -> torch.Tensor:
    """Run ``fn(batch) -> [b, ...]`` over ``indices`` sharded across ranks; ``[N, ...]`` on CPU."""
    rank, world = dist_info()
    n = len(indices)
    lo, hi, chunk = _split(n, rank, world)
    mine = list(indices[lo:hi])
    if world > 1 and len(mine) < chunk:  # equal work on every rank (collective forwards under FSDP)
        filler = int(indices[-1]) if n else 0
        mine += [filler] * (chunk - len(mine))
    dev = model_device(model)
    collate = collate_fn or (lambda feats: default_collate(feats, _pad_id(model)))
    outs = []
    flags = _training_flags(model)
    model.eval()
    try:
        for s in range(0, len(mine), batch_size):
            batch = _to_device(collate(_get_items(dataset, mine[s : s + batch_size])), dev)
            outs.append(fn(batch).float().cpu())
    finally:
        _restore_training(flags)
        reshard(model)
    if not outs:  # n == 0 or an empty shard: shape from a probe is unknown; return empty
        probe = None
        if n:
            batch = _to_device(collate(_get_items(dataset, [int(indices[0])])), dev)
            probe = fn(batch).float().cpu()
        local = torch.zeros((0, *probe.shape[1:])) if probe is not None else torch.zeros(0)
    else:
        local = torch.cat(outs, 0)
    if world == 1:
        return local
    return _gather_rows(local, n, chunk, _comm_device(dev))


def per_sample_loss(
    model: torch.nn.Module,
    dataset: Any,
    indices: Sequence[int],
    *,
    collate_fn: Callable | None = None,
    batch_size: int = 8,
) -> torch.Tensor:
    """Token-mean loss of each sample, ``[N]`` (fp32, CPU), in the order of ``indices``."""

    shift = loss_shifts_labels(model)

    def fn(batch: dict) -> torch.Tensor:
        out = model(**_model_inputs(batch))
        s, c = sequence_loss_terms(out.logits, batch["labels"], shift=shift)
        return s / c.clamp(min=1)

    return _map_forward(model, dataset, indices, fn, collate_fn=collate_fn, batch_size=batch_size)


def per_sample_excess_loss(
    model: torch.nn.Module,
    reference_model: torch.nn.Module,
    dataset: Any,
    indices: Sequence[int],
    *,
    collate_fn: Callable | None = None,
    batch_size: int = 8,
) -> torch.Tensor:
    """DoReMi's excess-loss terms of each sample, ``[N, 2]`` (fp32, CPU): column 0 is
    ``sum_j max(l_j(model) - l_j(reference_model), 0)`` over the sample's label tokens ``j`` (clipped per token,
    Algorithm 1 of the paper), column 1 the number of those tokens."""
    shift = loss_shifts_labels(model)
    ref_dev = model_device(reference_model)

    def fn(batch: dict) -> torch.Tensor:
        out = model(**_model_inputs(batch))
        ref_out = reference_model(**_model_inputs(_to_device(batch, ref_dev)))
        tok, mask = token_loss_terms(out.logits, batch["labels"], shift=shift)
        ref_tok, _ = token_loss_terms(ref_out.logits, batch["labels"].to(ref_dev), shift=shift)
        excess = ((tok - ref_tok.to(tok.device)).clamp(min=0) * mask).sum(-1)
        return torch.stack([excess, mask.sum(-1)], -1)

    ref_flags = _training_flags(reference_model)
    reference_model.eval()
    try:
        return _map_forward(model, dataset, indices, fn, collate_fn=collate_fn, batch_size=batch_size)
    finally:
        _restore_training(ref_flags)
        reshard(reference_model)


def embeddings(
    model: torch.nn.Module,
    dataset: Any,
    indices: Sequence[int],
    *,
    collate_fn: Callable | None = None,
    batch_size: int = 8,
    layer: int = -1,
    normalize: bool = True,
) -> torch.Tensor:
    """Mean-pooled (over ``attention_mask``) hidden state of layer ``layer``, ``[N, H]``, L2-normalised."""

    def fn(batch: dict) -> torch.Tensor:
        out = model(**_model_inputs(batch), output_hidden_states=True)
        h = out.hidden_states[layer].float()  # [b, S, H]
        m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
        e = (h * m).sum(1) / m.sum(1).clamp(min=1)
        return F.normalize(e, dim=-1) if normalize else e

    return _map_forward(model, dataset, indices, fn, collate_fn=collate_fn, batch_size=batch_size)


# --------------------------------------------------------------------------- random projection
class RandomProjector:
    """Random projection ``R^P -> R^k`` applied parameter by parameter, shard by shard.

    The projection of parameter ``j`` is cut into row blocks; each block's matrix is drawn from
    a generator seeded by ``(seed, j, block)``, so any rank can project any row range of any
    parameter without materialising the full ``[P, k]`` matrix, and ranks agree exactly.

    ``kind="gaussian"``: dense N(0, 1/k) entries (JL; LESS/TRAK style). ``kind="sketch"``:
    CountSketch (each coordinate to one random bucket with a random sign): O(P) per sample.
    Blocks are cached up to ``cache_bytes``.
    """

    def __init__(
        self,
        proj_dim: int,
        seed: int = 0,
        kind: str = "gaussian",
        device: torch.device | str = "cpu",
        block_elems: int = 1 << 16,
        cache_bytes: int = 256 << 20,
    ) -> None:
        if proj_dim <= 0:
            raise ValueError(f"proj_dim must be > 0, got {proj_dim}")
        if kind not in ("gaussian", "sketch"):
            raise ValueError(f"projection kind={kind!r} is not supported; choose 'gaussian' or 'sketch'")
        self.k, self.seed, self.kind = proj_dim, seed, kind
        self.device = torch.device(device)
        self.block_elems = block_elems
        self.cache_bytes = cache_bytes
        self._cache: dict[tuple[int, int], Any] = {}
        self._cached = 0

    def _block(self, j: int, b: int, numel: int) -> Any:
        key = (j, b)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        gen = torch.Generator(device=self.device)
        gen.manual_seed((self.seed * 1_000_003 + j * 7_919 + b * 104_729 + 17) % (2**62))
        if self.kind == "gaussian":
            val: Any = torch.randn(numel, self.k, generator=gen, device=self.device) / math.sqrt(self.k)
            size = val.numel() * 4
        else:
            bucket = torch.randint(0, self.k, (numel,), generator=gen, device=self.device)
            sign = torch.randint(0, 2, (numel,), generator=gen, device=self.device).float() * 2 - 1
            val = (bucket, sign)
            size = numel * 12
        if self._cached + size <= self.cache_bytes:
            self._cache[key] = val
            self._cached += size
        return val

    def project(self, j: int, local: torch.Tensor, full_rows: int, row_offset: int = 0) -> torch.Tensor:
        """Project rows ``[row_offset, row_offset + local.shape[0])`` of parameter ``j``.

        Args:
            j: parameter position (same on every rank).
            local: ``[r, ...]`` local slice of the gradient (dim 0 = rows of the full tensor).
            full_rows: rows of the full (unsharded) tensor.
            row_offset: global index of ``local``'s first row.
        Returns:
            ``[k]`` contribution of this slice.
        """
        out = torch.zeros(self.k, device=self.device)
        if local.numel() == 0:
            return out
        loc = local.reshape(local.shape[0], -1).to(self.device, torch.float32)
        row_numel = loc.shape[1]
        br = max(1, self.block_elems // max(1, row_numel))
        r0, r1 = row_offset, row_offset + loc.shape[0]
        for b in range(r0 // br, (r1 - 1) // br + 1):
            b_lo, b_hi = b * br, min((b + 1) * br, full_rows)
            lo, hi = max(b_lo, r0), min(b_hi, r1)
            if lo >= hi:
                continue
            blk = self._block(j, b, (b_hi - b_lo) * row_numel)
            x = loc[lo - r0 : hi - r0].reshape(-1)
            s, e = (lo - b_lo) * row_numel, (hi - b_lo) * row_numel
            if self.kind == "gaussian":
                out += x @ blk[s:e]
            else:
                bucket, sign = blk
                out.index_add_(0, bucket[s:e], x * sign[s:e])
        return out


def _shard_rows(p: torch.Tensor, local: torch.Tensor) -> tuple[int, int, bool]:
    """(full_rows, row_offset, contributes) of a parameter's local gradient slice."""
    full_shape = tuple(p.shape)
    full_rows = full_shape[0] if len(full_shape) else 1
    if not _is_dtensor(p):
        return full_rows, 0, True
    from torch.distributed.tensor import Replicate, Shard

    mesh = p.device_mesh
    if mesh.ndim != 1:
        raise NotImplementedError("grad_features supports FSDP2 on a 1-D device mesh only")
    (pl,) = p.placements
    coord = mesh.get_local_rank()
    if isinstance(pl, Replicate):
        return full_rows, 0, coord == 0
    if isinstance(pl, Shard) and pl.dim == 0:
        chunk = math.ceil(full_rows / mesh.size())
        return full_rows, coord * chunk, True
    raise NotImplementedError(f"grad_features: unsupported DTensor placement {pl}")


def _local(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None:
        return None
    return t.to_local() if _is_dtensor(t) else t


def _optimizer_attr(optimizer: Any, name: str, kind: type) -> Any:
    """``optimizer.<name>`` if it is a ``kind``, else that of the optimizer it wraps (accelerate's
    ``AcceleratedOptimizer``, a few levels deep); None when none has it."""
    opt = optimizer
    for _ in range(4):
        value = getattr(opt, name, None)
        if isinstance(value, kind):
            return value
        opt = getattr(opt, "optimizer", None)
        if opt is None:
            break
    return None


def _optimizer_state(optimizer: Any) -> dict:
    """``param -> state`` of a torch optimizer (also through accelerate's ``AcceleratedOptimizer``)."""
    return _optimizer_attr(optimizer, "state", dict) or {}


def _adam_hparams(optimizer: Any) -> dict:
    """``param -> (betas, eps)`` from the optimizer's param groups (also through ``AcceleratedOptimizer``)."""
    out = {}
    for g in _optimizer_attr(optimizer, "param_groups", list) or []:
        if "betas" in g and "eps" in g:
            betas = (float(g["betas"][0]), float(g["betas"][1]))
            for p in g["params"]:
                out[p] = (betas, float(g["eps"]))
    return out


def _adam_direction(
    p: torch.Tensor, g: torch.Tensor, state: dict, betas: tuple[float, float], eps: float
) -> torch.Tensor:
    """LESS's Adam-preconditioned per-sample direction ``m_hat / (sqrt(v_hat) + eps)`` (falls back to g)."""
    st = state.get(p)
    if not st or "exp_avg" not in st or "exp_avg_sq" not in st:
        return g
    b1, b2 = betas
    m = _local(st["exp_avg"]).to(g.device, torch.float32)
    v = _local(st["exp_avg_sq"]).to(g.device, torch.float32)
    step = float(st.get("step", 1))
    t = step + 1
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat = m / (1 - b1**t)
    v_hat = v / (1 - b2**t)
    return m_hat / (v_hat.sqrt() + eps)


def grad_features(
    model: torch.nn.Module,
    dataset: Any,
    indices: Sequence[int],
    *,
    proj_dim: int = 256,
    seed: int = 0,
    optimizer: Any = None,
    precondition: str = "sgd",
    projection: str = "gaussian",
    normalize: bool = False,
    collate_fn: Callable | None = None,
    loss_fn: LossFn | None = None,
    item_loss_fn: Callable[[torch.nn.Module, int], torch.Tensor] | None = None,
    betas: tuple[float, float] | None = None,
    eps: float | None = None,
    projector: RandomProjector | None = None,
) -> torch.Tensor:
    """Randomly projected per-sample gradients of the trainable parameters, ``[N, proj_dim]``.

    Args:
        model: the training model (plain, DDP, FSDP2 or PEFT; only ``requires_grad`` params count).
        dataset: indexable, items with ``input_ids`` (see :func:`default_collate`).
        indices: which samples.
        proj_dim: ``k``.
        seed: projection seed (identical on every rank).
        optimizer: for ``precondition="adam"``: the optimizer holding ``exp_avg``/``exp_avg_sq``.
        precondition: ``"sgd"`` (raw gradient) or ``"adam"`` (LESS training-sample features).
        projection: ``"gaussian"`` or ``"sketch"`` (see :class:`RandomProjector`).
        normalize: L2-normalise each row.
        loss_fn: ``loss_fn(model, batch) -> scalar``; default token-mean LM loss.
        item_loss_fn: ``item_loss_fn(model, index) -> scalar`` used instead of batching the dataset
            (NICE's policy-gradient surrogate).
        betas, eps: Adam constants of the preconditioner; None (default): each parameter's
            ``param_group["betas"]`` / ``["eps"]`` of ``optimizer`` (else ``(0.9, 0.999)`` / ``1e-8``).
    """
    if precondition not in ("sgd", "adam"):
        raise ValueError(f"precondition={precondition!r} is not supported; choose 'sgd' or 'adam'")
    rank, world = dist_info()
    reshard(model)
    sharded = is_sharded(model)
    n = len(indices)
    dev = model_device(model)
    proj = projector or RandomProjector(proj_dim, seed=seed, kind=projection, device=dev)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            "grad_features: the model has no trainable parameters (requires_grad=False everywhere)"
        )
    opt_state = _optimizer_state(optimizer) if (optimizer is not None and precondition == "adam") else {}
    hparams = _adam_hparams(optimizer) if opt_state else {}
    collate = collate_fn or (lambda feats: default_collate(feats, _pad_id(model)))
    loss_fn = loss_fn or lm_loss

    if world > 1 and not sharded:
        lo, hi, chunk = _split(n, rank, world)
        mine = list(indices[lo:hi])
    else:  # single process, or sharded params: every rank does every sample in lockstep
        mine, chunk = list(indices), n

    saved = [p.grad for p in params]
    flags = _training_flags(model)
    model.eval()
    no_sync = getattr(model, "no_sync", None) if (world > 1 and not sharded) else None
    rows = []
    try:
        for i in mine:
            for p in params:
                p.grad = None
            ctx = no_sync() if no_sync is not None else _nullcontext()
            with ctx:
                if item_loss_fn is not None:
                    loss = item_loss_fn(model, int(i))
                else:
                    batch = _to_device(collate(_get_items(dataset, [int(i)])), dev)
                    loss = loss_fn(model, batch)
                if sharded == "zero3":
                    model.backward(loss)  # DeepSpeed engine
                else:
                    loss.backward()
            vec = torch.zeros(proj.k, device=proj.device)
            for j, p in enumerate(params):
                if sharded == "zero3":  # pragma: no cover - needs deepspeed on GPU
                    from deepspeed.utils import safe_get_full_grad

                    g = safe_get_full_grad(p)
                    if g is None or rank != 0:
                        continue
                    full_rows, off, contributes = (g.shape[0] if g.dim() else 1), 0, True
                else:
                    g = _local(p.grad)
                    if g is None:
                        continue
                    full_rows, off, contributes = _shard_rows(p, g)
                if not contributes:
                    continue
                g = g.float()
                if opt_state:
                    p_betas, p_eps = hparams.get(p, ((0.9, 0.999), 1e-8))
                    g = _adam_direction(
                        p,
                        g,
                        opt_state,
                        p_betas if betas is None else betas,
                        p_eps if eps is None else eps,
                    )
                vec += proj.project(j, g if g.dim() else g.reshape(1), full_rows, off)
            rows.append(vec)
    finally:
        for p, g in zip(params, saved):
            p.grad = g
        _restore_training(flags)
    if world > 1 and not sharded:
        while len(rows) < chunk:
            rows.append(torch.zeros(proj.k, device=proj.device))
    local = torch.stack(rows, 0) if rows else torch.zeros((0, proj.k), device=proj.device)
    if world > 1:
        import torch.distributed as dist

        cdev = _comm_device(dev)
        if sharded:
            local = local.to(cdev)
            dist.all_reduce(local)
            out = local.cpu()
        else:
            out = _gather_rows(local.cpu(), n, chunk, cdev)
    else:
        out = local.cpu()
    return F.normalize(out, dim=-1) if normalize else out


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
