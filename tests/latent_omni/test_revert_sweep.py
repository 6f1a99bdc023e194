"""LatentOmni: what a failed LatentOmniProcessor.update_config leaves on the config."""

from __future__ import annotations

import copy

import pytest


def test_update_config_that_fails_validation_changes_nothing(model, processor):
    """update_config wrote the processor's ids and latent counts into the config and only then validated: a refused
    update (a latent id that is also the text model's pad id) left the config holding the processor's
    num_visual_latents (and ids) next to the ValueError."""
    cfg = copy.deepcopy(model.config)
    cfg.num_visual_latents = 4  # the processor has 8
    cfg.get_text_config().pad_token_id = processor.latent_end_token_id
    before = cfg.to_dict()
    with pytest.raises(ValueError, match="latent_end_token_id"):
        processor.update_config(cfg)
    assert cfg.to_dict() == before
