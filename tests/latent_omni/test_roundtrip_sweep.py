"""Round trips of what LatentOmni saves: the processor's settings."""

from __future__ import annotations

import numpy as np

from hf_ext.models.latent_omni import LatentOmniProcessor
from hf_ext.models.latent_omni.tiny import tiny_latent_omni_processor


def test_a_processor_with_numpy_image_statistics_saves_and_loads(tmp_path):
    mean = np.array([0.1, 0.2, 0.3], dtype=np.float32)  # e.g. computed from a dataset
    std = np.array([0.5, 0.25, 0.125], dtype=np.float32)
    proc = tiny_latent_omni_processor(image_mean=mean, image_std=std, fps=np.float32(1.5))
    path = tmp_path / "prøc"
    proc.save_pretrained(path)
    again = LatentOmniProcessor.from_pretrained(path)
    assert again.image_mean == [float(x) for x in mean] == proc.image_mean
    assert again.image_std == [float(x) for x in std] == proc.image_std
    assert again.fps == 1.5
    before = (path / "processor_config.json").read_bytes()
    again.save_pretrained(path)
    assert (path / "processor_config.json").read_bytes() == before
