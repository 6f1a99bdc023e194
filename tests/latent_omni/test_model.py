"""LatentOmni model: losses, teacher forcing, OSPE, controlled attention, save/load, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hf_ext.models.latent_omni.modeling_latent_omni import (
    controlled_attention_mask,
    energy_pool,
    find_latent_blocks,
    ospe_position_ids,
)

from .conftest import block_ids


def _segments(cfg, n=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = cfg.text_config.hidden_size
    vis = [torch.randn(5 + i, d, generator=g) for i in range(n)]
    aud = [torch.randn(3 + i, d, generator=g) for i in range(n)]
    return vis, aud


def _padded_training_batch(cfg) -> dict:
    """Forward kwargs of a two-row teacher-forced batch: a latent block each, the second row with a text prefix,
    a suffix and three right pads (labels -100 there), and one visual / audio segment per row."""
    ids = torch.cat([block_ids(cfg), block_ids(cfg, prefix=(1, 50), suffix=(60, 2, 0, 0, 0))])
    am = torch.ones_like(ids)
    am[1, -3:] = 0
    vis, aud = _segments(cfg, 2)
    return dict(
        input_ids=ids,
        attention_mask=am,
        labels=ids.masked_fill(am == 0, -100),
        segment_visual_features=vis,
        segment_audio_features=aud,
    )


class _Capture:
    """Records the kwargs the decoder receives and the hidden states it returns."""

    def __init__(self, module):
        self.calls = []
        self.h1 = module.register_forward_pre_hook(self._pre, with_kwargs=True)
        self.h2 = module.register_forward_hook(self._post)

    def _pre(self, mod, args, kwargs):
        self.calls.append(
            {
                "embeds": kwargs["inputs_embeds"].detach().clone(),
                "pos": kwargs["position_ids"].detach().clone(),
                "mask": kwargs.get("attention_mask"),
            }
        )

    def _post(self, mod, args, out):
        self.calls[-1]["hidden"] = out.last_hidden_state.detach().clone()

    def remove(self):
        self.h1.remove()
        self.h2.remove()


# ----------------------------------------------------------------------------------------- helpers
def test_energy_pool_matches_manual_bins():
    x = torch.randn(2, 10, 6)
    out = energy_pool(x, 3, eps=1e-6)
    bins = [(0, 4), (3, 7), (6, 10)]  # adaptive_avg_pool1d bins for 10 -> 3
    for b in range(2):
        for s, (lo, hi) in enumerate(bins):
            w = x[b, lo:hi].pow(2).sum(-1, keepdim=True) + 1e-6
            ref = (x[b, lo:hi] * w).sum(0) / w.sum()
            torch.testing.assert_close(out[b, s], ref, rtol=1e-5, atol=1e-6)
    # fewer tokens than slots: linear interpolation with the endpoints kept
    y = torch.tensor([[0.0, 0.0], [3.0, 6.0]])
    torch.testing.assert_close(
        energy_pool(y, 4), torch.tensor([[0.0, 0.0], [1.0, 2.0], [2.0, 4.0], [3.0, 6.0]])
    )
    torch.testing.assert_close(energy_pool(x, 10), x)
    # high-energy tokens dominate their bin
    z = torch.tensor([[1.0, 0.0], [0.0, 10.0]])
    assert energy_pool(z, 1)[0, 1] > 9.0


def test_ospe_ids_formula():
    pos = ospe_position_ids(100, 32, 8)
    assert pos.shape == (3, 40)
    assert pos[:, :32].tolist() == [list(range(100, 132))] * 3
    assert pos[0, 32:].tolist() == [100 + 4 * j for j in range(8)]
    assert pos[1:, 32:].abs().sum() == 0
    plain = ospe_position_ids(7, 32, 8, use_ospe=False)
    assert plain.tolist() == [list(range(7, 47))] * 3


# --------------------------------------------------------------------------------- forward / losses
def test_forward_backward_all_losses(model, cfg):
    model.train()
    batch = _padded_training_batch(cfg)
    ids, am = batch["input_ids"], batch["attention_mask"]
    vis, aud = batch["segment_visual_features"], batch["segment_audio_features"]
    cap = _Capture(model._text_model())
    out = model(**batch)
    cap.remove()
    for name in ("loss", "text_loss", "latent_loss", "sync_loss"):
        v = getattr(out, name)
        assert v is not None and torch.isfinite(v) and v > 0, name
    expect = out.text_loss + cfg.latent_loss_weight * out.latent_loss + cfg.sync_loss_weight * out.sync_loss
    torch.testing.assert_close(out.loss, expect)
    # teacher forcing: pad slots receive the pooled, detached targets (32/8 split, energy pooling)
    k, kv = cfg.num_latents, cfg.num_visual_latents
    s = 4  # trigger index in row 0
    embeds = cap.calls[0]["embeds"]
    ref0 = torch.cat([energy_pool(vis[0], kv), energy_pool(aud[0], cfg.num_audio_latents)])
    torch.testing.assert_close(embeds[0, s + 1 : s + 1 + k], ref0)
    torch.testing.assert_close(out.latent_targets[0], ref0)
    assert not out.latent_targets.requires_grad
    # next-feature prediction: hidden at trigger + i predicts slot i
    hidden = cap.calls[0]["hidden"]
    torch.testing.assert_close(out.latent_predictions[0], hidden[0, s : s + k])
    torch.testing.assert_close(
        out.latent_loss, torch.nn.functional.mse_loss(out.latent_predictions, out.latent_targets)
    )
    out.loss.backward()
    assert model.lm_head.weight.grad.abs().sum() > 0
    assert model.get_input_embeddings().weight.grad.abs().sum() > 0
    assert model.sync_visual_head.fc1.weight.grad.abs().sum() > 0
    assert model.sync_audio_head.fc2.weight.grad.abs().sum() > 0
    assert model.sync_temperature.log_scale.grad is not None
    # the pad and </Unified_Latent> labels are excluded from the CE
    labels = ids.masked_fill(am == 0, -100)
    manual = labels.clone()
    manual[(ids == cfg.latent_pad_token_id) | (ids == cfg.latent_end_token_id)] = -100
    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    ce = torch.nn.functional.cross_entropy(logits, manual[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.text_loss, ce)


def test_sync_loss_is_symmetric_infonce(model, cfg):
    vis = torch.randn(2, cfg.num_visual_latents, 64)
    aud = torch.randn(2, cfg.num_audio_latents, 64)
    loss = model.sync_loss_from(vis, aud)
    v = energy_pool(vis, cfg.num_audio_latents).reshape(-1, 64)
    zv = torch.nn.functional.normalize(model.sync_visual_head(v), dim=-1)
    za = torch.nn.functional.normalize(model.sync_audio_head(aud.reshape(-1, 64)), dim=-1)
    logits = zv @ za.t() / 0.07
    t = torch.arange(4)
    ref = 0.5 * (
        torch.nn.functional.cross_entropy(logits, t) + torch.nn.functional.cross_entropy(logits.t(), t)
    )
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-5)
    assert math.isclose(float(model.sync_temperature.scale().detach()), 1 / 0.07, rel_tol=1e-5)


def test_sync_source_features_trains_encoders(cfg):
    from hf_ext.models.latent_omni.tiny import tiny_latent_omni

    m = tiny_latent_omni(sync_source="features").train()
    ids = block_ids(m.config)
    vid = torch.randn(16, 3 * 2 * 4 * 4)  # one 2x4x4-patch segment clip
    out = m(
        input_ids=ids,
        labels=ids,
        segment_pixel_values_videos=vid,
        segment_video_grid_thw=torch.tensor([[1, 4, 4]]),
        segment_audio_features=_segments(m.config)[1],
    )
    out.sync_loss.backward()
    assert (
        any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.model.visual.parameters())
        if hasattr(m.model, "visual")
        else True
    )
    # latents mode: the latent MSE never reaches the (frozen-target) encoders
    m2 = tiny_latent_omni().train()
    out2 = m2(
        input_ids=ids,
        labels=ids,
        segment_pixel_values_videos=vid,
        segment_video_grid_thw=torch.tensor([[1, 4, 4]]),
        segment_audio_features=_segments(m2.config)[1],
    )
    out2.loss.backward()
    visual = getattr(m2.model, "visual", None) or m2.visual
    assert all(p.grad is None for p in visual.parameters())


# ------------------------------------------------------------------------------------------- OSPE
def test_ospe_positions_exact_text_only(model, cfg):
    ids = block_ids(cfg)
    vis, aud = _segments(cfg)
    cap = _Capture(model._text_model())
    model(input_ids=ids, segment_visual_features=vis, segment_audio_features=aud)
    cap.remove()
    pos = cap.calls[0]["pos"][:, 0]
    t = [0, 1, 2, 3, 4] + list(range(5, 13)) + [5, 9] + [15, 16, 17, 18]
    hw = [0, 1, 2, 3, 4] + list(range(5, 13)) + [0, 0] + [15, 16, 17, 18]
    assert pos[0].tolist() == t
    assert pos[1].tolist() == hw and pos[2].tolist() == hw


def test_ospe_positions_exact_with_video_and_generation_agrees(model, cfg):
    vb, ve, vt = cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.video_token_id
    k = cfg.num_latents
    prompt = [1, vb, vt, vt, vt, vt, ve, 30, cfg.latent_start_token_id]
    ids = torch.tensor([prompt + [cfg.latent_pad_token_id] * k + [cfg.latent_end_token_id, 40]])
    pix = torch.randn(16, 96)
    grid = torch.tensor([[1, 4, 4]])
    vis, aud = _segments(cfg)
    cap = _Capture(model._text_model())
    model(
        input_ids=ids,
        pixel_values_videos=pix,
        video_grid_thw=grid,
        segment_visual_features=vis,
        segment_audio_features=aud,
    )
    train_pos = cap.calls[0]["pos"][:, 0]
    # video tokens: t = 2, (h, w) = 2 + 2x2 grid; eos = 4; "30" = 5; trigger = 6 -> B = 7
    expect_t = [0, 1, 2, 2, 2, 2, 4, 5, 6] + list(range(7, 15)) + [7, 11] + [17, 18]
    expect_h = [0, 1, 2, 2, 3, 3, 4, 5, 6] + list(range(7, 15)) + [0, 0] + [17, 18]
    expect_w = [0, 1, 2, 3, 2, 3, 4, 5, 6] + list(range(7, 15)) + [0, 0] + [17, 18]
    assert train_pos.tolist() == [expect_t, expect_h, expect_w]
    cap.calls.clear()
    model.generate(torch.tensor([prompt]), pixel_values_videos=pix, video_grid_thw=grid, max_new_tokens=k + 2)
    cap.remove()
    gen_pos = torch.cat([c["pos"][:, 0] for c in cap.calls], 1)  # prefill + one per step
    n = len(prompt)
    assert gen_pos[:, : n + k + 1].tolist() == train_pos[:, : n + k + 1].tolist()  # prompt, slots, </UL>
    assert gen_pos[:, n + k + 1].tolist() == [18, 18, 18]


# ------------------------------------------------------------------------------ controlled attention
def test_controlled_attention_mask_semantics(cfg):
    vb, ve, vt = cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.video_token_id
    k = cfg.num_latents
    ids = torch.tensor(
        [
            [1, vb, vt, vt, ve, 30, cfg.latent_start_token_id]
            + [cfg.latent_pad_token_id] * k
            + [cfg.latent_end_token_id, 40, 41]
        ]
    )
    m = controlled_attention_mask(ids, torch.ones_like(ids), cfg)[0, 0]
    L = ids.shape[1]
    media = [2, 3]
    trig, end = 6, 7 + k
    for q in range(L):
        for key in range(L):
            expect = key <= q
            if key in media and q >= trig and not (q == trig or trig < q < end):
                expect = False
            assert bool(m[q, key]) == expect, (q, key)
    assert not m[end, 2] and not m[end + 1, 3] and m[trig, 2] and m[trig + 1, 3] and m[5, 2]


def test_controlled_attention_eager_equals_sdpa_and_changes_text(cfg):
    from hf_ext.models.latent_omni.tiny import tiny_latent_omni

    vb, ve, vt = cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.video_token_id
    k = cfg.num_latents
    ids = torch.tensor(
        [
            [1, vb, vt, vt, vt, vt, ve, 30, cfg.latent_start_token_id]
            + [cfg.latent_pad_token_id] * k
            + [cfg.latent_end_token_id, 40, 41]
        ]
    )
    kw = dict(
        input_ids=ids,
        pixel_values_videos=torch.randn(16, 96),
        video_grid_thw=torch.tensor([[1, 4, 4]]),
        segment_visual_features=_segments(cfg)[0],
        segment_audio_features=_segments(cfg)[1],
    )
    a = tiny_latent_omni(attn_implementation="sdpa")(**kw).logits
    b = tiny_latent_omni(attn_implementation="eager")(**kw).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    c = tiny_latent_omni(controlled_attention=False)(**kw).logits
    n_before = 9  # logits up to and including the trigger are unaffected by the mask
    torch.testing.assert_close(a[:, :n_before], c[:, :n_before])
    assert (a[:, -1] - c[:, -1]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="attn_implementation"):
        m = tiny_latent_omni()
        m._text_model().config._attn_implementation = "flash_attention_2"
        m(**kw)


# --------------------------------------------------------------------------------------- save/load
def test_save_load_roundtrip_identical_logits(model, cfg, tmp_path):
    from hf_ext.models.latent_omni.modeling_latent_omni import LatentOmniForConditionalGeneration

    with torch.no_grad():
        model.sync_temperature.log_scale.fill_(1.234)
    model.save_pretrained(tmp_path)
    loaded = LatentOmniForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.num_visual_latents == cfg.num_visual_latents
    assert loaded.sync_temperature.log_scale.item() == pytest.approx(1.234)
    ids = block_ids(cfg)
    vis, aud = _segments(cfg)
    a = model(input_ids=ids, labels=ids, segment_visual_features=vis, segment_audio_features=aud)
    b = loaded(input_ids=ids, labels=ids, segment_visual_features=vis, segment_audio_features=aud)
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.loss, b.loss)


# --------------------------------------------------------------------------------------- bad input
def test_bad_input_clear_errors(model, cfg):
    k = cfg.num_latents
    s, e, p = cfg.latent_start_token_id, cfg.latent_end_token_id, cfg.latent_pad_token_id
    vis, aud = _segments(cfg)
    cases = {
        "no matching <Unified_Latent>": [1, 30, e, 31],
        "not closed": [1, s] + [p] * k + [31, 32],
        "expected exactly K": [1, s] + [p] * (k - 1) + [e, 31],
        "outside a latent block": [1, p, 31],
    }
    for msg, ids in cases.items():
        with pytest.raises(ValueError, match=msg):
            model(input_ids=torch.tensor([ids]), segment_visual_features=vis, segment_audio_features=aud)
    ids = block_ids(cfg)
    with pytest.raises(ValueError, match="missing modality features.*visual"):
        model(input_ids=ids, segment_audio_features=aud)
    with pytest.raises(ValueError, match="missing modality features.*audio"):
        model(input_ids=ids, segment_visual_features=vis)
    with pytest.raises(ValueError, match="missing modality features"):
        model(input_ids=torch.cat([ids, ids]), segment_visual_features=vis, segment_audio_features=aud)
    with pytest.raises(ValueError, match=r"expected \[N >= 1, hidden_size=64\]"):
        model(input_ids=ids, segment_visual_features=[torch.randn(3, 32)], segment_audio_features=aud)
    with pytest.raises(ValueError, match="placeholder tokens but pixel_values_videos is None"):
        model(input_ids=torch.tensor([[1, cfg.vision_start_token_id, cfg.video_token_id, 5]]))
    with pytest.raises(ValueError, match="missing modality features"):
        model.generate(ids)
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(torch.tensor([[1, 30, 0]]), attention_mask=torch.tensor([[1, 1, 0]]))
    blocks, open_rows = find_latent_blocks(torch.tensor([[1, 30, s]]), None, cfg, allow_open_end=True)
    assert blocks == [] and open_rows == [0]
    with pytest.raises(ValueError, match="ends the sequence"):
        find_latent_blocks(torch.tensor([[1, 30, s]]), None, cfg, allow_open_end=False)


def test_config_validation_and_defaults():
    from hf_ext.models.latent_omni import LatentOmniConfig

    c = LatentOmniConfig()
    assert (c.num_visual_latents, c.num_audio_latents, c.num_latents) == (32, 8, 40)
    assert (c.latent_loss_weight, c.sync_loss_weight, c.sync_temperature) == (0.005, 1.0, 0.07)
    assert c.use_ospe and c.ospe_audio_time_stride == 4 and c.controlled_attention
    bad = [
        (dict(sync_source="text"), "sync_source='text' is invalid; allowed values: latents, features"),
        (dict(num_visual_latents=-1), "num_visual_latents"),
        (dict(num_visual_latents=0, num_audio_latents=0), "must be > 0"),
        (dict(latent_loss_weight=-1.0), "latent_loss_weight"),
        (dict(latent_pad_token_id=151665), "distinct"),
        (dict(latent_start_token_id=10**7), "vocab_size"),
        (dict(num_visual_latents=8), "ospe_audio_time_stride"),
        (dict(sync_temperature=0.0), "sync_temperature"),
    ]
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg.replace("[", r"\[").replace("(", r"\(")):
            LatentOmniConfig(**kw)
    th = LatentOmniConfig.from_thinker_config(c, num_visual_latents=16, num_audio_latents=4)
    assert th.num_latents == 20 and th.model_type == "latent_omni"
    assert np.isclose(th.latent_loss_weight, 0.005)


def test_latent_token_ids_must_be_ints_of_their_own():
    """A latent token id that is a bool, or that is also a media placeholder / boundary id or the bos / eos / pad id,
    is a ValueError naming both fields; before, it was accepted and the model misread the token (a pad-id trigger
    made every left-padded prompt look like it held latent slots, an eos-id trigger ended generation instead of
    opening a block, a video-id pad got video features scattered into it)."""
    from hf_ext.models.latent_omni.tiny import tiny_latent_omni_config

    c = tiny_latent_omni_config()
    text = c.get_text_config()
    for kw, match in (
        (dict(latent_start_token_id=True), "latent_start_token_id=True is invalid"),
        (dict(latent_pad_token_id=c.video_token_id), "latent_pad_token_id=.* is also video_token_id"),
        (dict(latent_end_token_id=c.audio_token_id), "latent_end_token_id=.* is also audio_token_id"),
        (dict(latent_end_token_id=c.vision_start_token_id), "is also vision_start_token_id"),
        (dict(latent_start_token_id=text.eos_token_id), "latent_start_token_id=.* is also eos_token_id"),
        (dict(latent_pad_token_id=text.pad_token_id), "latent_pad_token_id=.* is also pad_token_id"),
    ):
        with pytest.raises(ValueError, match=match):
            tiny_latent_omni_config(**kw)
    c.text_config.eos_token_id = [
        text.eos_token_id,
        c.latent_start_token_id,
    ]  # edited by hand: save checks it
    with pytest.raises(ValueError, match="is also text_config.eos_token_id"):
        c.validate()


def test_forward_honours_output_options_and_refuses_unknown_arguments(model, cfg):
    """The latent path returns hidden states (and eager attentions) when asked, a tuple with return_dict=False,
    the last logits with logits_to_keep; an argument it does not use is an error, never dropped."""
    ids = block_ids(cfg)
    vis, aud = _segments(cfg, 1)
    seg = dict(segment_visual_features=vis, segment_audio_features=aud)
    with torch.no_grad():
        full = model(ids, **seg)
        out = model(ids, **seg, output_hidden_states=True)
        n_layers = cfg.get_text_config().num_hidden_layers
        assert len(out.hidden_states) == n_layers + 1 and out.hidden_states[-1].shape[:2] == ids.shape
        torch.testing.assert_close(
            model.lm_head(out.hidden_states[-1]), full.logits
        )  # the last one is normed
        assert full.hidden_states is None and full.attentions is None
        tup = model(ids, **seg, return_dict=False)
        want = full.to_tuple()  # the set fields in order (no labels: latent_loss, sync_loss, logits, ...)
        assert isinstance(tup, tuple) and len(tup) == len(want)
        assert all(torch.equal(a, b) for a, b in zip(tup, want))
        last = model(ids, **seg, logits_to_keep=1)
        torch.testing.assert_close(last.logits, full.logits[:, -1:])
        torch.testing.assert_close(last.latent_predictions, full.latent_predictions)
        model.set_attn_implementation("eager")
        att = model(ids, **seg, output_attentions=True).attentions
        assert len(att) == n_layers and att[0].shape[-2:] == (ids.shape[1], ids.shape[1])
    with pytest.raises(ValueError, match="bogus_argument"):
        model(ids, **seg, bogus_argument=1)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(ids, **seg, labels=ids, logits_to_keep=1)


def test_config_overrides_after_construction_are_checked(model, tmp_path):
    """from_pretrained(path, field=...) sets overrides after construction: they are checked there, a field edited
    by hand is checked by save_pretrained and by the forward that uses it, never silently taken as another value."""
    from transformers import AutoConfig, AutoModelForMultimodalLM

    model.save_pretrained(tmp_path)
    for bad, name in (
        (dict(sync_source="latent"), "sync_source"),
        (dict(num_visual_latents=-1), "num_visual_latents"),
        (dict(latent_pad_token_id=10**7), "latent_pad_token_id"),
        (dict(use_ospe="no"), "use_ospe"),
        (dict(sync_temperature="0.07"), "sync_temperature"),
    ):
        with pytest.raises(ValueError, match=name):
            AutoConfig.from_pretrained(tmp_path, **bad)
        with pytest.raises(ValueError, match=name):
            AutoModelForMultimodalLM.from_pretrained(tmp_path, **bad)
    ok = AutoConfig.from_pretrained(tmp_path, sync_source="features", max_latent_blocks=1)
    assert (ok.sync_source, ok.max_latent_blocks) == ("features", 1)
    model.config.sync_source = "Latents"
    with pytest.raises(ValueError, match="sync_source"):
        model.save_pretrained(tmp_path / "bad")
    cfg = model.config
    vis, aud = _segments(cfg, 1)
    with pytest.raises(ValueError, match="sync_source"):
        model(block_ids(cfg), segment_visual_features=vis, segment_audio_features=aud)
