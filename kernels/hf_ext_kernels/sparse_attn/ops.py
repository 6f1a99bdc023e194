"""Public entry points of the SALE kernels: block-mask estimate, block-sparse attention, both in one.

Layouts as transformers passes them: ``q [B, H, Sq, D]``, ``k``/``v`` ``[B, Hkv, Sk, D]`` with
``H % Hkv == 0`` (GQA by index mapping, K/V never repeated). Causal alignment is bottom-right: query
``i`` sees key ``j`` when ``j <= i + Sk - Sq``. ``key_padding_mask`` is bool ``[B, Sk]``, True = real
token (left or right padding); padded keys never attend, rows without a visible key return 0.

``backend``: ``"auto"`` = Triton on CUDA tensors, the torch reference (:mod:`.naive`) elsewhere;
``"triton"`` forces Triton (on CPU only under ``TRITON_INTERPRET=1``); ``"torch"`` forces the reference.

Example:
    >>> import torch
    >>> q, k, v = torch.randn(1, 4, 200, 64), torch.randn(1, 2, 200, 64), torch.randn(1, 2, 200, 64)
    >>> out, mask = sale_attention(q, k, v, tau=0.0, return_mask=True)
    >>> bool(mask[0, 0, -1].all()), out.shape
    (True, torch.Size([1, 4, 200, 64]))
"""

from __future__ import annotations

import contextlib
import math
import os

import torch

from . import naive

__all__ = [
    "DEFAULT_BLOCK_K",
    "DEFAULT_BLOCK_Q",
    "SUPPORTED_BLOCKS",
    "SUPPORTED_DTYPES",
    "TRITON_HEAD_DIMS",
    "block_sparse_attention",
    "interpreter_problem",
    "sale_attention",
    "sale_block_mask",
]

DEFAULT_BLOCK_Q = 128
DEFAULT_BLOCK_K = 64
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_HEAD_DIMS = (64, 128)
SUPPORTED_BLOCKS = (16, 32, 64, 128)
SUPPORTED_BITS = (4, 8)
BACKENDS = ("auto", "triton", "torch")


# ------------------------------------------------------------------------------------- validation
def _release(version: str) -> tuple[int, ...]:
    """``"3.6.0+git1"`` -> ``(3, 6, 0)``: the leading numbers of a version string."""
    parts = []
    for piece in version.split("+")[0].split("."):
        digits = "".join(c for c in piece if c.isdigit()) if piece[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def interpreter_problem(triton_version: str | None = None, numpy_version: str | None = None) -> str | None:
    """Why Triton's CPU interpreter (``TRITON_INTERPRET=1``) cannot run these kernels here, or ``None``.

    Triton 3.6's interpreter turns loop bounds into Python ints with ``int()`` of a 1-element array, which numpy
    2.4 made an error: every kernel with a runtime loop bound fails inside the interpreter with an opaque
    ``InterpreterError``. Triton 3.7 and numpy < 2.4 both work. The versions default to the installed ones.
    """
    if triton_version is None or numpy_version is None:
        from importlib import metadata

        import numpy

        try:
            triton_version = triton_version or metadata.version("triton")
        except metadata.PackageNotFoundError:
            return None  # no triton: the caller's import fails with its own message
        numpy_version = numpy_version or numpy.__version__
    if _release(triton_version)[:2] < (3, 7) and _release(numpy_version)[:2] >= (2, 4):
        return (
            f"Triton's CPU interpreter (TRITON_INTERPRET=1) fails with triton {triton_version} and numpy "
            f"{numpy_version} (triton < 3.7 cannot run loops under numpy >= 2.4): install triton>=3.7 or "
            "numpy<2.4, or use backend='torch' / 'auto' on CPU"
        )
    return None


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got device {device}) or TRITON_INTERPRET=1; "
                "use backend='torch' or 'auto' on CPU"
            )
        problem = interpreter_problem()
        if problem is not None:
            raise RuntimeError(problem)
    return backend


def _check_tensor(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have 4 dims [B, heads, seq, head_dim], got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name}.dtype {x.dtype} is not supported; supported: {SUPPORTED_DTYPES}")


