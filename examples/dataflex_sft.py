"""Dynamic data training with DataFlex on a Trainer or TRL SFTTrainer script.

Runs on CPU as-is with a tiny random model on the synthetic clean/hard/noisy mixture:

    python examples/dataflex_sft.py                                  # DataFlexTrainer, config examples/dataflex.yaml
    python examples/dataflex_sft.py --method delta_loss              # override the method
    python examples/dataflex_sft.py --sft                            # TRL SFTTrainer + DataFlex (needs trl, datasets)

With a real model and dataset (a text dataset with a "domain" column):

    python examples/dataflex_sft.py --sft --model Qwen/Qwen2.5-0.5B --dataset my_data.jsonl --steps 1000
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))

PRESETS = {
    "odm": {"mixer": "odm"},
    "doremi": {"mixer": "doremi"},
    "delta_loss": {"selector": "delta_loss", "selector_args": {"budget": 0.5}},
    "loss": {"selector": "loss", "selector_args": {"budget": 0.5}},
    "less": {"selector": "less", "selector_args": {"budget": 0.5, "proj_dim": 128}},
    "near": {"selector": "near", "selector_args": {"budget": 0.5}},
    "weight_loss": {"weighter": "loss"},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=os.path.join(HERE, "dataflex.yaml"), help="DataFlex YAML/JSON config")
    p.add_argument("--method", choices=sorted(PRESETS), help="use a preset instead of --config")
    p.add_argument(
        "--sft", action="store_true", help="TRL SFTTrainer (text data) instead of Trainer (token data)"
    )
    p.add_argument("--model", default=None, help="HF model id/path (default: tiny random model)")
    p.add_argument("--dataset", default=None, help="json/jsonl with 'text' and 'domain' columns (--sft)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--output-dir", default="/tmp/dataflex_example")
    a = p.parse_args()

    from transformers import TrainingArguments

    from hf_ext.callbacks.dataflex import DataFlexConfig
    from hf_ext.callbacks.dataflex.callback import TARGET_SELECTORS
    from hf_ext.callbacks.dataflex.synthetic import heldout_loss, make_mixture, tiny_model, train_steps

    torch.manual_seed(0)
    cfg = (
        DataFlexConfig.from_file(a.config)
        if a.method is None
        else DataFlexConfig.from_dict({**PRESETS[a.method], "warmup_step": 10, "update_step": 10})
    )
    print(f"DataFlex: selector={cfg.selector} mixer={cfg.mixer} weighter={cfg.weighter}")
    extra = {}

    if a.sft:
        import datasets
        from trl import SFTConfig

        from hf_ext.callbacks.dataflex.trainer import DataFlexSFTTrainer

        if a.dataset:
            ds = datasets.load_dataset("json", data_files=a.dataset, split="train")
        else:
            texts = {
                "story": "The quick brown fox jumps over the lazy dog.",
                "code": "def add(a, b): return a + b.",
                "math": "Solve for x: 3x + 5 = 20.",
            }
            ds = datasets.Dataset.from_list([{"text": t, "domain": d} for d, t in texts.items()] * 16)
        if a.model:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            model, tok = AutoModelForCausalLM.from_pretrained(a.model), AutoTokenizer.from_pretrained(a.model)
        else:
            from hf_ext.testing import tiny_llama, tiny_tokenizer

            model, tok = tiny_llama(), tiny_tokenizer()
        if cfg.mixer == "doremi":
            extra["reference_model"] = model.__class__(
                model.config
            )  # replace with a model trained on the default mix
        args = SFTConfig(
            output_dir=a.output_dir,
            max_steps=a.steps,
            per_device_train_batch_size=8,
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
            logging_steps=10,
            save_strategy="no",
            max_length=64,
        )
        trainer = DataFlexSFTTrainer(
            model=model,
            args=args,
            train_dataset=ds,
            processing_class=tok,
            dataflex=cfg,
            target_dataset=ds.select(range(4)) if cfg.selector in TARGET_SELECTORS else None,
            **extra,
        )
        trainer.train()
    else:
        from hf_ext.callbacks.dataflex.ops import default_collate
        from hf_ext.callbacks.dataflex.trainer import DataFlexTrainer

        data = make_mixture({"clean": 128, "hard": 128, "noisy": 128}, seed=0)
        target = make_mixture({"clean": 16, "hard": 16}, seed=1)
        if cfg.mixer == "doremi":
            extra["reference_model"] = train_steps(tiny_model(seed=1), data, a.steps, batch_size=16)
        args = TrainingArguments(
            a.output_dir,
            max_steps=a.steps,
            per_device_train_batch_size=16,
            learning_rate=3e-3,
            report_to=[],
            use_cpu=True,
            logging_steps=20,
            save_strategy="no",
        )
        trainer = DataFlexTrainer(
            model=tiny_model(),
            args=args,
            train_dataset=data,
            data_collator=default_collate,
            dataflex=cfg,
            target_dataset=target
            if cfg.selector in TARGET_SELECTORS
            else None,  # only selectors that use one
            **extra,
        )
        trainer.train()
        heldout = make_mixture({"clean": 64, "hard": 64}, seed=2)
        print(f"held-out (clean+hard) loss: {heldout_loss(trainer.model, heldout):.3f}")

    df = trainer.dataflex
    print(f"updates: {df.updates_done}")
    for e in df.log_history[-3:]:
        print("  ", {k: v for k, v in e.items() if k != "seconds"}, f"({e['seconds'] * 1e3:.1f} ms)")
    if df.weights is not None:
        print("final domain weights:", dict(zip(df.domain_names, np.round(df.weights, 3).tolist())))


if __name__ == "__main__":
    main()
