"""Profilers: per-layer compute/memory of a transformers model and collective bandwidths.

Two JSON-serialisable results feed the cost model:

* :class:`ModelProfile` from :func:`profile_model`: forward and backward time of each decoder layer
  and of the LM head at a sequence length and a few micro-batch sizes (linear fit
  ``t(b) = fixed + slope * b``), saved activation bytes per sample (counted with
  ``torch.autograd.graph.saved_tensors_hooks``, so it works on CPU and GPU alike), parameter counts,
  and the derived achieved TFLOP/s and activation calibration against the analytic formulas.
* :class:`HardwareProfile`: achieved compute, HBM bandwidth and an alpha-beta model
  (``latency + bytes / bus_bandwidth``) of all-reduce, all-gather, reduce-scatter, all-to-all and p2p,
  intra-node and inter-node. :func:`profile_collectives` measures them for every power-of-two group
  size available in the current process group; :meth:`HardwareProfile.h100` holds documented defaults.

Results are cached as JSON (``cache_dir``); the key hashes shape, sequence length, micro-batches,
dtype and device name.

Example:
    >>> from hf_ext.testing import tiny_llama
    >>> prof = profile_model(tiny_llama(), seq_len=32, micro_batches=(1, 2), repeats=1, max_layers=1)
    >>> prof.layers[0].act_bytes_per_sample > 0
    True
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from hf_ext.accelerate.autoparallel.shapes import ModelShape, get_shape

_PROFILE_VERSION = 3  # bump when profile_model measures something new (invalidates caches)
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "p2p")


# ---------------------------------------------------------------------------------------- hardware
@dataclass
class LinkProfile:
    """Alpha-beta model of one collective on one kind of link: ``latency_us + bytes / (busbw * 1e9)``."""

    latency_us: float
    bus_bandwidth_GBps: float

    def time_ms(self, bus_bytes: float) -> float:
        return self.latency_us * 1e-3 + bus_bytes / (self.bus_bandwidth_GBps * 1e9) * 1e3


class _JsonFile:
    """``save(path)`` / ``load(path)`` through the class's ``to_dict`` / ``from_dict`` (atomic write)."""

    def save(self, path: str) -> None:
        _write_json(path, self.to_dict())  # type: ignore[attr-defined]

    @classmethod
    def load(cls, path: str) -> Any:
        with open(path) as f:
            return cls.from_dict(json.load(f))  # type: ignore[attr-defined]


@dataclass
class HardwareProfile(_JsonFile):
    """Device and interconnect characteristics used by the cost model.

    ``intra`` / ``inter`` give a :class:`LinkProfile` per collective name (see ``COLLECTIVES``) for
    groups inside one node and groups that cross nodes. ``measured`` optionally overrides them per
    group size: ``{"all_reduce": {"2": [latency_us, busbw_GBps]}}`` (as written by
    :func:`profile_collectives`).
    """

    name: str
    peak_tflops: float
    achieved_tflops: float
    hbm_GBps: float
    memory_gb: float
    gpus_per_node: int = 8
    intra: dict[str, LinkProfile] = field(default_factory=dict)
    inter: dict[str, LinkProfile] = field(default_factory=dict)
    measured: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    bwd_fwd_ratio: float = 2.0
    per_layer_overhead_ms: float = 0.0
    notes: str = ""

    @classmethod
    def h100(cls) -> HardwareProfile:
        """Defaults for an 8x H100-SXM 80GB node with NVLink 4 and 8x400 Gb/s InfiniBand per node.

        Assumptions (not measured here): dense bf16 peak 989 TFLOP/s; a transformer layer reaches
        450 TFLOP/s (Llama 3 reports 38-43% MFU end to end at scale); NCCL bus bandwidth 360 GB/s inside
        a node and 45 GB/s per GPU across nodes; HBM 3.0 TB/s (device copy, measured in GPU.md).
        """
        intra = {c: LinkProfile(20.0, 360.0) for c in COLLECTIVES}
        intra["p2p"] = LinkProfile(15.0, 200.0)
        inter = {c: LinkProfile(40.0, 45.0) for c in COLLECTIVES}
        inter["p2p"] = LinkProfile(20.0, 45.0)
        return cls(
            "H100-SXM-80GB (defaults)",
            989.0,
            450.0,
            3000.0,
            80.0,
            8,
            intra,
            inter,
            notes="documented defaults, not measured",
        )

    @classmethod
    def cpu(cls) -> HardwareProfile:
        """A slow 'device' for CPU tests (numbers only need to be self-consistent)."""
        links = {c: LinkProfile(50.0, 2.0) for c in COLLECTIVES}
        return cls("cpu", 0.2, 0.1, 20.0, 16.0, 8, dict(links), dict(links), notes="cpu test defaults")

    # -- collectives ------------------------------------------------------------------------------
    def collective_ms(self, op: str, nbytes: float, group: int, crosses_nodes: bool = False) -> float:
        """Time of collective ``op`` on a ``group``-rank group; ``nbytes`` is the full (unsharded) buffer.

        Bus bytes follow nccl-tests: all-reduce ``2(g-1)/g * n``, all-gather / reduce-scatter /
        all-to-all ``(g-1)/g * n``, p2p ``n``.
        """
        if op not in COLLECTIVES:
            raise ValueError(f"op={op!r} is not a collective; choose one of {', '.join(COLLECTIVES)}")
        if group <= 1 and op != "p2p":
            return 0.0
        if op == "all_reduce":
            bus = 2 * (group - 1) / group * nbytes
        elif op == "p2p":
            bus = nbytes
        else:
            bus = (group - 1) / group * nbytes
        m = self.measured.get(op, {}).get(str(group))
        if m is not None and not crosses_nodes:
            return LinkProfile(m[0], m[1]).time_ms(bus)
        link = (self.inter if crosses_nodes else self.intra).get(op)
        if link is None:
            raise ValueError(f"hardware profile {self.name!r} has no link model for {op!r}")
        return link.time_ms(bus)

    # -- json -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HardwareProfile:
        d = dict(d)
        d["intra"] = {k: LinkProfile(**v) for k, v in d.get("intra", {}).items()}
        d["inter"] = {k: LinkProfile(**v) for k, v in d.get("inter", {}).items()}
        return cls(**d)