def _check_qk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, backend: str) -> None:
    _check_tensor("q", q)
    _check_tensor("k", k)
    if v is not None:
        _check_tensor("v", v)
    for name, x in (("k", k), ("v", v)):
        if x is None:
            continue
        if x.device != q.device:
            raise ValueError(
                f"{name} is on {x.device} but q is on {q.device}; all inputs must share a device"
            )
        if x.dtype != q.dtype:
            raise ValueError(f"{name}.dtype {x.dtype} differs from q.dtype {q.dtype}; they must match")
        if x.shape[0] != q.shape[0]:
            raise ValueError(f"batch of {name} ({x.shape[0]}) differs from q's ({q.shape[0]})")
        if x.shape[-1] != q.shape[-1]:
            raise ValueError(f"head_dim of {name} ({x.shape[-1]}) differs from q's ({q.shape[-1]})")
    h, hkv = q.shape[1], k.shape[1]
    if hkv == 0 or h % hkv != 0:
        raise ValueError(f"q heads ({h}) must be a multiple of k heads ({hkv}) (GQA)")
    if v is not None and (v.shape[1] != hkv or v.shape[2] != k.shape[2]):
        raise ValueError(f"v shape {tuple(v.shape)} must match k shape {tuple(k.shape)} in heads and seq")
    if backend == "triton" and q.shape[-1] not in TRITON_HEAD_DIMS:
        raise ValueError(
            f"head_dim {q.shape[-1]} is not supported by the Triton kernels; supported: {TRITON_HEAD_DIMS} "
            "(use backend='torch' for others)"
        )


def _check_blocks(block_q: int, block_k: int) -> None:
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        if not isinstance(b, int) or b not in SUPPORTED_BLOCKS:
            raise ValueError(f"{name} must be one of {SUPPORTED_BLOCKS}, got {b!r}")


