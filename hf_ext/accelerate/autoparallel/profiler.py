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
import numbers
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from hf_ext.accelerate.autoparallel.shapes import ModelShape, get_shape

_PROFILE_VERSION = 4  # bump when profile_model measures something new (invalidates caches)
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

    Decoder-layer compute (see :meth:`layer_ms`): ``achieved_tflops`` and ``per_layer_overhead_ms`` give
    the forward line, ``bwd_fwd_ratio`` (backward / forward of the FLOP-proportional part) and
    ``bwd_overhead_ms`` (fixed backward ms; ``None``: ``bwd_fwd_ratio * per_layer_overhead_ms``) the
    backward line. :meth:`ModelProfile.calibrate` sets all four from a measured profile.
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
    bwd_overhead_ms: float | None = None

    # -- compute ----------------------------------------------------------------------------------
    def layer_bwd_overhead_ms(self) -> float:
        """Fixed backward time of a decoder layer (ms): ``bwd_overhead_ms``, or when that is ``None``
        (defaults, profiles older than version 4) ``bwd_fwd_ratio * per_layer_overhead_ms``."""
        if self.bwd_overhead_ms is not None:
            return self.bwd_overhead_ms
        return self.bwd_fwd_ratio * self.per_layer_overhead_ms

    def layer_ms(
        self,
        shape: ModelShape,
        b: float,
        seq_len: int,
        tp: int = 1,
        efficiency: float = 1.0,
        layer: int | None = None,
    ) -> tuple[float, float]:
        """Forward and backward ms of decoder layer ``layer`` (``None``: the mean layer, which differs from
        a given one only in a model with sliding-window layers) for a micro-batch of ``b`` sequences.

        ``compute = layer_flops_fwd(b * seq_len, seq_len, layer) / tp / (achieved_tflops * efficiency)``;
        ``fwd = per_layer_overhead_ms + compute``, ``bwd = layer_bwd_overhead_ms() + bwd_fwd_ratio * compute``
        (both affine in ``b``; a measured profile makes them its fitted layer lines).
        """
        flops = shape.layer_flops_fwd(int(b * seq_len), seq_len, layer) / tp
        compute = flops / (self.achieved_tflops * 1e12 * efficiency) * 1e3
        return (
            self.per_layer_overhead_ms + compute,
            self.layer_bwd_overhead_ms() + self.bwd_fwd_ratio * compute,
        )

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

    Compute of the decoder layers, as :meth:`calibrate` hands it to the cost model: the forward line
    ``per_layer_overhead_ms + compute(b)`` with ``compute(b) = layer FLOPs(b) / achieved_tflops``, the
    backward line ``bwd_overhead_ms + bwd_fwd_ratio * compute(b)`` (the fitted layer lines; profiles older
    than version 4 have ``bwd_overhead_ms=None`` and ``bwd_fwd_ratio`` = backward / forward at the
    largest micro-batch, i.e. ``bwd = ratio * fwd``).

    Besides the decoder layers and the head (final norm + LM head + fp32 cross-entropy) it holds the
    measured step costs outside the layers' own compute (0 / ``None`` when not measured; the cost model
    then falls back to analytic estimates). Per-micro-batch costs are affine in the micro-batch size ``b``
    (sequences of ``seq_len`` tokens): a fixed coefficient and a ``*_per_sample`` one (0 in profiles
    older than version 4: a constant per micro-batch, measured at ``b=1``):

    * ``embed``: input-embedding forward + backward (the backward writes a dense ``[V, h]`` gradient);
    * ``optimizer_ns_per_param``: one ``torch.optim.AdamW(foreach=True)`` step per fp32 parameter;
    * ``autocast_ns_per_param`` / ``autocast_act_ratio``: extra time per parameter per micro-batch and
      extra saved activations of a layer run with fp32 master weights under bf16 autocast (the DDP runtime:
      weight casts every micro-batch, fp32 gradient accumulation, fp32 residual stream) relative to the
      bf16-parameter layer the per-layer times are fitted on; ``autocast_ns_per_param_per_sample``: extra
      ns per *decoder-layer* parameter per sequence (per-token casts, fp32 residual stream);
    * ``fsdp_layer_overhead_ms``: extra time per micro-batch of one FSDP2 ``fully_shard`` layer
      (``reshard_after_forward=True``, bf16 ``param_dtype``, fp32 ``reduce_dtype``) on a one-rank mesh:
      all-gather copy-in/out twice, reduce-scatter copy, gradient accumulation and the hook overheads;
      ``fsdp_layer_overhead_ms_per_sample``: extra ms of that layer per sequence;
    * ``micro_batch_overhead_ms`` (+ ``_per_sample``): a whole-model forward + backward (bf16, gradients
      accumulating) minus the sum of its modelled parts (layer lines, head, embedding) at the
      ``runtime_micro_batches`` sizes, fitted as a line in ``b``: the per-micro-batch cost of the model
      wrapper (rotary tables, masks, output objects, gradient accumulation). It may be negative when the
      isolated layers' fixed launch overhead is hidden in the full model.
    * ``runtime`` / ``step_overhead_ms``: the whole model trained through :func:`apply_plan` (fp32 master
      weights; DDP with bf16 autocast, FSDP2 with bf16 ``param_dtype``) at the ``runtime_micro_batches``
      sizes (``b=1`` with 1 and 3 micro-batches, larger ``b`` with 1 and 2), optimizer step separate,
      fitted as ``train_step(b, m) = fixed + m * (mb_fixed + mb_per_sample * b)`` (see
      :func:`_measure_runtime`). Where it succeeds it replaces the per-layer probes above:
      ``autocast_ns_per_param*`` / ``fsdp_layer_overhead_ms*`` come from the measured per-micro-batch
      cost minus the plain whole-model forward + backward at each size (a line in ``b``),
      ``optimizer_ns_per_param`` from the real AdamW step, and ``step_overhead_ms[dp_type]`` is the
      per-step cost that does not grow with micro-batches (DDP bucket copy, first-micro-batch gradient
      allocation, DTensor optimizer dispatch).
    * ``recompute_fwd_ratio[dp_type]``: time of re-running a checkpointed layer under the runtime
      (recompute with autocast / FSDP hooks, checkpoint bookkeeping) over the modelled layer forward,
      measured with every layer checkpointed at the largest runtime size (missing: 1.0, a plain forward).
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
    bwd_overhead_ms: float | None = None
    autocast_ns_per_param_per_sample: float = 0.0
    fsdp_layer_overhead_ms_per_sample: float = 0.0
    micro_batch_overhead_ms_per_sample: float = 0.0
    recompute_fwd_ratio: dict[str, float] = field(default_factory=dict)
    runtime_micro_batches: list[int] = field(default_factory=list)

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
            bwd_overhead_ms=self.bwd_overhead_ms,
        )
        d["notes"] = (
            hw.notes + f"; compute calibrated on {self.device} ({self.shape.name}, s={self.seq_len})"
        ).strip("; ")
        return HardwareProfile.from_dict(d)

    def plain_step_ms(self, b: int, hw: HardwareProfile | None = None) -> float:
        """Modelled plain (bf16, no runtime wrapper) forward + backward of the whole model for one
        micro-batch of ``b`` sequences: decoder layers (calibrated lines), head and embedding."""
        hw = self.calibrate(hw or HardwareProfile.cpu())
        f, bw = hw.layer_ms(self.shape, b, self.seq_len)  # the mean layer
        t = self.shape.num_layers * (f + bw) + self.head.fwd_ms(b) + self.head.bwd_ms(b)
        if self.embed is not None:
            t += self.embed.fwd_ms(b) + self.embed.bwd_ms(b)
        return t


