"""Registry, config files, schedule, sampler, and bad input (errors raised before any work)."""

from __future__ import annotations

import json

import pytest
import torch

from hf_ext.callbacks.dataflex.callback import DataFlexCallback
from hf_ext.callbacks.dataflex.config import DataFlexConfig
from hf_ext.callbacks.dataflex.registry import build, names
from hf_ext.callbacks.dataflex.sampler import DataFlexSampler
from hf_ext.callbacks.dataflex.synthetic import make_mixture

DATA = make_mixture({"clean": 4, "noisy": 4}, seed=0)


def test_registry_lists_every_method():
    assert names("selector") == ["cluster_less", "delta_loss", "less", "loss", "near", "nice", "random"]
    assert names("mixer") == ["doremi", "dynamic", "odm"]
    assert names("weighter") == ["adapt", "loss"]


def test_unknown_name_lists_registered_names():
    with pytest.raises(
        ValueError, match=r"unknown DataFlex selector 'lesss'.*cluster_less, delta_loss, less, loss"
    ):
        build("selector", "lesss")
    with pytest.raises(ValueError, match="registered mixers: doremi, dynamic, odm"):
        DataFlexConfig(mixer="doremy")
    with pytest.raises(ValueError, match="kind='sampler'.*selector, mixer, weighter"):
        build("sampler", "x")
    with pytest.raises(
        ValueError, match=r"unknown config field\(s\) \['budgett'\]; allowed fields: \['budget'"
    ):
        build("selector", "random", budgett=0.5)
    with pytest.raises(ValueError, match="focus='mid'.*high, low, medium"):
        build("selector", "loss", focus="mid")


@pytest.mark.parametrize("bad", [0, -3, 1.5, True, "x"])
def test_update_step_must_be_positive_int(bad):
    with pytest.raises(ValueError, match="update_step.* must be a"):
        DataFlexConfig(selector="random", update_step=bad)


def test_yaml_strings_and_wrong_types_are_converted_or_named(tmp_path):
    """An audit found YAML strings ("1e-3") and wrong types reaching the methods (TypeError mid-run) or
    accepted silently (num_samples=2.5, update_step=True): numbers in strings are converted, the rest raise
    a ValueError naming the field."""
    path = tmp_path / "c.yaml"
    path.write_text("dataflex:\n  mixer: {name: doremi, smoothing: 1e-3, eta: 1.0}\n  ops_batch_size: '8'\n")
    cfg = DataFlexConfig.from_file(path)
    assert cfg.ops_batch_size == 8
    mx = build("mixer", cfg.mixer, **cfg.mixer_args)
    assert mx.smoothing == 1e-3 and isinstance(mx.smoothing, float)
    assert build("selector", "random", budget="0.5").budget == 0.5
    for kw, match in [
        ({"num_samples": 2.5}, "'num_samples' must be an int or None, got 2.5"),
        ({"seed": "x"}, "'seed' must be an int or None, got the string 'x'"),
        ({"ops_batch_size": True}, "'ops_batch_size' must be an int, got the boolean"),
    ]:
        with pytest.raises(ValueError, match=match):
            DataFlexConfig(selector="random", **kw)
    with pytest.raises(
        ValueError, match="weighter 'loss' field 'temperature' must be a float, got the string 'hot'"
    ):
        build("weighter", "loss", temperature="hot")


def test_method_args_without_method_or_given_twice():
    """mixer_args/weighter_args without their method, and an inline mapping overridden by *_args, were
    silently dropped / overridden (an audit found it)."""
    with pytest.raises(ValueError, match="mixer_args=.* is given but no mixer is set"):
        DataFlexConfig.from_dict({"selector": "random", "mixer_args": {"eta": 5.0}})
    with pytest.raises(ValueError, match="weighter_args=.* is given but no weighter is set"):
        DataFlexConfig(selector="random", weighter_args={"temperature": 0.1})
    with pytest.raises(ValueError, match=r"selector field\(s\) \['budget'\] are given both"):
        DataFlexConfig.from_dict(
            {"selector": {"name": "random", "budget": 0.9}, "selector_args": {"budget": 0.1}}
        )
    same = DataFlexConfig.from_dict(
        {"selector": {"name": "random", "budget": 0.9}, "selector_args": {"budget": 0.9}}
    )
    assert same.selector_args == {"budget": 0.9}


