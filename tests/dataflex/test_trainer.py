"""DataFlexTrainer / callback integration: sampler, loss hook, checkpoint resume, plain Trainer, TRL SFT."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import Trainer

from hf_ext.callbacks.dataflex.callback import STATE_FILE, DataFlexCallback
from hf_ext.callbacks.dataflex.ops import default_collate, sequence_loss_terms
from hf_ext.callbacks.dataflex.trainer import DataFlexTrainer
from tests.dataflex._common import Recorder, args, make_mixture, tiny_classifier, tiny_model

DATA = make_mixture({"clean": 24, "noisy": 24, "hard": 24}, seed=0)
TARGET = make_mixture({"clean": 8}, seed=1)


def _trainer(out, cfg, *, rec=None, **kw):
    t = DataFlexTrainer(
        model=tiny_model(),
        args=args(out, **kw.pop("targs", {})),
        train_dataset=DATA,
        data_collator=default_collate,
        dataflex=cfg,
        callbacks=[rec] if rec else None,
        **kw,
    )
    if rec is not None:
        rec.trainer = t
    return t


def test_selection_restricts_sampler(tmp_path):
    rec = Recorder()
    cfg = {"selector": "random", "selector_args": {"budget": 0.25}, "warmup_step": 2, "update_step": 100}
    t = _trainer(str(tmp_path), cfg, rec=rec)
    t.train()
    (entry,) = t.dataflex.log_history
    chosen = set(t.dataflex.sampler.plan["indices"])
    assert entry["step"] == 2 and len(chosen) == 18
    # batches after the update (plus the prefetch lag of 2 batches) only contain chosen samples
    late = [i for s, b in rec.batches.items() if s >= 5 for i in b]
    assert late and set(late) <= chosen
    early = [i for s, b in rec.batches.items() if s <= 2 for i in b]
    assert not set(early) <= chosen  # before the update: the whole dataset


def test_delta_loss_skips_the_update_at_its_first_scoring_step(tmp_path):
    """warmup_step=0: the step-0 update would compare the model with itself (all deltas 0, top-k = dataset
    order; an audit found this); it is skipped, training starts on the full data and selects at update_step."""
    rec = Recorder()
    cfg = {"selector": "delta_loss", "selector_args": {"budget": 0.25}, "update_step": 3, "update_times": 1}
    t = _trainer(str(tmp_path), cfg, rec=rec, targs=dict(max_steps=6))
    t.train()
    skipped, done = t.dataflex.log_history
    assert skipped["step"] == 0 and "skipped" in skipped and "selected" not in skipped
    assert done["step"] == 3 and done["selected"] == 18
    assert t.dataflex.updates_done == 1  # the skipped update does not use up update_times
    chosen = t.dataflex.sampler.plan["indices"]
    assert chosen != list(range(18))  # not the tie-broken-by-index selection
    early = {i for s in (1, 2, 3) for i in rec.batches[s]}
    assert max(early) >= 18  # steps 1-3 drew from the full dataset


@pytest.mark.parametrize(
    "cfg",
    [
        {"mixer": "odm", "warmup_step": 2, "update_step": 3, "mixer_args": {"alpha": 0.5}},
        {"selector": "delta_loss", "selector_args": {"budget": 0.5}, "warmup_step": 3, "update_step": 4},
        {"weighter": "adapt", "warmup_step": 2},
    ],
    ids=["odm", "delta_loss", "adapt"],
)
def test_resume_continues_with_same_data_state(tmp_path, cfg):
    out_a, out_b = str(tmp_path / "a"), str(tmp_path / "b")
    rec_a = Recorder()
    a = _trainer(out_a, cfg, rec=rec_a, targs=dict(save_strategy="steps", save_steps=6))
    a.train()
    assert os.path.exists(os.path.join(out_a, "checkpoint-6", STATE_FILE))
    with open(os.path.join(out_a, "checkpoint-6", STATE_FILE)) as f:
        state = json.load(f)
    rec_b = Recorder()
    b = _trainer(out_b, cfg, rec=rec_b, targs=dict(save_strategy="no"))
    b.train(resume_from_checkpoint=os.path.join(out_a, "checkpoint-6"))
    assert b.dataflex.resumed_from is not None
    assert b.dataflex.updates_done == a.dataflex.updates_done
    for step in range(7, 13):
        assert rec_b.batches[step] == rec_a.batches[step], step
    if cfg.get("mixer"):
        assert state["updates_done"] == 2
        np.testing.assert_allclose(b.dataflex.weights, a.dataflex.weights, rtol=1e-6)
    if cfg.get("weighter"):
        assert state["weighter"]["keys"]


def test_resume_replays_batches_prefetched_under_many_plans(tmp_path):
    """The sampler kept only the plans of its last 4 plan switches, but a DataLoader with workers draws
    num_workers x prefetch_factor batches ahead: with an update every step (ODM's setting) the batches drawn before a
    checkpoint but trained after it used up to 8 plans here, the older ones were dropped, and the resumed run drew
    those positions from the newest plan instead (steps 7-10 differed from the uninterrupted run). Plans now stay
    while a position at or after the Trainer's resume point (what it skips on resume) uses them."""
    cfg = {"mixer": "odm", "warmup_step": 1, "update_step": 1}
    targs = dict(max_steps=10, dataloader_num_workers=1, dataloader_prefetch_factor=8)
    rec_a, rec_b = Recorder(), Recorder()
    a = _trainer(
        str(tmp_path / "a"), cfg, rec=rec_a, targs=dict(save_strategy="steps", save_steps=6, **targs)
    )
    a.train()
    b = _trainer(str(tmp_path / "b"), cfg, rec=rec_b, targs=targs)
    b.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-6"))
    assert {s: rec_b.batches[s] for s in range(7, 11)} == {s: rec_a.batches[s] for s in range(7, 11)}
    sampler = a.dataflex.sampler
    assert sampler.trained == 40 and len(sampler.plans) <= 10  # the trained positions' plans are dropped


def test_the_trainers_seed_drives_the_data_order_unless_the_config_sets_one(tmp_path):
    """DataFlex's sampler and methods used the config seed (42) whatever TrainingArguments(seed=..., data_seed=...)
    said: runs with different Trainer seeds drew the same batches and selections (the bench passed a config seed per
    run to get different data orders). With the config seed unset they now use the Trainer's data_seed, else its seed,
    as a stock Trainer's sampler does; a config seed still wins, and a resumed run keeps the checkpoint's seed."""
    cfg = {"selector": "random", "selector_args": {"budget": 0.25}, "warmup_step": 2, "update_step": 100}

    def run(out, cfg=cfg, resume=None, **targs):
        rec = Recorder()
        t = _trainer(out, cfg, rec=rec, targs=dict(max_steps=6, **targs))
        t.train(resume_from_checkpoint=resume)
        return rec.batches, t.dataflex

    a, cb_a = run(str(tmp_path / "a"), seed=1, save_strategy="steps", save_steps=3)
    b, cb_b = run(str(tmp_path / "b"), seed=2)
    assert a != b
    assert cb_a.sampler.plan["indices"] != cb_b.sampler.plan["indices"]  # the selector's randomness too
    assert (cb_a.seed, cb_b.seed) == (1, 2)
    c, _ = run(str(tmp_path / "c"), seed=2, data_seed=1)
    assert c == a  # data_seed before seed
    d, _ = run(str(tmp_path / "d"), cfg={**cfg, "seed": 7}, seed=1)
    e, _ = run(str(tmp_path / "e"), cfg={**cfg, "seed": 7}, seed=2)
    assert d == e and d != a  # an explicit config seed wins
    r, cb_r = run(str(tmp_path / "r"), seed=5, resume=str(tmp_path / "a" / "checkpoint-3"))
    assert cb_r.seed == 1 and all(r[s] == a[s] for s in (4, 5, 6))


def test_resuming_with_a_training_dataset_of_another_size_is_refused(tmp_path):
    """The checkpoint's sampler state (dataset size, positions per epoch) replaced the new run's without a check: a
    one-epoch resume with 96 samples instead of 72 (uniform plan) drew only indices below 72 and stopped after 18 of
    its 24 steps (the sampler's epoch had the old length); a smaller dataset fails with an IndexError. It is now a
    ValueError at train begin naming both sizes."""
    cfg = {"mixer": "odm", "warmup_step": 1, "update_step": 2}
    _trainer(str(tmp_path / "a"), cfg, targs=dict(max_steps=2, save_strategy="steps", save_steps=2)).train()
    bigger = DATA + make_mixture({"clean": 8, "noisy": 8, "hard": 8}, seed=5)
    t = DataFlexTrainer(
        model=tiny_model(),
        args=args(str(tmp_path / "b"), max_steps=4),
        train_dataset=bigger,
        data_collator=default_collate,
        dataflex=cfg,
    )
    with pytest.raises(
        ValueError, match=r"training dataset of 72 samples \(72 .*\), but this run has 96 \(96\)"
    ):
        t.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert t.dataflex.updates_done == 0 and t.dataflex.sampler.dataset_size == 96


def test_weighted_loss_matches_manual(tmp_path):
    """The installed loss equals sum_i w_i * loss_sum_i / num_items with the weighter's weights."""
    t = _trainer(str(tmp_path), {"weighter": "loss", "weighter_args": {"temperature": 0.5}, "warmup_step": 0})
    batch = default_collate([DATA[i] for i in (0, 30, 60, 61)])
    idx = torch.tensor([0, 30, 60, 61])
    model = t.model.train()
    t._dataflex_batch_index = idx
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    got = t._dataflex_loss(out, batch["labels"], num_items_in_batch=torch.tensor(40))
    s, c = sequence_loss_terms(out.logits, batch["labels"])
    per = (s / c).detach()
    w = torch.softmax(per / 0.5, 0) * 4
    torch.testing.assert_close(got, (s * w).sum() / 40)
    assert not torch.allclose(got, s.sum() / 40)  # weighting changes the loss
    # without a weighter the loss is the stock token-mean loss
    t2 = _trainer(str(tmp_path / "2"), {"mixer": "odm", "update_step": 5})
    t2._dataflex_batch_index = idx
    torch.testing.assert_close(t2._dataflex_loss(out, batch["labels"]), s.sum() / c.sum())


def test_eval_loss_without_num_items_is_not_divided_by_accumulation_steps(tmp_path):
    """TRL's prediction_step calls compute_loss without num_items_in_batch: the evaluation loss was divided by the
    last training's gradient_accumulation_steps (4x too small at 4)."""
    t = _trainer(str(tmp_path), {"mixer": "odm", "update_step": 5}, targs={"gradient_accumulation_steps": 4})
    t.current_gradient_accumulation_steps = 4  # what training leaves behind
    batch = default_collate([DATA[i] for i in (0, 30, 60, 61)])
    t._dataflex_batch_index = torch.tensor([0, 30, 60, 61])
    model = t.model.eval()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    s, c = sequence_loss_terms(out.logits, batch["labels"])
    torch.testing.assert_close(t._dataflex_loss(out, batch["labels"]), s.sum() / c.sum())
    model.train()  # a training step without num_items_in_batch: the Trainer will not divide, so the hook does
    torch.testing.assert_close(t._dataflex_loss(out, batch["labels"]), s.sum() / c.sum() / 4)


@pytest.mark.parametrize(
    "cfg",
    [{"mixer": "odm", "update_step": 5}, {"weighter": "loss"}, {"weighter": "adapt"}],
    ids=["odm", "loss", "adapt"],
)
def test_loss_hook_refuses_a_batch_whose_rows_are_not_the_samples(tmp_path, cfg):
    """A padding-free collator (TRL SFTConfig(padding_free=True)) packs the batch's samples into one row: the hook gave
    ODM that row's loss as the loss of every sample (rewards of all domains corrupted), the loss weighter weighed the
    single row (weight 1: silently unweighted) and adapt failed with an IndexError. Now a ValueError explains it, and
    padding_free=True with a weighter/ODM is refused at construction."""
    t = _trainer(str(tmp_path), cfg)
    items = [DATA[i] for i in (0, 30, 60, 61)]
    packed = default_collate(
        [{"input_ids": [t for d in items for t in d["input_ids"]]}]
    )  # one row of 4 samples
    model = t.model.train()
    t._dataflex_batch_index = torch.tensor([0, 30, 60, 61])
    out = model(input_ids=packed["input_ids"])
    with pytest.raises(ValueError, match=r"one batch row per training sample.* 1 row\(s\) for 4 samples"):
        t._dataflex_loss(out, packed["labels"], num_items_in_batch=torch.tensor(48))
    targs = args(str(tmp_path / "pf"))
    targs.padding_free = True  # what TRL's SFTConfig adds
    with pytest.raises(ValueError, match="padding_free=True packs a batch's samples into one row"):
        DataFlexTrainer(
            model=tiny_model(), args=targs, train_dataset=DATA, data_collator=default_collate, dataflex=cfg
        )
    DataFlexTrainer(  # selectors and mixers without observations do not need per-sample losses
        model=tiny_model(),
        args=targs,
        train_dataset=DATA,
        data_collator=default_collate,
        dataflex={"selector": "random"},
    )


def test_loss_hook_applies_label_smoothing_like_trainer(tmp_path):
    """label_smoothing_factor was silently dropped by the DataFlex loss hook (an audit found it): the hook
    bypasses Trainer's LabelSmoother, so it smooths each item itself and matches the stock Trainer's loss."""
    batch = default_collate([DATA[i] for i in (0, 30, 60, 61)])
    batch["labels"][0, :3] = -100  # ignored positions stay ignored
    idx = torch.tensor([0, 30, 60, 61])
    targs = dict(label_smoothing_factor=0.3)
    plain = Trainer(
        model=tiny_model(), args=args(str(tmp_path / "p"), **targs), data_collator=default_collate
    )
    odm = _trainer(str(tmp_path / "o"), {"mixer": "odm", "update_step": 5}, targs=targs)
    model = plain.model.train()
    with torch.no_grad():
        ref = plain.compute_loss(model, dict(batch))
        got = odm.compute_loss(model, {**batch, "dataflex_index": idx})
        torch.testing.assert_close(got, ref)
        # sanity: the smoothing changes the loss
        assert not torch.allclose(
            _trainer(str(tmp_path / "n"), {"mixer": "odm"}).compute_loss(model, dict(batch)), ref
        )
    # a weighter weighs the smoothed per-sample losses
    t = _trainer(
        str(tmp_path / "w"), {"weighter": "loss", "weighter_args": {"temperature": 0.5}}, targs=targs
    )
    t._dataflex_batch_index = idx
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    got = t._dataflex_loss(out, batch["labels"], num_items_in_batch=torch.tensor(40))
    lg, lab = out.logits[:, :-1].float(), batch["labels"][:, 1:]
    logp = torch.log_softmax(lg, -1)
    mask = lab != -100
    nll = -logp.gather(-1, lab.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    tok = (0.7 * nll - 0.3 * logp.mean(-1)) * mask
    s = tok.sum(-1)
    w = torch.softmax((s / mask.sum(-1)).detach() / 0.5, 0) * 4
    torch.testing.assert_close(got, (s * w).sum() / 40)


def _odm_trainer(model: Any, data: list[dict], tmp_path: Any) -> DataFlexTrainer:
    """A DataFlexTrainer with the ODM mixer over ``data`` (batched by ``default_collate``), for loss-hook checks."""
    return DataFlexTrainer(
        model=model,
        args=args(str(tmp_path)),
        train_dataset=data,
        data_collator=default_collate,
        dataflex={"mixer": "odm"},
    )


@pytest.mark.parametrize(
    "problem_type,num_labels",
    [("multi_label_classification", 4), ("regression", 1), ("single_label_classification", 3)],
)
def test_loss_hook_matches_the_stock_loss_of_every_sequence_classification_problem(
    tmp_path, problem_type, num_labels
):
    """The hook scored [B, C] logits with cross-entropy whatever the labels were: multi-label targets ([B, C] floats)
    became soft-label cross-entropy (silently, when C equals the batch size, as here; a shape error otherwise) instead
    of the heads' binary cross-entropy, and regression failed ('expected target dtype to be Long'). It now follows the
    heads' problem_type rule (C == 1: squared error; float labels: BCE per label), so ODM/weighters train the stock
    loss (sum of the per-sample terms / num_items_in_batch, as Trainer counts it)."""
    model = tiny_classifier("Sequence", num_labels, pad_token_id=0)
    if problem_type == "multi_label_classification":
        labels = torch.tensor(
            [[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 1.0]]
        )
    elif problem_type == "regression":
        labels = torch.tensor([0.5, -1.0, 2.0, 0.25])
    else:
        labels = torch.tensor([0, 2, 1, 2])
    data = [{"input_ids": [1, 5 + i, 6, 7], "domain": "ab"[i % 2]} for i in range(4)]
    batch = default_collate(data)
    t = _odm_trainer(model, data, tmp_path)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
        assert model.config.problem_type == problem_type
        t._dataflex_batch_index = None
        torch.testing.assert_close(t._dataflex_loss(out, labels), out.loss)
        n = labels.ne(-100).sum()  # Trainer's num_items_in_batch (labels are not shifted for these heads)
        torch.testing.assert_close(t._dataflex_loss(out, labels, num_items_in_batch=n), out.loss)


def test_loss_hook_and_scoring_do_not_shift_token_classification_labels(tmp_path):
    """Only causal LMs shift labels (Trainer's rule); the hook shifted any [B, S, V] logits (an audit found it)."""
    from hf_ext.callbacks.dataflex.ops import loss_shifts_labels, per_sample_loss

    model = tiny_classifier("Token", 3)
    data = [
        {"input_ids": [1, 5, 6, 7, 8], "labels": [0, 1, 2, 0, 1], "domain": "a"},
        {"input_ids": [1, 9, 9, 4], "labels": [2, 2, 1, -100], "domain": "b"},
    ]
    batch = default_collate(data)
    t = _odm_trainer(model, data, tmp_path)
    assert not loss_shifts_labels(model) and not t._loss_shifts_labels
    assert loss_shifts_labels(tiny_model())
    with torch.no_grad():
        out = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        )
        t._dataflex_batch_index = None
        torch.testing.assert_close(t._dataflex_loss(out, batch["labels"]), out.loss)
        # the scoring ops agree: per-sample token mean of the unshifted cross-entropy
        got = per_sample_loss(model, data, [0, 1])
        for i in range(2):
            lab = batch["labels"][i]
            ref = F.cross_entropy(out.logits[i], lab, ignore_index=-100)
            torch.testing.assert_close(got[i], ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "cfg",
    [
        {"selector": "random", "selector_args": {"budget": 0.25}, "warmup_step": 2, "update_step": 4},
        {"selector": "delta_loss", "selector_args": {"budget": 0.25}, "warmup_step": 2, "update_step": 4},
        {"mixer": "odm", "warmup_step": 2, "update_step": 2},
    ],
    ids=["random", "delta_loss", "odm"],
)
def test_second_train_starts_from_a_fresh_data_state(tmp_path, cfg):
    """A second train() with the same DataFlexCallback inherited updates_done, sampler plans/position and
    method memories (an audit found it); without a checkpoint to resume it now repeats the first run exactly."""
    rec = Recorder()
    t = _trainer(str(tmp_path), {**cfg, "update_times": 2}, rec=rec, targs=dict(max_steps=7))
    t.train()
    cb, first = t.dataflex, dict(rec.batches)
    old = list(cb.log_history)
    assert cb.updates_done == 2 and len(old) == 2
    rec2 = Recorder()
    t2 = _trainer(str(tmp_path / "2"), cb, rec=rec2, targs=dict(max_steps=7))  # fresh model and optimizer
    t2.train()
    new = [e for e in cb.log_history if all(e is not o for o in old)]
    assert cb.updates_done == 2 and len(new) == 2  # both updates ran again
    strip = [{k: v for k, v in e.items() if k != "seconds"} for e in (*old, *new)]
    assert strip[2:] == strip[:2]
    assert rec2.batches == first


def test_plain_trainer_with_callback_only(tmp_path):
    cb = DataFlexCallback(
        {
            "mixer": "dynamic",
            "mixer_args": {"schedule": [{"step": 0, "weights": {"clean": 1.0}}]},
            "update_step": 2,
        },
        train_dataset=DATA,
    )
    seen = []

    def collate(feats):
        seen.extend(f["domain"] for f in feats)
        return default_collate(feats)

    t = Trainer(
        model=tiny_model(),
        args=args(str(tmp_path), max_steps=4, remove_unused_columns=False),
        train_dataset=DATA,
        data_collator=collate,
        callbacks=[cb],
    )
    t.train()
    assert cb.weights.tolist() == [1.0, 0.0, 0.0]
    assert set(seen) == {"clean"}


def test_plain_trainer_resumes_data_state_from_a_checkpoint_outside_output_dir(tmp_path):
    """Callback-only mode found dataflex_state.json only under output_dir/checkpoint-N, so resuming from
    another folder restarted the data state (an audit found it); it now reads the checkpoint being resumed."""
    data = [dict(d, id=i) for i, d in enumerate(DATA)]
    cfg = {"mixer": "odm", "warmup_step": 2, "update_step": 3, "mixer_args": {"alpha": 0.5}}

    def run(out, resume=None):
        seen = []

        def collate(feats):
            seen.append([f["id"] for f in feats])
            return default_collate(feats)

        cb = DataFlexCallback(cfg, train_dataset=data)
        targs = dict(max_steps=8, save_strategy="steps", save_steps=4, remove_unused_columns=False)
        t = Trainer(
            model=tiny_model(),
            args=args(out, **targs),
            train_dataset=data,
            data_collator=collate,
            callbacks=[cb],
        )
        t.train(resume_from_checkpoint=resume)
        return cb, seen

    a, seen_a = run(str(tmp_path / "a"))
    ckpt = str(tmp_path / "a" / "checkpoint-4")
    b, seen_b = run(str(tmp_path / "b"), resume=ckpt)
    assert b.resumed_from == os.path.join(ckpt, STATE_FILE)
    assert b.updates_done == a.updates_done == 3
    np.testing.assert_allclose(b.weights, a.weights, rtol=1e-6)
    assert seen_b == seen_a[-len(seen_b) :] and len(seen_b) >= 4


def test_callback_resume_without_a_findable_checkpoint_is_a_clear_error(tmp_path):
    """Callback-only resume finds the checkpoint through the running Trainer on the call stack (transformers passes
    callbacks no checkpoint path). Where that lookup fails (here on_train_begin is called outside a Trainer) and no
    fallback folder holds dataflex_state.json, the data state silently restarted from scratch with a log line; it is
    now a RuntimeError naming resume_from, raised before the callback changes anything, and resume_from(<folder>)
    resumes."""
    from transformers import TrainerControl, TrainerState

    cfg = {"mixer": "odm", "warmup_step": 2, "update_step": 3, "mixer_args": {"alpha": 0.5}}
    out = str(tmp_path / "a")
    cb = DataFlexCallback(cfg, train_dataset=DATA)
    t = Trainer(
        model=tiny_model(),
        args=args(out, max_steps=4, save_strategy="steps", save_steps=4, remove_unused_columns=False),
        train_dataset=DATA,
        data_collator=default_collate,
        callbacks=[cb],
    )
    t.train()
    ckpt = str(tmp_path / "moved")
    os.rename(os.path.join(out, "checkpoint-4"), ckpt)  # no longer where the fallbacks look

    fresh = DataFlexCallback(cfg, train_dataset=DATA)
    targs = args(str(tmp_path / "b"), max_steps=8)
    state = TrainerState(global_step=4)
    with pytest.raises(RuntimeError, match=r"resumes at step 4.*resume_from"):
        fresh.on_train_begin(targs, state, TrainerControl())
    assert fresh.updates_done == 0 and fresh._model is None and fresh.resumed_from is None
    fresh.resume_from(ckpt)
    fresh.on_train_begin(targs, state, TrainerControl())
    assert fresh.resumed_from == os.path.join(ckpt, STATE_FILE)
    assert fresh.updates_done == cb.updates_done == 1
    np.testing.assert_allclose(fresh.weights, cb.weights, rtol=1e-6)
    with pytest.raises(ValueError, match="resume_from: checkpoint"):
        fresh.resume_from(True)


def test_the_call_stack_lookup_finds_only_the_trainer_running_this_callback(tmp_path):
    """The running Trainer's resume_from_checkpoint is read from the frame whose ``self`` is a Trainer holding the
    callback; a Trainer that does not hold it (or no Trainer) gives nothing."""
    from hf_ext.callbacks.dataflex.callback import _running_trainer_resume

    cb, other = (
        DataFlexCallback({"selector": "random"}, train_dataset=DATA),
        DataFlexCallback({"selector": "random"}),
    )
    seen = {}

    class Probe(Trainer):
        def _inner_training_loop(self, *a, resume_from_checkpoint=None, **kw):  # only the lookup, no training
            seen["mine"] = _running_trainer_resume(cb)
            seen["other"] = _running_trainer_resume(other)
            return None

    t = Probe(model=tiny_model(), args=args(str(tmp_path)), train_dataset=DATA, callbacks=[cb])
    ckpt = str(tmp_path / "elsewhere" / "checkpoint-3")
    t._inner_training_loop(resume_from_checkpoint=ckpt)
    assert seen == {"mine": (True, ckpt), "other": (False, None)}
    assert _running_trainer_resume(cb) == (False, None)


def test_a_trainer_takes_one_dataflex_callback_once(tmp_path):
    """A DataFlexCallback registered twice (callbacks=[cb, cb], or passed both as dataflex= and in callbacks=) ran
    every hook twice: two updates per update step (update steps 2 and 4 each logged twice here) and a second reset at
    train begin; a second DataFlexCallback next to DataFlexTrainer's swapped its own sampler in, so the trainer's
    selections had no effect. Both are now ValueErrors: at construction for DataFlexTrainer, else at train begin
    before the callback changes anything."""
    cfg = {"mixer": "odm", "update_step": 2}
    cb = DataFlexCallback(cfg, train_dataset=DATA)
    t = Trainer(
        model=tiny_model(),
        args=args(str(tmp_path), max_steps=4, remove_unused_columns=False),
        train_dataset=DATA,
        data_collator=default_collate,
        callbacks=[cb, cb],
    )
    with pytest.raises(ValueError, match="holds this DataFlexCallback 2 times"):
        t.train()
    assert cb.log_history == [] and cb._model is None
    with pytest.raises(ValueError, match="callbacks= holds a DataFlexCallback"):
        _trainer(str(tmp_path / "t"), cb, rec=DataFlexCallback(cfg, train_dataset=DATA))
    dft = _trainer(str(tmp_path / "t"), cfg)
    dft.add_callback(DataFlexCallback(cfg, train_dataset=DATA))
    with pytest.raises(ValueError, match="holds 2 DataFlexCallbacks"):
        dft.train()
    assert dft.dataflex.log_history == []


def test_state_is_written_by_every_process_the_trainer_saves_with(tmp_path):
    """on_save wrote dataflex_state.json on world rank 0 only, but with save_on_each_node=True the Trainer writes the
    checkpoint on each node's local rank 0 (args.should_save): a node without shared storage resumed without the data
    state, restarted its sampler and drew other batches than the ranks of node 0. It now follows args.should_save."""
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    cb = DataFlexCallback({"selector": "random"}, train_dataset=DATA)
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    node1_local0 = SimpleNamespace(output_dir=str(tmp_path), should_save=True)  # process_index 8, local 0
    cb.on_save(node1_local0, TrainerState(global_step=3, is_world_process_zero=False), TrainerControl())
    assert (folder / STATE_FILE).exists()
    other = tmp_path / "checkpoint-4"
    other.mkdir()
    cb.on_save(
        SimpleNamespace(output_dir=str(tmp_path), should_save=False),
        TrainerState(global_step=4),
        TrainerControl(),
    )
    assert not (other / STATE_FILE).exists()


@pytest.mark.parametrize("name", ["near", "cluster_less"])
def test_a_layer_the_model_does_not_have_is_refused_at_train_begin(tmp_path, name):
    """near / cluster_less took any 'layer' and failed at the first update, mid-training, with 'IndexError: tuple index
    out of range' in the embedding pass (here after 2 trained steps). It is now a ValueError at train begin naming the
    field and the allowed range for the model's layer count, before any step."""
    cfg = {"selector": name, "selector_args": {"layer": 5}, "warmup_step": 2, "update_step": 2}
    t = _trainer(str(tmp_path), cfg, target_dataset=TARGET, targs=dict(max_steps=4))
    with pytest.raises(
        ValueError, match=r"field 'layer'=5 does not index .* 1 layers, so layer must be in \[-2, 1\]"
    ):
        t.train()
    assert t.state.global_step == 0 and t.dataflex.log_history == []


def test_a_train_dataset_replaced_after_construction_is_refused(tmp_path):
    """trainer.train_dataset = other after construction trained on the new dataset with the sampler and domains of
    the old one: here only indices 0-15 of a 48-sample dataset were ever drawn, its third domain never, with no error.
    It is now a ValueError when the training DataLoader is built, before any step."""
    small = make_mixture({"clean": 8, "noisy": 8}, seed=0)
    t = DataFlexTrainer(
        model=tiny_model(),
        args=args(str(tmp_path), max_steps=4),
        train_dataset=small,
        data_collator=default_collate,
        dataflex={"mixer": "odm", "update_step": 2},
    )
    t.train_dataset = DATA
    with pytest.raises(ValueError, match="train_dataset was replaced after the DataFlexTrainer was built"):
        t.train()
    assert t.state.global_step == 0 and t.dataflex.log_history == []


def test_plain_trainer_rejects_weighter(tmp_path):
    cb = DataFlexCallback({"weighter": "loss"}, train_dataset=DATA)
    t = Trainer(
        model=tiny_model(),
        args=args(str(tmp_path), max_steps=2),
        train_dataset=DATA,
        data_collator=default_collate,
        callbacks=[cb],
    )
    with pytest.raises(ValueError, match="DataFlexTrainer"):
        t.train()


@pytest.mark.parametrize("strategy", ["sequential", "group_by_length"])
def test_a_sampling_strategy_dataflex_would_replace_is_refused_in_callback_mode(tmp_path, strategy):
    """A plain Trainer + DataFlexCallback silently swapped its sampler over the user's train_sampling_strategy (a
    sequential or length-grouped order became DataFlex's shuffled one; only DataFlexTrainer checked it). It is now a
    ValueError at train begin naming the option and the allowed value, raised before the callback changes anything;
    a DataFlexTrainer whose args were changed after construction is caught there too."""
    cfg = {"selector": "random", "update_step": 2}
    cb = DataFlexCallback(cfg, train_dataset=DATA)
    t = Trainer(
        model=tiny_model(),
        args=args(str(tmp_path), max_steps=2, train_sampling_strategy=strategy, remove_unused_columns=False),
        train_dataset=DATA,
        data_collator=default_collate,
        callbacks=[cb],
    )
    with pytest.raises(ValueError, match=rf"train_sampling_strategy='{strategy}' would be ignored.*'random'"):
        t.train()
    assert cb._model is None and cb.sampler.plan == {"kind": "uniform"} and cb.sampler.drawn == 0
    dft = _trainer(str(tmp_path / "t"), cfg)
    dft.args.train_sampling_strategy = strategy
    with pytest.raises(ValueError, match=rf"train_sampling_strategy='{strategy}' would be ignored"):
        dft.train()


def test_trl_sft_mixin(tmp_path, tokenizer):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from hf_ext.callbacks.dataflex.trainer import DataFlexSFTTrainer
    from hf_ext.testing import tiny_llama

    texts = ["The quick brown fox jumps.", "Sparse attention skips blocks."] * 8
    ds = datasets.Dataset.from_dict({"text": texts, "domain": ["fox", "attn"] * 8})
    cfg = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        max_length=32,
    )
    t = DataFlexSFTTrainer(
        model=tiny_llama(),
        args=cfg,
        train_dataset=ds,
        processing_class=tokenizer,
        dataflex={"mixer": "odm", "warmup_step": 1, "update_step": 1},
    )
    t.train()
    assert t.dataflex.updates_done == 4
    assert t.dataflex._obs_count is not None and t.dataflex.log_history[-1]["weights"]
    assert isinstance(t, trl.SFTTrainer)


