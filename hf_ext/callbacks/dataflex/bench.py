"""DataFlex benchmark: update overhead vs a plain Trainer, and held-out loss of dynamic vs static training.

Two measurements, written to ``benchmarks/results/dataflex.csv`` (+ PNG):

* ``update_overhead`` — wall time per optimizer step of ``DataFlexTrainer`` with each method,
  amortised (median step time + one update's time / ``--update-step``) vs the median step of
  the same run with a plain ``Trainer`` (baseline ``plain_trainer``); ``quality_value`` is the
  time of one update in ms. ratio = plain / dataflex (1.0 = no overhead).
* ``heldout_loss`` — loss on held-out *clean + hard* data (the noisy domain has random labels:
  nothing to learn) after the same number of steps, dynamic method vs uniform static training
  (baseline ``static``), averaged over ``--seeds`` data orders; ratio = static / dynamic (> 1: the method helps).

CPU (default): the 1-layer hidden-32 synthetic model. GPU: ``--device cuda --preset small``
(Llama-shaped 8 x 512 random model, bf16, sequences of 128 tokens); needs no ``datasets``/``trl``.

    python -m hf_ext bench dataflex                      # CPU, ~1-2 min
    python -m hf_ext bench dataflex -- --quick           # CPU smoke run
    python -m hf_ext bench dataflex -- --device cuda --preset small
"""

from __future__ import annotations

import argparse
import contextlib
import io
import platform
import statistics
import tempfile
import time
from typing import Any

import numpy as np

from hf_ext.utils.bench import bench_main, check_flag_minimums, mark_quick_run

OVERHEAD_METHODS = {
    "random": {"selector": "random", "selector_args": {"budget": 0.5}},
    "loss": {"selector": "loss", "selector_args": {"budget": 0.5}},
    "delta_loss": {"selector": "delta_loss", "selector_args": {"budget": 0.5}},
    "less": {"selector": "less", "selector_args": {"budget": 0.5, "proj_dim": 256, "pool_size": 128}},
    "near": {"selector": "near", "selector_args": {"budget": 0.5}},
    "doremi": {"mixer": "doremi", "mixer_args": {"probe_size": 16}},
    "odm": {"mixer": "odm"},
    "dynamic": {
        "mixer": "dynamic",
        "mixer_args": {"schedule": [{"step": 0, "weights": [1, 1, 1]}, {"step": 100, "weights": [1, 1, 0]}]},
    },
    "weight_loss": {"weighter": "loss"},
    "weight_adapt": {"weighter": "adapt"},
}

QUALITY_METHODS = {
    "delta_loss": {"selector": "delta_loss", "selector_args": {"budget": 0.6}},
    "less": {"selector": "less", "selector_args": {"budget": 0.6, "proj_dim": 256, "pool_size": 256}},
    "near": {"selector": "near", "selector_args": {"budget": 0.6}},
    "loss": {"selector": "loss", "selector_args": {"budget": 0.6}},
    "random": {"selector": "random", "selector_args": {"budget": 0.6}},
    "doremi": {"mixer": "doremi", "mixer_args": {"probe_size": 16}},
    "odm": {"mixer": "odm"},
    "dynamic": {"mixer": "dynamic", "mixer_args": {"schedule": [{"step": 0, "weights": [1, 1, 0]}]}},
    "weight_loss": {"weighter": "loss"},
    "weight_adapt": {"weighter": "adapt", "weighter_args": {"beta": 1.0}},
}


def _model(preset: str, device: str, seed: int = 0) -> Any:
    from hf_ext.callbacks.dataflex.synthetic import tiny_model

    if preset == "tiny":
        m = tiny_model(seed)
    else:
        m = tiny_model(
            seed,
            hidden_size=512,
            intermediate_size=1536,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=4,
            max_position_embeddings=256,
        )
    return m.to(device)


