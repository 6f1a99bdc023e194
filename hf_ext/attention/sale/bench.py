"""SALE benchmarks: ``--kernels`` (attention-level, delegated) and ``--e2e`` (model prefill).

``--kernels [ARGS...]``: runs the kernel benchmark ``benchmarks/sale_kernels.py`` (its ``main(ARGS)``):
SALE vs cuDNN / torch-flash SDPA / FlexAttention on the Llama-3.1-8B attention shape.

``--e2e``: prefill of a Llama-3.1-8B-shaped random-weight model (bf16, 32 layers, 32 q / 8 kv heads,
d=128, hidden 4096, no download) at each ``--lengths`` with ``attn_implementation="sale"`` vs ``"sdpa"``
on the same weights and the same prompt, ``logits_to_keep=1``. Reports the prefill time ratio, the
kept-block density, and the cosine of the last position's logits vs sdpa. Rows go to
``benchmarks/results/sale.csv`` (case ``llama8b_e2e_prefill_<len>``, baseline ``sdpa``, metric
``prefill_time_ms``). Random weights give near-uniform attention: that is the best case for density and
the worst case for accuracy, so the accuracy figure that matters comes from the kernel benchmark's
structured inputs; this one measures what the sparse prefill saves inside a real model forward.

On CPU (no CUDA) the default shape is a tiny one (``--shape tiny``) so the whole path can be tried quickly:
``python -m hf_ext bench sale --e2e --layers 2 --lengths 512``.

GPU example (< 3 min on an H100)::

    PYTHONPATH=$PWD:$PWD/kernels python -m hf_ext bench sale --e2e --lengths 32768 65536
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

from hf_ext.utils.bench import check_flag_minimums

COMPONENT = "sale"
_KERNEL_BENCH = Path(__file__).resolve().parents[3] / "benchmarks" / "sale_kernels.py"

SHAPES = {
    # Llama-3.1-8B
    "llama8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        layers=32,
    ),
    # CPU smoke test (head dim 64 like the Triton kernel supports)
    "tiny": dict(
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        layers=2,
    ),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hf-ext bench sale", description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--kernels",
        action="store_true",
        help="attention-level benchmark (benchmarks/sale_kernels.py); remaining args go to it",
    )
    mode.add_argument("--e2e", action="store_true", help="end-to-end prefill of a Llama-3.1-8B-shaped model")
    p.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        default=None,
        help="prompt lengths (default: 32768 65536 on CUDA, 512 1024 on CPU)",
    )
    p.add_argument(
        "--layers", type=int, default=None, help="decoder layers (default: the shape's; 32 for llama8b)"
    )
    p.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default=None,
        help="model shape (default: llama8b on CUDA, tiny on CPU)",
    )
    p.add_argument("--tau", type=float, default=None, help="SALE tau for every head (default: SALEConfig's)")
    p.add_argument("--block-q", type=int, default=None, help="query block (default: kernel default)")
    p.add_argument("--block-k", type=int, default=None, help="key block (default: kernel default)")
    p.add_argument(
        "--min-seq-len",
        type=int,
        default=None,
        help="dense below this prompt length (default: SALEConfig's, 4096; 64 on the tiny shape)",
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed prefills per implementation and length")
    p.add_argument("--rep", type=int, default=3, help="timed prefills (median reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-write", action="store_true", help="print only; write no CSV/PNG")
    return p


def run_kernels(argv: list[str]) -> int:
    """Delegate to ``benchmarks/sale_kernels.py``'s ``main(argv)``."""
    if not _KERNEL_BENCH.exists():
        print(
            f"hf-ext bench sale --kernels: {_KERNEL_BENCH} is missing (the kernel benchmark is not in this checkout)"
        )
        return 1
    spec = importlib.util.spec_from_file_location("hf_ext_sale_kernel_bench", _KERNEL_BENCH)
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = mod  # type: ignore[union-attr]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return int(mod.main(argv) or 0)