def test_state_is_saved_in_the_checkpoint_of_a_hyperparameter_search_trial(tmp_path, monkeypatch):
    """Under Trainer.hyperparameter_search the Trainer saves a trial's checkpoints in
    Trainer._get_output_dir(trial)/checkpoint-N (output_dir/run-<trial number> with optuna), but on_save wrote
    dataflex_state.json to output_dir/checkpoint-N, a folder that does not exist, so no DataFlex state was saved with
    the trial's checkpoint. No search backend is installed here: the trial is set up as hyperparameter_search does
    (backend, hp_space) and passed to train(trial=...), so the real _save_checkpoint and on_save run."""
    import transformers.integrations
    from transformers.trainer_utils import HPSearchBackend

    class Trial:  # what the Trainer reads of an optuna trial
        number = 3
        params: dict = {}

    monkeypatch.setattr(transformers.integrations, "hp_params", lambda trial: {})  # optuna is not installed
    cfg = {"selector": "random", "selector_args": {"budget": 0.5}, "warmup_step": 1, "update_step": 100}
    t = _trainer(str(tmp_path), cfg, targs=dict(max_steps=2, save_strategy="steps", save_steps=2))
    t.hp_search_backend, t.hp_space = HPSearchBackend.OPTUNA, lambda trial: {}
    t.train(trial=Trial())
    folder = tmp_path / "run-3" / "checkpoint-2"
    assert (folder / "trainer_state.json").exists()  # where the Trainer saved the trial's checkpoint
    state = json.loads((folder / STATE_FILE).read_text())
    assert state["updates_done"] == 1 and state["sampler"]["current"] == 1
    assert not (tmp_path / "checkpoint-2").exists()


