"""Launch-configuration sweep of the SALE estimate kernel (GPU only; one call of a few minutes).

For the Llama-3.1-8B shape (32 q / 8 kv heads, d=128, causal, bf16, structured inputs, tau=0.01) it
times :func:`hf_ext_kernels.sparse_attn.quant_score.sale_estimate` under several launch knobs
(``heads_per_program``, ``pair``, ``num_warps``, ``num_stages``) and checks that every variant's mask
equals the reference mask (the torch reference on small shapes, the default variant at full size).
An optional ``--baseline`` module path (a copy of an earlier ``quant_score.py``) is timed first.
A ceiling kernel (int8 dot + integer row max only, no statistics) shows the headroom.

Usage (GPU machine)::

    PYTHONPATH=$PWD:$PWD/kernels python benchmarks/sale_estimate_sweep.py --lengths 65536 131072
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
for _p in (_ROOT, _ROOT / "kernels"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

# (heads_per_program, pair, num_warps, num_stages, maxnreg (0 = no cap))
VARIANTS = [
    (1, 0, 4, 3, 0),
    (1, 0, 4, 3, 128),
    (1, 0, 4, 4, 128),
    (1, 0, 4, 2, 128),
    (1, 0, 8, 3, 0),
    (2, 0, 8, 3, 0),
    (2, 0, 8, 3, 128),
    (2, 0, 8, 4, 128),
    (2, 0, 4, 3, 0),
    (1, 2, 4, 3, 0),
    (1, 2, 4, 3, 168),
    (1, 1, 4, 3, 168),
]
RS2_VARIANTS = [(1, 0, 4, 3, 0), (2, 0, 4, 3, 0), (2, 0, 4, 3, 128), (2, 0, 8, 3, 0), (1, 0, 8, 3, 0)]


@triton.jit
def _ceiling_kernel(
    QI, KI, OUT, NQB, H, G, S, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr
):
    """int8 Q·Kᵀ over the causal lower triangle + integer row max: the estimate without statistics."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    qb = NQB - 1 - pid_m
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    qi = tl.load(QI + h * S * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :])
    kb_base = KI + (h // G) * S * HEAD_DIM
    m = tl.full([BLOCK_M], -2147483647, tl.int32)
    for kb in range(0, (qb * BLOCK_M) // BLOCK_N):
        k = tl.load(kb_base + (kb * BLOCK_N + offs_n)[:, None] * HEAD_DIM + offs_d[None, :])
        acc = tl.dot(qi, tl.trans(k), out_dtype=tl.int32)
        m = tl.maximum(m, tl.max(acc, axis=1))
    tl.store(OUT + h * S + offs_m, m)


def _dump_compiled(jit_fn) -> None:
    """Registers / spills / shared memory of every compiled specialisation (best effort)."""
    try:
        caches = getattr(jit_fn, "device_caches", {})
        for dev_cache in caches.values():
            kcache = dev_cache[0] if isinstance(dev_cache, tuple) else dev_cache
            for key, kern in kcache.items():
                md = kern.metadata
                print(
                    f"compiled: warps={md.num_warps} stages={md.num_stages} regs={kern.n_regs} "
                    f"spills={kern.n_spills} shared={md.shared} key={str(key)[-160:]}",
                    flush=True,
                )
    except Exception as exc:  # pragma: no cover
        print(f"(no compile info: {type(exc).__name__}: {exc})")


def _load_module(path: str):
    spec = importlib.util.spec_from_file_location("qs_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run_length(n, args, alive, base, qs, structured_qkv, rows) -> dict:
    """Time every alive variant (and the baseline, the ceiling kernel) at length ``n``."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, _ = structured_qkv(1, 32, 8, n, 128, seed=n, dtype=torch.bfloat16, device=dev)
    taus = torch.full((32,), args.tau, device=dev)
    common = dict(
        block_q=128,
        block_k=64,
        sink_blocks=1,
        local_window=128,
        causal=True,
        scale=128**-0.5,
        bits=8,
        key_padding_mask=None,
    )
    rep = 600 if n <= 65536 else 1500

    def bench(fn, rep=rep):
        if dev == "cpu":  # interpreter smoke test
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        return float(triton.testing.do_bench(fn, warmup=100, rep=rep, return_mode="median"))

    ops = 2 * 32 * 128 * (n * n / 2)  # causal Q·Kᵀ MACs x2
    t_qk = bench(lambda: qs.quantize_k(k, block_k=64, bits=8, key_padding_mask=None))  # noqa: B023
    print(f"N={n}: quantize_k {t_qk:.3f} ms", flush=True)
    ref_mask = None
    if base is not None:
        ref_mask, _ = base.sale_estimate(q, k, taus, **common)
        t = bench(lambda: base.sale_estimate(q, k, taus, **common))  # noqa: B023
        rows.append((n, "baseline", t, 0, ops / t / 1e9, "", ""))
        print(f"N={n} baseline {t:.2f} ms  {ops / t / 1e9:.0f} TOPS-equiv", flush=True)
    res = {}
    for hpc, pair, w, st, mr in alive:
        kw = dict(common, num_warps=w, num_stages=st, heads_per_program=hpc, pair=pair, maxnreg=mr)
        try:
            m, _ = qs.sale_estimate(q, k, taus, **kw)
            if ref_mask is None:
                ref_mask = m.clone()
            mis = int((m != ref_mask).sum())
            t = bench(lambda kw=kw: qs.sale_estimate(q, k, taus, **kw))  # noqa: B023
        except Exception as exc:  # report, keep going
            print(f"N={n} v={hpc, pair, w, st, mr} FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            continue
        info = ""
        res[(hpc, pair, w, st, mr)] = t
        rows.append((n, f"h{hpc}p{pair}w{w}s{st}r{mr}", t, mis, ops / t / 1e9, info, ""))
        print(
            f"N={n} v=h{hpc} p{pair} w{w} s{st} r{mr}: {t:.2f} ms  {ops / t / 1e9:.0f} TOPS-equiv  "
            f"mask mismatch {mis}  density {float(m.float().mean()):.4f}",
            flush=True,
        )
    if n == max(args.lengths):  # row_stride 2 (every 2nd query row scored)
        for hpc, pair, w, st, mr in RS2_VARIANTS:
            kw = dict(
                common, row_stride=2, num_warps=w, num_stages=st, heads_per_program=hpc, pair=pair, maxnreg=mr
            )
            try:
                t = bench(lambda kw=kw: qs.sale_estimate(q, k, taus, **kw))
            except Exception as exc:
                print(f"N={n} rs2 v={hpc, pair, w, st, mr} FAILED {type(exc).__name__}: {str(exc)[:300]}")
                continue
            rows.append((n, f"rs2_h{hpc}p{pair}w{w}s{st}r{mr}", t, -1, ops / t / 1e9, "", ""))
            print(f"N={n} rs2 v=h{hpc} p{pair} w{w} s{st} r{mr}: {t:.2f} ms", flush=True)
    # ceiling kernel: dot + row max only
    qi = torch.randint(-127, 128, (32, n, 128), dtype=torch.int8, device=dev)
    ki = torch.randint(-127, 128, (8, n, 128), dtype=torch.int8, device=dev)
    out = torch.empty(32, n, dtype=torch.int32, device=dev)
    for bn, w, st in ((64, 4, 3), (128, 4, 3), (64, 8, 3), (128, 8, 3)):
        try:
            fn = lambda bn=bn, w=w, st=st: _ceiling_kernel[(n // 128, 32)](  # noqa: E731
                qi,
                ki,
                out,
                n // 128,
                32,
                4,
                n,
                BLOCK_M=128,
                BLOCK_N=bn,
                HEAD_DIM=128,
                num_warps=w,
                num_stages=st,
            )
            t = bench(fn)
            rows.append((n, f"ceiling_bn{bn}w{w}s{st}", t, 0, ops / t / 1e9, "", ""))
            print(
                f"N={n} ceiling dot+rowmax bn{bn} w{w} s{st}: {t:.2f} ms {ops / t / 1e9:.0f} TOPS",
                flush=True,
            )
        except Exception as exc:
            print(f"ceiling bn{bn} w{w} FAILED {type(exc).__name__}: {str(exc)[:200]}", flush=True)
    return res


def main(argv: list[str] | None = None) -> int:  # noqa: C901
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[65536, 131072])
    p.add_argument("--tau", type=float, default=0.01)
    p.add_argument("--baseline", default=None, help="path of an earlier quant_score.py to time first")
    p.add_argument(
        "--keep-frac",
        type=float,
        default=1.15,
        help="time at the next length only variants within this factor of the best",
    )
    p.add_argument("--out", default=None, help="CSV path for all timings")
    args = p.parse_args(argv)

    from hf_ext_kernels.sparse_attn import quant_score as qs
    from hf_ext_kernels.sparse_attn import sale_block_mask
    from hf_ext_kernels.sparse_attn.inputs import structured_qkv

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cuda":
        print(torch.cuda.get_device_name(), end=" ")
    print("torch", torch.__version__, "triton", triton.__version__, flush=True)
    base = _load_module(args.baseline) if args.baseline else None

    # ---- correctness on small shapes vs the torch reference, every variant
    t0 = time.time()
    bad = 0
    # lengths divisible by 16*block: the same compiled specialisations as the timed runs
    small = ((True, 32, 8, 2048, 1), (True, 32, 8, 2048, 2))
    if dev == "cpu":
        small = ((True, 4, 2, 256, 1), (False, 4, 2, 300, 1))
    for causal, h, hkv, n, rs in small:
        q, k, _ = structured_qkv(1, h, hkv, n, 128, seed=n, device=dev, local_logit=8.0, sink_logit=8.0)
        kw = dict(causal=causal, local_window=64, row_stride=rs)
        mref = sale_block_mask(q, k, tau=0.02, backend="torch", **kw)
        taus = torch.full((h,), 0.02, device=dev)
        for hpc, pair, w, st, mr in VARIANTS if rs == 1 else RS2_VARIANTS:
            mt, _ = qs.sale_estimate(
                q,
                k,
                taus,
                block_q=128,
                block_k=64,
                sink_blocks=1,
                local_window=64,
                causal=causal,
                scale=128**-0.5,
                bits=8,
                key_padding_mask=None,
                row_stride=rs,
                num_warps=w,
                num_stages=st,
                heads_per_program=hpc,
                pair=pair,
                maxnreg=mr,
            )
            mis = int((mt != mref).sum())
            if mis > 0.01 * mref.numel():
                bad += 1
            print(
                f"check causal={causal} n={n} rs={rs} v={hpc, pair, w, st, mr}: mismatch {mis}/{mref.numel()}"
                f" density {float(mref.float().mean()):.3f}",
                flush=True,
            )
    print(f"small-shape checks done in {time.time() - t0:.0f}s, variants failing: {bad}", flush=True)

    rows = []
    alive = list(VARIANTS)
    for n in args.lengths:
        res = _run_length(n, args, alive, base, qs, structured_qkv, rows)
        torch.cuda.empty_cache()
        if res:
            best = min(res.values())
            alive = [v for v in alive if v in res and res[v] <= args.keep_frac * best]

    _dump_compiled(qs._estimate_kernel)
    print("\nlength variant ms mismatch TOPS-equiv")
    for r in rows:
        print(f"{r[0]:>7} {r[1]:<22} {r[2]:8.2f} {r[3]:>6} {r[4]:6.0f}")
    if args.out:
        with open(args.out, "w") as f:
            f.write("length,variant,ms,mask_mismatch,tops_equiv\n")
            for r in rows:
                f.write(f"{r[0]},{r[1]},{r[2]:.4f},{r[3]},{r[4]:.1f}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