def _check_kpm(kpm: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    if kpm is None:
        return None
    if not isinstance(kpm, torch.Tensor):
        raise TypeError(f"key_padding_mask must be a torch.Tensor or None, got {type(kpm).__name__}")
    if kpm.shape != (k.shape[0], k.shape[2]):
        raise ValueError(
            f"key_padding_mask must have shape [B, Sk] = {(k.shape[0], k.shape[2])}, got {tuple(kpm.shape)}"
        )
    if kpm.device != q.device:
        raise ValueError(f"key_padding_mask is on {kpm.device} but q is on {q.device}")
    if kpm.dtype != torch.bool:
        kpm = kpm != 0
    return kpm


def _check_tau(tau: float | torch.Tensor, h: int, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(tau, dtype=torch.float32).detach().flatten()
    if t.numel() not in (1, h):
        raise ValueError(f"tau must be a float or a tensor of {h} per-head values, got {t.numel()} values")
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()) or bool((t > 1).any()):
        raise ValueError(f"tau must lie in [0, 1], got {t.tolist() if t.numel() < 9 else t}")
    return t.expand(h).contiguous().to(device)


def _check_scale(scale: float | None, d: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(d)
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite float or None, got {scale}")
    return scale


def _check_stride(row_stride: int, block_q: int) -> None:
    if not isinstance(row_stride, int) or row_stride not in (1, 2, 4, 8) or block_q // row_stride < 16:
        raise ValueError(
            f"row_stride must be one of (1, 2, 4, 8) with block_q // row_stride >= 16, got {row_stride!r} "
            f"(block_q={block_q})"
        )


def _check_sel(sink_blocks: int, local_window: int, bits: int) -> None:
    if not isinstance(sink_blocks, int) or sink_blocks < 0:
        raise ValueError(f"sink_blocks must be an int >= 0, got {sink_blocks!r}")
    if not isinstance(local_window, int) or local_window < 0:
        raise ValueError(f"local_window must be an int >= 0, got {local_window!r}")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")


def _check_mask(block_mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int):
    if not isinstance(block_mask, torch.Tensor):
        raise TypeError(f"block_mask must be a torch.Tensor, got {type(block_mask).__name__}")
    b, h, sq = q.shape[:3]
    nqb, nkb = math.ceil(sq / block_q), math.ceil(k.shape[2] / block_k)
    ok = (
        block_mask.dim() == 4
        and block_mask.shape[0] in (1, b)
        and block_mask.shape[1] in (1, h)
        and tuple(block_mask.shape[2:]) == (nqb, nkb)
    )
    if not ok:
        raise ValueError(
            f"block_mask must have shape [B, H, ceil(Sq/block_q), ceil(Sk/block_k)] = {(b, h, nqb, nkb)} "
            f"(B and H may be 1), got {tuple(block_mask.shape)}"
        )
    if block_mask.device != q.device:
        raise ValueError(f"block_mask is on {block_mask.device} but q is on {q.device}")
    return block_mask.bool().expand(b, h, nqb, nkb)


def _on_device(device: torch.device):
    """Context making ``device`` current for a Triton launch: Triton launches on the *current* CUDA device,
    so tensors on another GPU (e.g. a layer on ``cuda:1`` under ``device_map="auto"``) need this."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# -------------------------------------------------------------------------------------------- API
@torch.no_grad()
def sale_block_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    tau: float | torch.Tensor,
    block_q: int = DEFAULT_BLOCK_Q,
    block_k: int = DEFAULT_BLOCK_K,
    sink_blocks: int = 1,
    local_window: int = 128,
    causal: bool = True,
    scale: float | None = None,
    bits: int = 8,
    key_padding_mask: torch.Tensor | None = None,
    backend: str = "auto",
    row_stride: int = 1,
) -> torch.Tensor:
    """SALE block selection: ``mask [B, H, ceil(Sq/block_q), ceil(Sk/block_k)]`` bool, True = keep.

    Args:
        q: ``[B, H, Sq, D]`` queries (fp16/bf16/fp32).
        k: ``[B, Hkv, Sk, D]`` keys, ``H % Hkv == 0``.
        tau: relative-attention threshold in ``[0, 1]``, a float or a ``[H]`` tensor (per head);
            0 keeps every visible block, larger keeps fewer.
        block_q, block_k: block sizes (16/32/64/128).
        sink_blocks: key blocks always kept from the first real key.
        local_window: keys before the aligned diagonal whose blocks are always kept.
        causal: bottom-right causal masking: ``True`` / ``False`` (numpy bools and 0 / 1 too; anything else
            raises ``ValueError``).
        scale: softmax scale (default ``D**-0.5``).
        bits: quantisation bits of the estimate (8, or 4 emulated in int8).
        key_padding_mask: ``[B, Sk]`` bool, True = real token.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.
        row_stride: score only every ``row_stride``-th row of each query block (1 = all rows, the
            paper's estimate; 2/4 trade selection recall for a 2x/4x cheaper estimate).

    Always keeps the sink block(s), the local window and the diagonal blocks (where visible); blocks
    with no visible (query, key) pair are never kept.
    """
    causal = naive.check_causal(causal)
    _check_qk(q, k, None, "torch")
    backend = _resolve_backend(backend, q.device)
    _check_qk(q, k, None, backend)
    kpm, scale, taus = _check_selection(
        q, k, tau, block_q, block_k, sink_blocks, local_window, bits, row_stride, key_padding_mask, scale
    )
    return _select(
        q, k, taus, block_q, block_k, sink_blocks, local_window, causal, scale, bits, kpm, row_stride, backend
    )


def _check_selection(q, k, tau, block_q, block_k, sink_blocks, local_window, bits, row_stride, kpm, scale):
    """Validate the estimate's arguments (shared by :func:`sale_block_mask` and :func:`sale_attention`)."""
    _check_blocks(block_q, block_k)
    _check_sel(sink_blocks, local_window, bits)
    _check_stride(row_stride, block_q)
    kpm = _check_kpm(kpm, q, k)
    scale = _check_scale(scale, q.shape[-1])
    taus = _check_tau(tau, q.shape[1], q.device)
    return kpm, scale, taus


def _select(
    q, k, taus, block_q, block_k, sink_blocks, local_window, causal, scale, bits, kpm, row_stride, backend
):
    """The block mask from already validated arguments: torch reference or the Triton estimate."""
    if backend == "torch":
        return _mask_torch(
            q, k, taus, block_q, block_k, sink_blocks, local_window, causal, scale, bits, kpm, row_stride
        )
    from .quant_score import sale_estimate

    with _on_device(q.device):
        mask, _ = sale_estimate(
            q,
            k,
            taus,
            block_q=block_q,
            block_k=block_k,
            sink_blocks=sink_blocks,
            local_window=local_window,
            causal=causal,
            scale=scale,
            bits=bits,
            key_padding_mask=kpm,
            row_stride=row_stride,
        )
    return mask


def _mask_torch(
    q, k, taus, block_q, block_k, sink_blocks, local_window, causal, scale, bits, kpm, row_stride
):
    # one (batch, KV head) group at a time bounds the reference's memory
    b, h = q.shape[:2]
    hkv = k.shape[1]
    g = h // hkv
    if b == 0:  # empty batch: an empty mask (torch.cat of no groups would raise)
        nqb, nkb = math.ceil(q.shape[2] / block_q), math.ceil(k.shape[2] / block_k)
        return torch.zeros(0, h, nqb, nkb, dtype=torch.bool, device=q.device)
    outs = []
    for bi in range(b):
        row = []
        for j in range(hkv):
            row.append(
                naive.sale_block_mask_ref(
                    q[bi : bi + 1, j * g : (j + 1) * g],
                    k[bi : bi + 1, j : j + 1],
                    tau=taus[j * g : (j + 1) * g],
                    block_q=block_q,
                    block_k=block_k,
                    sink_blocks=sink_blocks,
                    local_window=local_window,
                    causal=causal,
                    scale=scale,
                    bits=bits,
                    row_stride=row_stride,
                    key_padding_mask=None if kpm is None else kpm[bi : bi + 1],
                )
            )
        outs.append(torch.cat(row, dim=1))
    return torch.cat(outs, dim=0)


@torch.no_grad()
def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    *,
    block_q: int = DEFAULT_BLOCK_Q,
    block_k: int = DEFAULT_BLOCK_K,
    causal: bool = True,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Exact attention over the kept blocks only: ``out [B, H, Sq, D]`` in q's dtype.

    ``block_mask`` ``[B, H, ceil(Sq/block_q), ceil(Sk/block_k)]`` bool (B and H may be 1). Online
    softmax in fp32 (Triton) / fp32 math (torch); rows with no visible kept key return 0.
    """
    causal = naive.check_causal(causal)
    _check_qk(q, k, v, "torch")
    backend = _resolve_backend(backend, q.device)
    _check_qk(q, k, v, backend)
    _check_blocks(block_q, block_k)
    kpm = _check_kpm(key_padding_mask, q, k)
    scale = _check_scale(scale, q.shape[-1])
    mask = _check_mask(block_mask, q, k, block_q, block_k)
    return _compute(q, k, v, mask, block_q, block_k, causal, scale, kpm, backend)


def _compute(q, k, v, mask, block_q, block_k, causal, scale, kpm, backend):
    """Block-sparse attention over ``mask`` from already validated arguments (torch or Triton)."""
    if backend == "torch":
        return _attn_torch(q, k, v, mask, block_q, block_k, causal, scale, kpm)
    with _on_device(q.device):
        return _compute_triton(q, k, v, mask, block_q, block_k, causal, scale, kpm)


def _compute_triton(q, k, v, mask, block_q, block_k, causal, scale, kpm):
    """The Triton forward (compacted block lists, then the kernel) on the current device."""
    from .block_sparse import block_sparse_attn_fwd, compact_block_mask

    idx, cnt, nfull = compact_block_mask(
        mask, q.shape[2], k.shape[2], block_q, block_k, causal=causal, has_kpm=kpm is not None
    )
    return block_sparse_attn_fwd(
        q,
        k,
        v,
        idx,
        cnt,
        nfull,
        block_q=block_q,
        block_k=block_k,
        causal=causal,
        scale=scale,
        key_padding_mask=kpm,
    )


def _attn_torch(q, k, v, mask, block_q, block_k, causal, scale, kpm):
    b, h = q.shape[:2]
    hkv = k.shape[1]
    g = h // hkv
    out = torch.empty_like(q)
    for bi in range(b):
        for j in range(hkv):
            out[bi : bi + 1, j * g : (j + 1) * g] = naive.block_sparse_attention_ref(
                q[bi : bi + 1, j * g : (j + 1) * g],
                k[bi : bi + 1, j : j + 1],
                v[bi : bi + 1, j : j + 1],
                mask[bi : bi + 1, j * g : (j + 1) * g],
                block_q=block_q,
                block_k=block_k,
                causal=causal,
                scale=scale,
                key_padding_mask=None if kpm is None else kpm[bi : bi + 1],
            )
    return out


@torch.no_grad()
def sale_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    tau: float | torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    block_q: int = DEFAULT_BLOCK_Q,
    block_k: int = DEFAULT_BLOCK_K,
    sink_blocks: int = 1,
    local_window: int = 128,
    bits: int = 8,
    backend: str = "auto",
    return_mask: bool = False,
    row_stride: int = 1,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """SALE estimate + block-sparse attention in one call.

    Returns ``out [B, H, Sq, D]`` (q's dtype), and ``mask [B, H, nQB, nKB]`` when ``return_mask``.
    Arguments as in :func:`sale_block_mask` and :func:`block_sparse_attention`.
    """
    causal = naive.check_causal(causal)
    _check_qk(q, k, v, "torch")
    backend = _resolve_backend(backend, q.device)
    _check_qk(q, k, v, backend)
    kpm, scale, taus = _check_selection(
        q, k, tau, block_q, block_k, sink_blocks, local_window, bits, row_stride, key_padding_mask, scale
    )
    mask = _select(
        q, k, taus, block_q, block_k, sink_blocks, local_window, causal, scale, bits, kpm, row_stride, backend
    )
    out = _compute(q, k, v, mask, block_q, block_k, causal, scale, kpm, backend)
    return (out, mask) if return_mask else out
