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
