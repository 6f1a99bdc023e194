"""DataFlexTrainer with ``TrainingArguments(torch_compile=True)`` (CPU, aot_eager backend) against the same run eager."""

from __future__ import annotations

import pytest
import torch

from hf_ext.callbacks.dataflex.trainer import DataFlexTrainer
from tests.dataflex._common import args, tiny_model
from tests.dataflex.test_trainer import DATA, TARGET, default_collate

CASES = {
    "weighter_loss": ({"weighter": "loss", "weighter_args": {"temperature": 0.5}, "warmup_step": 0}, {}),
    "less": (
        {"selector": "less", "selector_args": {"budget": 0.5}, "warmup_step": 2, "update_step": 3},
        {"target_dataset": TARGET},
    ),
    "doremi": ({"mixer": "doremi", "warmup_step": 1, "update_step": 2}, {"reference_model": "tiny"}),
}


def _train(out: str, name: str, compiled: bool):
    cfg, extra = CASES[name]
    extra = {k: (tiny_model() if v == "tiny" else v) for k, v in extra.items()}
    kw = {"max_steps": 6}
    if compiled:
        kw.update(torch_compile=True, torch_compile_backend="aot_eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    t = DataFlexTrainer(
        model=tiny_model(),
        args=args(out, **kw),
        train_dataset=DATA,
        data_collator=default_collate,
        dataflex=dict(cfg),
        **extra,
    )
    res = t.train()
    assert (
        torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    ) == compiled  # the forward ran compiled
    torch._dynamo.reset()
    log = [{k: v for k, v in e.items() if k != "seconds"} for e in t.dataflex.log_history]
    return res.training_loss, [p.detach().clone() for p in t.model.parameters()], t.model_wrapped, log


@pytest.mark.parametrize("name", ["weighter_loss", "less", "doremi"])
def test_torch_compile_training_matches_eager(tmp_path, name):
    """The sample weights (loss hook on the compiled model's outputs), a gradient selector (LESS) and a mixer (DoReMi)
    give the eager run's loss, updates and final parameters."""
    loss, params, _, log = _train(str(tmp_path / "eager"), name, False)
    c_loss, c_params, wrapped, c_log = _train(str(tmp_path / "compiled"), name, True)
    assert type(wrapped).__name__ == "OptimizedModule"  # the Trainer did compile the model
    assert c_log == log
    assert c_loss == pytest.approx(loss, rel=1e-5)
    for a, b in zip(params, c_params):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
