"""DataFlexTrainer without its callback: the trainer trains as the stock Trainer does."""

from __future__ import annotations

from transformers import Trainer, TrainerCallback

from hf_ext.callbacks.dataflex.ops import default_collate
from hf_ext.callbacks.dataflex.sampler import DataFlexSampler
from hf_ext.callbacks.dataflex.trainer import DataFlexTrainer
from tests.dataflex._common import args, make_mixture, tiny_model

DATA = make_mixture({"clean": 24, "noisy": 24, "hard": 24}, seed=0)


class _Batches(TrainerCallback):
    """The first three input ids of every training batch's rows, and the sampler each epoch drew from."""

    def __init__(self) -> None:
        self.rows: list[list[list[int]]] = []
        self.samplers: list[str] = []

    def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
        obj = train_dataloader.batch_sampler
        while getattr(obj, "batch_sampler", None) not in (None, obj):
            obj = obj.batch_sampler
        self.samplers.append(type(obj.sampler).__name__)


def _record_rows(trainer, rec: _Batches) -> None:
    compute = trainer.compute_loss

    def spy(model, inputs, *a, **kw):
        rec.rows.append(inputs["input_ids"][:, :3].tolist())
        return compute(model, inputs, *a, **kw)

    trainer.compute_loss = spy


def test_removing_the_callback_from_a_dataflex_trainer_gives_the_stock_trainer(tmp_path):
    """After trainer.remove_callback(trainer.dataflex) the next train() still drew from DataFlex's sampler (the last
    selection: 18 of 72 samples, in the same order every epoch since nothing called set_epoch any more) and the
    weighter still weighed every loss, although no DataFlex update ran: removing the callback did not switch
    DataFlex off."""
    cfg = {
        "selector": "random",
        "selector_args": {"budget": 0.25},
        "warmup_step": 1,
        "update_step": 100,
        "weighter": "loss",
        "weighter_args": {"temperature": 0.5},
    }
    targs = dict(max_steps=6, remove_unused_columns=False)
    t = DataFlexTrainer(
        model=tiny_model(),
        args=args(str(tmp_path / "a"), **targs),
        train_dataset=DATA,
        data_collator=default_collate,
        dataflex=cfg,
    )
    t.train()
    cb = t.dataflex
    assert len(cb.sampler.plan["indices"]) == 18
    t.remove_callback(cb)
    observed = cb._obs_count.copy()
    weighed = []
    weigh = cb.weigh
    cb.weigh = lambda *a, **kw: weighed.append(1) or weigh(*a, **kw)
    rec = _Batches()
    t.add_callback(rec)
    _record_rows(t, rec)
    t.train()

    plain = Trainer(
        model=tiny_model(),
        args=args(str(tmp_path / "b"), **targs),
        train_dataset=DATA,
        data_collator=default_collate,
    )
    ref = _Batches()
    plain.add_callback(ref)
    _record_rows(plain, ref)
    plain.train()

    assert DataFlexSampler.__name__ not in rec.samplers, rec.samplers
    assert rec.rows == ref.rows
    assert weighed == [] and (cb._obs_count == observed).all()


def test_the_scoring_ops_give_every_module_its_own_training_flag_back():
    """The shared scoring ops ran the model in eval mode and then called model.train(was_training): a model in
    training mode with a sub-module kept in eval mode (a frozen tower, a dropout switched off) came back with every
    module in training mode (and a reference model likewise)."""
    from hf_ext.callbacks.dataflex import ops

    model = tiny_model().train()
    model.model.layers[0].mlp.eval()
    ref = tiny_model(seed=1).train()
    ref.model.norm.eval()
    flags = [m.training for m in model.modules()]
    ref_flags = [m.training for m in ref.modules()]
    data = DATA[:4]
    ops.per_sample_loss(model, data, [0, 1, 2, 3], batch_size=2)
    ops.embeddings(model, data, [0, 1], batch_size=2)
    ops.per_sample_excess_loss(model, ref, data, [0, 1], batch_size=2)
    ops.grad_features(model, data, [0, 1], proj_dim=8)
    assert [m.training for m in model.modules()] == flags
    assert [m.training for m in ref.modules()] == ref_flags
