"""Regression tests for bugs found by a LatentOmni correctness audit (each failed before its fix)."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize(
    "field", ["output_scores", "output_logits", "output_attentions", "output_hidden_states"]
)
def test_latent_generate_refuses_output_fields_it_cannot_return(model, cfg, field):
    """output_scores=True & co. were accepted and silently dropped: the returned LatentOmniGenerateOutput had no
    `scores` (AttributeError later). They are a ValueError naming the field; False / None stay accepted."""
    prompt = torch.tensor([[1, 30, 31, cfg.latent_start_token_id]])
    with pytest.raises(ValueError, match=field):
        model.generate(prompt, max_new_tokens=3, return_dict_in_generate=True, **{field: True})
    out = model.generate(prompt, max_new_tokens=3, return_dict_in_generate=True, **{field: False})
    assert out.sequences.shape == (1, 7)
