"""Supervised fine-tuning of LatentOmni on interleaved text / audio-visual latent trajectories.

Runs as-is on CPU with a tiny random Qwen2.5-Omni thinker and a synthetic trajectory set (JSONL + .npy
frames + .wav audio written to a temporary folder). Paper recipe (arXiv 2605.22012): one joint SFT stage,
750 steps, lr 1e-5, 5% warm-up, λ1 = 0.005, λ2 = 1.0, K = 32 visual + 8 audio latents.

    python examples/latent_omni_sft.py                                  # tiny, CPU, ~10 steps
    python examples/latent_omni_sft.py --trainer trl                    # same through TRL's SFTTrainer
    python examples/latent_omni_sft.py --model path/to/latent-omni --processor path/to/latent-omni \\
        --data trajectories.jsonl --max-steps 750 --lr 1e-5 --bf16       # a real checkpoint

``--init-from-thinker DIR`` starts from a Qwen2.5-Omni thinker checkpoint saved as a
``Qwen2_5OmniThinkerForConditionalGeneration`` (its tokenizer + processor files in the same folder): the
latent tokens are added, and LatentOmni's sync heads are newly initialised.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import TrainingArguments

import hf_ext  # noqa: F401  (registers the latent_omni Auto classes)
from hf_ext.models.latent_omni import LatentOmniDataCollator, LatentOmniTrainer, load_jsonl
from hf_ext.models.latent_omni.collator import write_synthetic_jsonl


def build(args: argparse.Namespace):
    if args.init_from_thinker:
        from transformers import AutoTokenizer, Qwen2_5OmniThinkerConfig, WhisperFeatureExtractor

        from hf_ext.models.latent_omni import (
            LatentOmniConfig,
            LatentOmniForConditionalGeneration,
            LatentOmniProcessor,
        )

        tok = AutoTokenizer.from_pretrained(args.init_from_thinker)
        proc = LatentOmniProcessor(WhisperFeatureExtractor(feature_size=128), tok)
        cfg = proc.update_config(
            LatentOmniConfig.from_thinker_config(
                Qwen2_5OmniThinkerConfig.from_pretrained(args.init_from_thinker)
            )
        )
        model = LatentOmniForConditionalGeneration.from_pretrained(args.init_from_thinker, config=cfg)
        if len(tok) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tok))
        return model, proc
    if args.model == "tiny":
        from hf_ext.models.latent_omni.tiny import tiny_latent_omni, tiny_latent_omni_processor

        return tiny_latent_omni(seed=0), tiny_latent_omni_processor()
    from transformers import AutoModelForMultimodalLM, AutoProcessor

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    return (
        AutoModelForMultimodalLM.from_pretrained(args.model, dtype=dtype),
        AutoProcessor.from_pretrained(args.processor or args.model),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help="'tiny' or a LatentOmni checkpoint folder")
    p.add_argument("--processor", default=None, help="processor folder (default: --model)")
    p.add_argument("--init-from-thinker", default=None, help="Qwen2.5-Omni thinker checkpoint to start from")
    p.add_argument("--data", default=None, help="trajectory JSONL (default: a synthetic set)")
    p.add_argument("--trainer", choices=("hf", "trl"), default="hf")
    p.add_argument("--max-steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=5e-3, help="5e-3 for the tiny demo; the paper uses 1e-5")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--output-dir", default=None)
    args = p.parse_args()

    tmp = tempfile.mkdtemp(prefix="latent_omni_sft_")
    data_path = args.data or write_synthetic_jsonl(tmp, 16, seed=0, frames=4, size=8)
    train = load_jsonl(data_path)
    model, proc = build(args)
    collator = LatentOmniDataCollator(proc)
    common = dict(
        output_dir=args.output_dir or f"{tmp}/out",
        per_device_train_batch_size=args.batch_size,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        warmup_steps=0.05,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        bf16=args.bf16,
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    if args.trainer == "trl":
        from datasets import Dataset
        from trl import SFTConfig

        from hf_ext.models.latent_omni.training import latent_omni_sft_trainer_class

        cfg = SFTConfig(**common, dataset_kwargs={"skip_prepare_dataset": True})
        trainer = latent_omni_sft_trainer_class()(
            model=model,
            args=cfg,
            train_dataset=Dataset.from_list(train),
            data_collator=collator,
            processing_class=proc.tokenizer,
        )
    else:
        trainer = LatentOmniTrainer(
            model=model, args=TrainingArguments(**common), train_dataset=train, data_collator=collator
        )
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    print(
        f"first step: loss {logs[0]['loss']:.3f} (text {logs[0].get('text_loss')}, latent {logs[0].get('latent_loss')}, "
        f"sync {logs[0].get('sync_loss')})"
    )
    print(
        f"last step:  loss {logs[-1]['loss']:.3f} (text {logs[-1].get('text_loss')}, latent {logs[-1].get('latent_loss')}, "
        f"sync {logs[-1].get('sync_loss')})"
    )
    out = args.output_dir or f"{tmp}/checkpoint"
    trainer.model.save_pretrained(out)
    proc.save_pretrained(out)
    print(
        f"saved model + processor to {out} (load with AutoModelForMultimodalLM / AutoProcessor after `import hf_ext`)"
    )


if __name__ == "__main__":
    main()
