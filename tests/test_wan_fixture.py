"""The tiny diffusers Wan fixtures build and run on CPU (used by AdaSpa tests)."""

import pytest

pytest.importorskip("diffusers")


def test_tiny_wan_pipeline_runs():
    from hf_ext.testing import tiny_wan_pipeline

    pipe = tiny_wan_pipeline()
    frames = pipe(
        "a cat",
        num_inference_steps=2,
        height=16,
        width=16,
        num_frames=5,
        output_type="pt",
        guidance_scale=1.0,
    ).frames
    assert frames.shape == (1, 5, 3, 16, 16)
