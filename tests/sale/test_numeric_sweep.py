"""SALE on the dtypes users load models in: calibration in bfloat16 against float32."""

from __future__ import annotations

import torch
import transformers as tf

from hf_ext.attention.sale import SALEConfig, calibrate
from tests.sale._models import rand_ids


def test_bfloat16_calibration_matches_float32_where_attention_outputs_are_large():
    """The error budget compared the sparse output with the model's dense (sdpa) output: in bfloat16 their rounding
    differs by about an ulp of |out| per element, summed over head_dim, which alone broke theta * N once outputs were
    large (mean |out| ~4.8 at head_dim 128 here): every head was made dense (tau 0) while float32 and float16 both
    calibrated tau 0.002."""
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=128,
        max_position_embeddings=1024,
    )
    base = tf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        base.model.layers[0].self_attn.v_proj.weight.mul_(200)  # large attention outputs
    ids = rand_ids(512)
    sale = SALEConfig(block_q=64, block_k=64, local_window=64)
    taus = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = tf.LlamaForCausalLM(cfg).eval()
        model.load_state_dict(base.state_dict())
        taus[dtype] = calibrate(model.to(dtype), ids, config=sale).taus
    assert taus[torch.float32] == [[0.002, 0.002]]
    assert taus[torch.bfloat16] == taus[torch.float32]