def analytic_layer_act_bytes(shape: ModelShape, tokens: int) -> tuple[float, float]:
    """Saved activation bytes of one bf16 decoder layer for ``tokens`` tokens at tp=1.

    Returns ``(replicated, tp_sharded)``: the part left whole under tensor parallelism (norm
    inputs/outputs: ~24h bytes/token, RMSNorm upcasts to fp32) and the part split by ``tp`` (q and the
    attention output, ``num_heads * head_dim`` wide, k / v, ``num_kv_heads * head_dim`` wide, SwiGLU
    intermediates: ``6 q_dim + 6 kv_dim + 8f`` bytes/token; ``q_dim = h`` for Llama). Sequence
    parallelism also splits the replicated part (Korthikanti et al., 2022). There is no ``s^2`` term: the
    flash / memory-efficient sdpa kernels save the attention output and one log-sum-exp per query row, so
    a sliding window does not change the saved bytes.
    """
    h, f = shape.hidden_size, shape.intermediate_size
    return 24.0 * h * tokens, (6.0 * shape.q_dim + 6.0 * shape.kv_dim + 8.0 * f) * tokens


def _write_json(path: str, obj: Any) -> None:
    """numpy scalars as numbers; the text is made before the file is touched and replaced whole (no ``.tmp`` left
    behind by a value JSON cannot hold)."""
    from hf_ext.utils.atomic import atomic_write_text
    from hf_ext.utils.jsonable import to_jsonable

    text = json.dumps(to_jsonable(obj), indent=1)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(path, text)


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


