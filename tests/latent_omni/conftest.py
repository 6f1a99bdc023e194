"""Fixtures for the LatentOmni tests (tiny random models, CPU)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def model():
    from hf_ext.models.latent_omni.tiny import tiny_latent_omni

    return tiny_latent_omni(seed=0)


@pytest.fixture
def processor():
    from hf_ext.models.latent_omni.tiny import tiny_latent_omni_processor

    return tiny_latent_omni_processor()


@pytest.fixture
def cfg(model):
    return model.config


def block_ids(cfg, prefix=(1, 30, 31, 32), suffix=(40, 41, 2)):
    """``prefix <UL> pad*K </UL> suffix`` as a [1, L] tensor."""
    k = cfg.num_latents
    ids = (
        list(prefix) + [cfg.latent_start_token_id] + [cfg.latent_pad_token_id] * k + [cfg.latent_end_token_id]
    )
    return torch.tensor([ids + list(suffix)])