def test_other_config_errors():
    with pytest.raises(ValueError, match="choose one of them"):
        DataFlexConfig(selector="random", mixer="odm")
    with pytest.raises(ValueError, match="at least one of selector, mixer or weighter"):
        DataFlexConfig()
    with pytest.raises(ValueError, match="unknown DataFlex config key"):
        DataFlexConfig.from_dict({"selector": "random", "update_every": 3})
    with pytest.raises(ValueError, match="budget must be > 0"):
        build("selector", "random", budget=0)
    with pytest.raises(ValueError, match="needs target_dataset"):
        DataFlexCallback({"selector": "less"})
    with pytest.raises(ValueError, match="needs reference_model"):
        DataFlexCallback({"mixer": "doremi"})


def test_missing_domain_column_is_a_clear_error():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"input_ids": d["input_ids"], "source": d["domain"]} for d in DATA])
    with pytest.raises(
        ValueError, match=r"domain_column='domain' is not a column.*\['input_ids', 'source'\]"
    ):
        DataFlexCallback({"mixer": "odm"}, train_dataset=ds)
    with pytest.raises(ValueError, match=r"domain_column='topic' is not a key of the training samples"):
        DataFlexCallback({"mixer": "odm", "domain_column": "topic"}, train_dataset=DATA)
    # trainer: raised in __init__, before any training work
    from transformers import TrainingArguments

    from hf_ext.callbacks.dataflex.ops import default_collate
    from hf_ext.callbacks.dataflex.synthetic import tiny_model
    from hf_ext.callbacks.dataflex.trainer import DataFlexTrainer

    with pytest.raises(ValueError, match="domain_column='domain' is not a column"):
        DataFlexTrainer(
            model=tiny_model(),
            args=TrainingArguments("/tmp/df_bad", use_cpu=True, report_to=[]),
            train_dataset=ds,
            data_collator=default_collate,
            dataflex={"mixer": "odm"},
        )
    # selectors do not need domains
    assert DataFlexCallback({"selector": "random"}, train_dataset=ds).domain_ids is None
    cb = DataFlexCallback({"mixer": "odm"}, train_dataset=ds.rename_column("source", "domain"))
    assert cb.domain_names == ["clean", "noisy"]


def test_yaml_and_json_round_trip(tmp_path):
    y = tmp_path / "df.yaml"
    y.write_text(
        "dataflex:\n  selector: {name: less, budget: 0.3, proj_dim: 64}\n  warmup_step: 5\n"
        "  update_step: 10\n  update_times: 2\n"
    )
    cfg = DataFlexConfig.from_file(y)
    assert (cfg.selector, cfg.selector_args, cfg.update_times) == ("less", {"budget": 0.3, "proj_dim": 64}, 2)
    j = tmp_path / "df.json"
    cfg.save(j)
    assert DataFlexConfig.from_file(j) == cfg
    assert json.loads(j.read_text())["warmup_step"] == 5
    with pytest.raises(ValueError, match=r"must end in \.yaml, \.yml or \.json"):
        DataFlexConfig.from_file(tmp_path / "df.toml")


def test_schedule():
    cfg = DataFlexConfig(selector="random", warmup_step=5, update_step=10, update_times=2)
    steps = [s for s in range(60) if cfg.is_update_step(s, sum(cfg.is_update_step(t, 0) for t in range(s)))]
    assert steps == [5, 15]
    unlimited = DataFlexConfig(selector="random", warmup_step=0, update_step=7)
    assert [s for s in range(30) if unlimited.is_update_step(s, 0)] == [0, 7, 14, 21, 28]


def test_sampler_mixture_and_resume_replay():
    dom = [0] * 50 + [1] * 50
    s = DataFlexSampler(100, seed=1, domain_ids=dom)
    s.set_plan({"kind": "mixture", "weights": [0.9, 0.1]})
    first = list(s)
    assert 0.8 < sum(i < 50 for i in first) / 100 < 0.97
    s.set_epoch(1)
    it = iter(s)
    head = [next(it) for _ in range(30)]
    state = s.state_dict()
    s.set_plan({"kind": "subset", "indices": [7, 8]})  # takes effect at position 30
    tail = [next(it) for _ in range(20)]
    assert set(tail) <= {7, 8}
    # a resumed sampler (state saved before the new plan) replays positions < drawn, then uses the newest plan
    r = DataFlexSampler(100, seed=1, domain_ids=dom)
    r.load_state_dict(state)
    r.plans[max(r.plans) + 1] = {"kind": "subset", "indices": [7, 8]}
    r.current = max(r.plans)
    r.set_epoch(1)
    again = list(r)[:50]
    assert again[:30] == head and again[30:] == tail


