"""LatentOmni processor, collator, Trainer loop and Auto-class registration."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from hf_ext.models.latent_omni.collator import (
    LatentOmniDataCollator,
    load_jsonl,
    make_synthetic_records,
    write_synthetic_jsonl,
)


def test_processor_expansion_labels_and_media(processor):
    proc = processor
    k = proc.num_latents
    rng = np.random.default_rng(0)
    vid = rng.integers(0, 255, (4, 16, 16, 3), dtype=np.uint8)
    aud = (0.1 * rng.standard_normal(16000)).astype(np.float32)
    msgs = [
        {"role": "user", "content": [{"type": "video"}, {"type": "audio"}, {"type": "text", "text": "Why?"}]}
    ]
    prompt = proc.render_conversation(msgs, add_generation_prompt=True)
    b = proc(
        text=[prompt],
        videos=[vid],
        audio=[aud],
        answers=["a <Unified_Latent></Unified_Latent> b"],
        segment_videos=[vid[2:]],
        segment_audios=[aud[8000:]],
    )
    ids = b["input_ids"][0].tolist()
    tid = proc.tokenizer.convert_tokens_to_ids
    assert ids.count(proc.latent_pad_token_id) == k
    assert ids.count(tid("<|VIDEO|>")) == 2 * 4 * 4 // 4  # grid (2, 4, 4) / merge 2x2
    assert ids.count(tid("<|AUDIO|>")) == 25  # 100 mel frames -> 50 -> 25
    assert b["video_grid_thw"].tolist() == [[2, 4, 4]]
    assert b["segment_video_grid_thw"].tolist() == [[1, 4, 4]]
    assert b["segment_input_features"].shape[0] == 1
    labels = b["labels"][0]
    start = ids.index(proc.latent_start_token_id)
    assert (
        labels[
            : len(ids)
            - len(proc.tokenizer("a <Unified_Latent>", add_special_tokens=False)["input_ids"])
            - k
            - 3
        ]
        == -100
    ).all()
    assert labels[start] == proc.latent_start_token_id  # the trigger is trained
    assert (labels[start + 1 : start + k + 2] == -100).all()  # pads and </Unified_Latent> are not
    # the video patches match transformers' Qwen2-VL image processor layout
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ip = Qwen2VLImageProcessorPil(
        patch_size=4, temporal_patch_size=2, merge_size=2, min_pixels=16, max_pixels=10**6
    )
    img = rng.integers(0, 255, (16, 24, 3), dtype=np.uint8)
    ref = ip(images=[img], return_tensors="pt")
    mine, grid = proc.patchify_video(np.stack([img, img]))
    assert list(grid) == ref["image_grid_thw"][0].tolist()
    torch.testing.assert_close(mine, ref["pixel_values"], rtol=1e-5, atol=1e-5)


def test_processor_bad_input_and_roundtrip(processor, tmp_path):
    proc = processor
    for text, msg in [
        ("a </Unified_Latent>", "no matching"),
        ("<Unified_Latent> x </Unified_Latent>", "contains text"),
        ("<Unified_Latent><Unified_Latent></Unified_Latent>", "inside another"),
        ("<Unified_Latent> tail", "never closed"),
    ]:
        with pytest.raises(ValueError, match=msg):
            proc.expand_latent_markers(text)
    assert proc.expand_latent_markers("q <Unified_Latent>").endswith("<Unified_Latent>")
    with pytest.raises(ValueError, match="missing modality features"):
        proc(text=["q"], answers=["<Unified_Latent></Unified_Latent> a"], segment_audios=[np.zeros(1600)])
    with pytest.raises(ValueError, match="placeholders but 0 videos"):
        proc(text=["<|VIDEO|> q"])
    with pytest.raises(ValueError, match="use_audio_in_video"):
        proc(text=["q"], use_audio_in_video=True)
    proc.save_pretrained(tmp_path)
    from hf_ext.models.latent_omni import LatentOmniProcessor

    again = LatentOmniProcessor.from_pretrained(tmp_path)
    assert (again.num_visual_latents, again.patch_size, again.latent_pad_token_id) == (
        8,
        4,
        proc.latent_pad_token_id,
    )
    assert torch.equal(
        again(text=["hello <Unified_Latent>"])["input_ids"],
        proc(text=["hello <Unified_Latent>"])["input_ids"],
    )


def test_wav_audio_of_every_pcm_width_loads_centred_at_zero(tmp_path):
    """8-bit WAV PCM is unsigned (silence = 128): it loads as (x - 128) / 128 like the signed widths, not as x / 256,
    which put a +0.5 offset on every sample (a silent 8-bit clip came out as a constant 0.5)."""
    from scipy.io import wavfile

    from hf_ext.models.latent_omni.collator import _load_array

    t = np.arange(1600) / 16000.0
    wave = 0.5 * np.sin(2 * np.pi * 440.0 * t)
    for dtype, raw in (
        (np.uint8, np.round(wave * 128 + 128)),
        (np.int16, np.round(wave * 32768)),
        (np.int32, np.round(wave * 2**31)),
    ):
        wavfile.write(tmp_path / "a.wav", 16000, raw.astype(dtype))
        got = _load_array("a.wav", tmp_path, "audio")
        assert got.dtype == np.float32 and np.abs(got - wave).max() < 1.5 / 128, dtype


def test_collator_jsonl_equals_in_memory_and_errors(processor, tmp_path):
    coll = LatentOmniDataCollator(processor)
    recs = load_jsonl(write_synthetic_jsonl(tmp_path, 2, seed=3))
    a = coll(recs)
    b = coll(make_synthetic_records(2, seed=3))
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    torch.testing.assert_close(a["segment_pixel_values_videos"], b["segment_pixel_values_videos"])
    assert (a["input_features"] - b["input_features"]).abs().mean() < 1e-3  # 16-bit .wav quantisation
    # the segment is the second half of the clip (time span 2 s..4 s at 2 fps = frames 4..7)
    b_vid = make_synthetic_records(2, seed=3)[0]["video"][4:]
    seg_only = processor(text=["<|VIDEO|>"], videos=[b_vid])
    torch.testing.assert_close(
        b["segment_pixel_values_videos"][: seg_only["pixel_values_videos"].shape[0]],
        seg_only["pixel_values_videos"],
    )
    assert b_vid.shape[0] == 4
    bad = make_synthetic_records(1)[0]
    bad["segments"] = []
    with pytest.raises(ValueError, match="missing modality features"):
        coll([bad])
    bad = make_synthetic_records(1)[0]
    bad["segments"] = [{}]
    with pytest.raises(ValueError, match="missing modality features.*no video"):
        coll([bad])


def test_trainer_reduces_loss_on_synthetic_set(tmp_path):
    from transformers import TrainingArguments

    from hf_ext.models.latent_omni.tiny import tiny_latent_omni, tiny_latent_omni_processor
    from hf_ext.models.latent_omni.training import LatentOmniTrainer

    model = tiny_latent_omni(seed=1).train()
    coll = LatentOmniDataCollator(tiny_latent_omni_processor())
    data = make_synthetic_records(8, seed=1, frames=4, size=8)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=10,
        learning_rate=5e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=True,
    )
    trainer = LatentOmniTrainer(model=model, args=args, train_dataset=data, data_collator=coll)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 10
    assert all(k in logs[0] for k in ("text_loss", "latent_loss", "sync_loss"))
    assert logs[-1]["loss"] < 0.8 * logs[0]["loss"], [round(x["loss"], 3) for x in logs]
    assert logs[-1]["text_loss"] < logs[0]["text_loss"]
    assert logs[-1]["latent_loss"] < logs[0]["latent_loss"]


def test_auto_classes_resolve_in_fresh_process(tmp_path):
    from hf_ext.models.latent_omni.tiny import tiny_latent_omni, tiny_latent_omni_processor

    model = tiny_latent_omni()
    model.save_pretrained(tmp_path)
    tiny_latent_omni_processor().save_pretrained(tmp_path)
    ids = torch.tensor([[1, 30, 31]])
    ref = model(input_ids=ids).logits
    torch.save(ref, tmp_path / "ref.pt")
    code = textwrap.dedent(f"""
        import sys, torch
        import hf_ext
        heavy = [m for m in ("transformers.models.auto.modeling_auto", "transformers.configuration_utils",
                             "hf_ext.models.latent_omni.modeling_latent_omni") if m in sys.modules]
        assert not heavy, heavy
        from transformers import AutoConfig, AutoModelForMultimodalLM, AutoModelForImageTextToText, AutoProcessor
        p = {str(tmp_path)!r}
        assert type(AutoConfig.from_pretrained(p)).__name__ == "LatentOmniConfig"
        m = AutoModelForMultimodalLM.from_pretrained(p).eval()
        assert type(m).__name__ == "LatentOmniForConditionalGeneration"
        assert type(AutoModelForImageTextToText.from_pretrained(p)).__name__ == "LatentOmniForConditionalGeneration"
        assert type(AutoProcessor.from_pretrained(p)).__name__ == "LatentOmniProcessor"
        assert torch.equal(m(input_ids=torch.tensor([[1, 30, 31]])).logits, torch.load(p + "/ref.pt"))
        print("OK")
    """)
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-2000:]


def test_collator_leaves_the_processor_fps_and_images_are_refused(processor):
    """A batch of 8 fps records is processed at 8 fps without changing the processor (later calls keep its 2 fps);
    an image placeholder that nothing would fill is an error, in render_conversation and in __call__."""
    import numpy as np
    import pytest

    from hf_ext.models.latent_omni import LatentOmniDataCollator, make_synthetic_records

    vid = np.zeros((4, 8, 8, 3), np.uint8)
    msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "q"}]}]
    text = processor.render_conversation(msgs, add_generation_prompt=True)
    before = processor(text=[text], videos=[vid])["video_second_per_grid"].tolist()
    batch = LatentOmniDataCollator(processor)(make_synthetic_records(1, frames=8, size=8, fps=8.0))
    tp = processor.temporal_patch_size
    assert batch["video_second_per_grid"].tolist() == [tp / 8.0]  # the records' own frame rate
    assert (
        processor.fps == 2.0
        and processor(text=[text], videos=[vid])["video_second_per_grid"].tolist() == before
    )
    assert processor(text=[text], videos=[vid], fps=4.0)["video_second_per_grid"].tolist() == [tp / 4.0]
    with pytest.raises(ValueError, match="fps"):
        processor(text=[text], videos=[vid], fps=0)
    with pytest.raises(ValueError, match="image"):
        processor.render_conversation([{"role": "user", "content": [{"type": "image"}]}])
    with pytest.raises(ValueError, match="IMAGE"):
        processor(text=["<|vision_bos|><|IMAGE|><|vision_eos|> q"])


def test_trainer_logs_eval_losses_apart_from_training_losses(tmp_path):
    """evaluate() reports eval_text_loss / eval_latent_loss / eval_sync_loss; its batches do not leak into the
    next training log, whose components then add up to that step's loss."""
    from transformers import TrainingArguments

    from hf_ext.models.latent_omni.tiny import tiny_latent_omni, tiny_latent_omni_processor
    from hf_ext.models.latent_omni.training import LatentOmniTrainer

    model = tiny_latent_omni(seed=1).train()
    cfg = model.config
    coll = LatentOmniDataCollator(tiny_latent_omni_processor())
    data = make_synthetic_records(4, seed=1, frames=4, size=8)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        max_steps=1,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = LatentOmniTrainer(
        model=model, args=args, train_dataset=data, eval_dataset=data, data_collator=coll
    )
    metrics = trainer.evaluate()
    assert all(f"eval_{k}" in metrics for k in ("text_loss", "latent_loss", "sync_loss"))
    want = metrics["eval_text_loss"] + cfg.latent_loss_weight * metrics["eval_latent_loss"]
    want += cfg.sync_loss_weight * metrics["eval_sync_loss"]
    assert abs(metrics["eval_loss"] - want) < 1e-3
    trainer.train()
    (log,) = [entry for entry in trainer.state.log_history if "loss" in entry]
    parts = (
        log["text_loss"]
        + cfg.latent_loss_weight * log["latent_loss"]
        + cfg.sync_loss_weight * log["sync_loss"]
    )
    assert abs(log["loss"] - parts) < 1e-3, (log, parts)
