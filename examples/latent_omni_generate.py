"""Generate with LatentOmni: text decoding interleaved with K audio-visual latent steps.

Runs as-is on CPU with a tiny random model and a synthetic clip (the output text is gibberish, the
mechanics are real): the prompt ends with ``<Unified_Latent>`` (by default) so the model first runs K latent
steps, K = 32 visual + 8 audio (8 + 2 in the tiny model) (last hidden state fed back, OSPE positions, no LM
head), then ``</Unified_Latent>`` is forced and text continues; with ``--no-force-latent`` the model decides
itself whether to emit ``<Unified_Latent>``.

    python examples/latent_omni_generate.py
    python examples/latent_omni_generate.py --model path/to/latent-omni --video frames.npy --audio clip.wav \\
        --question "Which instrument starts first?" --bf16
"""

from __future__ import annotations

import argparse
import time

import torch

import hf_ext  # noqa: F401  (registers the latent_omni Auto classes)
from hf_ext.models.latent_omni.collator import _load_array, make_synthetic_records


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--model", default="tiny", help="'tiny' or a LatentOmni checkpoint folder (with its processor)"
    )
    p.add_argument("--video", default=None, help="question frames [T, H, W, 3] as .npy (default: synthetic)")
    p.add_argument("--audio", default=None, help="question audio, 16 kHz .wav/.npy (default: synthetic)")
    p.add_argument("--question", default="What colour appears and what tone plays?")
    p.add_argument("--fps", type=float, default=2.0)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--no-force-latent", action="store_true", help="let the model decide when to think in latents"
    )
    p.add_argument("--sample", action="store_true")
    p.add_argument("--bf16", action="store_true")
    args = p.parse_args()

    if args.model == "tiny":
        from hf_ext.models.latent_omni.tiny import tiny_latent_omni, tiny_latent_omni_processor

        model, proc = tiny_latent_omni(seed=0), tiny_latent_omni_processor(fps=args.fps)
    else:
        from transformers import AutoModelForMultimodalLM, AutoProcessor

        dtype = torch.bfloat16 if args.bf16 else torch.float32
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = AutoModelForMultimodalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
        proc = AutoProcessor.from_pretrained(args.model)
        proc.fps = args.fps
    synth = make_synthetic_records(1, seed=1, frames=4, size=8)[0]
    video = _load_array(args.video, None, "--video") if args.video else synth["video"]
    audio = _load_array(args.audio, None, "--audio") if args.audio else synth["audio"]

    msgs = [
        {"role": "system", "content": "You are a helpful assistant that reasons over audio and video."},
        {
            "role": "user",
            "content": [{"type": "video"}, {"type": "audio"}, {"type": "text", "text": args.question}],
        },
    ]
    prompt = proc.render_conversation(msgs, add_generation_prompt=True)
    if not args.no_force_latent:
        prompt += "<Unified_Latent>"
    inputs = proc(text=[prompt], videos=[video], audio=[audio]).to(model.device)
    if args.bf16:
        for key in ("pixel_values_videos", "input_features"):
            inputs[key] = inputs[key].to(torch.bfloat16)
    t0 = time.perf_counter()
    out = model.generate(
        **inputs,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        return_dict_in_generate=True,
        output_latents=True,
    )
    dt = time.perf_counter() - t0
    new = out.sequences[0, inputs["input_ids"].shape[1] :]
    text = proc.compact_latents(proc.decode(new, skip_special_tokens=False))
    n_lat = int(out.latent_states[0].shape[0])
    print(
        f"prompt tokens: {inputs['input_ids'].shape[1]}, new tokens: {new.numel()} ({n_lat} latent steps), {dt:.2f} s"
    )
    print("output:", text)
    if n_lat:
        norms = out.latent_states[0].float().norm(dim=-1)
        print(f"latent state norms: first {norms[0]:.2f}, last {norms[-1]:.2f}")


if __name__ == "__main__":
    main()
