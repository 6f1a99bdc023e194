"""Benchmark: latent reasoning steps vs plain text chain-of-thought steps (same count, same model).

Both sides run LatentOmni's own decoding loop from the same prefilled KV cache (cropped back before every
repetition): *ours* runs K latent steps (the last hidden state is fed back; no LM head, no sampling),
the *baseline* ``text_cot`` runs K greedy text steps (LM head over the full vocabulary, argmax, embedding
lookup). Metric: ``steps_per_s`` = batch · K / time (higher is better); ratio = ours / baseline.
The same run checks the latent path: the fed-back hidden states with the KV cache vs. a full recompute
without cache (``quality``: max abs difference relative to the hidden-state scale).

Modes:
    cpu: a small Qwen-vocabulary text tower (hidden 512, 2 layers, vocab 152064), fp32.
    gpu: Qwen2.5-Omni-7B-thinker-shaped text tower (hidden 3584, 28 heads / 4 KV heads, MLP 18944,
         vocab 152064) with ``--layers`` decoder layers, random weights, bf16.

Example:
    $ PYTHONPATH=$PWD python -m hf_ext bench latent_omni --mode cpu --steps 8
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from hf_ext.utils.bench import check_flag_minimums

COMPONENT = "latent_omni"


def _config(mode: str, layers: int, k_visual: int, k_audio: int) -> Any:
    from .configuration_latent_omni import LatentOmniConfig

    if mode == "gpu":
        text = dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4)
        out_dim = 3584
    else:
        text = dict(hidden_size=512, intermediate_size=1376, num_attention_heads=8, num_key_value_heads=2)
        out_dim = 512
    text.update(
        num_hidden_layers=layers,
        vocab_size=152064,
        max_position_embeddings=32768,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1000000.0,
            "mrope_section": [16, 24, 24] if mode == "gpu" else [8, 12, 12],
        },
    )
    return LatentOmniConfig(
        text_config=text,
        vision_config=dict(
            depth=1,
            hidden_size=64,
            intermediate_size=128,
            num_heads=2,
            out_hidden_size=out_dim,
            fullatt_block_indexes=[0],
        ),
        audio_config=dict(
            d_model=64,
            encoder_layers=1,
            encoder_attention_heads=2,
            encoder_ffn_dim=128,
            output_dim=out_dim,
            num_mel_bins=128,
        ),
        num_visual_latents=k_visual,
        num_audio_latents=k_audio,
        ospe_audio_time_stride=max(1, k_visual // max(1, k_audio)) if k_audio else 4,
    )


def _build(mode: str, layers: int, k_visual: int, k_audio: int, device: str, dtype: torch.dtype) -> Any:
    from .modeling_latent_omni import LatentOmniForConditionalGeneration

    cfg = _config(mode, layers, k_visual, k_audio)
    cfg._attn_implementation = "sdpa"
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LatentOmniForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.to(device=device, dtype=dtype).eval()


def _prefill(model: Any, prompt: torch.Tensor) -> tuple[Any, int]:
    state = model._latent_prefill(prompt, None, True, {})
    return state, prompt.shape[1]


def _fresh(state: Any, snapshot: dict[str, Any], prefix_len: int) -> Any:
    """Reset ``state`` to just after the prefill (crop the cache, restore the per-row bookkeeping)."""
    extra = state.cache.get_seq_length() - prefix_len
    if extra > 0:
        state.cache.crop(-extra)  # negative: drop that many tokens (transformers 5.17 and 5.24 agree)
    state.attention_mask = snapshot["attention_mask"]
    state.sequences = snapshot["sequences"]
    state.last_hidden = snapshot["last_hidden"]
    for key in ("mode", "latent_i", "base", "next_pos", "blocks"):
        setattr(state, key, list(snapshot[key]))
    return state


def _snapshot(state: Any) -> dict[str, Any]:
    return {
        "attention_mask": state.attention_mask,
        "sequences": state.sequences,
        "last_hidden": state.last_hidden,
        "mode": list(state.mode),
        "latent_i": list(state.latent_i),
        "base": list(state.base),
        "next_pos": list(state.next_pos),
        "blocks": list(state.blocks),
    }


def run_case(model: Any, batch: int, prompt_len: int, steps: int, device: str, warmup: int, rep: int) -> dict:
    """Time ``steps`` latent steps vs ``steps`` greedy text steps from one prefilled prompt (``rep`` rounds after
    ``warmup``, the two runs interleaved in alternating order; median of each)."""
    from hf_ext.utils.bench import time_interleaved

    cfg = model.config
    g = torch.Generator().manual_seed(0)
    body = torch.randint(100, 20000, (batch, prompt_len - 1), generator=g)
    lat_prompt = torch.cat([body, torch.full((batch, 1), cfg.latent_start_token_id)], 1).to(device)
    txt_prompt = torch.cat([body, torch.full((batch, 1), 101)], 1).to(device)
    results: dict[str, Any] = {}
    with torch.no_grad():
        runs = {}
        for name, prompt, kw in (
            ("latent", lat_prompt, dict(max_latent_blocks=1)),
            ("text_cot", txt_prompt, dict(max_latent_blocks=0)),
        ):
            state, plen = _prefill(model, prompt)
            snap = _snapshot(state)

            def run(state=state, snap=snap, plen=plen, kw=kw) -> None:
                _fresh(state, snap, plen)
                model._latent_decode(state, steps, eos_token_ids=[], pad_token_id=0, **kw)

            run()
            if name == "latent":  # the timed loop really ran K latent steps and no text step
                assert all(m in ("latent", "end") for m in state.mode), state.mode
            else:
                assert all(m == "text" for m in state.mode), state.mode
            runs[name] = run
        ms = time_interleaved(runs, rounds=rep, warmup=warmup, device=device)
        for name, t in ms.items():
            results[name] = batch * steps / (t / 1e3)
        del runs
        # correctness of the timed latent path: KV-cache decoding vs full recompute
        n_check = min(steps, 8)
        short = lat_prompt[:, -min(prompt_len, 64) :]
        a = model.generate(
            short, max_new_tokens=n_check, return_dict_in_generate=True, output_latents=True, eos_token_id=[]
        )
        b = model.generate(
            short,
            max_new_tokens=n_check,
            return_dict_in_generate=True,
            output_latents=True,
            eos_token_id=[],
            use_cache=False,
        )
        la, lb = torch.stack(a.latent_states).float(), torch.stack(b.latent_states).float()
        results["quality"] = float((la - lb).abs().max() / lb.abs().max().clamp_min(1e-6))
        results["finite"] = bool(torch.isfinite(la).all())
    return results


def main(argv: list[str] | None = None) -> int:
    """CLI entry (``python -m hf_ext bench latent_omni [args]``)."""
    p = argparse.ArgumentParser(prog="hf-ext bench latent_omni", description=__doc__.split("\n")[0])
    p.add_argument(
        "--mode",
        choices=("auto", "cpu", "gpu"),
        default="auto",
        help="cpu: small fp32 tower; gpu: 7B-thinker-shaped bf16 tower; auto: gpu when CUDA is available",
    )
    p.add_argument(
        "--layers", type=int, nargs="+", default=None, help="decoder layers (default gpu: 4 28, cpu: 2)"
    )
    p.add_argument(
        "--batch", type=int, nargs="+", default=None, help="batch sizes (default gpu: 1 8, cpu: 1)"
    )
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default gpu: 512, cpu: 128)")
    p.add_argument("--visual-latents", type=int, default=32)
    p.add_argument("--audio-latents", type=int, default=8)
    p.add_argument(
        "--steps", type=int, default=None, help="steps per run (default K = visual + audio latents)"
    )
    p.add_argument(
        "--rep",
        type=int,
        default=None,
        help="timed rounds, latent and text interleaved (default gpu: 30, cpu: 3)",
    )
    p.add_argument("--no-write", action="store_true", help="print only; do not append to the CSV")
    args = p.parse_args(argv)
    # before any model is built; 0 used to mean the default ('or')
    check_flag_minimums(p, args, {"steps": 1, "prompt_len": 1, "visual_latents": 0, "audio_latents": 0})
    for flag in ("layers", "batch"):
        v = getattr(args, flag)
        if v is not None and min(v) < 1:
            p.error(f"argument --{flag}: must be >= 1 (got {' '.join(map(str, v))})")
    if args.visual_latents + args.audio_latents < 1:
        p.error("arguments --visual-latents / --audio-latents: K = visual + audio latents must be >= 1")

    from rich.progress import track

    from hf_ext.utils.bench import Row, append_rows, plot_results, print_rows

    mode = args.mode
    if mode == "auto":
        mode = "gpu" if torch.cuda.is_available() else "cpu"
    if mode == "gpu" and not torch.cuda.is_available():
        raise SystemExit("--mode gpu needs CUDA; use --mode cpu")
    device = "cuda" if mode == "gpu" else "cpu"
    dtype = torch.bfloat16 if mode == "gpu" else torch.float32
    layers = args.layers or ([4, 28] if mode == "gpu" else [2])
    batches = args.batch or ([1, 8] if mode == "gpu" else [1])
    prompt_len = args.prompt_len or (512 if mode == "gpu" else 128)
    k = args.visual_latents + args.audio_latents
    steps = args.steps or k
    if steps > k:
        raise SystemExit(f"--steps={steps} must be <= K = {k} (one latent block)")
    warmup, rep = (3, 30) if mode == "gpu" else (1, 3)
    rep = rep if args.rep is None else args.rep
    if rep < 1:
        raise SystemExit(f"--rep must be >= 1, got {rep}")
    if mode == "cpu":
        torch.set_num_threads(min(4, torch.get_num_threads()))

    rows = []
    cases = [(n, b) for n in layers for b in batches]
    for n_layers, batch in track(cases, description="latent_omni bench"):
        t0 = time.perf_counter()
        model = _build(mode, n_layers, args.visual_latents, args.audio_latents, device, dtype)
        build_s = time.perf_counter() - t0
        res = run_case(model, batch, prompt_len, steps, device, warmup, rep)
        if not res["finite"]:
            raise RuntimeError("latent states are not finite")
        shape = "7B-thinker" if mode == "gpu" else "h512"
        case = f"{shape}_L{n_layers}_b{batch}_ctx{prompt_len}_K{steps}_{str(dtype).split('.')[-1]}"
        rows.append(
            Row.make(
                COMPONENT,
                case,
                "steps_per_s",
                res["latent"],
                "text_cot",
                res["text_cot"],
                higher_is_better=True,
                quality_name="latent_cache_vs_recompute_rel_maxdiff",
                quality_value=round(res["quality"], 6),
            )
        )
        print(
            f"  {case}: latent {res['latent']:.1f} steps/s, text CoT {res['text_cot']:.1f} steps/s "
            f"(model built in {build_s:.1f} s)"
        )
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    print_rows(rows, title="LatentOmni: latent steps vs text CoT steps")
    if not args.no_write:
        path = append_rows(COMPONENT, rows)
        plot_results(COMPONENT, path)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
