"""DataFlex on batches a real user gives: rows without a target token (labels all -100, e.g. an SFT completion cut
off by truncation) next to ordinary rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_ext.callbacks.dataflex.ops import IGNORE_INDEX, default_collate, sequence_loss_terms
from hf_ext.callbacks.dataflex.trainer import DataFlexTrainer
from tests.dataflex._common import args, make_mixture, tiny_model

DATA = make_mixture({"clean": 24, "noisy": 24, "hard": 24}, seed=0)
IDX = [0, 30, 60, 61]


def _batch_with_an_empty_row():
    batch = default_collate([DATA[i] for i in IDX])
    batch["labels"][1] = IGNORE_INDEX  # row 1 (sample 30) has no target token
    return batch


def _trainer(tmp_path, cfg):
    t = DataFlexTrainer(
        model=tiny_model(),
        args=args(str(tmp_path)),
        train_dataset=DATA,
        data_collator=default_collate,
        dataflex=cfg,
    )
    t._dataflex_batch_index = torch.tensor(IDX)
    return t


def test_loss_weighter_ignores_a_row_without_targets(tmp_path):
    """The empty row's loss (0) took a share of the batch's softmax weights: the other rows' weights were those of a
    4-row batch, not of the 3 rows that have a loss (on this batch the weighted loss was 1.33x the right one, 4/3)."""
    t = _trainer(tmp_path, {"weighter": "loss", "weighter_args": {"temperature": 0.5}, "warmup_step": 0})
    batch = _batch_with_an_empty_row()
    model = t.model.train()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    s, c = sequence_loss_terms(out.logits, batch["labels"])
    n = int(c.sum())
    got = t._dataflex_loss(out, batch["labels"], num_items_in_batch=torch.tensor(n))
    keep = torch.tensor([0, 2, 3])
    w = torch.softmax((s[keep] / c[keep]).detach() / 0.5, 0) * 3  # the weights of the rows that have a loss
    torch.testing.assert_close(got, (s[keep] * w).sum() / n)


@pytest.mark.parametrize("cfg", [{"mixer": "odm", "update_step": 5}, {"weighter": "adapt", "warmup_step": 0}])
def test_a_row_without_targets_is_not_observed(tmp_path, cfg):
    """ODM recorded the empty row as a loss-0 observation of its domain (pulling its reward down); adapt likewise
    moved the domain's loss averages toward 0."""
    t = _trainer(tmp_path, cfg)
    d = len(t.dataflex.domain_names)
    t.dataflex._obs_loss, t.dataflex._obs_count = np.zeros(d), np.zeros(d)  # what on_train_begin sets up
    batch = _batch_with_an_empty_row()
    model = t.model.train()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    t._dataflex_loss(out, batch["labels"], num_items_in_batch=torch.tensor(40))
    dom = t.dataflex.domain_ids[30]
    if "mixer" in cfg:
        assert t.dataflex._obs_count[dom] == 0 and t.dataflex._obs_loss[dom] == 0
        assert t.dataflex._obs_count.sum() == 3
    else:
        assert dom not in t.dataflex.weighter._fast


def test_odm_probe_does_not_inflate_a_domain_of_weight_zero():
    """Without training observations (a plain Trainer + DataFlexCallback) ODM probes every domain with the same number
    of samples, but still divided each probe loss by the domain's weight: a domain given weight 0 scored loss / 1e-12
    and went from 0 to 0.62 of the mixture at the first update although every domain had the same loss."""
    from types import SimpleNamespace

    from hf_ext.callbacks.dataflex.registry import build

    mx = build("mixer", "odm", initial_weights=[0.0, 0.5, 0.5])
    ctx = SimpleNamespace(
        n_domains=3,
        domain_names=["a", "b", "c"],
        observed_count=None,
        observed_loss=None,
        step=10,
        rng=lambda k: np.random.default_rng(k),
        domain_indices=lambda: [np.arange(0, 5), np.arange(5, 10), np.arange(10, 15)],
        losses=lambda idx: np.full(len(idx), 2.0),
    )
    w = mx.update(ctx, mx.init_weights(ctx.domain_names))
    np.testing.assert_allclose(w, [1 / 3] * 3)  # equal losses: equal weights
