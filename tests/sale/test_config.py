"""SALEConfig: validation at construction, dict round trip, per-layer/head lookup."""

from __future__ import annotations

import json

import pytest

from hf_ext.attention.sale.config import SALEConfig


@pytest.mark.parametrize(
    "kw, name",
    [
        ({"tau": 0.0}, "tau"),
        ({"tau": 1.0}, "tau"),
        ({"tau": -0.1}, "tau"),
        ({"tau": "0.1"}, "tau"),
        ({"taus": [[0.1, 1.5]]}, r"taus\[0\]\[1\]"),
        ({"taus": [[0.1, 0.2], [0.1]]}, r"taus\[1\]"),
        ({"taus": []}, "taus"),
        ({"block_q": 48}, "block_q"),
        ({"block_k": 256}, "block_k"),
        ({"sink_blocks": -1}, "sink_blocks"),
        ({"local_window": -5}, "local_window"),
        ({"min_seq_len": 1}, "min_seq_len"),
        ({"bits": 2}, "bits"),
        ({"backend": "cuda"}, "backend"),
        ({"on_unsupported": "ignore"}, "on_unsupported"),
    ],
)
def test_bad_config_raises_naming_the_parameter(kw, name):
    with pytest.raises(ValueError, match=name):
        SALEConfig(**kw)


def test_dict_round_trip_is_json_and_exact():
    cfg = SALEConfig(
        tau=0.01, taus=[[0.008, 0.0], [0.004, 0.002]], block_q=16, block_k=32, min_seq_len=300, bits=4
    )
    d = json.loads(json.dumps(cfg.to_dict()))
    assert SALEConfig.from_dict(d) == cfg
    assert SALEConfig.from_dict(None) == SALEConfig()
    with pytest.raises(ValueError, match="unknown keys.*'taux'"):
        SALEConfig.from_dict({"taux": 0.1})


def test_tau_lookup_per_layer_and_head():
    cfg = SALEConfig(tau=0.01, taus=[[0.008, 0.0], [0.004, 0.002]])
    assert cfg.tau_for(1, 2) == [0.004, 0.002]
    assert cfg.tau_for(None, 2) == [0.01, 0.01]
    assert SALEConfig(tau=0.03).tau_for(5, 3) == [0.03] * 3
    with pytest.raises(ValueError, match="2 layers but layer_idx=2"):
        cfg.tau_for(2, 2)
    with pytest.raises(ValueError, match="has 2 heads but the layer has 4"):
        cfg.tau_for(0, 4)


def test_help_text_for_every_field():
    assert all(SALEConfig.help().values())


def test_block_sizes_and_bits_must_be_ints_and_tau_values_any_real():
    """16.0 for block_q (or 8.0 for bits) is refused when the config is built, not at the first sparse call;
    numpy / torch scalars are fine as calibrated tau values."""
    import numpy as np
    import pytest
    import torch

    from hf_ext.attention.sale import SALEConfig

    for bad, name in (
        (dict(block_q=16.0), "block_q"),
        (dict(block_k=32.0), "block_k"),
        (dict(bits=8.0), "bits"),
    ):
        with pytest.raises(ValueError, match=name):
            SALEConfig(**bad)
    cfg = SALEConfig(taus=[[np.float32(0.1), torch.tensor(0.2).item(), np.float64(0.0)]])
    assert cfg.taus == [[pytest.approx(0.1), pytest.approx(0.2), 0.0]]
    with pytest.raises(ValueError, match=r"taus\[0\]\[0\]"):
        SALEConfig(taus=[[np.float32("nan")]])


def test_a_saleconfig_object_on_the_model_config_still_saves(tmp_path):
    """model.config.sale_config = SALEConfig(...) (instead of enable_sale's dict) works at run time and no longer
    breaks save_pretrained: it is stored as its dict at the first call."""
    import torch

    from hf_ext.attention.sale import SALEConfig, enable_sale
    from tests.sale._models import rand_ids, tiny_family

    model = tiny_family("llama")
    enable_sale(model)
    cfg = SALEConfig(min_seq_len=32, block_q=16, block_k=16)
    for layer in model.model.layers:
        layer.self_attn.config.sale_config = cfg
    with torch.no_grad():
        model(rand_ids(64))
    model.save_pretrained(tmp_path)
    assert SALEConfig.from_dict(model.config.sale_config) == cfg


def test_numpy_scalars_are_taken_as_python_numbers():
    """tau=np.float32(0.01) was refused ("must be a float") while np.float64 and every numpy real in ``taus`` passed,
    and a numpy integer block size was refused with "allowed values are ... [16, 32, 64, 128]" for 64 itself; they
    are accepted and stored as Python numbers, so the config still serialises to config.json."""
    import numpy as np

    cfg = SALEConfig(
        tau=np.float32(0.5),
        block_q=np.int64(64),
        block_k=np.int32(32),
        sink_blocks=np.int64(2),
        local_window=np.int16(64),
        min_seq_len=np.int64(512),
        bits=np.int8(4),
    )
    d = cfg.to_dict()
    assert (
        d["tau"],
        d["block_q"],
        d["block_k"],
        d["sink_blocks"],
        d["local_window"],
        d["min_seq_len"],
        d["bits"],
    ) == (
        0.5,
        64,
        32,
        2,
        64,
        512,
        4,
    )
    assert all(
        type(d[k]) is int
        for k in ("block_q", "block_k", "sink_blocks", "local_window", "min_seq_len", "bits")
    )
    assert type(d["tau"]) is float and SALEConfig.from_dict(json.loads(json.dumps(d))) == cfg
    for bad, name in ((dict(block_q=np.int64(48)), "block_q"), (dict(tau=np.float32(1.5)), "tau")):
        with pytest.raises(ValueError, match=name):
            SALEConfig(**bad)


