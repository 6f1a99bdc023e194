"""SALE sparse prefill on a long prompt: from_pretrained(attn_implementation="sale") + calibrate + generate.

By default (no flags) it runs on CPU in seconds: a tiny random Llama is saved to a local folder, reloaded
with ``attn_implementation="sale"``, calibrated (per-head thresholds written into its config), saved and
reloaded again (the thresholds survive), then it generates from a long prompt and compares with sdpa.

    python examples/sale_long_context.py
    python examples/sale_long_context.py --model meta-llama/Llama-3.1-8B-Instruct --device cuda \\
        --dtype bfloat16 --prompt-len 32768 --calib-len 16384 --min-seq-len 4096

With ``--model`` the weights come from that path / hub name (the tiny default downloads nothing).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

import hf_ext  # noqa: F401  (registers attn_implementation="sale")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--model", default=None, help="model path or hub name (default: a tiny random Llama, saved locally)"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="default: bfloat16 on CUDA, float32 on CPU",
    )
    p.add_argument("--prompt-len", type=int, default=600, help="tokens in the long prompt")
    p.add_argument("--calib-len", type=int, default=400, help="tokens in the calibration prompt")
    p.add_argument(
        "--theta",
        type=float,
        default=None,
        help="calibration error budget per token (default: the reference's 0.4 for real models; 0.02 for "
        "the tiny model, whose head dim 16 and small outputs make 0.4 a very loose budget)",
    )
    p.add_argument(
        "--min-seq-len",
        type=int,
        default=None,
        help="dense below this (default 4096; 128 for the tiny model)",
    )
    p.add_argument("--block-q", type=int, default=None)
    p.add_argument("--block-k", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--save", default=None, help="where to save the calibrated model (default: a temp folder)")
    return p


def _long_prompt(tokenizer, n: int, vocab: int, seed: int) -> torch.Tensor:
    if tokenizer is None:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(3, vocab, (1, n), generator=g)
    needle = "The secret passphrase is 'blue heron 42'. "
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    text = filler * (n // 16)
    cut = len(text) // 3
    text = text[:cut] + needle + text[cut:] + "\nQuestion: what is the secret passphrase? Answer:"
    ids = tokenizer(text, return_tensors="pt").input_ids
    return torch.cat([ids[:, :1], ids[:, -(n - 1) :]], dim=1) if ids.shape[1] > n else ids


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_ext.attention.sale import SALEConfig, calibrate, sale_stats

    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    )
    tmp = tempfile.TemporaryDirectory()
    tokenizer = None
    if args.model is None:
        from hf_ext.testing import tiny_llama

        path = f"{tmp.name}/tiny-llama"
        tiny_llama().save_pretrained(path)
        min_seq = args.min_seq_len or 128
        theta = args.theta or 0.02
        blocks = dict(block_q=args.block_q or 16, block_k=args.block_k or 16, local_window=32)
    else:
        path = args.model
        tokenizer = AutoTokenizer.from_pretrained(path)
        min_seq = args.min_seq_len or 4096
        theta = args.theta or 0.4
        blocks = dict(block_q=args.block_q, block_k=args.block_k)

    # 1. from_pretrained with the "sale" attention implementation
    model = (
        AutoModelForCausalLM.from_pretrained(path, attn_implementation="sale", dtype=dtype)
        .to(args.device)
        .eval()
    )
    vocab = model.config.vocab_size
    cfg = SALEConfig(min_seq_len=min_seq, **blocks)

    # 2. calibrate per-(layer, head) thresholds; they are written into model.config.sale_config
    t0 = time.perf_counter()
    calib = _long_prompt(tokenizer, args.calib_len, vocab, seed=1).to(args.device)
    cfg = calibrate(model, calib, theta=theta, config=cfg)
    flat = [t for row in cfg.taus for t in row]
    print(
        f"calibrated {len(cfg.taus)} layers x {len(cfg.taus[0])} heads in {time.perf_counter() - t0:.1f}s: "
        f"tau min {min(flat):.5f} / median {sorted(flat)[len(flat) // 2]:.5f} / max {max(flat):.5f}"
    )

    # 3. save + reload: the thresholds travel in config.json
    save = args.save or f"{tmp.name}/calibrated"
    model.save_pretrained(save)
    if tokenizer is not None:
        tokenizer.save_pretrained(save)
    model = (
        AutoModelForCausalLM.from_pretrained(save, attn_implementation="sale", dtype=dtype)
        .to(args.device)
        .eval()
    )
    assert SALEConfig.from_dict(model.config.sale_config).taus == cfg.taus
    print(f"saved to {save} and reloaded: sale_config.taus kept")

    # 4. long-prompt generation, sparse prefill vs sdpa
    ids = _long_prompt(tokenizer, args.prompt_len, vocab, seed=2).to(args.device)
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
    with torch.no_grad(), sale_stats() as st:
        t0 = time.perf_counter()
        out = model.generate(ids, **gen)
        t_sale = time.perf_counter() - t0
        logits = model(ids, logits_to_keep=1).logits[:, -1].float()
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        t0 = time.perf_counter()
        ref = model.generate(ids, **gen)
        t_sdpa = time.perf_counter() - t0
        ref_logits = model(ids, logits_to_keep=1).logits[:, -1].float()
    cos = float(torch.nn.functional.cosine_similarity(logits, ref_logits, dim=-1).mean())
    diff = (out[0, ids.shape[1] :] != ref[0, ids.shape[1] :]).nonzero()
    same = (
        int(diff[0, 0]) if len(diff) else args.max_new_tokens
    )  # greedy tokens equal before the first divergence
    print(
        f"prompt {ids.shape[1]} tokens: kept-block density {st.density:.3f} over {st.sparse_calls} sparse "
        f"attention calls; last-token logits cosine vs sdpa {cos:.4f}; first {same}/{args.max_new_tokens} greedy "
        f"tokens identical; generate {t_sale:.2f}s (sale) vs {t_sdpa:.2f}s (sdpa)"
    )
    if tokenizer is not None:
        print("sale:", tokenizer.decode(out[0, ids.shape[1] :]))
        print("sdpa:", tokenizer.decode(ref[0, ids.shape[1] :]))
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
