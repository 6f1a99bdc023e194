"""LatentOmni split over devices (accelerate's ``dispatch_model``, what ``from_pretrained(device_map=...)`` does):
latent ``generate`` and the training forward run and give the single-device results.

The split puts the embeddings and the first decoder layer on one device, the last layer, the norm and the LM head
on another. On CPU both are ``"cpu"`` (the code path runs; the default suite); with two GPUs (marker
``multi_gpu``) they are ``cuda:0`` and ``cuda:1``, where mixing devices fails loudly.
"""

from __future__ import annotations

import pytest
import torch


def _split(model, second: str | int, first: str | int):
    from accelerate import dispatch_model

    tm = model._text_model()
    pre = next(n for n, x in model.named_modules() if x is tm)
    late = (pre + ".layers.1", pre + ".norm", "lm_head")
    dm = {}
    for name, _ in [*model.named_parameters(), *model.named_buffers()]:
        mod = name.rsplit(".", 1)[0]
        if mod.startswith(pre + ".layers."):
            mod = ".".join(mod.split(".")[: len(pre.split(".")) + 2])
        dm[mod] = second if mod.startswith(late) else first
    return dispatch_model(model, device_map=dm)


def _check(first: str | int, second: str | int, ref_device: str) -> None:
    """The split model against the whole model on ``ref_device`` (the same kind of device: greedy tokens of a tiny
    random model can flip between CPU and GPU arithmetic)."""
    from hf_ext.models.latent_omni.tiny import tiny_latent_omni

    ref = tiny_latent_omni().to(ref_device)
    c = ref.config
    k = c.num_latents
    prompt = torch.tensor([[1, 30, 31, 32, c.latent_start_token_id]])
    text = torch.tensor([[1, 30, 31]])
    train = torch.tensor(
        [[1, 30, c.latent_start_token_id] + [c.latent_pad_token_id] * k + [c.latent_end_token_id, 40]]
    )
    labels = torch.tensor([[1, 30, c.latent_start_token_id] + [-100] * (k + 1) + [40]])
    g = torch.Generator().manual_seed(0)
    feats = dict(
        segment_visual_features=[torch.randn(5, 64, generator=g)],
        segment_audio_features=[torch.randn(3, 64, generator=g)],
    )
    on = {key: [f.to(ref_device) for f in v] for key, v in feats.items()}
    with torch.no_grad():
        want_latent = ref.generate(prompt.to(ref_device), max_new_tokens=k + 3).cpu()
        want_text = ref.generate(text.to(ref_device), max_new_tokens=3).cpu()
        want_loss = ref(train.to(ref_device), labels=labels.to(ref_device), **on).loss.cpu()
    model = _split(tiny_latent_omni(), second, first)
    with torch.no_grad():
        got_latent = model.generate(prompt, max_new_tokens=k + 3)
        got_text = model.generate(text, max_new_tokens=3)
        got_hf = model.generate(text, max_new_tokens=3, latent_reasoning=False)
        out = model(train, labels=labels, **feats)
    assert torch.equal(got_latent.cpu(), want_latent) and torch.equal(got_text.cpu(), want_text)
    assert got_hf.shape == (1, 6)
    torch.testing.assert_close(out.loss.cpu(), want_loss, atol=1e-4, rtol=1e-4)
    assert out.latent_loss is not None and out.sync_loss is not None


def test_split_model_runs_latent_generate_and_training_on_one_device():
    _check("cpu", "cpu", "cpu")


@pytest.mark.multi_gpu
def test_split_model_runs_latent_generate_and_training_on_two_gpus():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    _check(0, 1, "cuda:0")