def test_ignored_inputs_raise_or_warn(tmp_path):
    """An audit found inputs silently ignored: trainer arguments next to a ready DataFlexCallback, a sampler
    strategy DataFlex replaces, a misspelt domain_column, an all-zero dynamic schedule, unused datasets/models."""
    from hf_ext.callbacks.dataflex.ops import default_collate
    from hf_ext.callbacks.dataflex.synthetic import cpu_training_args, tiny_model
    from hf_ext.callbacks.dataflex.trainer import DataFlexTrainer

    data = make_mixture({"clean": 4, "noisy": 4}, seed=0)
    cb = DataFlexCallback({"selector": "random"}, train_dataset=data)

    def trainer(**kw):
        targs = kw.pop("targs", {})
        return DataFlexTrainer(
            model=tiny_model(),
            args=cpu_training_args(str(tmp_path), max_steps=1, **targs),
            train_dataset=data,
            data_collator=default_collate,
            **kw,
        )

    with pytest.raises(ValueError, match=r"\['target_dataset'\] would be ignored: dataflex= is a ready"):
        trainer(dataflex=cb, target_dataset=data)
    with pytest.raises(ValueError, match="dataflex_collate_fn"):
        trainer(dataflex=cb, dataflex_collate_fn=default_collate)
    with pytest.raises(
        ValueError, match="train_sampling_strategy='group_by_length' / group_by_length would be"
    ):
        trainer(dataflex={"selector": "random"}, targs=dict(train_sampling_strategy="group_by_length"))
    with pytest.raises(ValueError, match="domain_column='dom' is not a key"):
        DataFlexCallback({"selector": "random", "domain_column": "dom"}, train_dataset=data)
    for sched, match in [
        ([{"step": 0, "weights": [0, 0]}], "positive sum"),
        ([{"step": -5, "weights": [1, 1]}], "integer >= 0"),
        ([{"step": 0, "weights": {"clean": -1.0}}], "positive sum"),
    ]:
        with pytest.raises(ValueError, match=match):
            build("mixer", "dynamic", schedule=sched)
    with pytest.warns(UserWarning, match="target_dataset .* given but not used"):
        DataFlexCallback({"selector": "random"}, train_dataset=data, target_dataset=data)
    with pytest.warns(UserWarning, match="reference_model .* given but not used"):
        DataFlexCallback({"mixer": "odm"}, train_dataset=data, reference_model=tiny_model())


@pytest.mark.parametrize("cfg", [{"selector": "random"}, {"mixer": "odm"}], ids=["selector", "mixer"])
def test_an_iterable_training_dataset_is_a_clear_value_error(tmp_path, cfg):
    """A torch IterableDataset given to DataFlexTrainer / DataFlexCallback failed while the domains were read, with
    'TypeError: object of type ... has no len()'; it is now the ValueError explaining that DataFlex needs a map-style
    dataset (the one datasets' IterableDataset already got), raised before the Trainer is built."""
    from hf_ext.callbacks.dataflex.ops import default_collate
    from hf_ext.callbacks.dataflex.synthetic import cpu_training_args, tiny_model
    from hf_ext.callbacks.dataflex.trainer import DataFlexTrainer

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(DATA)

    match = r"DataFlex needs a map-style training dataset .*not an IterableDataset\), got Stream"
    with pytest.raises(ValueError, match=match):
        DataFlexCallback(cfg, train_dataset=Stream())
    with pytest.raises(ValueError, match=match):
        DataFlexTrainer(
            model=tiny_model(),
            args=cpu_training_args(str(tmp_path), max_steps=1),
            train_dataset=Stream(),
            data_collator=default_collate,
            dataflex=cfg,
        )


