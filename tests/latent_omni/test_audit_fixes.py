"""Regression tests for bugs found by a LatentOmni correctness audit (each failed before its fix)."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize(
    "field", ["output_scores", "output_logits", "output_attentions", "output_hidden_states"]
)
def test_latent_generate_refuses_output_fields_it_cannot_return(model, cfg, field):
    """output_scores=True & co. were accepted and silently dropped: the returned LatentOmniGenerateOutput had no
    `scores` (AttributeError later). They are a ValueError naming the field; False / None stay accepted."""
    prompt = torch.tensor([[1, 30, 31, cfg.latent_start_token_id]])
    with pytest.raises(ValueError, match=field):
        model.generate(prompt, max_new_tokens=3, return_dict_in_generate=True, **{field: True})
    out = model.generate(prompt, max_new_tokens=3, return_dict_in_generate=True, **{field: False})
    assert out.sequences.shape == (1, 7)


@pytest.mark.parametrize(
    ("kw", "name"),
    [
        (dict(energy_pool_eps=-1.0), "energy_pool_eps"),
        (dict(energy_pool_eps="1e-6"), "energy_pool_eps"),
        (dict(energy_pool_eps=float("nan")), "energy_pool_eps"),
        (dict(sync_temperature=2.0), "sync_temperature"),
        (dict(sync_temperature=0.001), "sync_temperature"),
        (dict(max_latent_blocks=True), "max_latent_blocks"),
        (dict(sync_projection_dim=True), "sync_projection_dim"),
        (dict(sync_head_hidden_size=True), "sync_head_hidden_size"),
        (dict(ospe_audio_time_stride=True), "ospe_audio_time_stride"),
        (dict(latent_loss_weight=True), "latent_loss_weight"),
        (dict(sync_loss_weight=float("inf")), "sync_loss_weight"),
    ],
)
def test_config_checks_every_latent_field(kw, name):
    """These were accepted: energy_pool_eps was never checked (a string failed mid-training, a negative ε could
    divide by zero); a sync_temperature outside the learnable clamp [0.01, 1] was silently replaced by the clamp
    bound with a zero gradient (stuck); bools passed as ints (True -> a 1-wide sync head); inf loss weights."""
    from hf_ext.models.latent_omni.tiny import tiny_latent_omni_config

    with pytest.raises(ValueError, match=name):
        tiny_latent_omni_config(**kw)


def test_config_accepts_the_clamp_bounds_and_zero_eps():
    from hf_ext.models.latent_omni.tiny import tiny_latent_omni_config

    for kw in (dict(sync_temperature=0.01), dict(sync_temperature=1.0), dict(energy_pool_eps=0.0)):
        tiny_latent_omni_config(**kw)


def test_logits_processor_sees_the_whole_batch_in_row_order(model, cfg):
    """A logits processor got only the rows decoding text at that step, re-indexed from 0: while row 0 ran its
    latent block, row 1 was passed as batch row 0 (a PrefixConstrainedLogitsProcessor then applied row 0's
    constraint to row 1). It now sees every row (row i = sequence i, as in transformers' generate)."""
    from transformers import LogitsProcessorList, PrefixConstrainedLogitsProcessor

    k = cfg.num_latents
    allowed = {0: [50], 1: [60]}
    seen = []

    def fn(batch_id, ids):
        seen.append((batch_id, ids.shape[-1]))
        return allowed[batch_id]

    batch = torch.tensor([[1, 30, 31, cfg.latent_start_token_id], [0, 1, 40, 41]])
    am = (batch != 0).long()
    lp = LogitsProcessorList([PrefixConstrainedLogitsProcessor(fn, num_beams=1)])
    out = model.generate(batch, attention_mask=am, max_new_tokens=k + 3, eos_token_id=[], logits_processor=lp)
    assert out[1, 4:].tolist() == [60] * (k + 3)  # row 1 decodes text at every step
    assert out[0, 4 + k + 1 :].tolist() == [50] * 2  # row 0: K latents, the end marker, then text
    assert {b for b, _ in seen} == {0, 1}


def test_processor_padding_values(processor):
    """padding='max_length' padded to the longest row only (the tokenizer's meaning is: to max_length), and any
    other truthy string ('do_not_pad', typos) padded too. 'max_length' now pads to max_length; unknown values are
    a ValueError naming padding and its allowed values."""
    texts = ["hello there", "hi"]
    out = processor(text=texts, padding="max_length", max_length=24)
    assert out["input_ids"].shape == (2, 24)
    assert out["attention_mask"][:, -1].tolist() == [1, 1]  # left padding for prompts
    assert out["attention_mask"].sum(1).tolist() == [len(processor.tokenizer(t)["input_ids"]) for t in texts]
    ans = processor(text=texts, answers=["a", "b"], padding="max_length", max_length=24)
    assert ans["labels"].shape == (2, 24) and (ans["labels"][:, -1] == -100).all()
    assert (
        processor(text=texts, padding="longest")["input_ids"].shape
        == processor(text=texts)["input_ids"].shape
    )
    for bad in ("do_not_pad", "max_lenght"):
        with pytest.raises(ValueError, match="padding"):
            processor(text=texts, padding=bad)
    with pytest.raises(ValueError, match="max_length"):
        processor(text=texts, padding="max_length")
    for bad in ("24", 0, True):
        with pytest.raises(ValueError, match="max_length"):
            processor(text=texts, max_length=bad)


def test_latent_only_generate_arguments_are_refused_without_latent_reasoning(model):
    """latent_reasoning=False silently dropped output_latents and max_latent_blocks (they only exist on the latent
    path): a caller asking for latent states got none without a word."""
    prompt = torch.tensor([[1, 30, 31]])
    for kw in (dict(output_latents=True), dict(max_latent_blocks=1)):
        with pytest.raises(ValueError, match=next(iter(kw))):
            model.generate(prompt, max_new_tokens=2, latent_reasoning=False, **kw)
    assert model.generate(
        prompt, max_new_tokens=2, latent_reasoning=False, eos_token_id=None, min_new_tokens=2
    ).shape == (1, 5)


@pytest.mark.parametrize(
    "kw",
    [dict(top_h=0.5, do_sample=True), dict(dola_layers="high"), dict(token_healing=True), dict(max_time=0.5)],
)
def test_latent_generate_refuses_more_fields_it_does_not_apply(model, cfg, kw):
    """The docs promise a ValueError for any output-changing generation field the latent path does not apply;
    top_h (a sampling warper), dola_layers (DoLa decoding), token_healing and max_time were silently ignored."""
    prompt = torch.tensor([[1, 30, 31, cfg.latent_start_token_id]])
    name = next(k for k in kw if k != "do_sample")
    with pytest.raises(ValueError, match=name):
        model.generate(prompt, max_new_tokens=3, **kw)


def test_processor_media_errors_name_the_argument_and_empty_clips_are_refused(processor):
    """A too-short segment audio was reported as `audio[0]` (the question audio's name), a bad segment video as
    `video frames` without saying which; a zero-frame video was accepted with grid t = 0 and failed later, in the
    model's energy pooling (0 tokens), mid-training."""
    import numpy as np

    text = "<|im_start|>user\n<|vision_bos|><|VIDEO|><|vision_eos|><|audio_bos|><|AUDIO|><|audio_eos|>q<|im_end|>\n"
    vid, aud = np.zeros((2, 8, 8, 3), np.uint8), np.zeros(16000, np.float32)
    kw = dict(text=[text], videos=[vid], audio=[aud], answers=["x <Unified_Latent></Unified_Latent> y"])
    cases = [
        (dict(segment_videos=[vid], segment_audios=[np.zeros(100, np.float32)]), r"segment_audios\[0\]"),
        (dict(segment_videos=[np.zeros((8, 8, 3))], segment_audios=[aud]), r"segment_videos\[0\]"),
        (dict(segment_videos=[np.zeros((0, 8, 8, 3))], segment_audios=[aud]), r"segment_videos\[0\].*frame"),
    ]
    for extra, match in cases:
        with pytest.raises(ValueError, match=match):
            processor(**kw, **extra)
    with pytest.raises(ValueError, match=r"videos\[0\].*frame"):
        processor(text=[text], videos=[np.zeros((0, 8, 8, 3))], audio=[aud])


def test_collator_record_fps_null_uses_the_default_and_bad_fps_names_the_record(processor):
    """A record with "fps": null (the field is optional in the JSONL schema) raised a bare TypeError from float();
    it now means the collator's default, and a non-positive or non-numeric fps is a ValueError naming the record."""
    from hf_ext.models.latent_omni import LatentOmniDataCollator, make_synthetic_records

    coll = LatentOmniDataCollator(processor, fps=4.0)
    rec = make_synthetic_records(1, frames=8, size=8, fps=4.0)[0]
    batch = coll([dict(rec, fps=None)])
    assert batch["video_second_per_grid"].tolist() == [processor.temporal_patch_size / 4.0]
    for bad in (0, -2.0, "fast"):
        with pytest.raises(ValueError, match="synthetic-0.*fps"):
            coll([dict(rec, fps=bad)])