# ------------------------------------------------------------------------------------------- model
@dataclass
class LayerProfile:
    """One profiled block (a decoder layer or the LM head), times in ms, bytes per sample.

    ``fwd_ms(b) = fwd_fixed_ms + fwd_ms_per_sample * b``; same for ``bwd``.
    """

    name: str
    params: int
    fwd_fixed_ms: float
    fwd_ms_per_sample: float
    bwd_fixed_ms: float
    bwd_ms_per_sample: float
    act_bytes_per_sample: float

    def fwd_ms(self, b: float) -> float:
        return max(0.0, self.fwd_fixed_ms + self.fwd_ms_per_sample * b)

    def bwd_ms(self, b: float) -> float:
        return max(0.0, self.bwd_fixed_ms + self.bwd_ms_per_sample * b)


@dataclass
class ModelProfile(_JsonFile):
    """Measured per-layer profile of a model at one sequence length (see :func:`profile_model`).

    Besides the decoder layers and the head (final norm + LM head + fp32 cross-entropy) it holds the
    measured step costs outside the layers' own compute (0 / ``None`` when not measured; the cost model
    then falls back to analytic estimates):

    * ``embed``: input-embedding forward + backward (the backward writes a dense ``[V, h]`` gradient);
    * ``optimizer_ns_per_param``: one ``torch.optim.AdamW(foreach=True)`` step per fp32 parameter;
    * ``autocast_ns_per_param`` / ``autocast_act_ratio``: extra time per parameter per micro-batch and
      extra saved activations of a layer run with fp32 master weights under bf16 autocast (the DDP runtime:
      weight casts every micro-batch, fp32 gradient accumulation, fp32 residual stream) relative to the
      bf16-parameter layer the per-layer times are fitted on;
    * ``fsdp_layer_overhead_ms``: extra time per micro-batch of one FSDP2 ``fully_shard`` layer
      (``reshard_after_forward=True``, bf16 ``param_dtype``, fp32 ``reduce_dtype``) on a one-rank mesh:
      all-gather copy-in/out twice, reduce-scatter copy, gradient accumulation and the hook overheads;
    * ``micro_batch_overhead_ms``: a whole-model forward + backward at ``b=1`` (gradients accumulating)
      minus the sum of its profiled parts (layers, head, embedding): the per-micro-batch cost of the
      model wrapper (rotary tables, masks, output objects, gradient accumulation). It may be negative
      when the isolated layers' fixed launch overhead is hidden in the full model.
    * ``runtime`` / ``step_overhead_ms``: the whole model trained through :func:`apply_plan` (fp32 master
      weights; DDP with bf16 autocast, FSDP2 with bf16 ``param_dtype``) at ``b=1`` for 1 and 3
      micro-batches, optimizer step separate (see :func:`_measure_runtime`). Where it succeeds it
      replaces the per-layer probes above: ``autocast_ns_per_param`` / ``fsdp_layer_overhead_ms`` come
      from the measured per-micro-batch cost minus the plain whole-model forward + backward,
      ``optimizer_ns_per_param`` from the real AdamW step, and ``step_overhead_ms[dp_type]`` is the
      per-step cost that does not grow with micro-batches (DDP bucket copy, first-micro-batch gradient
      allocation, DTensor optimizer dispatch).
    * ``probe_notes``: one line per probe that failed, was skipped or was clamped (also warned).
    """

    shape: ModelShape
    seq_len: int
    micro_batches: list[int]
    device: str
    dtype: str
    layers: list[LayerProfile]
    head: LayerProfile
    achieved_tflops: float
    bwd_fwd_ratio: float
    act_calibration: float
    per_layer_overhead_ms: float
    embed: LayerProfile | None = None
    optimizer_ns_per_param: float = 0.0
    autocast_ns_per_param: float = 0.0
    autocast_act_ratio: float = 1.0
    fsdp_layer_overhead_ms: float = 0.0
    micro_batch_overhead_ms: float = 0.0
    step_overhead_ms: dict[str, float] = field(default_factory=dict)
    runtime: dict[str, dict[str, float]] = field(default_factory=dict)
    probe_notes: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = self.shape.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelProfile:
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        d["shape"] = ModelShape.from_dict(d["shape"])
        d["layers"] = [LayerProfile(**x) for x in d["layers"]]
        d["head"] = LayerProfile(**d["head"])
        if d.get("embed") is not None:
            d["embed"] = LayerProfile(**d["embed"])
        return cls(**d)

    def calibrate(self, hw: HardwareProfile) -> HardwareProfile:
        """A copy of ``hw`` whose compute numbers come from this measured profile."""
        d = hw.to_dict()
        d.update(
            achieved_tflops=self.achieved_tflops,
            bwd_fwd_ratio=self.bwd_fwd_ratio,
            per_layer_overhead_ms=self.per_layer_overhead_ms,
        )
        d["notes"] = (
            hw.notes + f"; compute calibrated on {self.device} ({self.shape.name}, s={self.seq_len})"
        ).strip("; ")
        return HardwareProfile.from_dict(d)


