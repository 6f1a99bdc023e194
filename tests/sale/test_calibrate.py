"""Calibration: the reference's halving criterion per (layer, head), stored in the config, round trip."""

from __future__ import annotations

import pytest
import torch

from hf_ext.attention.sale import SALEConfig, calibrate, enable_sale, sale_stats
from hf_ext.attention.sale.calibrate import Calibrator, calibrating
from tests.sale._models import rand_ids, tiny_family

CFG = SALEConfig(block_q=16, block_k=16, local_window=32, min_seq_len=64)


def _model_with_distinct_heads():
    """Tiny Llama whose query heads differ in sharpness, so calibrated thresholds differ per head."""
    model = tiny_family("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.self_attn.q_proj.weight.view(4, 16, -1)
            for h, f in enumerate((0.5, 1.0, 4.0, 12.0)):
                w[h] *= f
    return model


class _Recorder(Calibrator):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.seen = {}

    def observe(self, module, query, key, value, attention_mask, dense_out, *rest):
        self.seen[module.layer_idx] = (query.clone(), key.clone(), value.clone(), dense_out.clone())


def _head_errors(q, k, v, dense, taus):
    from hf_ext_kernels.sparse_attn import ops

    out = ops.sale_attention(
        q, k, v, tau=torch.tensor(taus), block_q=16, block_k=16, local_window=32, backend="torch"
    )
    return (out.float() - dense.transpose(1, 2).float()).abs().sum(dim=(0, 2, 3))  # [H]


def test_calibrate_follows_the_reference_criterion_per_head():
    model = _model_with_distinct_heads()
    ids = rand_ids(256)
    theta = 0.05
    new = calibrate(model, ids, theta=theta, config=CFG)
    assert len(new.taus) == 2 and all(len(r) == 4 for r in new.taus)
    assert len({t for row in new.taus for t in row}) >= 2, new.taus  # per-head values differ
    allowed = {0.008 / 2**i for i in range(7)} | {0.0}
    assert all(min(abs(t - a) for a in allowed) < 1e-12 for row in new.taus for t in row), new.taus
    assert model.config.sale_config["taus"] == new.taus

    rec = _Recorder(CFG, theta, 0.008, 1e-4)
    model.set_attn_implementation("sale")
    with calibrating(rec), torch.no_grad():
        model(ids, use_cache=False)
    n = ids.shape[1]
    for layer, (q, k, v, dense) in rec.seen.items():
        taus = new.taus[layer]
        err = _head_errors(q, k, v, dense, taus)
        assert bool((err < theta * n).all()), (layer, err, taus)  # the calibrated tau meets the budget
        looser = [min(2 * t, 0.008) if t > 0 else 0.0 for t in taus]
        err2 = _head_errors(q, k, v, dense, looser)
        for h, t in enumerate(taus):
            if 0 < t < 0.008:  # it was halved, so the previous (doubled) value broke the budget
                assert err2[h] >= theta * n, (layer, h, float(err2[h]), t)


def test_calibrated_taus_round_trip_and_are_used(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _model_with_distinct_heads()
    new = calibrate(model, [rand_ids(200), {"input_ids": rand_ids(150, seed=3)}], theta=0.05, config=CFG)
    assert model.config._attn_implementation == "sdpa"  # restored after calibration
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sale").eval()
    assert SALEConfig.from_dict(loaded.config.sale_config).taus == new.taus
    # the loaded thresholds drive the kernel: all-zero taus (dense heads) reproduce sdpa exactly
    ids = rand_ids(256, seed=5)
    with torch.no_grad():
        ref = model(ids).logits
    enable_sale(
        loaded, SALEConfig.from_dict({**loaded.config.sale_config, "taus": [[0.0] * 4] * 2, "tau": 0.5})
    )
    with torch.no_grad(), sale_stats() as st:
        out = loaded(ids).logits
    assert st.sparse_calls == 2
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_calibrate_bad_arguments():
    model = tiny_family("llama")
    with pytest.raises(ValueError, match="theta"):
        calibrate(model, rand_ids(64), theta=0)
    with pytest.raises(ValueError, match="tau_init"):
        calibrate(model, rand_ids(64), tau_init=1.5)
    with pytest.raises(ValueError, match="inputs"):
        calibrate(model, [], theta=0.4)
    with pytest.raises(ValueError, match="inputs"):
        calibrate(model, torch.randn(1, 8), theta=0.4)


def test_an_all_padding_prompt_does_not_make_every_head_dense():
    """A calibration batch with one empty (all-padding) prompt gives the thresholds of its real prompts: the empty
    row has no token to check (its error 0 against a bound 0 used to fail every head until tau was 0)."""
    kw = dict(min_seq_len=32, block_q=16, block_k=16, local_window=16)
    ids = rand_ids(128, batch=2)
    full = calibrate(tiny_family("llama"), {"input_ids": ids[:1]}, theta=0.4, config=SALEConfig(**kw))
    am = torch.ones_like(ids)
    am[1] = 0
    padded = calibrate(
        tiny_family("llama"), {"input_ids": ids, "attention_mask": am}, theta=0.4, config=SALEConfig(**kw)
    )
    assert padded.taus == full.taus and any(t > 0 for row in full.taus for t in row)


def _tiny_llava() -> object:
    """A tiny Llava whose sub-models run different implementations."""
    from hf_ext.testing import tiny_llava

    return tiny_llava(attn_implementation=MIXED_IMPLS)


def _impls(model) -> tuple[str, str, str]:
    """(top-level, text, vision) attention implementations."""
    c = model.config
    return c._attn_implementation, c.text_config._attn_implementation, c.vision_config._attn_implementation


MIXED_IMPLS = {"": "eager", "text_config": "eager", "vision_config": "sdpa"}


def test_calibrate_restores_every_sub_models_implementation():
    """calibrate() puts back each sub-config's implementation (the vision tower's sdpa next to the text model's
    eager); it restored only the top-level one, which switched the vision tower to eager."""
    model = _tiny_llava()
    before = _impls(model)
    assert before == ("eager", "eager", "sdpa")
    new = calibrate(
        model, rand_ids(96), theta=0.4, config=SALEConfig(block_q=16, block_k=16, local_window=16)
    )
    assert len(new.taus) == 2
    assert _impls(model) == before


def test_calibrate_restores_implementations_and_config_when_it_raises():
    """A forward pass that raises (a token id past the vocabulary) leaves every (sub-)model's implementation and
    the stored sale_config as they were."""
    model = _tiny_llava()
    before = _impls(model)
    bad = torch.full((1, 32), model.config.text_config.vocab_size + 10)
    with pytest.raises(IndexError):
        calibrate(model, bad, theta=0.4)
    assert _impls(model) == before
    assert getattr(model.config, "sale_config", None) is None
    assert getattr(model.config.text_config, "sale_config", None) is None


@pytest.mark.parametrize(
    "kw, name",
    [
        ({"tau_init": "0.01"}, "tau_init"),
        ({"tau_init": None}, "tau_init"),
        ({"tau_min": None}, "tau_min"),
        ({"tau_min": "0"}, "tau_min"),
        ({"theta": float("inf")}, "theta"),
        ({"progress": "no"}, "progress"),
    ],
)
def test_calibrate_argument_types_raise_value_errors_naming_them_before_any_change(kw, name):
    """tau_init / tau_min of the wrong type raised a bare TypeError from a comparison ("'<' not supported between
    instances of 'float' and 'str'"), theta=inf passed (no error budget: every head kept tau_init) and a truthy
    string as progress turned the progress bar on; each is a ValueError naming the parameter, before the model is
    touched."""
    model = tiny_family("llama")
    with pytest.raises(ValueError, match=name):
        calibrate(model, rand_ids(64), **kw)
    assert model.config._attn_implementation == "sdpa" and getattr(model.config, "sale_config", None) is None


def test_calibrate_passes_every_model_input_of_a_batch():
    """A processor's batch for a vision-language model carries pixel_values next to input_ids; calibrate kept only
    input_ids / attention_mask, so the image placeholders were calibrated as plain text tokens (no error)."""
    from hf_ext.testing import tiny_llava

    model = tiny_llava()
    seen = []
    model.model.vision_tower.register_forward_hook(lambda mod, args, out: seen.append(1))
    ids = rand_ids(96)
    ids[0, 4:20] = 5  # the 16 image tokens
    pix = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    cfg = SALEConfig(block_q=16, block_k=16, local_window=16)
    calibrate(model, {"input_ids": ids, "pixel_values": pix, "use_cache": True}, theta=0.4, config=cfg)
    assert seen == [1]


def test_calibrate_a_model_left_in_training_mode():
    """After Trainer.train() (or building a model from a config) the model is in training mode, where SALE takes
    every layer dense: calibrate skipped such layers, which silently kept the default tau (here layer 0; with every
    layer in training mode it raised "calibration observed no attention layer"). It now runs in eval mode, gives the
    thresholds of the same model in eval mode, and puts each module's training flag back."""
    ids = rand_ids(96)
    ref = calibrate(tiny_family("llama"), ids, theta=0.05, config=CFG)
    model = tiny_family("llama").train()
    model.model.layers[1].eval()  # a mixed state is put back as it was
    flags = [m.training for m in model.modules()]
    got = calibrate(model, ids, theta=0.05, config=CFG)
    assert got.taus == ref.taus
    assert [m.training for m in model.modules()] == flags


class _AllCalls(Calibrator):
    """Records every attention call's arguments (the model runs dense, as under calibrate)."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.calls = []

    def observe(self, module, *args):
        self.calls.append((module, args))


def _tower(module) -> str:
    return "vision" if "Vision" in type(module).__name__ else "text"


def _calibrate_and_record_calls(model, batch) -> list:
    """``calibrate`` ``model`` on ``batch`` (theta 0.003, 16-token blocks), then record one forward under ``"sale"``.
    Returns ``[(module, args, taus), ...]`` in call order: each attention call's module and arguments, and the
    thresholds the halving criterion gives on that call's inputs alone (the reference; ``None`` for a call the
    Calibrator does not calibrate, e.g. cross-attention)."""
    cfg = SALEConfig(block_q=16, block_k=16, local_window=16, min_seq_len=32)
    theta = 0.003
    calibrate(model, batch, theta=theta, config=cfg)
    rec = _AllCalls(cfg, theta, 0.008, 1e-4)
    model.set_attn_implementation("sale")
    with calibrating(rec), torch.no_grad():
        model(**batch, use_cache=False)
    out = []
    for module, args in rec.calls:
        one = Calibrator(cfg, theta, 0.008, 1e-4)
        one.observe(module, *args)
        out.append((module, args, next(iter(one.taus.values())) if one.taus else None))
    return out


@pytest.mark.parametrize("vision_heads", [4, 2])
def test_calibrated_taus_are_kept_per_sub_model_when_towers_share_layer_indices(vision_heads, tmp_path):
    """Gemma4's vision tower numbers its attention layers 0, 1 like its text model. calibrate keyed thresholds by
    layer_idx alone: with equal head counts the two towers' halvings were merged into one table that both read
    (the text model ran on the vision tower's thresholds), with other head counts calibrate raised ValueError
    ("tau must be ... 4 per-head values, got 2"). Each tower now gets the thresholds calibrated on its own
    activations, reads them at run time, and keeps them through save_pretrained / from_pretrained."""
    from transformers import Gemma4ForConditionalGeneration

    from hf_ext.attention.sale.attention import config_of
    from tests.sale._models import gemma4_vl_batch, tiny_gemma4_vl

    model = tiny_gemma4_vl(vision_heads)
    batch = gemma4_vl_batch()
    # the reference: the halving criterion run on each attention module's own inputs alone
    want = {m: [float(t) for t in taus.tolist()] for m, _, taus in _calibrate_and_record_calls(model, batch)}
    assert {_tower(m) for m in want} == {"vision", "text"} and len(want) == 4
    by_tower = {t: [v for m, v in want.items() if _tower(m) == t] for t in ("vision", "text")}
    assert by_tower["vision"] != by_tower["text"], want  # the towers need different thresholds here

    def used(
        mods: dict,
    ) -> dict:  # {reference module: module to look up}: the thresholds the attention function uses
        return {ref: config_of(m).tau_for(m.layer_idx, len(want[ref])) for ref, m in mods.items()}

    assert used({m: m for m in want}) == want
    with torch.no_grad(), sale_stats() as st:
        model(**batch)
    assert [c["path"] for c in st.calls] == ["sparse"] * 4, st.calls  # both towers run sparse on them

    model.save_pretrained(tmp_path)
    loaded = dict(
        Gemma4ForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="sale").named_modules()
    )
    assert used({m: loaded[n] for n, m in model.named_modules() if m in want}) == want


def test_thresholds_of_another_model_or_sub_model_are_refused_naming_them():
    """sub_taus that do not fit a sub-model (head count, layers) or name one the model does not have are a
    ValueError naming sub_taus, before the model changes; text-model taus that do not fit still name taus."""
    from tests.sale._models import tiny_gemma4_vl

    model = tiny_gemma4_vl(vision_heads=2)
    good = {"taus": [[0.004] * 4] * 2, "sub_taus": {"vision_config": [[0.002] * 2] * 2}}
    bad = [
        ({"sub_taus": {"vision_config": [[0.002] * 4] * 2}}, r"sub_taus\['vision_config'\]\[0\] has 4 heads"),
        ({"sub_taus": {"vision_config": [[0.002] * 2]}}, r"sub_taus\['vision_config'\] has 1 layers"),
        ({"sub_taus": {"audio_config": [[0.002] * 2] * 2}}, r"sub_taus names \['audio_config'\]"),
        ({"taus": [[0.004] * 2] * 2}, r"sale_config.taus\[0\] has 2 heads"),
    ]
    for change, match in bad:
        with pytest.raises(ValueError, match=match):
            enable_sale(model, SALEConfig(**{**good, **change}))
        assert model.config._attn_implementation == "sdpa"
        assert getattr(model.config.vision_config, "sale_config", None) is None
    enable_sale(model, SALEConfig(**good))
    assert model.config.sale_config["sub_taus"] == good["sub_taus"]
    assert model.config.vision_config.sale_config["taus"] == good["sub_taus"]["vision_config"]
    assert model.config.text_config.sale_config["taus"] == good["taus"]
    assert "sub_taus" not in model.config.text_config.sale_config


def _kernel_taus(model, batch, monkeypatch) -> tuple[list, list]:
    """Run ``model`` on ``batch`` under "sale": (the per-head thresholds each sparse call handed the kernel, in call
    order; every call's record from sale_stats)."""
    from hf_ext.attention.sale import attention as attn

    seen = []
    orig = attn._run_rows

    def rec(query, key, value, kpm, taus, *a, **k):
        seen.append(taus.float().tolist())
        return orig(query, key, value, kpm, taus, *a, **k)

    with monkeypatch.context() as mp, torch.no_grad(), sale_stats() as st:
        mp.setattr(attn, "_run_rows", rec)
        model(**batch)
    return seen, st.calls


@pytest.mark.parametrize("decoder_heads", [4, 2])
def test_encoder_decoder_thresholds_are_kept_per_attention_kind(decoder_heads, tmp_path, monkeypatch):
    """BART (like Whisper, Marian, M2M100, Moonshine) keeps encoder self-attention (non-causal), decoder
    self-attention (causal) and decoder cross-attention modules on one config with the same layer_idx values 0, 1.
    calibrate keyed thresholds by (config, layer_idx): the three kinds' halvings went into one table that all three
    read (with other head counts in encoder and decoder: ValueError). Now encoder self-attention gets its own table
    (encoder_taus), decoder self-attention keeps taus, and cross-attention runs dense (it is left out of
    calibration). Each module reads the thresholds calibrated on its own activations, also after
    save_pretrained / from_pretrained."""
    from transformers import BartForConditionalGeneration

    from tests.sale._models import bart_batch, tiny_bart

    model = tiny_bart(encoder_heads=4, decoder_heads=decoder_heads)
    batch = bart_batch()
    # the reference: the halving criterion run on each self-attention module's own inputs alone, in call order
    names = {m: n for n, m in model.named_modules()}
    want, kinds = [], []
    for module, _, taus in _calibrate_and_record_calls(model, batch):
        kinds.append(names[module].split(".")[-1] if "decoder" in names[module] else "encoder")
        if "encoder_attn" in names[module]:
            continue  # cross-attention: dense
        want.append(taus.float().tolist())  # float32, as handed to the kernel
    assert kinds == ["encoder"] * 2 + ["self_attn", "encoder_attn"] * 2
    assert want[:2] != want[2:], want  # encoder and decoder self-attention need different thresholds here

    got, calls = _kernel_taus(model, batch, monkeypatch)
    assert got == want
    paths = [c["path"] for c in calls]
    assert paths == ["sparse"] * 3 + ["fallback:cross_attention", "sparse", "fallback:cross_attention"], calls

    model.save_pretrained(tmp_path)
    loaded = BartForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="sale").eval()
    assert _kernel_taus(loaded, batch, monkeypatch)[0] == want

    # the thresholds drive the kernel: all-zero (dense) heads reproduce sdpa
    ref = tiny_bart(encoder_heads=4, decoder_heads=decoder_heads)
    with torch.no_grad():
        want_logits = ref(**batch).logits
    zero = {"taus": [[0.0] * decoder_heads] * 2, "encoder_taus": [[0.0] * 4] * 2, "tau": 0.5}
    enable_sale(loaded, SALEConfig.from_dict({**loaded.config.sale_config, **zero}))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, want_logits, atol=2e-5, rtol=1e-4)


def test_encoder_decoder_cross_attention_runs_dense_and_foreign_encoder_taus_are_refused():
    """Cross-attention (decoder queries over encoder states) shares config and layer_idx with decoder self-attention
    and its queries and keys share no positions: SALE runs it dense, with one warning, or raises a ValueError with
    on_unsupported='error' (the old code ran it sparse on the decoder's thresholds). Encoder thresholds that do not fit
    the encoder, or given to a model without an encoder, are refused naming encoder_taus."""
    import warnings

    from hf_ext.attention.sale.attention import reset_warnings
    from tests.sale._models import bart_batch, tiny_bart

    model = tiny_bart(encoder_heads=4, decoder_heads=2)
    batch = bart_batch()
    with torch.no_grad():
        want = model(**batch).logits
    blocks = dict(block_q=16, block_k=16, local_window=16, min_seq_len=32)
    # all-zero thresholds (every block kept) and dense cross-attention reproduce sdpa
    zero = dict(taus=[[0.0] * 2] * 2, encoder_taus=[[0.0] * 4] * 2, tau=0.5)
    enable_sale(model, SALEConfig(**blocks, **zero))
    reset_warnings()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad(), sale_stats() as st:
        warnings.simplefilter("always")
        got = model(**batch).logits
        model(**batch)
    assert [c["path"] for c in st.calls].count("fallback:cross_attention") == 4, st.calls
    assert st.sparse_calls == 8  # encoder and decoder self-attention stay sparse
    cross = [w for w in caught if "cross-attention" in str(w.message)]
    assert len(cross) == 1, [str(w.message) for w in caught]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    enable_sale(model, SALEConfig(**blocks, on_unsupported="error"))
    with pytest.raises(ValueError, match="cross-attention"), torch.no_grad():
        model(**batch)

    for bad, match in (
        ({"encoder_taus": [[0.004] * 2] * 2}, r"sale_config.encoder_taus\[0\] has 2 heads"),
        ({"encoder_taus": [[0.004] * 4]}, r"sale_config.encoder_taus has 1 layers"),
        ({"taus": [[0.004] * 4] * 2}, r"sale_config.taus\[0\] has 4 heads"),
    ):
        with pytest.raises(ValueError, match=match):
            enable_sale(model, SALEConfig(**bad))
    with pytest.raises(ValueError, match="encoder_taus is set, but"):
        enable_sale(tiny_family("llama"), SALEConfig(encoder_taus=[[0.004] * 4] * 2))


@pytest.mark.parametrize("vision_heads", [4, 2])
def test_text_only_prompts_give_an_unreached_sub_model_the_flat_tau(vision_heads):
    """Text-only calibration prompts to a vision-language model never reach the vision tower. Its modules must not
    read the text model's thresholds: with another head count set_sale_config refused them after the whole run
    (ValueError), with the same count the vision tower ran on the text model's thresholds."""
    from tests.sale._models import tiny_gemma4_vl

    model = tiny_gemma4_vl(vision_heads)
    cfg = SALEConfig(block_q=16, block_k=16, min_seq_len=16)
    new = calibrate(model, rand_ids(192, seed=3), config=cfg)
    assert len(new.taus) == 2 and all(len(r) == 4 for r in new.taus)
    assert new.sub_taus == {"vision_config": [[cfg.tau] * vision_heads] * 2}
    assert model.config.vision_config.sale_config["taus"] == [[cfg.tau] * vision_heads] * 2
    assert model.config.text_config.sale_config["taus"] == new.taus


@pytest.mark.parametrize("failure", ["no_layer_observed", "table_refused"])
def test_a_calibration_that_fails_after_the_run_keeps_the_stored_thresholds(monkeypatch, failure):
    """calibrate clears the stored thresholds for its run and puts them back when the run raises. The checks after
    the run (no layer observed: RuntimeError; a table _tables cannot build or set_sale_config refuses: ValueError)
    raised after that restore had been skipped, so the model was left with taus=None."""
    import sys

    cal_mod = sys.modules["hf_ext.attention.sale.calibrate"]
    model = tiny_family("llama")
    calibrate(model, rand_ids(256, seed=2), config=SALEConfig(block_q=16, block_k=16, min_seq_len=16))
    before = dict(model.config.sale_config)
    assert before["taus"] is not None
    if failure == "no_layer_observed":
        monkeypatch.setattr(cal_mod._attn, "_unsupported_reason", lambda *a, **k: ("forced", "forced"))
        error = RuntimeError
    else:

        def refuse(*a, **k):
            raise ValueError("refused")

        monkeypatch.setattr(cal_mod, "_tables", refuse)
        error = ValueError
    with pytest.raises(error):
        calibrate(model, rand_ids(256, seed=3))
    assert model.config.sale_config == before
