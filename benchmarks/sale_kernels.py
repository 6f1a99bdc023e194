"""SALE kernel benchmark: estimate + block-sparse compute vs cuDNN / flash SDPA / FlexAttention.

Shape: Llama-3.1-8B attention (B=1, 32 query heads, 8 KV heads, d=128, causal, bf16) at the chosen
lengths. For each length and input kind (``structured``: sinks + RoPE + local focus + long-range
needles from :func:`hf_ext_kernels.sparse_attn.inputs.structured_qkv`; ``random``: i.i.d. Gaussian)
it measures, in the same run and with ``triton.testing.do_bench`` medians:

* SALE total (``sale_attention``: K quantisation + fused estimate + compaction + sparse forward),
  the estimate alone (``sale_block_mask``) and the sparse compute alone on that mask
  (``block_sparse_attention``: compaction + forward);
* cuDNN SDPA and torch flash SDPA (dense, K/V repeated to 32 heads beforehand, not timed);
* compiled FlexAttention with a ``BlockMask`` built from the same kept blocks (full / partial
  blocks split as our kernel does);
* kept-block density (kept / causally visible block pairs) and the SALE output's error vs the cuDNN
  dense output (relative L1, cosine).

A correctness check of the Triton kernels against the torch references runs first.

Rows go to ``benchmarks/results/sale.csv`` (or ``$HF_EXT_RESULTS_DIR``), then ``sale.png``.

Usage (GPU machine)::

    PYTHONPATH=$PWD:$PWD/kernels python benchmarks/sale_kernels.py --lengths 8192 32768 65536 131072
    python benchmarks/sale_kernels.py --quick   # CPU smoke test (torch reference, tiny shapes)
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
for _p in (_ROOT, _ROOT / "kernels"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import torch  # noqa: E402

COMPONENT = "sale"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sale_kernels", description=__doc__.split("\n")[0])
    p.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        default=[8192, 16384, 32768, 65536, 131072],
        help="sequence lengths (Sq = Sk)",
    )
    p.add_argument("--tau", type=float, default=0.01, help="SALE threshold tau (all heads)")
    p.add_argument(
        "--extra-taus",
        type=float,
        nargs="*",
        default=[],
        help="more tau values: density/error/time printed, not written",
    )
    p.add_argument("--inputs", nargs="+", default=["structured", "random"], choices=["structured", "random"])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-q", type=int, default=None)
    p.add_argument("--block-k", type=int, default=None)
    p.add_argument("--bits", type=int, default=8, choices=[4, 8])
    p.add_argument(
        "--row-stride",
        type=int,
        default=1,
        choices=[1, 2, 4],
        help="score every n-th query row in the estimate (1 = all rows)",
    )
    p.add_argument("--case-suffix", default="", help="appended to each case name (e.g. a variant label)")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    p.add_argument("--no-check", action="store_true", help="skip the kernel-vs-reference check")
    p.add_argument("--no-write", action="store_true", help="print only, write no CSV/PNG")
    p.add_argument("--tune", action="store_true", help="also time kernel launch configs (warps, stages)")
    p.add_argument("--quick", action="store_true", help="CPU smoke test: tiny shapes, torch reference")
    return p


def _errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    o, r = out.float().flatten(), ref.float().flatten()
    rel_l1 = float((o - r).abs().sum() / r.abs().sum().clamp_min(1e-30))
    cos = float(torch.nn.functional.cosine_similarity(o, r, dim=0))
    return rel_l1, cos


def _visible_pairs(n: int, bq: int, bk: int) -> int:
    nqb, nkb = math.ceil(n / bq), math.ceil(n / bk)
    return sum(min(nkb, ((min((i + 1) * bq, n) - 1) // bk) + 1) for i in range(nqb))


def _check_kernels(dev: str) -> str:
    """Triton vs torch reference on small shapes; returns a one-line summary (raises on failure)."""
    from hf_ext_kernels.sparse_attn import block_sparse_attention, sale_block_mask
    from hf_ext_kernels.sparse_attn.inputs import structured_qkv

    worst_mask, worst_err = 0.0, 0.0
    for causal, hkv, n, pad in ((True, 2, 1000, False), (False, 4, 777, True), (True, 1, 1500, True)):
        q, k, v = structured_qkv(2, 4, hkv, n, 128, seed=1, device=dev, local_logit=8.0, sink_logit=8.0)
        kpm = None
        if pad:
            kpm = torch.ones(2, n, dtype=torch.bool, device=dev)
            kpm[0, :37] = False
            kpm[1, -50:] = False
        kw = dict(tau=0.02, causal=causal, key_padding_mask=kpm, local_window=64)
        mt = sale_block_mask(q, k, backend="triton", **kw)
        mr = sale_block_mask(q, k, backend="torch", **kw)
        worst_mask = max(worst_mask, float((mt != mr).float().mean()))
        ot = block_sparse_attention(q, k, v, mr, causal=causal, key_padding_mask=kpm, backend="triton")
        orf = block_sparse_attention(
            q.float(), k.float(), v.float(), mr, causal=causal, key_padding_mask=kpm, backend="torch"
        )
        err = float((ot.float() - orf).abs().max())
        worst_err = max(worst_err, err)
        if torch.isnan(ot).any() or err > 2e-2 or worst_mask > 0.01:
            raise RuntimeError(
                f"kernel check failed: causal={causal} mask mismatch {worst_mask} max err {err}"
            )
    return f"kernel check ok: mask mismatch {worst_mask:.2e}, max |triton - ref| {worst_err:.2e}"


def main(argv: list[str] | None = None) -> int:  # noqa: C901
    args = _parser().parse_args(argv)
    from hf_ext.utils.bench import append_rows, plot_results, print_rows, time_fn
    from hf_ext_kernels.sparse_attn import DEFAULT_BLOCK_K, DEFAULT_BLOCK_Q

    cuda = torch.cuda.is_available() and not args.quick
    dev = "cuda" if cuda else "cpu"
    bq = args.block_q or DEFAULT_BLOCK_Q
    bk = args.block_k or DEFAULT_BLOCK_K
    if args.quick:
        args.lengths = [n for n in args.lengths if n <= 1024] or [512]
        args.heads, args.kv_heads, args.head_dim = 4, 2, 64
        args.no_flex = True
        bq, bk = args.block_q or 64, args.block_k or 64
    args.block_q, args.block_k = bq, bk  # resolved: _run_case reads them from args
    h = args.heads
    t0 = time.time()

    if cuda and not args.no_check:
        print(_check_kernels(dev), flush=True)

    flex = None
    if cuda and not args.no_flex:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)

    def bench(fn):
        return time_fn(fn, warmup=25 if cuda else 1, rep=100 if cuda else 2, device=dev)

    rows: list = []
    extra_lines: list[str] = []
    try:
        from tqdm import tqdm

        it = tqdm(args.lengths, desc="sale bench", disable=not sys.stderr.isatty())
    except ImportError:  # pragma: no cover
        it = args.lengths
    for n in it:
        vis_pairs = _visible_pairs(n, bq, bk) * h
        dense_t: dict[str, float] = {}
        for kind in args.inputs:
            _run_case(args, cuda, flex, bench, n, kind, vis_pairs, dense_t, rows, extra_lines)
            if cuda:
                torch.cuda.empty_cache()
    print_rows(rows, title=f"SALE kernels (block {bq}x{bk}, tau={args.tau}, {time.time() - t0:.0f}s)")
    for line in extra_lines:
        print(line)
    if not args.no_write and rows:
        path = append_rows(COMPONENT, rows)
        png = plot_results(COMPONENT)
        print(f"wrote {path} and {png}")
    return 0


def _run_case(
    args,
    cuda: bool,
    flex,
    bench,
    n: int,
    kind: str,
    vis_pairs: int,
    dense_t: dict,
    rows: list,
    extra_lines: list,
) -> None:
    """Measure one (length, input kind): appends result rows and printed lines."""
    from hf_ext.utils.bench import Row
    from hf_ext_kernels.sparse_attn import block_sparse_attention, sale_attention, sale_block_mask
    from hf_ext_kernels.sparse_attn.inputs import random_qkv, structured_qkv

    sdpa = torch.nn.functional.scaled_dot_product_attention
    h, hkv, d, bq, bk = args.heads, args.kv_heads, args.head_dim, args.block_q, args.block_k
    g = h // hkv
    dev, dtype, backend = ("cuda", torch.bfloat16, "triton") if cuda else ("cpu", torch.float32, "torch")
    gen = structured_qkv if kind == "structured" else random_qkv
    q, k, v = gen(1, h, hkv, n, d, seed=n, dtype=dtype, device=dev)
    kr, vr = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    if cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            ref = sdpa(q, kr, vr, is_causal=True)
            if "cudnn" not in dense_t:
                dense_t["cudnn"] = bench(lambda: sdpa(q, kr, vr, is_causal=True))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            if "flash" not in dense_t:
                ref_f = sdpa(q, kr, vr, is_causal=True)
                dense_t["flash"] = bench(lambda: sdpa(q, kr, vr, is_causal=True))
                _, cos_f = _errors(ref_f, ref)
                print(f"N={n}: flash vs cudnn cosine {cos_f:.6f}", flush=True)
                del ref_f
    else:
        ref = sdpa(q, kr, vr, is_causal=True)
        if "sdpa" not in dense_t:
            dense_t["sdpa"] = bench(lambda: sdpa(q, kr, vr, is_causal=True))
    for tau in [args.tau, *args.extra_taus]:
        kw = dict(
            tau=tau, block_q=bq, block_k=bk, bits=args.bits, backend=backend, row_stride=args.row_stride
        )
        out, mask = sale_attention(q, k, v, return_mask=True, **kw)
        rel_l1, cos = _errors(out, ref)
        density = float(mask.sum()) / vis_pairs
        t_total = bench(lambda: sale_attention(q, k, v, **kw))  # noqa: B023
        t_est = bench(lambda: sale_block_mask(q, k, **kw))  # noqa: B023
        t_comp = bench(
            lambda mask=mask: block_sparse_attention(
                q,
                k,
                v,
                mask,
                block_q=bq,
                block_k=bk,
                backend=backend,
            )
        )
        t_flex = None
        if flex is not None:
            bm = _flex_block_mask(mask, n, bq, bk)
            try:
                o_flex = flex(q, k, v, block_mask=bm, enable_gqa=True)
                t_flex = bench(lambda: flex(q, k, v, block_mask=bm, enable_gqa=True))  # noqa: B023
                _, cos_fx = _errors(o_flex, out)
                if cos_fx < 0.999:
                    print(f"WARNING: flex vs SALE compute cosine {cos_fx:.5f}", flush=True)
                del o_flex
            except Exception as exc:  # pragma: no cover - report, don't die
                print(f"FlexAttention failed at N={n}: {type(exc).__name__}: {exc}", flush=True)
        if args.tune and cuda and tau == args.tau:
            _tune(q, k, v, mask, tau, bq, bk, bench)
        line = (
            f"N={n:>6} {kind:<10} tau={tau:<7g} density={density:.4f} total={t_total:.3f}ms "
            f"est={t_est:.3f}ms ({t_est / t_total:.0%}) compute={t_comp:.3f}ms "
            f"flex={'-' if t_flex is None else f'{t_flex:.3f}ms'} "
            + " ".join(f"{b}={t:.3f}ms" for b, t in dense_t.items())
            + f" relL1={rel_l1:.4f} cos={cos:.5f}"
        )
        print(line, flush=True)
        extra_lines.append(line)
        if tau != args.tau:
            continue
        case = f"llama8b_causal_{n}_{kind}" if not args.quick else f"quick_causal_{n}_{kind}"
        if args.row_stride > 1:
            case += f"_rs{args.row_stride}"
        case += args.case_suffix
        for b, tb in dense_t.items():
            qn, qv = ("cosine", cos) if b != "flash" else ("rel_l1", rel_l1)
            rows.append(
                Row.make(COMPONENT, case, "attn_time_ms", t_total, b, tb, quality_name=qn, quality_value=qv)
            )
        if t_flex is not None:
            rows.append(
                Row.make(
                    COMPONENT,
                    case,
                    "attn_time_ms",
                    t_total,
                    "flex",
                    t_flex,
                    quality_name="cosine",
                    quality_value=cos,
                )
            )
            rows.append(
                Row.make(
                    COMPONENT,
                    case,
                    "sparse_compute_time_ms",
                    t_comp,
                    "flex",
                    t_flex,
                    quality_name="density",
                    quality_value=density,
                )
            )
        base = dense_t.get("cudnn", dense_t.get("sdpa"))
        rows.append(
            Row.make(
                COMPONENT,
                case,
                "estimate_time_ms",
                t_est,
                "cudnn" if cuda else "sdpa",
                base,
                quality_name="estimate_share",
                quality_value=t_est / t_total,
            )
        )
        rows.append(
            Row.make(
                COMPONENT,
                case,
                "kept_block_density",
                density,
                "dense",
                1.0,
                quality_name="rel_l1",
                quality_value=rel_l1,
            )
        )


def _tune(q, k, v, mask, tau, bq, bk, bench) -> None:
    """Time the estimate and the sparse forward under several (num_warps, num_stages)."""
    from hf_ext_kernels.sparse_attn.block_sparse import block_sparse_attn_fwd, compact_block_mask
    from hf_ext_kernels.sparse_attn.quant_score import quantize_k, sale_estimate

    n = q.shape[2]
    scale = q.shape[-1] ** -0.5
    taus = torch.full((q.shape[1],), tau, device=q.device)
    idx, cnt, nfull = compact_block_mask(mask, n, n, bq, bk, causal=True, has_kpm=False)
    t_c = bench(lambda: compact_block_mask(mask, n, n, bq, bk, causal=True, has_kpm=False))
    t_qk = bench(lambda: quantize_k(k, block_k=bk, bits=8, key_padding_mask=None))
    res = [f"tune N={n}: compaction {t_c:.3f}ms quant_k {t_qk:.3f}ms"]
    for w, st in ((4, 2), (4, 3), (8, 2), (8, 3), (8, 4)):
        try:
            t = bench(
                lambda w=w, st=st: block_sparse_attn_fwd(
                    q,
                    k,
                    v,
                    idx,
                    cnt,
                    nfull,
                    block_q=bq,
                    block_k=bk,
                    causal=True,
                    scale=scale,
                    key_padding_mask=None,
                    num_warps=w,
                    num_stages=st,
                )
            )
            res.append(f"fwd w{w}s{st}={t:.3f}")
        except Exception as exc:  # pragma: no cover
            res.append(f"fwd w{w}s{st}=ERR({type(exc).__name__})")
        try:
            t = bench(
                lambda w=w, st=st: sale_estimate(
                    q,
                    k,
                    taus,
                    block_q=bq,
                    block_k=bk,
                    sink_blocks=1,  # noqa: B023
                    local_window=128,
                    causal=True,
                    scale=scale,
                    bits=8,
                    key_padding_mask=None,
                    num_warps=w,
                    num_stages=st,
                )
            )
            res.append(f"est w{w}s{st}={t:.3f}")
        except Exception as exc:  # pragma: no cover
            res.append(f"est w{w}s{st}=ERR({type(exc).__name__})")
    print(" ".join(res), flush=True)


def _flex_block_mask(mask: torch.Tensor, n: int, bq: int, bk: int):
    """FlexAttention ``BlockMask`` with the kept blocks of ``mask``, split into full / partial blocks."""
    from torch.nn.attention.flex_attention import BlockMask

    nqb, nkb = mask.shape[-2:]
    qs = torch.arange(nqb, device=mask.device) * bq
    ke = (torch.arange(nkb, device=mask.device) + 1) * bk - 1
    full_region = (ke[None, :] <= qs[:, None]) & (ke[None, :] < n)
    full = mask & full_region
    part = mask & ~full_region

    def lists(m):
        num = m.sum(dim=-1, dtype=torch.int32)
        ind = torch.argsort(m.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return num.contiguous(), ind.contiguous()

    pn, pi = lists(part)
    fn, fi = lists(full)

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    return BlockMask.from_kv_blocks(pn, pi, fn, fi, BLOCK_SIZE=(bq, bk), mask_mod=causal, seq_lengths=(n, n))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