def analytic_layer_act_bytes(shape: ModelShape, tokens: int) -> tuple[float, float]:
    """Saved activation bytes of one bf16 decoder layer for ``tokens`` tokens at tp=1.

    Returns ``(replicated, tp_sharded)``: the part left whole under tensor parallelism (norm
    inputs/outputs: ~24h bytes/token, RMSNorm upcasts to fp32) and the part split by ``tp`` (q/k/v,
    attention output, SwiGLU intermediates: ``6h + 6kv + 8f`` bytes/token). Sequence parallelism also
    splits the replicated part (Korthikanti et al., 2022).
    """
    h, f, kv = shape.hidden_size, shape.intermediate_size, shape.num_kv_heads * shape.head_dim
    return 24.0 * h * tokens, (6.0 * h + 6.0 * kv + 8.0 * f) * tokens


def _write_json(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _find_layers(model: Any) -> Any:
    import torch

    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for cand in ("model.layers", "model.model.layers", "transformer.h", "layers"):
        obj = model
        for part in cand.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList) and (n is None or len(obj) == n):
            return obj
    for mod in model.modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n:
            return mod
    raise ValueError(f"could not find the decoder layers of {type(model).__name__} (looked for model.layers)")


def _sync(device: Any) -> None:
    """Wait for ``device``'s queued kernels (a ``torch.device`` or a device string; no-op off CUDA)."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn: Any, device: Any, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ts.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(ts))


def _saved_bytes(fn: Any, exclude: set[int]) -> float:
    """Bytes of distinct tensors autograd saves while ``fn()`` runs (parameters excluded)."""
    import torch

    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in exclude:
                seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        except Exception:  # pragma: no cover - exotic tensor subclasses
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return float(sum(seen.values()))


def _fit(bs: list[int], ts: list[float]) -> tuple[float, float]:
    if len(bs) == 1:
        return 0.0, ts[0] / bs[0]
    mb, mt = statistics.mean(bs), statistics.mean(ts)
    var = sum((b - mb) ** 2 for b in bs)
    slope = sum((b - mb) * (t - mt) for b, t in zip(bs, ts)) / var
    slope = max(slope, 1e-9)
    fixed = max(0.0, mt - slope * mb)
    return fixed, slope


def profile_model(
    model: Any,
    seq_len: int = 1024,
    micro_batches: tuple[int, ...] = (1, 2),
    *,
    device: Any = None,
    dtype: Any = None,
    warmup: int = 1,
    repeats: int = 3,
    max_layers: int | None = 2,
    cache_dir: str | None = None,
    shape: ModelShape | None = None,
    runtime_probe: bool = True,
) -> ModelProfile:
    """Measure per-layer forward/backward time and saved-activation memory of a decoder model.

    Each decoder layer runs alone on random hidden states ``[b, seq_len, hidden]`` with the
    position embeddings / mask the model itself passes (captured with a forward pre-hook), for each
    ``b`` in ``micro_batches``. ``max_layers`` limits how many (identical) layers are timed; the rest
    reuse their mean. The LM head (final norm + head + cross-entropy) is profiled the same way.

    Args:
        model: a transformers causal LM (Llama-style; must expose ``model.layers``).
        seq_len: tokens per sequence.
        micro_batches: sequences per micro-batch to fit ``t(b) = fixed + slope * b``.
        device, dtype: where/how to run (default: the model's own).
        cache_dir: if set, reuse/write ``<cache_dir>/model_<hash>.json``.
        runtime_probe: also train the whole model through :func:`apply_plan` (DDP and FSDP2, ``b=1``,
            1 and 3 micro-batches) to measure the runtime's own per-micro-batch and per-step costs.
            Needs an initialised one-rank process group (skipped, with a note, otherwise); it holds
            an fp32 copy of the model with gradients and AdamW states (16 bytes per parameter).
    """
    import torch

    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if not micro_batches or any(int(b) <= 0 for b in micro_batches):
        raise ValueError(f"micro_batches must be positive integers, got {micro_batches!r}")
    shape = shape or get_shape(model.config)
    p0 = next(model.parameters())
    device = torch.device(device) if device is not None else p0.device
    dtype = dtype or p0.dtype
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{os.cpu_count()}c"
    key = hashlib.sha1(
        json.dumps(
            [
                shape.to_dict(),
                seq_len,
                list(micro_batches),
                str(dtype),
                dev_name,
                max_layers,
                runtime_probe,
                _PROFILE_VERSION,
            ]
        ).encode()
    ).hexdigest()[:16]
    cache_path = os.path.join(cache_dir, f"model_{key}.json") if cache_dir else None
    if cache_path and os.path.exists(cache_path):
        return ModelProfile.load(cache_path)

    layers = _find_layers(model)
    model.to(device=device, dtype=dtype)
    was_training = model.training
    model.train()
    captured: dict[str, Any] = {}

    def grab(mod: Any, args: tuple, kwargs: dict) -> None:
        captured.setdefault("args", args)
        captured.setdefault("kwargs", kwargs)

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            ids = torch.randint(0, shape.vocab_size, (1, seq_len), device=device)
            model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    kwargs = {
        k: v
        for k, v in captured["kwargs"].items()
        if k not in ("hidden_states", "past_key_values", "past_key_value")
    }
    kwargs["use_cache"] = False
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def run_block(block: Any, b: int, head: bool = False) -> tuple[float, float, float]:
        x = torch.randn(b, seq_len, shape.hidden_size, device=device, dtype=dtype, requires_grad=True)
        labels = torch.randint(0, shape.vocab_size, (b, seq_len), device=device)

        def fwd() -> Any:
            if head:
                logits = block(x).float()
                return torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))
            out = block(x, **kwargs)
            return out[0] if isinstance(out, tuple) else out

        def fwd_bwd() -> None:
            out = fwd()
            if head:
                out.backward()
            else:
                out.backward(torch.ones_like(out))
            x.grad = None
            block.zero_grad(set_to_none=True)

        t_f = _median_ms(fwd, device, warmup, repeats)
        t_fb = _median_ms(fwd_bwd, device, warmup, repeats)
        act = _saved_bytes(fwd, param_ptrs) / b
        return t_f, max(t_fb - t_f, 0.0), act

    n_prof = len(layers) if max_layers is None else max(1, min(max_layers, len(layers)))
    profs: list[LayerProfile] = []
    for i in range(n_prof):
        fs, bs_, acts = [], [], []
        for b in micro_batches:
            f, bw, a = run_block(layers[i], int(b))
            fs.append(f)
            bs_.append(bw)
            acts.append(a)
        ff, fs_ = _fit(list(micro_batches), fs)
        bf, bsl = _fit(list(micro_batches), bs_)
        lp = sum(p.numel() for p in layers[i].parameters())
        profs.append(LayerProfile(f"layer{i}", lp, ff, fs_, bf, bsl, float(statistics.mean(acts))))
    for i in range(n_prof, len(layers)):
        src = profs[i % n_prof]
        profs.append(
            LayerProfile(
                f"layer{i}",
                src.params,
                src.fwd_fixed_ms,
                src.fwd_ms_per_sample,
                src.bwd_fixed_ms,
                src.bwd_ms_per_sample,
                src.act_bytes_per_sample,
            )
        )

    norm = getattr(getattr(model, "model", model), "norm", None)
    lm_head = model.get_output_embeddings()
    head_mod = torch.nn.Sequential(norm, lm_head) if norm is not None else torch.nn.Sequential(lm_head)
    hf, hb, ha = [], [], []
    for b in micro_batches:
        f, bw, a = run_block(head_mod, int(b), head=True)
        hf.append(f)
        hb.append(bw)
        ha.append(a)
    hff, hfs = _fit(list(micro_batches), hf)
    hbf, hbs = _fit(list(micro_batches), hb)
    head = LayerProfile(
        "head", sum(p.numel() for p in head_mod.parameters()), hff, hfs, hbf, hbs, float(statistics.mean(ha))
    )
    emb_mod = model.get_input_embeddings()
    ef, eb = [], []
    for b in micro_batches:
        f, bw = _time_embedding(emb_mod, int(b), seq_len, shape.vocab_size, device, warmup, repeats)
        ef.append(f)
        eb.append(bw)
    eff, efs = _fit(list(micro_batches), ef)
    ebf, ebs = _fit(list(micro_batches), eb)
    embed = LayerProfile("embed", sum(p.numel() for p in emb_mod.parameters()), eff, efs, ebf, ebs, 0.0)
    plain_b1 = profs[0].fwd_ms(1) + profs[0].bwd_ms(1)
    notes: dict[str, str] = {}
    extras: dict[str, Any] = _measure_step_extras(
        layers[0], kwargs, shape, seq_len, device, dtype, warmup, repeats, plain_b1, param_ptrs, notes
    )
    ids1 = torch.randint(0, shape.vocab_size, (1, seq_len), device=device)

    def full_step() -> None:
        model(input_ids=ids1, labels=ids1, use_cache=False).loss.backward()

    t_full = None
    parts = sum(p.fwd_ms(1) + p.bwd_ms(1) for p in profs) + head.fwd_ms(1) + head.bwd_ms(1)
    parts += embed.fwd_ms(1) + embed.bwd_ms(1)
    try:
        t_full = _median_ms(full_step, device, max(1, warmup), repeats)
        extras["micro_batch_overhead_ms"] = t_full - parts
    except Exception as exc:  # pragma: no cover - best effort (e.g. out of memory)
        _note(notes, "whole_model", f"failed: {type(exc).__name__}: {exc}")
    model.zero_grad(set_to_none=True)
    if runtime_probe and t_full is not None:
        _runtime_extras(model, shape, seq_len, device, dtype, warmup, repeats, t_full, profs, extras, notes)
    extras["probe_notes"] = notes
    model.train(was_training)

    timed = profs[:n_prof]
    bmax = max(int(b) for b in micro_batches)
    flops = shape.layer_flops_fwd(bmax * seq_len, seq_len)
    fwd_tot = statistics.mean(p.fwd_ms(bmax) for p in timed)
    bwd_tot = statistics.mean(p.bwd_ms(bmax) for p in timed)
    overhead = statistics.mean(p.fwd_fixed_ms for p in timed)
    if overhead > 0.5 * fwd_tot:  # noisy fit (tiny model): attribute everything to compute
        overhead = 0.0
    achieved = flops / max((fwd_tot - overhead) * 1e-3, 1e-12) / 1e12
    ratio = max(1.0, bwd_tot / max(fwd_tot, 1e-12))
    rep, shd = analytic_layer_act_bytes(shape, seq_len)
    calib = statistics.mean(p.act_bytes_per_sample for p in timed) / (rep + shd)
    prof = ModelProfile(
        shape,
        seq_len,
        [int(b) for b in micro_batches],
        dev_name,
        str(dtype).replace("torch.", ""),
        profs,
        head,
        float(achieved),
        float(ratio),
        float(calib),
        float(overhead),
        embed,
        **extras,
    )
    if cache_path:
        prof.save(cache_path)
    return prof


def _time_embedding(
    emb: Any, b: int, seq_len: int, vocab: int, device: Any, warmup: int, repeats: int
) -> tuple[float, float]:
    """Forward and backward ms of the input embedding for ``[b, seq_len]`` token ids."""
    import torch

    ids = torch.randint(0, vocab, (b, seq_len), device=device)

    def fwd() -> Any:
        return emb(ids)

    def fwd_bwd() -> None:
        out = emb(ids)
        out.backward(torch.ones_like(out))
        emb.zero_grad(set_to_none=True)

    t_f = _median_ms(fwd, device, warmup, repeats)
    t_fb = _median_ms(fwd_bwd, device, warmup, repeats)
    return t_f, max(t_fb - t_f, 0.0)


def _measure_step_extras(
    layer: Any,
    kwargs: dict[str, Any],
    shape: ModelShape,
    seq_len: int,
    device: Any,
    dtype: Any,
    warmup: int,
    repeats: int,
    plain_b1_ms: float,
    param_ptrs: set[int],
    notes: dict[str, str],
) -> dict[str, float]:
    """Optimizer step, autocast and FSDP2 per-layer overheads, measured on a copy of one decoder layer.

    Each measurement is independent and best effort: a failure leaves its field at the neutral value
    (and the cost model falls back to its analytic estimate) and is warned and recorded in ``notes``.
    """
    import copy

    import torch

    out: dict[str, float] = {}
    n_params = sum(p.numel() for p in layer.parameters())
    low = dtype in (torch.bfloat16, torch.float16)

    # 1. AdamW (foreach) step over fp32 master copies of the layer's parameters.
    try:
        ps = [p.detach().float().clone().requires_grad_(True) for p in layer.parameters()]
        for p in ps:
            p.grad = torch.randn_like(p)
        opt = torch.optim.AdamW(ps, lr=1e-5, foreach=True)
        t = _median_ms(opt.step, device, max(1, warmup), repeats)
        out["optimizer_ns_per_param"] = t * 1e6 / n_params
        del opt, ps
    except Exception as exc:  # pragma: no cover - best effort
        _note(notes, "optimizer", f"failed: {type(exc).__name__}: {exc}")

    # 2. bf16 autocast over fp32 weights (what DDP runs), gradients accumulating into fp32 .grad.
    if low:
        try:
            l32 = copy.deepcopy(layer).float()
            kw32 = {
                k: (
                    tuple(t.float() if torch.is_tensor(t) and t.is_floating_point() else t for t in v)
                    if isinstance(v, tuple)
                    else v
                )
                for k, v in kwargs.items()
            }
            x = torch.randn(1, seq_len, shape.hidden_size, device=device, requires_grad=True)

            def fwd() -> Any:
                with torch.autocast(device.type, dtype=dtype):
                    o = l32(x, **kw32)
                return o[0] if isinstance(o, tuple) else o

            def fwd_bwd() -> None:
                o = fwd()
                o.backward(torch.ones_like(o))
                x.grad = None

            t = _median_ms(fwd_bwd, device, max(1, warmup), repeats)
            if t < plain_b1_ms:
                _note(notes, "autocast", f"clamped to 0: {t:.3f} ms < plain layer {plain_b1_ms:.3f} ms")
            out["autocast_ns_per_param"] = max(0.0, t - plain_b1_ms) * 1e6 / n_params
            ptrs = param_ptrs | {p.untyped_storage().data_ptr() for p in l32.parameters()}
            plain = _saved_bytes(lambda: _layer_out(layer, _rand_like_x(x, dtype), kwargs), ptrs)
            ac = _saved_bytes(fwd, ptrs)
            if plain > 0:
                out["autocast_act_ratio"] = max(1.0, ac / plain)
            del l32
        except Exception as exc:  # pragma: no cover - best effort
            _note(notes, "autocast", f"failed: {type(exc).__name__}: {exc}")

    # 3. FSDP2 on a one-rank mesh (only where this process is the whole world).
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() == 1:
        try:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            class _Root(torch.nn.Module):
                def __init__(self, inner: Any) -> None:
                    super().__init__()
                    self.inner = inner

                def forward(self, x: Any) -> Any:
                    o = self.inner(x, **kwargs)
                    return o[0] if isinstance(o, tuple) else o

            mesh = init_device_mesh(device.type, (1,))
            mp = MixedPrecisionPolicy(param_dtype=dtype if low else None, reduce_dtype=torch.float32)
            root = _Root(copy.deepcopy(layer).float())
            fully_shard(root.inner, mesh=mesh, reshard_after_forward=True, mp_policy=mp)
            fully_shard(root, mesh=mesh, mp_policy=mp)
            x = torch.randn(1, seq_len, shape.hidden_size, device=device, dtype=dtype, requires_grad=True)

            def fsdp_fb() -> None:
                o = root(x)
                o.backward(torch.ones_like(o))
                x.grad = None

            t = _median_ms(fsdp_fb, device, max(1, warmup), repeats)
            if t < plain_b1_ms:
                _note(notes, "fsdp", f"clamped to 0: {t:.3f} ms < plain layer {plain_b1_ms:.3f} ms")
            out["fsdp_layer_overhead_ms"] = max(0.0, t - plain_b1_ms)
            del root
        except Exception as exc:  # pragma: no cover - best effort
            _note(notes, "fsdp", f"failed: {type(exc).__name__}: {exc}")
    else:
        notes.setdefault("fsdp", "skipped: needs an initialised one-rank torch.distributed process group")
    return out


def _note(notes: dict[str, str], key: str, msg: str) -> None:
    """Record a probe problem in the profile (``probe_notes``) and warn about it."""
    import warnings

    notes[key] = msg
    warnings.warn(f"profile_model: {key} probe {msg}", stacklevel=3)


def _measure_runtime(
    model: Any,
    shape: ModelShape,
    seq_len: int,
    device: Any,
    dtype: Any,
    dp_type: str,
    warmup: int,
    repeats: int,
) -> dict[str, float]:
    """Time the whole model trained through :func:`apply_plan` exactly as a one-GPU plan runs it.

    An fp32 copy of ``model`` (master weights) is wrapped with ``dp_type`` (``ddp``: DDP + bf16 autocast;
    ``fsdp``: FSDP2 per layer, bf16 ``param_dtype``, fp32 reduce) and trained at ``b=1`` with 1 and 3
    micro-batches, alternating, each step followed by ``AdamW(foreach=True).step()`` and
    ``zero_grad(set_to_none=True)`` (timed separately). Fits ``train_step(m) = fixed + m * mb``.

    Returns ``{"mb_ms", "fixed_ms", "opt_ms", "step1_ms", "step3_ms"}`` (medians, ms; ``max(3, repeats)``).
    """
    import copy

    import torch

    from hf_ext.accelerate.autoparallel.apply import apply_plan
    from hf_ext.accelerate.autoparallel.plan import Plan

    low = dtype in (torch.bfloat16, torch.float16)
    m32 = copy.deepcopy(model).float()
    runner = opt = None
    try:
        plans = {
            m: Plan.uniform(shape, gpus=1, dp_type=dp_type, global_batch=m, seq_len=seq_len, micro_batch=1)
            for m in (1, 3)
        }
        runner = apply_plan(m32, plans[3], device=device, param_dtype=dtype if low else None)
        opt = torch.optim.AdamW(runner.parameters(), lr=1e-5, foreach=True)
        ids = {m: torch.randint(0, shape.vocab_size, (m, seq_len), device=device) for m in (1, 3)}
        train: dict[int, list[float]] = {1: [], 3: []}
        opt_t: list[float] = []
        for it in range(max(1, warmup) + max(3, repeats)):
            for m in (1, 3):
                runner.plan = plans[m]
                _sync(device)
                t0 = time.perf_counter()
                runner.train_step(ids[m])
                _sync(device)
                t1 = time.perf_counter()
                opt.step()
                opt.zero_grad(set_to_none=True)
                _sync(device)
                t2 = time.perf_counter()
                if it >= max(1, warmup):
                    train[m].append((t1 - t0) * 1e3)
                    opt_t.append((t2 - t1) * 1e3)
        s1, s3 = statistics.median(train[1]), statistics.median(train[3])
        mb = (s3 - s1) / 2
        return {
            "mb_ms": float(mb),
            "fixed_ms": float(s1 - mb),
            "opt_ms": float(statistics.median(opt_t)),
            "step1_ms": float(s1),
            "step3_ms": float(s3),
        }
    finally:
        del m32, runner, opt
        if getattr(device, "type", str(device)) == "cuda":
            torch.cuda.empty_cache()


def _runtime_extras(
    model: Any,
    shape: ModelShape,
    seq_len: int,
    device: Any,
    dtype: Any,
    warmup: int,
    repeats: int,
    t_full: float,
    profs: list[LayerProfile],
    extras: dict[str, Any],
    notes: dict[str, str],
) -> None:
    """Replace the per-layer probes with whole-runtime measurements (see :class:`ModelProfile`).

    ``t_full`` is the plain whole-model forward + backward at ``b=1`` (what the cost model's layer, head,
    embedding and ``micro_batch_overhead_ms`` terms add up to); the runtime's per-micro-batch excess
    over it is spread over the parameters (``ddp``: per parameter; ``fsdp``: per layer parameter, the
    embedding / head units counting 2/3 as the cost model does), its per-step excess goes to
    ``step_overhead_ms``.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() == 1):
        notes["runtime"] = "skipped: needs an initialised one-rank torch.distributed process group"
        return
    n_total = sum(p.numel() for p in model.parameters())
    n_layers = sum(p.params for p in profs)
    runtime: dict[str, dict[str, float]] = {}
    step_over: dict[str, float] = {}
    for dp_type in ("ddp", "fsdp"):
        try:
            r = _measure_runtime(model, shape, seq_len, device, dtype, dp_type, warmup, repeats)
        except Exception as exc:
            _note(notes, f"runtime_{dp_type}", f"failed: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        runtime[dp_type] = r
        extra = r["mb_ms"] - t_full
        if extra < 0:
            _note(
                notes,
                f"runtime_{dp_type}",
                f"per-micro-batch {r['mb_ms']:.3f} ms below the plain model's {t_full:.3f} ms; clamped to 0",
            )
        extra = max(0.0, extra)
        if dp_type == "ddp" or "optimizer_ns_per_param" not in runtime.get("ddp", {}):
            opt_ns = r["opt_ms"] * 1e6 / n_total
            runtime[dp_type]["optimizer_ns_per_param"] = opt_ns
        if dp_type == "ddp":
            extras["optimizer_ns_per_param"] = runtime["ddp"]["optimizer_ns_per_param"]
            extras["autocast_ns_per_param"] = extra * 1e6 / n_total
        else:
            rate = extra / max(n_layers + 2.0 / 3.0 * (n_total - n_layers), 1.0)
            extras["fsdp_layer_overhead_ms"] = rate * profs[0].params
        # per-step remainder: the fixed part of train_step plus the optimizer beyond the modelled one
        opt_pred = extras.get("optimizer_ns_per_param", 0.0) * n_total * 1e-6
        fixed = r["fixed_ms"] + (r["opt_ms"] - opt_pred if opt_pred > 0 else 0.0)
        if fixed < 0:
            _note(notes, f"runtime_{dp_type}_step", f"per-step remainder {fixed:.3f} ms clamped to 0")
        step_over[dp_type] = max(0.0, fixed)
    extras["runtime"] = runtime
    extras["step_overhead_ms"] = step_over


def _rand_like_x(x: Any, dtype: Any) -> Any:
    import torch

    return torch.randn(x.shape, device=x.device, dtype=dtype, requires_grad=True)


def _layer_out(layer: Any, x: Any, kwargs: dict[str, Any]) -> Any:
    o = layer(x, **kwargs)
    return o[0] if isinstance(o, tuple) else o


# ----------------------------------------------------------------------------------- collectives
def profile_collectives(
    sizes_bytes: tuple[int, ...] = (1 << 16, 1 << 20, 1 << 22),
    *,
    ops: tuple[str, ...] = COLLECTIVES,
    repeats: int = 3,
    device: Any = None,
) -> dict[str, dict[str, list[float]]]:
    """Measure collectives in the current process group for every power-of-two group size.

    Must be called on every rank (collective). For each op and group size ``g`` (groups of the
    first ``g`` ranks), times each message size, converts to bus bytes and fits
    ``time = latency + bus_bytes / busbw`` (least squares). Returns
    ``{op: {str(g): [latency_us, busbw_GBps]}}``, ready for ``HardwareProfile.measured``.
    Returns ``{}`` when the world has one rank (nothing to measure).
    """
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError("profile_collectives needs an initialized torch.distributed process group")
    for op in ops:
        if op not in COLLECTIVES:
            raise ValueError(f"ops contains {op!r}; allowed: {', '.join(COLLECTIVES)}")
    world, rank = dist.get_world_size(), dist.get_rank()
    if device is None:
        device = (
            torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend() == "nccl"
            else torch.device("cpu")
        )
    sizes_g = [g for g in (2**i for i in range(1, 31)) if g <= world]
    groups = {g: (dist.new_group(list(range(g))) if g < world else dist.group.WORLD) for g in sizes_g}
    out: dict[str, dict[str, list[float]]] = {}
    for op in ops:
        for g in sizes_g:
            pg = groups[g]
            xs, ys = [], []
            for n in sizes_bytes:
                numel = max(g, n // 4 // g * g)
                if rank < g:
                    t = _time_collective(op, numel, g, rank, pg, device, repeats)
                    bus = {"all_reduce": 2 * (g - 1) / g, "p2p": 1.0}.get(op, (g - 1) / g) * numel * 4
                    xs.append(bus)
                    ys.append(t)
            dist.barrier()
            if rank == 0 and xs:
                lat_ms, inv_bw = _fit(xs, ys) if len(xs) > 1 else (0.0, ys[0] / xs[0])
                out.setdefault(op, {})[str(g)] = [lat_ms * 1e3, 1.0 / max(inv_bw, 1e-15) * 1e3 / 1e9]
    obj = [out]
    dist.broadcast_object_list(obj, src=0)
    return obj[0]


def _time_collective(op: str, numel: int, g: int, rank: int, pg: Any, device: Any, repeats: int) -> float:
    import torch
    import torch.distributed as dist

    x = torch.ones(numel, device=device)
    y = torch.empty(numel, device=device)
    shard = torch.ones(numel // g, device=device)

    def run() -> None:
        if op == "all_reduce":
            dist.all_reduce(x, group=pg)
        elif op == "all_gather":
            dist.all_gather_into_tensor(y, shard, group=pg)
        elif op == "reduce_scatter":
            dist.reduce_scatter_tensor(shard, x, group=pg)
        elif op == "all_to_all":
            dist.all_to_all_single(y, x, group=pg)
        elif rank == 0:  # p2p between global ranks 0 and 1 (groups hold the first g ranks)
            dist.send(x, dst=1)
        elif rank == 1:
            dist.recv(y, src=0)

    if op == "reduce_scatter" and device.type == "cpu":
        # gloo lacks reduce_scatter_tensor: an all-reduce then a local slice moves the same bytes twice.
        def run() -> None:  # noqa: F811
            dist.all_reduce(x, group=pg)

    for _ in range(1):
        run()
    _sync(device)
    ts = []
    for _ in range(repeats):
        dist.barrier(group=pg)
        t0 = time.perf_counter()
        run()
        _sync(device)
        ts.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(ts))