def test_pushed_checkpoint_folder_holds_the_dataflex_state(tmp_path, monkeypatch):
    """With push_to_hub=True and hub_strategy='checkpoint', Trainer._save_checkpoint starts uploading the checkpoint
    folder (_push_from_checkpoint, in the background) before the callbacks' on_save, where DataFlex wrote
    dataflex_state.json, so the pushed folder could lack it. DataFlex now writes it from on_push_begin, which the
    Trainer calls right before the upload. The upload is replaced by a recorder of the folder's files (no network)."""
    from concurrent.futures import Future
    from types import SimpleNamespace

    import transformers.trainer

    uploads: list[tuple[str | None, list[str]]] = []

    class Api:
        def create_repo(self, name, **kw):
            return SimpleNamespace(repo_id=f"user/{name}")

        def upload_folder(self, folder_path, path_in_repo=None, **kw):
            # what an upload starting now sees
            uploads.append((path_in_repo, sorted(os.listdir(folder_path))))
            done = Future()
            done.set_result(None)
            return done

    monkeypatch.setattr(transformers.trainer, "hf_api", Api)
    cfg = {"selector": "random", "selector_args": {"budget": 0.5}, "warmup_step": 1, "update_step": 100}
    targs = dict(
        max_steps=2, save_strategy="steps", save_steps=2, push_to_hub=True, hub_strategy="checkpoint"
    )
    t = _trainer(str(tmp_path), cfg, targs=targs)
    t.train()
    (pushed,) = [files for where, files in uploads if where == "last-checkpoint"]
    assert "trainer_state.json" in pushed and STATE_FILE in pushed
    state = json.loads((tmp_path / "checkpoint-2" / STATE_FILE).read_text())
    assert state["updates_done"] == 1 and state["sampler"]["current"] == 1
