"""Input sweep of the simulator's public API: bad input is refused, naming the parameter, before any run."""

from __future__ import annotations

import pytest

from hf_ext.simulate import CostModel, SimConfig, Simulator, make_scheduler


def test_kv_capacity_in_tokens_and_in_bytes_together_are_refused():
    """With both given, kv_capacity_bytes was silently ignored (kv_capacity_tokens won)."""
    with pytest.raises(ValueError, match=r"kv_capacity_tokens.*kv_capacity_bytes"):
        SimConfig(kv_capacity_tokens=1000, kv_capacity_bytes=1e9)
    with pytest.raises(ValueError, match=r"kv_capacity_tokens.*kv_capacity_bytes"):
        Simulator(
            CostModel(kv_bytes_per_token=1e3),
            make_scheduler("fcfs"),
            SimConfig(kv_capacity_tokens=1000),
            kv_capacity_bytes=1e9,
        )
    assert SimConfig(kv_capacity_bytes=1e9).kv_capacity_tokens is None


@pytest.mark.parametrize("config", [{"max_num_seqs": 4}, "fcfs"], ids=["dict", "str"])
def test_a_config_that_is_not_a_simconfig_is_refused(config):
    """A dict was kept as the config: AttributeError ('dict' object has no attribute 'cpu_capacity_tokens')."""
    with pytest.raises(ValueError, match=r"config must be a SimConfig or None, got"):
        Simulator(CostModel(), make_scheduler("fcfs"), config)
