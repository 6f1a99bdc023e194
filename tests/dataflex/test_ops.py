"""Model-dependent ops: per-sample loss, embeddings, projected gradient features (PEFT, Adam, shards)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hf_ext.callbacks.dataflex import ops
from hf_ext.callbacks.dataflex.synthetic import make_mixture, tiny_model
from tests.dataflex._common import tiny_classifier

DATA = make_mixture({"clean": 3, "noisy": 3}, seed=0)
DATA[1] = {"input_ids": DATA[1]["input_ids"][:6], "domain": "clean"}  # ragged lengths


def test_per_sample_loss_and_embeddings_match_manual():
    m = tiny_model()
    got = ops.per_sample_loss(m, DATA, [0, 1, 4], batch_size=2)
    emb = ops.embeddings(m, DATA, [1], batch_size=2)
    for k, i in enumerate([0, 1, 4]):
        ids = torch.tensor([DATA[i]["input_ids"]])
        with torch.no_grad():
            out = m(ids, output_hidden_states=True)
        ref = F.cross_entropy(out.logits[0, :-1], ids[0, 1:])
        torch.testing.assert_close(got[k], ref, rtol=1e-4, atol=1e-5)
        if i == 1:
            torch.testing.assert_close(
                emb[0], F.normalize(out.hidden_states[-1][0].mean(0), dim=0), rtol=1e-4, atol=1e-5
            )


def _flat_grads(m, i):
    m.zero_grad()
    ops.lm_loss(m, ops.default_collate([DATA[i]])).backward()
    g = torch.cat([p.grad.reshape(-1) for p in m.parameters() if p.requires_grad])
    m.zero_grad()
    return g


@pytest.mark.parametrize("kind", ["gaussian", "sketch"])
def test_projection_preserves_inner_products(kind):
    m = tiny_model().eval()
    g = torch.stack([_flat_grads(m, i) for i in range(len(DATA))])
    feats = ops.grad_features(m, DATA, list(range(len(DATA))), proj_dim=2048, projection=kind, seed=1)
    exact = F.normalize(g, dim=1) @ F.normalize(g, dim=1).T
    approx = F.normalize(feats, dim=1) @ F.normalize(feats, dim=1).T
    assert (exact - approx).abs().max() < 0.12  # JL: error ~ 1/sqrt(k)
    # deterministic in the seed
    torch.testing.assert_close(
        feats, ops.grad_features(m, DATA, list(range(len(DATA))), proj_dim=2048, projection=kind, seed=1)
    )


def test_projector_shards_sum_to_full_projection():
    """Rows split across 'ranks' (FSDP2 dim-0 shards) project to pieces that sum to the full projection."""
    proj = ops.RandomProjector(16, seed=0, block_elems=64)
    g = torch.randn(37, 5)
    full = proj.project(3, g, 37, 0)
    chunk = 10  # ceil(37 / 4)
    parts = sum(proj.project(3, g[r * chunk : (r + 1) * chunk], 37, r * chunk) for r in range(4))
    torch.testing.assert_close(parts, full, rtol=1e-5, atol=1e-5)
    # full projection equals a dense matmul with the concatenated blocks
    dense = torch.cat(
        [proj._block(3, b, min(12, 37 - 12 * b) * 5) for b in range(4)], 0
    )  # 64 // 5 = 12 rows/block
    torch.testing.assert_close(full, g.reshape(-1) @ dense, rtol=1e-5, atol=1e-5)


def test_lora_features_use_only_adapter_params():
    peft = pytest.importorskip("peft")
    m = peft.get_peft_model(
        tiny_model(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    )
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    f = ops.grad_features(m, DATA, [0, 1, 2], proj_dim=32)
    assert f.shape == (3, 32) and f.norm(dim=1).min() > 0
    # the base weights get no gradient and nothing changes; the model's .grad is left as it was
    assert all(p.grad is None for p in m.parameters())
    assert all(torch.equal(before[n], p) for n, p in m.named_parameters())


def test_adam_preconditioning_formula():
    m = tiny_model()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    ops.lm_loss(m, ops.default_collate(DATA[:2])).backward()
    opt.step()
    opt.zero_grad()
    got = ops.grad_features(m, DATA, [3], proj_dim=64, optimizer=opt, precondition="adam", seed=2)
    # by hand: m' = b1 m + (1-b1) g, v' = b2 v + (1-b2) g^2, feature = m'_hat / (sqrt(v'_hat) + eps), t = 2
    m.eval()
    ops.lm_loss(m, ops.default_collate([DATA[3]])).backward()
    proj = ops.RandomProjector(64, seed=2)
    ref = torch.zeros(64)
    for j, p in enumerate(m.parameters()):
        st = opt.state[p]
        mm = 0.9 * st["exp_avg"] + 0.1 * p.grad
        vv = 0.999 * st["exp_avg_sq"] + 0.001 * p.grad**2
        d = (mm / (1 - 0.9**2)) / ((vv / (1 - 0.999**2)).sqrt() + 1e-8)
        ref += proj.project(j, d if d.dim() else d.reshape(1), d.shape[0])
    torch.testing.assert_close(got[0], ref, rtol=1e-4, atol=1e-4)
    sgd = ops.grad_features(m, DATA, [3], proj_dim=64, optimizer=opt, precondition="sgd", seed=2)
    assert not torch.allclose(sgd, got)


def test_adam_preconditioning_uses_each_param_groups_betas_and_eps():
    """LESS's preconditioner hard-coded betas=(0.9, 0.999), eps=1e-8 (an audit found it); it now reads them
    from the parameter's param_group (two groups with different constants here)."""
    m = tiny_model()
    params = list(m.parameters())
    groups = [
        {"params": params[:3], "betas": (0.5, 0.6), "eps": 1e-3},
        {"params": params[3:], "betas": (0.8, 0.9), "eps": 1e-4},
    ]
    opt = torch.optim.AdamW(groups, lr=3e-3)
    for _ in range(2):
        ops.lm_loss(m, ops.default_collate(DATA[:2])).backward()
        opt.step()
        opt.zero_grad()
    got = ops.grad_features(m, DATA, [3], proj_dim=32, optimizer=opt, precondition="adam", seed=1)
    m.eval()
    ops.lm_loss(m, ops.default_collate([DATA[3]])).backward()
    proj = ops.RandomProjector(32, seed=1)
    ref = torch.zeros(32)
    for j, p in enumerate(params):
        (b1, b2), eps = groups[0 if j < 3 else 1]["betas"], groups[0 if j < 3 else 1]["eps"]
        st, t = opt.state[p], 3
        mm = b1 * st["exp_avg"] + (1 - b1) * p.grad
        vv = b2 * st["exp_avg_sq"] + (1 - b2) * p.grad**2
        d = (mm / (1 - b1**t)) / ((vv / (1 - b2**t)).sqrt() + eps)
        ref += proj.project(j, d if d.dim() else d.reshape(1), d.shape[0] if d.dim() else 1)
    m.zero_grad()
    torch.testing.assert_close(got[0], ref, rtol=1e-4, atol=1e-4)
    # explicit betas/eps still override the optimizer's
    forced = ops.grad_features(
        m, DATA, [3], proj_dim=32, optimizer=opt, precondition="adam", seed=1, betas=(0.5, 0.6), eps=1e-3
    )
    assert not torch.allclose(forced, got, rtol=1e-3, atol=1e-3)