def _build_model(shape: str, layers: int | None, seed: int, device: str, dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    s = dict(SHAPES[shape])
    n_layers = layers or s.pop("layers")
    s.pop("layers", None)
    cfg = LlamaConfig(
        **s,
        num_hidden_layers=n_layers,
        max_position_embeddings=262144,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    with torch.device(device):  # random init directly on the device, in the target dtype (no download)
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
    return model.eval()


def _time_ms(fn, warmup: int, rep: int, cuda: bool) -> float:
    import torch

    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(max(1, rep)):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        ts.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(ts))


def run_e2e(args: argparse.Namespace) -> int:
    """End-to-end prefill: ``"sale"`` vs ``"sdpa"`` on one random-weight model."""
    import torch
    from rich.console import Console

    from hf_ext.attention.sale import SALEConfig, enable_sale, sale_stats
    from hf_ext.utils.bench import Row, append_rows, plot_results, print_rows

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    shape = args.shape or ("llama8b" if cuda else "tiny")
    lengths = args.lengths or ([32768, 65536] if cuda else [512, 1024])
    dtype = torch.bfloat16 if cuda else torch.float32
    defaults = SALEConfig()
    min_seq = args.min_seq_len or (defaults.min_seq_len if shape == "llama8b" else 64)
    cfg = SALEConfig(
        tau=args.tau if args.tau is not None else defaults.tau,
        block_q=args.block_q,
        block_k=args.block_k,
        min_seq_len=min_seq,
    )
    con = Console()
    t0 = time.perf_counter()
    model = _build_model(shape, args.layers, args.seed, device, dtype)
    n_layers = model.config.num_hidden_layers
    con.print(
        f"[bold]SALE e2e prefill[/]: {shape} ({n_layers} layers, {dtype}, {device}), built in "
        f"{time.perf_counter() - t0:.1f}s; SALE config {cfg.to_dict()}"
    )
    rows = []
    g = torch.Generator().manual_seed(args.seed)
    for n in lengths:
        ids = torch.randint(3, model.config.vocab_size, (1, n), generator=g).to(device)

        def prefill(ids=ids):
            with torch.inference_mode():
                return model(ids, use_cache=False, logits_to_keep=1).logits[:, -1].float()

        model.set_attn_implementation("sdpa")
        ref = prefill()
        t_sdpa = _time_ms(prefill, args.warmup, args.rep, cuda)
        enable_sale(model, cfg)
        with sale_stats() as st:
            out = prefill()
        t_sale = _time_ms(prefill, args.warmup, args.rep, cuda)
        model.set_attn_implementation("sdpa")
        cos = float(torch.nn.functional.cosine_similarity(out, ref, dim=-1).mean())
        paths = sorted({c["path"] for c in st.calls})
        con.print(
            f"len {n}: sdpa {t_sdpa:.1f} ms, sale {t_sale:.1f} ms ({t_sdpa / t_sale:.2f}x), "
            f"density {st.density:.3f}, paths {paths}, last-logits cos {cos:.4f}"
        )
        rows.append(
            Row.make(
                COMPONENT,
                f"{'llama8b' if shape == 'llama8b' else shape}_e2e_prefill_{n}",
                "prefill_time_ms",
                t_sale,
                "sdpa",
                t_sdpa,
                quality_name=f"last_logits_cos@density={st.density:.3f}",
                quality_value=cos,
            )
        )
        if cuda:
            torch.cuda.empty_cache()
    print_rows(rows, title=f"SALE end-to-end prefill ({shape}, {n_layers} layers)")
    if not args.no_write:
        path = append_rows(COMPONENT, rows)
        png = plot_results(COMPONENT)
        con.print(f"rows appended to {path}; plot {png}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``hf-ext bench sale --kernels [ARGS...]`` or ``hf-ext bench sale --e2e [options]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--kernels" in argv:
        i = argv.index("--kernels")
        return run_kernels(argv[:i] + argv[i + 1 :])
    parser = _parser()
    args = parser.parse_args(argv)
    # before the model is built; 0 used to mean the default ('or') or one timed run (max(1, rep))
    check_flag_minimums(parser, args, {"rep": 1, "warmup": 0, "layers": 1, "min_seq_len": 2})
    if args.lengths is not None and min(args.lengths) < 1:
        parser.error(f"argument --lengths: must be >= 1 (got {' '.join(map(str, args.lengths))})")
    return run_e2e(args)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
