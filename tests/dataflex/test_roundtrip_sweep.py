"""Round trips of what DataFlex saves: DataFlexConfig.save / from_file and the checkpoint state."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hf_ext.callbacks.dataflex.config import DataFlexConfig


@pytest.mark.parametrize("ext", ["yaml", "json"])
@pytest.mark.parametrize("value", [np.float32(0.5), np.float64(0.5)], ids=["float32", "float64"])
def test_config_with_numpy_scalars_saves_and_loads(tmp_path, ext, value):
    cfg = DataFlexConfig(selector="random", selector_args={"budget": value}, seed=7, update_times=2)
    path = tmp_path / f"dätä cfg.{ext}"
    cfg.save(path)
    back = DataFlexConfig.from_file(path)
    assert back == cfg
    assert type(back.selector_args["budget"]) is float
    before = path.read_bytes()
    back.save(path)
    assert path.read_bytes() == before


def test_a_failed_save_leaves_the_existing_file_alone(tmp_path):
    path = tmp_path / "cfg.json"
    DataFlexConfig(selector="random").save(path)
    before = path.read_bytes()
    cfg = DataFlexConfig(selector="random", selector_args={"budget": object()})
    with pytest.raises(TypeError):
        cfg.save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json"]


def test_save_refuses_an_extension_from_file_cannot_read(tmp_path):
    with pytest.raises(ValueError, match=r"must end in \.yaml, \.yml or \.json"):
        DataFlexConfig(selector="random").save(tmp_path / "cfg.txt")
    assert not (tmp_path / "cfg.txt").exists()


def _loss_callback():
    from datasets import Dataset

    from hf_ext.callbacks.dataflex.callback import DataFlexCallback
    from hf_ext.callbacks.dataflex.synthetic import make_mixture

    ds = Dataset.from_list(make_mixture({"clean": 8, "noisy": 8}))
    return DataFlexCallback({"selector": "delta_loss"}, train_dataset=ds)


def test_checkpoint_state_with_numpy_values_of_a_custom_method_saves_and_loads(tmp_path):
    # a registered method keeping numpy scalars in its state_dict (its docstring asks for JSON-able state)
    cb = _loss_callback()
    cb.selector.state_dict = lambda: {
        "prev_index": [np.int64(3)],
        "prev_loss": [np.float32(0.5)],
        "prev_step": 2,
    }
    path = cb.save_state(str(tmp_path))
    again = _loss_callback()
    again.load_state(str(tmp_path))
    assert again.selector._prev == {3: 0.5} and again.selector._prev_step == 2
    before = Path(path).read_bytes()
    cb.save_state(str(tmp_path))
    assert Path(path).read_bytes() == before


def test_a_failed_checkpoint_state_save_leaves_the_previous_file(tmp_path):
    cb = _loss_callback()
    path = cb.save_state(str(tmp_path))
    before = Path(path).read_bytes()
    cb.selector.state_dict = lambda: {"memo": object()}
    with pytest.raises(TypeError):
        cb.save_state(str(tmp_path))
    assert Path(path).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataflex_state.json"]


@pytest.mark.parametrize("ext", ["yaml", "json"])
def test_a_dynamic_schedule_keyed_by_integer_domain_labels_works_before_and_after_a_save(tmp_path, ext):
    # domain labels 0 / 1 (an int column) become the names '0' / '1'; a YAML `weights: {0: 0.9, 1: 0.1}` has int
    # keys, which a saved file turns into strings: both must give the same weights
    from datasets import Dataset

    from hf_ext.callbacks.dataflex.callback import DataFlexCallback
    from hf_ext.callbacks.dataflex.synthetic import make_mixture

    ds = Dataset.from_list(make_mixture({"clean": 8, "noisy": 8}))
    cfg = DataFlexConfig(mixer="dynamic", mixer_args={"schedule": [{"step": 0, "weights": {0: 0.9, 1: 0.1}}]})
    path = tmp_path / f"cfg.{ext}"
    cfg.save(path)
    for c in (cfg, DataFlexConfig.from_file(path)):
        cb = DataFlexCallback(c, train_dataset=ds, domains=[0] * 8 + [1] * 8)
        np.testing.assert_allclose(cb.mixer.init_weights(cb.domain_names), [0.9, 0.1])