def test_dynamic_schedule_points_the_updates_cannot_apply_warn():
    """The dynamic mixer's weights change only at update steps, so a 'step' schedule point off the update grid took
    effect silently late (a switch at step 50 happened at step 100 with the default update_step) and points after the
    last update (update_times) never did. Both now give a UserWarning at construction; points on the grid do not."""
    import warnings

    mixer = {
        "name": "dynamic",
        "interpolation": "step",
        "schedule": [{"step": 0, "weights": [1, 0]}, {"step": 50, "weights": [0, 1]}],
    }
    with pytest.warns(
        UserWarning, match=r"step\(s\) \[50\] take effect at the next update step .* 0 \+ k \* 100"
    ):
        DataFlexCallback({"mixer": mixer})
    with pytest.warns(UserWarning, match=r"step\(s\) \[50\] come after the last update \(update_times=1\)"):
        DataFlexCallback({"mixer": mixer, "update_step": 25, "update_times": 1})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DataFlexCallback({"mixer": mixer, "update_step": 25})
        DataFlexCallback(
            {"mixer": {**mixer, "interpolation": "linear"}}
        )  # linear: exact at every update step


def test_initial_weights_can_name_their_domains():
    """A mixer's initial_weights was a bare list applied in the order of the sorted domain names, which nothing said:
    weights listed in dataset order ('web', 'code', 'books') silently went to other domains (web got books' 0.1). A
    {domain: weight} mapping is now accepted (unknown names are a ValueError listing the domains), and the list order
    is documented and named in the length error."""
    import numpy as np

    data = [{"input_ids": [1, 2], "domain": d} for d in ["web", "code", "books"] * 2]
    cb = DataFlexCallback(
        {"mixer": {"name": "odm", "initial_weights": {"web": 0.7, "code": 0.2, "books": 0.1}}},
        train_dataset=data,
    )
    assert cb.domain_names == ["books", "code", "web"]
    np.testing.assert_allclose(cb.weights, [0.1, 0.2, 0.7])
    with pytest.raises(ValueError, match=r"initial_weights names unknown domain\(s\) \['news'\]"):
        DataFlexCallback({"mixer": {"name": "odm", "initial_weights": {"news": 1.0}}}, train_dataset=data)
    with pytest.raises(ValueError, match="a list follows the sorted domain names"):
        DataFlexCallback({"mixer": {"name": "odm", "initial_weights": [1, 1]}}, train_dataset=data)
    with pytest.raises(ValueError, match="initial_weights must be a {domain: weight} mapping or a list"):
        build("mixer", "doremi", initial_weights={"web": -1.0})


def _draw_under_switching_plans(s: DataFlexSampler, switches: int) -> list[int]:
    """A new mixture plan before every drawn position (an update every step, drawn ahead), nothing trained."""
    it, drawn = iter(s), []
    for k in range(switches):
        s.set_plan({"kind": "mixture", "weights": [1.0 + k % 7, 1.0 + k % 5]})
        drawn.append(next(it))
    return drawn


def test_sampler_resume_is_exact_with_more_plan_switches_drawn_ahead_than_a_fixed_cap():
    """The history kept only the last 64 plan switches, so positions drawn ahead of the trained point under an older
    plan were replayed from another plan after a resume. Plans now stay while a position at or after the trained point
    uses them, with no fixed cap, and go once those positions are trained."""
    dom = [0] * 50 + [1] * 50
    s = DataFlexSampler(1000, seed=1, domain_ids=dom)
    drawn = _draw_under_switching_plans(s, 100)  # positions 0-99, each under its own plan
    s.set_trained(10)  # the checkpoint: positions 0-9 trained, 10-99 drawn ahead
    r = DataFlexSampler(1000, seed=1, domain_ids=dom)
    r.load_state_dict(s.state_dict())
    assert list(r)[10:100] == drawn[10:]
    s.set_trained(95)  # memory follows the drawn-ahead window
    assert len(s.history) == 5 and len(s.plans) == 5


def test_sampler_warns_when_its_memory_bound_makes_resume_inexact():
    dom = [0] * 50 + [1] * 50
    s = DataFlexSampler(1000, seed=1, domain_ids=dom, max_pending=8)
    with pytest.warns(UserWarning, match="resume inexact"):
        _draw_under_switching_plans(s, 12)
    assert len(s.history) == 8 and len(s.plans) == 8