def test_default_collate_labels():
    b = ops.default_collate([{"input_ids": [1, 2, 3]}, {"input_ids": [1, 5], "completion_mask": [0, 1]}])
    assert b["input_ids"].tolist() == [[1, 2, 3], [1, 5, 0]]
    assert b["labels"].tolist() == [[1, 2, 3], [-100, 5, -100]]
    s, c = ops.sequence_loss_terms(torch.zeros(2, 3, 8), b["labels"])
    assert c.tolist() == [2.0, 1.0]
    np.testing.assert_allclose(s.numpy(), np.log(8) * np.array([2, 1]), rtol=1e-5)


@pytest.mark.parametrize("problem_type", ["regression", "multi_label_classification"])
def test_scoring_losses_of_regression_and_multi_label_samples(problem_type):
    """default_collate (the scoring passes' default) turned a float label into an int (regression target 0.75 scored
    as 0: a wrong loss, silently) and read a multi-label vector [1.0, 0.0, 1.0] as token labels (a shape error). Float
    labels now stay floats ([B] targets, [B, C] vectors) and per_sample_loss gives each sample's squared error / mean
    binary cross-entropy, as the model's head defines its loss."""
    model = tiny_classifier("Sequence", 1 if problem_type == "regression" else 3, pad_token_id=0)
    targets = (
        [0.75, -1.5, 2.25]
        if problem_type == "regression"
        else [[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [0.0, 0.0, 0.0]]
    )
    data = [{"input_ids": [1, 5 + i, 6, 7][: 3 + i % 2], "label": t} for i, t in enumerate(targets)]
    got = ops.per_sample_loss(model, data, [0, 1, 2], batch_size=3)
    for i, item in enumerate(data):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([item["input_ids"]])).logits[0].float()
        t = torch.tensor(targets[i])
        want = (
            (logits[0] - t) ** 2
            if problem_type == "regression"
            else F.binary_cross_entropy_with_logits(logits, t)
        )
        torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-5)
