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


class _OnCheck:
    def on_check(self, req, states, now):
        return []


class _NoHooks:
    pass


@pytest.mark.parametrize(
    "branch_policy, kw, match",
    [
        (_OnCheck(), {}, r"check_every=0"),  # on_check never ran
        (None, {"check_every": 5}, r"check_every=5 .*branch_policy"),  # no policy to call
        (_NoHooks(), {"check_every": 5}, r"branch_policy .*on_check.*on_branch_finish"),  # no hook to call
    ],
    ids=["on_check_without_check_every", "check_every_without_policy", "policy_without_hooks"],
)
def test_a_branch_policy_or_check_every_that_would_never_be_used_is_refused(branch_policy, kw, match):
    """A branch policy's on_check ran only every SimConfig.check_every steps, and the default 0 meant never: the
    policy was silently ignored; check_every without a policy with on_check, and a policy with neither hook, too."""
    with pytest.raises(ValueError, match=match):
        Simulator(CostModel(), make_scheduler("fcfs"), branch_policy=branch_policy, **kw)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prompt_len": 5.5}, r"request 0: prompt_len must be a whole number of tokens >= 1, got 5.5"),  # ran
        (
            {"output_len": 4.5},
            r"request 0: output_len must be a whole number of tokens >= 1, got 4.5",
        ),  # int(): 4
        (
            {"arrival": "1"},
            r"request 0: arrival must be a finite time >= 0, got '1'",
        ),  # TypeError in the sort
        ({"meta": {"branch_lens": [3, 2.5]}}, r"request 0: meta\['branch_lens'\] must be whole numbers"),
    ],
)
def test_requests_with_fractional_or_non_numeric_fields_are_refused(kwargs, match):
    from hf_ext.simulate import Request

    req = Request(**{"id": 0, "arrival": 0.0, "prompt_len": 5, "output_len": 5, **kwargs})
    ok = Request(id=1, arrival=0.0, prompt_len=5, output_len=5)
    with pytest.raises(ValueError, match=match):
        Simulator(CostModel(base_s=0.01), make_scheduler("fcfs")).run([ok, req])