def test_sub_taus_validate_round_trip_and_leave_the_older_format_alone():
    """Per-sub-model thresholds (``sub_taus``) are checked like ``taus`` and survive the dict round trip; a config
    without them serialises exactly as before they existed (no ``sub_taus`` key), so older saved configs load and
    single-tower configs do not change."""
    old = {
        "tau": 0.01,
        "taus": [[0.008, 0.0]],
        "block_q": 16,
        "block_k": 16,
        "sink_blocks": 1,
        "local_window": 128,
        "min_seq_len": 4096,
        "bits": 8,
        "backend": "auto",
        "on_unsupported": "fallback",
    }
    assert SALEConfig.from_dict(old).to_dict() == old
    cfg = SALEConfig(taus=[[0.008, 0.0]], sub_taus={"vision_config": [[0.004], [0.002]]})
    assert SALEConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.for_sub_model("vision_config") == SALEConfig(taus=[[0.004], [0.002]])
    assert cfg.for_sub_model(None) == cfg.for_sub_model("audio_config") == SALEConfig(taus=[[0.008, 0.0]])
    for bad, match in (
        ({"vision_config": [[0.1, 1.5]]}, r"sub_taus\['vision_config'\]\[0\]\[1\]"),
        ({"vision_config": []}, r"sub_taus\['vision_config'\]"),
        ({"": [[0.1]]}, "sub_taus key"),
        ([[0.1]], "sub_taus"),
    ):
        with pytest.raises(ValueError, match=match):
            SALEConfig(sub_taus=bad)


def test_encoder_taus_validate_round_trip_and_leave_the_older_formats_alone():
    """The encoder self-attention thresholds of an encoder-decoder model (``encoder_taus``) are checked like
    ``taus``, survive the dict round trip, are read by non-causal layers only (``tau_for(..., encoder=True)``, else
    ``taus``), and stay with the text model (a sub-model's config gets none). A config without them serialises as
    before they existed (no ``encoder_taus`` key): decoder-only and ``sub_taus`` configs do not change."""
    cfg = SALEConfig(taus=[[0.008, 0.0]], encoder_taus=[[0.004] * 3, [0.002] * 3])
    assert SALEConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.tau_for(0, 2) == [0.008, 0.0] and cfg.tau_for(1, 3, encoder=True) == [0.002] * 3
    assert SALEConfig(taus=[[0.008, 0.0]]).tau_for(0, 2, encoder=True) == [0.008, 0.0]  # unset: taus
    with pytest.raises(ValueError, match=r"sale_config.encoder_taus\[0\] has 3 heads"):
        cfg.tau_for(0, 2, encoder=True)
    with pytest.raises(ValueError, match=r"sale_config.encoder_taus has 2 layers"):
        cfg.tau_for(2, 3, encoder=True)
    assert cfg.for_sub_model(None) == cfg
    assert cfg.for_sub_model("vision_config") == SALEConfig(taus=[[0.008, 0.0]])
    for bad, match in (
        ([[0.1, 1.5]], r"encoder_taus\[0\]\[1\]"),
        ([], "encoder_taus"),
        ([[0.1], [0.1, 0.2]], "encoder_taus\\[1\\]"),
    ):
        with pytest.raises(ValueError, match=match):
            SALEConfig(encoder_taus=bad)
    for old in (
        SALEConfig(taus=[[0.008, 0.0]]),
        SALEConfig(taus=[[0.008, 0.0]], sub_taus={"vision_config": [[0.004], [0.002]]}),
    ):
        assert "encoder_taus" not in old.to_dict()
        assert SALEConfig.from_dict(old.to_dict()) == old


def test_positional_arguments_keep_their_meaning_after_the_new_threshold_tables():
    """encoder_taus / sub_taus were inserted after taus: SALEConfig(tau, taus, block_q, block_k, ...) written for the
    older field order handed block_q to encoder_taus (ValueError). They are keyword-only now."""
    cfg = SALEConfig(0.002, [[0.1, 0.2]], 32, 64, 2, 256, 1024, 4, "torch", "error")
    assert (cfg.tau, cfg.taus, cfg.block_q, cfg.block_k) == (0.002, [[0.1, 0.2]], 32, 64)
    assert (cfg.sink_blocks, cfg.local_window, cfg.min_seq_len, cfg.bits) == (2, 256, 1024, 4)
    assert (cfg.backend, cfg.on_unsupported, cfg.encoder_taus, cfg.sub_taus) == ("torch", "error", None, None)
    both = SALEConfig(encoder_taus=[[0.1]], sub_taus={"vision_config": [[0.2]]})
    assert SALEConfig.from_dict(both.to_dict()) == both