def _args(out: str, steps: int, device: str, batch: int, lr: float) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=lr,
        report_to=[],
        use_cpu=device == "cpu",
        bf16=device != "cpu",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
        lr_scheduler_type="constant",
        warmup_steps=0,
    )


def _run(
    cfg: dict | None, *, data, target, ref, steps, preset, device, batch, lr, update_step, warmup, seed=0
):
    from transformers import Trainer, TrainerCallback

    from hf_ext.callbacks.dataflex.callback import TARGET_SELECTORS
    from hf_ext.callbacks.dataflex.ops import default_collate
    from hf_ext.callbacks.dataflex.trainer import DataFlexTrainer

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.t: list[float] = []

        def on_step_begin(self, *a, **k):
            self.t.append(time.perf_counter())

        def on_train_end(self, *a, **k):
            self.t.append(time.perf_counter())

    timer = Timer()
    model = _model(preset, device)
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):
        args = _args(out, steps, device, batch, lr)
        args.seed = args.data_seed = seed
        if cfg is None:
            tr = Trainer(
                model=model, args=args, train_dataset=data, data_collator=default_collate, callbacks=[timer]
            )
        else:
            cfg = {
                **cfg,
                "update_step": update_step,
                "warmup_step": warmup,
                "ops_batch_size": 32,
                "seed": 42 + seed,
            }
            tr = DataFlexTrainer(
                model=model,
                args=args,
                train_dataset=data,
                data_collator=default_collate,
                callbacks=[timer],
                dataflex=cfg,
                # only what the method uses (DataFlex warns about inputs it would ignore)
                target_dataset=target if cfg.get("selector") in TARGET_SELECTORS else None,
                reference_model=ref if cfg.get("mixer") == "doremi" else None,
            )
        tr.train()
    # Amortised ms per step = median step time (robust to a busy machine; includes per-step hooks such as
    # weighters) + median update time / update_step. The first steps (warm-up) are skipped.
    dts = np.diff(timer.t)[min(5, steps // 4) :]
    upd = [e["seconds"] for e in tr.dataflex.log_history] if cfg is not None else []
    upd_ms = 1e3 * statistics.median(upd) if upd else 0.0
    return model, float(np.median(dts)) * 1e3 + upd_ms / update_step, upd_ms


@bench_main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hf-ext bench dataflex", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument(
        "--preset",
        default=None,
        choices=["tiny", "small"],
        help="model size (default tiny on CPU, small on CUDA)",
    )
    p.add_argument("--steps", type=int, default=None, help="training steps per run")
    p.add_argument(
        "--update-step", type=int, default=None, help="steps between updates (default 20, 10 with --quick)"
    )
    p.add_argument("--methods", nargs="*", default=None, help="subset of methods")
    p.add_argument("--skip-quality", action="store_true", help="only the overhead measurement")
    p.add_argument(
        "--seeds", type=int, default=None, help="data-order seeds averaged (default 3 tiny, 1 small)"
    )
    p.add_argument("--quick", action="store_true", help="smoke run (few steps, few methods)")
    p.add_argument("--no-write", action="store_true", help="print only; do not append to the CSV")
    argv = list(argv or [])
    if argv[:1] == ["--"]:  # `hf-ext bench dataflex -- --device cuda`
        argv = argv[1:]
    a = p.parse_args(argv)
    # 0 used to mean the default ('or'), -5 reached the Trainer
    check_flag_minimums(p, a, {"steps": 1, "seeds": 1, "update_step": 1})
    mark_quick_run(a.quick)
    if a.methods is not None:  # before any training: the reference run alone takes a while
        unknown = [m for m in a.methods if m not in OVERHEAD_METHODS]
        if unknown or not a.methods:
            what = f"unknown method(s) {', '.join(map(repr, unknown))}" if unknown else "no method given"
            p.error(f"argument --methods: {what}; choose from: {', '.join(OVERHEAD_METHODS)}")

    import torch
    from rich.progress import track

    from hf_ext.callbacks.dataflex.synthetic import heldout_loss, make_mixture, train_steps
    from hf_ext.utils.bench import Row, append_rows, device_name, plot_results, print_rows

    if a.device == "cpu":
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    preset = a.preset or ("tiny" if a.device == "cpu" else "small")
    length = 12 if preset == "tiny" else 128
    steps = a.steps or (30 if a.quick else (120 if preset == "tiny" else 100))
    batch = 16
    lr = 3e-3 if preset == "tiny" else 3e-4
    n_dom = 64 if a.quick else 256
    data = make_mixture({"clean": n_dom, "hard": n_dom, "noisy": n_dom}, seed=0, length=length)
    target = make_mixture({"clean": 16, "hard": 16}, seed=1, length=length)
    heldout = make_mixture({"clean": 64, "hard": 64}, seed=2, length=length)
    a.seeds = a.seeds or (3 if preset == "tiny" else 1)
    if preset != "tiny":  # CountSketch: O(P) per sample instead of O(P * k) for the larger model
        for table in (OVERHEAD_METHODS, QUALITY_METHODS):
            table["less"]["selector_args"]["projection"] = "sketch"
    methods = a.methods or (["random", "doremi", "weight_loss"] if a.quick else list(OVERHEAD_METHODS))
    common = dict(
        data=data,
        target=target,
        steps=steps,
        preset=preset,
        device=a.device,
        batch=batch,
        lr=lr,
        update_step=a.update_step if a.update_step is not None else (10 if a.quick else 20),
        warmup=5,
    )

    ref = train_steps(_model(preset, a.device, seed=1), data, steps, lr=lr, batch_size=batch, seed=1)
    if a.device != "cpu":
        ref = ref.to(torch.bfloat16)
    cmd = "python -m hf_ext bench dataflex " + " ".join(argv or [])
    dev_case = f"{preset}/{a.device}"
    # the device the runs used: a CPU run on a machine with a GPU is labelled as the CPU, not the card
    where = device_name() if a.device == "cuda" else f"cpu-{platform.machine()}"
    rows: list[Row] = []
    for name in track(methods, description="update overhead"):
        _, plain_ms, _ = _run(None, ref=ref, **common)  # paired with each method: the machine may be busy
        _, ms, upd = _run(OVERHEAD_METHODS[name], ref=ref, **common)
        rows.append(
            Row.make(
                "dataflex",
                f"{name} ({dev_case}, every {common['update_step']} steps)",
                "update_overhead",
                ms,
                "plain_trainer",
                plain_ms,
                quality_name="ms_per_update",
                quality_value=round(upd, 3),
                command=cmd,
                device=where,
            )
        )
    if not a.skip_quality:
        seeds = range(a.seeds)
        static = float(
            np.mean([heldout_loss(_run(None, ref=ref, seed=s, **common)[0].float(), heldout) for s in seeds])
        )
        qmethods = (
            [m for m in methods if m in QUALITY_METHODS] if a.methods or a.quick else list(QUALITY_METHODS)
        )
        for name in track(qmethods, description="held-out loss"):
            loss = float(
                np.mean(
                    [
                        heldout_loss(
                            _run(QUALITY_METHODS[name], ref=ref, seed=s, **common)[0].float(), heldout
                        )
                        for s in seeds
                    ]
                )
            )
            rows.append(
                Row.make(
                    "dataflex",
                    f"{name} ({dev_case}, {steps} steps)",
                    "heldout_loss",
                    loss,
                    "static",
                    static,
                    quality_name="seeds",
                    quality_value=a.seeds,
                    command=cmd,
                    device=where,
                )
            )
    print_rows(rows, title=f"DataFlex ({dev_case}); plain step {plain_ms:.2f} ms")
    if not a.no_write:
        path = append_rows("dataflex", rows)
        png = plot_results("dataflex")
        print(f"wrote {path} and {png}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    import sys

    raise SystemExit(main(sys.argv[1:]))
