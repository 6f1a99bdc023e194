"""The shape model against real transformers models built from tiny configs (meta device / CPU, fast).

The planner used to read every config as Llama with ``head_dim = hidden_size / num_attention_heads`` and full
causal attention: Qwen3 / Gemma configs with an explicit ``head_dim`` got wrong parameter counts, FLOPs and
activations, and sliding-window layers were charged the whole causal prefix.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from hf_ext.accelerate.autoparallel.cost_model import CostModel, LayerStrategy, ParallelConfig, TrainingSpec
from hf_ext.accelerate.autoparallel.profiler import HardwareProfile, analytic_layer_act_bytes
from hf_ext.accelerate.autoparallel.search import SearchConfig, search
from hf_ext.accelerate.autoparallel.shapes import ModelShape, get_shape

BASE = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4)


def _config(kind: str, **extra: Any) -> Any:
    import transformers as tf

    configs = {
        # head_dim 32 != 64 / 4: q / o are 64 x 128, k / v 64 x 64, plus q_norm / k_norm of 32
        "qwen3": lambda: tf.Qwen3Config(**BASE, num_key_value_heads=2, head_dim=32),
        "qwen3_bias": lambda: tf.Qwen3Config(**BASE, num_key_value_heads=2, head_dim=8, attention_bias=True),
        "qwen2": lambda: tf.Qwen2Config(**BASE, num_key_value_heads=2),  # q / k / v biases
        "gemma": lambda: tf.GemmaConfig(**BASE, num_key_value_heads=1, head_dim=24),
        "gemma2": lambda: tf.Gemma2Config(**BASE, num_key_value_heads=2, head_dim=24),  # 4 norms per layer
        "gemma3": lambda: tf.Gemma3TextConfig(**BASE, num_key_value_heads=2, head_dim=24),  # + q / k norm
        "mistral": lambda: tf.MistralConfig(**BASE, num_key_value_heads=2, head_dim=8),
        "llama_bias": lambda: tf.LlamaConfig(
            **BASE, num_key_value_heads=2, head_dim=8, attention_bias=True, mlp_bias=True
        ),
    }
    cfg = configs[kind]()
    for k, v in extra.items():
        setattr(cfg, k, v)
    return cfg


def _meta_model(cfg: Any) -> Any:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


KINDS = ["qwen3", "qwen3_bias", "qwen2", "gemma", "gemma2", "gemma3", "mistral", "llama_bias"]


@pytest.mark.parametrize("kind", KINDS)
def test_param_count_equals_the_built_model(kind):
    """Whole model and one layer, from the config object and from its config.json dict."""
    cfg = _config(kind)
    model = _meta_model(cfg)
    shape = get_shape(cfg)
    assert shape.num_params() == sum(p.numel() for p in model.parameters()), kind
    layer = model.model.layers[0]
    assert shape.layer_params() == sum(p.numel() for p in layer.parameters()), kind
    assert shape.head_dim == (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    assert get_shape(cfg.to_dict()) == shape  # a config.json reads the same


def test_head_dim_survives_json_and_old_dicts_default_to_h_over_a():
    shape = get_shape(_config("qwen3"))
    assert (shape.head_dim, shape.q_dim, shape.kv_dim) == (32, 128, 64)
    assert ModelShape.from_dict(shape.to_dict()) == shape
    old = {k: v for k, v in shape.to_dict().items() if k not in ("head_dim", "extra_layer_params")}
    assert ModelShape.from_dict(old).head_dim == 16  # a plan written before head_dim was recorded
    with pytest.raises(ValueError, match="head_dim"):
        ModelShape("x", 1, 64, 128, 4, 2, 100, head_dim=0)
    # with an explicit head_dim the hidden size need not be heads * head_dim
    assert ModelShape("x", 1, 60, 128, 4, 2, 100, head_dim=32).q_dim == 128


def _counted_flops(layer: Any, x: torch.Tensor, kwargs: dict[str, Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        layer(x, **kwargs)
    return fc.get_total_flops()


@pytest.mark.parametrize("kind", ["qwen3", "gemma2", "mistral"])
def test_layer_flops_match_a_flop_counter_on_the_real_layer(kind):
    """torch's FLOP counter on one real decoder layer (eager attention: dense s x s scores) counts the
    projections at their real widths and QK^T / PV over the whole square; the shape model counts the causal
    half, so counter = model + 2 * tokens * s * q_dim. Short sequences: no window is in play."""
    cfg = _config(kind)
    cfg._attn_implementation = "eager"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(cfg)
    s, b = 16, 2
    captured: dict[str, Any] = {}

    def grab(mod: Any, args: tuple, kwargs: dict) -> None:
        captured.setdefault("kwargs", kwargs)

    layer = model.model.layers[0]
    h = layer.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 100, (b, s)), use_cache=False)
    h.remove()
    kw = {k: v for k, v in captured["kwargs"].items() if k not in ("hidden_states", "past_key_values")}
    with torch.no_grad():
        counted = _counted_flops(layer, torch.randn(b, s, cfg.hidden_size), kw)
    shape = get_shape(cfg)
    tokens = b * s
    assert shape.layer_flops_fwd(tokens, s, 0) + 2 * tokens * s * shape.q_dim == counted


def test_activation_bytes_use_the_real_q_and_kv_widths():
    """q and the attention output are heads * head_dim wide, k / v kv_heads * head_dim: with head_dim 32
    (twice h / a) the tp-sharded activations grow by 6 bytes/token per extra q / kv column."""
    wide = get_shape(_config("qwen3"))
    narrow = ModelShape.from_dict({**wide.to_dict(), "head_dim": 16})
    rep_w, shd_w = analytic_layer_act_bytes(wide, 10)
    rep_n, shd_n = analytic_layer_act_bytes(narrow, 10)
    assert rep_w == rep_n
    assert shd_w - shd_n == 10 * 6 * ((wide.q_dim - narrow.q_dim) + (wide.kv_dim - narrow.kv_dim))


# --------------------------------------------------------------------------------------- sliding window
def _sliding(kind: str) -> Any:
    import transformers as tf

    four = dict(BASE, num_hidden_layers=4, num_key_value_heads=2)
    return {
        "mistral": lambda: tf.MistralConfig(**four, sliding_window=8),  # every layer
        "qwen2": lambda: tf.Qwen2Config(
            **four, use_sliding_window=True, sliding_window=8, max_window_layers=2
        ),
        "qwen3": lambda: tf.Qwen3Config(
            **four, head_dim=16, use_sliding_window=True, sliding_window=8, max_window_layers=3
        ),
        "qwen2_off": lambda: tf.Qwen2Config(**four, use_sliding_window=False, sliding_window=8),
        "gemma2": lambda: tf.Gemma2Config(**four, head_dim=16, sliding_window=8),  # layers 0, 2
        "gemma3": lambda: tf.Gemma3TextConfig(
            **dict(four, num_hidden_layers=7), head_dim=16, sliding_window=8
        ),
    }[kind]()


def _mask_keys_per_layer(cfg: Any, s: int) -> list[float]:
    """Mean keys each query attends to, per layer, read from the masks transformers passes each layer."""
    from transformers import AutoModelForCausalLM

    cfg._attn_implementation = "eager"  # the eager path always materialises the additive mask
    model = AutoModelForCausalLM.from_config(cfg)
    keys: dict[int, float] = {}

    def hook(i: int) -> Any:
        def grab(mod: Any, args: tuple, kwargs: dict) -> None:
            m = kwargs["attention_mask"][0, 0]  # [s, s]
            allowed = m == 0 if m.dtype != torch.bool else m
            keys[i] = float(allowed.sum()) / s

        return grab

    for i, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(hook(i), with_kwargs=True)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 100, (1, s)), use_cache=False)
    return [keys[i] for i in range(len(model.model.layers))]


@pytest.mark.parametrize("kind", ["mistral", "qwen2", "qwen3", "qwen2_off", "gemma2", "gemma3"])
def test_sliding_layers_follow_the_masks_transformers_builds(kind):
    """Per layer, the modelled attended keys equal those of the mask the real model gives the layer (the
    continuous formula is within half a key of the discrete count), and a config.json without
    ``layer_types`` (older transformers) resolves to the same layers."""
    cfg = _sliding(kind)
    s = 64
    shape = get_shape(cfg)
    real = _mask_keys_per_layer(cfg, s)
    for i, r in enumerate(real):
        assert shape.attended_keys(s, i) == pytest.approx(r, abs=0.51), (kind, i, real)
    expected = {
        "mistral": (0, 1, 2, 3),
        "qwen2": (2, 3),
        "qwen3": (3,),
        "qwen2_off": (),
        "gemma2": (0, 2),
        "gemma3": (0, 1, 2, 3, 4, 6),
    }[kind]
    assert shape.sliding_layers == expected
    d = cfg.to_dict()
    d.pop("layer_types", None)
    assert get_shape(d).sliding_layers == expected, kind
    # sequences within the window: plain causal attention everywhere
    assert all(shape.attended_keys(8, i) == 4.0 for i in range(shape.num_layers))


def test_windowed_layers_cost_less_time_at_long_sequences():
    """Gemma2 at s = 8 * w: the windowed layers (0, 2) do far less attention work, so their modelled time
    is lower, the mean-layer FLOPs (MFU) drop, and the search still matches the cost model per layer."""
    cfg = _sliding("gemma2")
    shape = get_shape(cfg)
    full = ModelShape.from_dict({**shape.to_dict(), "sliding_window": None, "sliding_layers": []})
    spec = TrainingSpec(global_batch=2, seq_len=64)
    hw = HardwareProfile.cpu()
    pc = ParallelConfig(gpus=1, pp=1, tp=1, sp=False, micro_batch=1, num_micro_batches=2, dp_type="fsdp")
    cm, cm_full = CostModel(shape, hw, spec), CostModel(full, hw, spec)
    st = LayerStrategy(0, False)
    t = [cm.layer_terms(pc, st, i).mb_ms for i in range(4)]
    assert t[0] == t[2] < t[1] == t[3] == cm_full.layer_terms(pc, st, 1).mb_ms
    assert shape.layer_flops_fwd(64, 64) < full.layer_flops_fwd(64, 64)
    stages = [[st] * 4]
    assert cm.evaluate(pc, stages).step_ms < cm_full.evaluate(pc, stages).step_ms
    res = search(shape, SearchConfig(gpus=1, memory_gb=16, global_batch=2, seq_len=64), hardware=hw)
    again = cm.evaluate(res.best.config, res.best.stage_strategies(), 16).step_ms
    assert res.best.predicted["step_ms"] == pytest.approx(again)