def _is_attention_mask(t: Any) -> bool:
    """A ``[b, 1, s, s]`` attention mask: sdpa's boolean mask, or the additive copy (0 / -inf) it saves for the
    backward. Told apart by its values from a rotary table ``[b, 1, s, head_dim]`` when ``head_dim == s``."""
    import torch

    if not (t.dim() == 4 and t.shape[1] == 1 and t.shape[-2] == t.shape[-1] > 1):
        return False
    if t.dtype == torch.bool:
        return True
    if not t.is_floating_point():
        return False
    return bool(((t == 0) | (t <= torch.finfo(t.dtype).min)).all())


def _saved_bytes(fn: Any, exclude: set[int]) -> float:
    """Bytes of distinct tensors autograd saves while ``fn()`` runs (parameters excluded).

    Attention masks are left out: the cost model counts sdpa's masks on their own (``CostModel.layer_has_mask``),
    so a windowed layer profiled at ``s >= w`` must not fold them into the activation calibration as well."""
    import torch

    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in exclude and not _is_attention_mask(t):
                seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        except Exception:  # pragma: no cover - exotic tensor subclasses
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return float(sum(seen.values()))


def _fit(bs: list[int], ts: list[float]) -> tuple[float, float]:
    """``t(b) = fixed + slope * b`` for a timing: the least-squares slope (:func:`_line`) kept positive,
    ``fixed >= 0`` through the means; one point gives a line through the origin."""
    if len(bs) == 1:
        return 0.0, ts[0] / bs[0]
    slope = max(_line(bs, ts)[1], 1e-9)
    fixed = max(0.0, statistics.mean(ts) - slope * statistics.mean(bs))
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
    runtime_micro_batches: tuple[int, ...] | None = None,
    ckpt_probe: bool = True,
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
        runtime_probe: also train the whole model through :func:`apply_plan` (DDP and FSDP2, at every
            size of ``runtime_micro_batches``: the smallest with 1 and 3 micro-batches, the others with 1
            and 2) to measure the runtime's own per-micro-batch and per-step costs as lines in ``b``.
            Needs an initialised one-rank process group (skipped, with a note, otherwise); it holds
            an fp32 copy of the model with gradients and AdamW states (16 bytes per parameter).
        runtime_micro_batches: micro-batch sizes of the whole-model and runtime probes (default
            ``(1, max(micro_batches))``); a size that fails (e.g. out of memory) is noted and dropped,
            one size alone gives per-micro-batch constants (``*_per_sample = 0``).
        ckpt_probe: with the runtime probe, also train with every layer checkpointed at the largest
            runtime size (one micro-batch) to measure ``recompute_fwd_ratio``.

    The model is moved / cast to ``device`` / ``dtype`` in place (``model.to``) and stays there; its
    training mode is put back on return, also when profiling raises.
    """
    import torch

    # all checked before the model is touched (it is moved, cast and put in train mode below)
    def is_int(v: Any, low: int) -> bool:
        return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= low

    for name, value, low in (("seq_len", seq_len, 1), ("warmup", warmup, 0), ("repeats", repeats, 1)):
        if not is_int(value, low):
            raise ValueError(f"profile_model: {name}={value!r} must be an int >= {low}")
    if max_layers is not None and not is_int(max_layers, 1):
        raise ValueError(
            f"profile_model: max_layers={max_layers!r} must be None (every layer) or an int >= 1"
        )
    for name, sizes in (("micro_batches", micro_batches), ("runtime_micro_batches", runtime_micro_batches)):
        if name == "runtime_micro_batches" and sizes is None:
            continue
        if not isinstance(sizes, (tuple, list)) or not sizes or not all(is_int(b, 1) for b in sizes):
            raise ValueError(
                f"profile_model: {name}={sizes!r} must be a non-empty tuple of positive integers (micro-batch sizes)"
            )
    for name, flag in (("runtime_probe", runtime_probe), ("ckpt_probe", ckpt_probe)):
        if not isinstance(flag, bool):
            raise ValueError(f"profile_model: {name}={flag!r} must be True or False")
    if runtime_micro_batches is None:
        runtime_micro_batches = (1, max(int(b) for b in micro_batches))
    rt_sizes = sorted({int(b) for b in runtime_micro_batches})
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
                rt_sizes,
                ckpt_probe,
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
    try:
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
                    return torch.nn.functional.cross_entropy(
                        logits.view(-1, logits.shape[-1]), labels.view(-1)
                    )
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
            "head",
            sum(p.numel() for p in head_mod.parameters()),
            hff,
            hfs,
            hbf,
            hbs,
            float(statistics.mean(ha)),
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
        # Layer compute as the cost model sees it (HardwareProfile.layer_ms after calibrate): forward line
        # overhead + compute(b), backward line bwd_overhead + ratio * compute(b), exact at the fitted lines.
        timed = profs[:n_prof]
        bmax = max(int(b) for b in micro_batches)
        flops = statistics.mean(shape.layer_flops_fwd(bmax * seq_len, seq_len, i) for i in range(n_prof))
        fwd_tot = statistics.mean(p.fwd_ms(bmax) for p in timed)
        bwd_tot = statistics.mean(p.bwd_ms(bmax) for p in timed)
        overhead = statistics.mean(p.fwd_fixed_ms for p in timed)
        bwd_overhead = statistics.mean(p.bwd_fixed_ms for p in timed)
        if overhead > 0.5 * fwd_tot:  # noisy fit (tiny model): attribute everything to compute
            overhead = 0.0
        if bwd_overhead > 0.5 * bwd_tot:
            bwd_overhead = 0.0
        achieved = flops / max((fwd_tot - overhead) * 1e-3, 1e-12) / 1e12
        ratio = max(1.0, (bwd_tot - bwd_overhead) / max(fwd_tot - overhead, 1e-12))
        rep, shd = analytic_layer_act_bytes(shape, seq_len)
        measured = statistics.mean(p.act_bytes_per_sample for p in timed)
        if (
            kwargs.get("attention_mask") is not None
            and getattr(model.config, "_attn_implementation", "") == "sdpa"
        ):
            # given a mask (a windowed layer at s >= w), transformers copies k / v to every query head for sdpa (no
            # enable_gqa) and sdpa saves the copies: the cost model adds those bytes on masked layers itself
            # (CostModel.mask_repeat_kv_bytes), so they are not part of the calibration
            measured -= 2.0 * (shape.q_dim - shape.kv_dim) * seq_len * dtype.itemsize
        calib = measured / (rep + shd)
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
            bwd_overhead_ms=float(bwd_overhead),
        )

        plain_b1 = profs[0].fwd_ms(1) + profs[0].bwd_ms(1)
        notes: dict[str, str] = {}
        extras: dict[str, Any] = _measure_step_extras(
            layers[0], kwargs, shape, seq_len, device, dtype, warmup, repeats, plain_b1, param_ptrs, notes
        )
        # Whole plain model at each runtime size; its excess over the modelled parts is a line in b.
        t_full: dict[int, float] = {}
        for b in rt_sizes:
            ids_b = torch.randint(0, shape.vocab_size, (b, seq_len), device=device)

            def full_step(ids_b: Any = ids_b) -> None:
                model(input_ids=ids_b, labels=ids_b, use_cache=False).loss.backward()

            try:
                t_full[b] = _median_ms(full_step, device, max(1, warmup), repeats)
            except Exception as exc:  # best effort (e.g. out of memory at the larger size)
                key = "whole_model" if b == rt_sizes[0] else f"whole_model_b{b}"
                _note(notes, key, f"failed: {type(exc).__name__}: {str(exc)[:200]}")
                if b == rt_sizes[0]:
                    break
            finally:
                del ids_b
                model.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        if t_full:
            w0, w1 = _wrapper_line(prof, t_full)
            extras["micro_batch_overhead_ms"] = w0
            extras["micro_batch_overhead_ms_per_sample"] = w1
            extras["runtime_micro_batches"] = sorted(t_full)
        if runtime_probe and t_full:
            _runtime_extras(model, prof, device, dtype, warmup, repeats, t_full, extras, notes, ckpt_probe)
        extras["probe_notes"] = notes
    finally:  # also when a probe raises: the caller's mode back
        model.train(was_training)
    for k, v in extras.items():
        setattr(prof, k, v)
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
    sizes: tuple[int, ...] = (1,),
    ckpt_b: int | None = None,
    notes: dict[str, str] | None = None,
) -> dict[str, float]:
    """Time the whole model trained through :func:`apply_plan` exactly as a one-GPU plan runs it.

    An fp32 copy of ``model`` (master weights) is wrapped with ``dp_type`` (``ddp``: DDP + bf16 autocast;
    ``fsdp``: FSDP2 per layer, bf16 ``param_dtype``, fp32 reduce) and trained, one phase per micro-batch
    size ``b`` in ``sizes``: the smallest with ``m`` = 1 and 3 micro-batches, the others with 1 and 2, and
    at ``b == ckpt_b`` also one micro-batch with every layer checkpointed; configurations alternate
    within a phase, each step followed by ``AdamW(foreach=True).step()`` and ``zero_grad(set_to_none=True)``
    (timed separately). A phase after the first that fails (e.g. out of memory) is noted in ``notes`` and
    left out; a failing first phase raises. Fits ``train_step(b, m) = fixed + m * (mb_fixed + mb_per_sample
    * b)`` by least squares over the medians (one size: ``mb_per_sample = 0``).

    Returns (ms, medians of ``max(3, repeats)``) ``fixed_ms``, ``mb_fixed_ms``, ``mb_ms_per_sample``,
    ``mb_ms`` (per micro-batch at ``b=1``), ``opt_ms``, ``step_b{b}_m{m}_ms`` per configuration and, when
    the checkpointed run succeeded, ``ckpt_step_b{b}_m1_ms`` and ``ckpt_b``.
    """
    import copy
    import gc

    import torch

    from hf_ext.accelerate.autoparallel.apply import _set_checkpointing, apply_plan
    from hf_ext.accelerate.autoparallel.plan import Plan

    low = dtype in (torch.bfloat16, torch.float16)
    sizes = tuple(sorted({int(b) for b in sizes}))
    phases = []
    for i, b in enumerate(sizes):
        cfgs = [(b, m, False) for m in ((1, 3) if i == 0 else (1, 2))]
        if ckpt_b is not None and b == int(ckpt_b):
            cfgs.append((b, 1, True))
        phases.append(cfgs)
    m32 = copy.deepcopy(model).float()
    layers = _find_layers(m32)
    runner = opt = None
    steps: dict[tuple[int, int, bool], float] = {}
    opt_t: list[float] = []
    try:
        plan0 = Plan.uniform(shape, gpus=1, dp_type=dp_type, global_batch=3, seq_len=seq_len, micro_batch=1)
        runner = apply_plan(m32, plan0, device=device, param_dtype=dtype if low else None)
        opt = torch.optim.AdamW(runner.parameters(), lr=1e-5, foreach=True)
        for i, cfgs in enumerate(phases):
            failed = ""
            try:
                steps.update(
                    _time_train_steps(
                        runner, opt, layers, cfgs, shape, seq_len, device, dp_type, warmup, repeats, opt_t
                    )
                )
            except Exception as exc:
                if i == 0:
                    raise
                failed = f"{type(exc).__name__}: {str(exc)[:160]}"
            if failed:  # outside the except clause: the traceback (and what it pins) is gone
                opt.zero_grad(set_to_none=True)
                _set_checkpointing(layers, [False] * len(layers))
                gc.collect()
                if getattr(device, "type", str(device)) == "cuda":
                    torch.cuda.empty_cache()
                if notes is not None:
                    _note(
                        notes,
                        f"runtime_{dp_type}_b{cfgs[0][0]}",
                        f"failed: {failed}; per-sample / recompute terms from the other sizes (or none)",
                    )
        pts = [(b, m, t) for (b, m, ck), t in steps.items() if not ck]
        fixed, mb_fixed, per_sample = _fit_train_steps(pts)
        out = {
            "fixed_ms": fixed,
            "mb_fixed_ms": mb_fixed,
            "mb_ms_per_sample": per_sample,
            "mb_ms": mb_fixed + per_sample,
            "opt_ms": float(statistics.median(opt_t)),
        }
        for (b, m, ck), t in steps.items():
            out[f"{'ckpt_' if ck else ''}step_b{b}_m{m}_ms"] = t
            if ck:
                out["ckpt_b"] = float(b)
        return out
    finally:
        if runner is not None:
            runner.close()  # the probe's mesh process groups
        del m32, runner, opt, layers
        gc.collect()
        if getattr(device, "type", str(device)) == "cuda":
            torch.cuda.empty_cache()


def _time_train_steps(
    runner: Any,
    opt: Any,
    layers: Any,
    cfgs: list[tuple[int, int, bool]],
    shape: ModelShape,
    seq_len: int,
    device: Any,
    dp_type: str,
    warmup: int,
    repeats: int,
    opt_t: list[float],
) -> dict[tuple[int, int, bool], float]:
    """Median ``runner.train_step`` ms of each ``(b, m, checkpointed)`` in ``cfgs``, alternating; the AdamW
    step + ``zero_grad`` after each is timed into ``opt_t``."""
    import torch

    from hf_ext.accelerate.autoparallel.apply import _set_checkpointing
    from hf_ext.accelerate.autoparallel.plan import Plan

    plans = {
        (b, m): Plan.uniform(
            shape, gpus=1, dp_type=dp_type, global_batch=b * m, seq_len=seq_len, micro_batch=b
        )
        for b, m, _ in cfgs
    }
    ids = {k: torch.randint(0, shape.vocab_size, (k[0] * k[1], seq_len), device=device) for k in plans}
    times: dict[tuple[int, int, bool], list[float]] = {c: [] for c in cfgs}
    for it in range(max(1, warmup) + max(3, repeats)):
        for c in cfgs:
            b, m, ck = c
            runner.plan = plans[(b, m)]
            _set_checkpointing(layers, [ck] * len(layers))
            _sync(device)
            t0 = time.perf_counter()
            runner.train_step(ids[(b, m)])
            _sync(device)
            t1 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)
            t2 = time.perf_counter()
            if it >= max(1, warmup):
                times[c].append((t1 - t0) * 1e3)
                opt_t.append((t2 - t1) * 1e3)
    _set_checkpointing(layers, [False] * len(layers))
    return {c: float(statistics.median(v)) for c, v in times.items()}


def _fit_train_steps(points: list[tuple[int, int, float]]) -> tuple[float, float, float]:
    """Least-squares ``t = fixed + m * (mb_fixed + mb_per_sample * b)`` over ``(b, m, t)`` points.

    Needs two micro-batch counts at some size; with one size only ``mb_per_sample = 0`` and ``mb_fixed``
    is the per-micro-batch time at that size. Returns ``(fixed, mb_fixed, mb_per_sample)`` (ms).
    """
    import numpy as np

    bs = {b for b, _, _ in points}
    t = np.array([p[2] for p in points], dtype=float)
    if len(bs) > 1:
        a = np.array([[1.0, m, m * b] for b, m, _ in points])
        sol = np.linalg.lstsq(a, t, rcond=None)[0]
        return float(sol[0]), float(sol[1]), float(sol[2])
    a = np.array([[1.0, m] for _, m, _ in points])
    sol = np.linalg.lstsq(a, t, rcond=None)[0]
    return float(sol[0]), float(sol[1]), 0.0


def _line(xs: list[int], ys: list[float]) -> tuple[float, float]:
    """Least-squares ``y = a0 + a1 * x`` (not clamped); one point gives ``(y, 0)``."""
    if len(xs) == 1:
        return float(ys[0]), 0.0
    mx, my = statistics.mean(xs), statistics.mean(ys)
    a1 = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return float(my - a1 * mx), float(a1)


def _wrapper_line(prof: ModelProfile, t_full: dict[int, float]) -> tuple[float, float]:
    """``(micro_batch_overhead_ms, micro_batch_overhead_ms_per_sample)``: the whole plain model ``t_full[b]``
    minus its modelled parts (:meth:`ModelProfile.plain_step_ms`) at each size, fitted as a line in ``b``."""
    bs = sorted(t_full)
    return _line(bs, [t_full[b] - prof.plain_step_ms(b) for b in bs])


def _runtime_coefficients(
    r: dict[str, float],
    dp_type: str,
    t_full: dict[int, float],
    n_total: float,
    n_layers: float,
    ref_params: float,
    num_layers: int,
    fwd_ms: Any,
    notes: dict[str, str],
) -> dict[str, float]:
    """Profile fields of ``dp_type`` from its runtime fit ``r`` (see :func:`_measure_runtime`).

    The runtime's excess per micro-batch over the plain whole model, ``X(b) = mb_fixed + mb_per_sample * b
    - t_full[b]`` at each size that ran (clamped at 0, noted), is fitted as ``x0 + x1 * b``. ``x0`` is
    spread over the parameters as the cost model charges it (``ddp``: ``x0 / n_total`` per parameter;
    ``fsdp``: per layer parameter, the root unit counting 2/3), ``x1`` over the decoder-layer parameters
    only (``n_layers``; per-token casts and the fp32 residual stream live in the layers). With a
    checkpointed run at size ``B``, ``recompute_fwd_ratio = (ckpt_step - step) / num_layers / fwd_ms(B)``
    (clamped at 0, noted). ``fwd_ms(b)`` is the modelled plain layer forward. ``x0``, ``x1`` and the
    per-layer recompute ms are also written into ``r`` (``excess_ms``, ``excess_ms_per_sample``,
    ``recompute_ms_per_layer``).
    """
    bs = [b for b in sorted(t_full) if f"step_b{b}_m1_ms" in r]
    xs = []
    for b in bs:
        x = r["mb_fixed_ms"] + r["mb_ms_per_sample"] * b - t_full[b]
        if x < 0:
            _note(
                notes,
                f"runtime_{dp_type}" + ("" if b == bs[0] else f"_b{b}"),
                f"per-micro-batch {x + t_full[b]:.3f} ms at b={b} below the plain model's {t_full[b]:.3f} ms; "
                "clamped to 0",
            )
        xs.append(max(0.0, x))
    x0, x1 = _line(bs, xs) if bs else (0.0, 0.0)
    r["excess_ms"], r["excess_ms_per_sample"] = x0, x1
    out: dict[str, float] = {}
    if dp_type == "ddp":
        out["autocast_ns_per_param"] = x0 * 1e6 / max(n_total, 1.0)
        out["autocast_ns_per_param_per_sample"] = x1 * 1e6 / max(n_layers, 1.0)
    else:
        rate = x0 / max(n_layers + 2.0 / 3.0 * (n_total - n_layers), 1.0)
        out["fsdp_layer_overhead_ms"] = rate * ref_params
        out["fsdp_layer_overhead_ms_per_sample"] = x1 / max(n_layers, 1.0) * ref_params
    if "ckpt_b" in r:
        b = int(r["ckpt_b"])
        delta = (r[f"ckpt_step_b{b}_m1_ms"] - r[f"step_b{b}_m1_ms"]) / max(num_layers, 1)
        ratio = delta / max(fwd_ms(b), 1e-12)
        if ratio < 0:
            _note(
                notes, f"recompute_{dp_type}", f"checkpointed run {delta:.3f} ms/layer faster; clamped to 0"
            )
        r["recompute_ms_per_layer"] = delta
        out["recompute_fwd_ratio"] = max(0.0, ratio)
    return out


def _runtime_extras(
    model: Any,
    prof: ModelProfile,
    device: Any,
    dtype: Any,
    warmup: int,
    repeats: int,
    t_full: dict[int, float],
    extras: dict[str, Any],
    notes: dict[str, str],
    ckpt_probe: bool = True,
) -> None:
    """Replace the per-layer probes with whole-runtime measurements (see :class:`ModelProfile`).

    ``t_full[b]`` is the plain whole-model forward + backward at each runtime size ``b`` (what the cost
    model's layer, head, embedding and ``micro_batch_overhead_ms`` terms add up to there); the runtime's
    per-micro-batch excess over it becomes the ``autocast_*`` / ``fsdp_layer_overhead_*`` coefficients
    (:func:`_runtime_coefficients`), its per-step excess goes to ``step_overhead_ms``, the checkpointed
    run (at the largest size) to ``recompute_fwd_ratio``.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() == 1):
        notes["runtime"] = "skipped: needs an initialised one-rank torch.distributed process group"
        return
    shape, seq_len = prof.shape, prof.seq_len
    n_total = sum(p.numel() for p in model.parameters())
    n_layers = sum(p.params for p in prof.layers)
    hw = prof.calibrate(HardwareProfile.cpu())
    sizes = tuple(sorted(t_full))
    runtime: dict[str, dict[str, float]] = {}
    step_over: dict[str, float] = {}
    recompute: dict[str, float] = {}
    for dp_type in ("ddp", "fsdp"):
        try:
            r = _measure_runtime(
                model,
                shape,
                seq_len,
                device,
                dtype,
                dp_type,
                warmup,
                repeats,
                sizes,
                max(sizes) if ckpt_probe else None,
                notes,
            )
        except Exception as exc:
            _note(notes, f"runtime_{dp_type}", f"failed: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        runtime[dp_type] = r
        co = _runtime_coefficients(
            r,
            dp_type,
            t_full,
            n_total,
            n_layers,
            prof.layers[0].params,
            shape.num_layers,
            lambda b: hw.layer_ms(shape, b, seq_len)[0],
            notes,
        )
        if "recompute_fwd_ratio" in co:
            recompute[dp_type] = co.pop("recompute_fwd_ratio")
        extras.update(co)
        if dp_type == "ddp" or "optimizer_ns_per_param" not in runtime.get("ddp", {}):
            runtime[dp_type]["optimizer_ns_per_param"] = r["opt_ms"] * 1e6 / n_total
        if dp_type == "ddp":
            extras["optimizer_ns_per_param"] = runtime["ddp"]["optimizer_ns_per_param"]
        # per-step remainder: the fixed part of train_step plus the optimizer beyond the modelled one
        opt_pred = extras.get("optimizer_ns_per_param", 0.0) * n_total * 1e-6
        fixed = r["fixed_ms"] + (r["opt_ms"] - opt_pred if opt_pred > 0 else 0.0)
        if fixed < 0:
            _note(notes, f"runtime_{dp_type}_step", f"per-step remainder {fixed:.3f} ms clamped to 0")
        step_over[dp_type] = max(0.0, fixed)
    extras["runtime"] = runtime
    extras["step_overhead_ms"] = step_over
    extras["recompute_fwd_ratio"] = recompute


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
