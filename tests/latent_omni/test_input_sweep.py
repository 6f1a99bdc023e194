"""Input sweep of LatentOmni's public config helpers: what a user gives is used or refused, never dropped."""

from __future__ import annotations

import pytest


def test_from_thinker_config_refuses_a_latent_kwarg_it_does_not_know():
    """from_thinker_config(thinker, num_visual_latent=16) (a typo of num_visual_latents) kept K=32 and stored the
    unknown key as a stray attribute: the setting was silently dropped."""
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniThinkerConfig

    from hf_ext.models.latent_omni import LatentOmniConfig

    thinker = Qwen2_5OmniThinkerConfig()
    with pytest.raises(ValueError, match=r"num_visual_latent\b.*num_visual_latents"):
        LatentOmniConfig.from_thinker_config(thinker, num_visual_latent=16)
    cfg = LatentOmniConfig.from_thinker_config(
        thinker, num_visual_latents=16, num_audio_latents=4, tie_word_embeddings=False
    )
    assert cfg.num_visual_latents == 16


@pytest.mark.parametrize(
    "argv, flag, low",
    [
        (["--steps", "0"], "--steps", 1),  # 'steps or K': silently K steps
        (["--steps", "-3"], "--steps", 1),
        (["--prompt-len", "0"], "--prompt-len", 1),  # 'or default': silently 128 tokens
        (["--layers", "0"], "--layers", 1),
        (["--batch", "1", "0"], "--batch", 1),  # failed inside the first run
        (["--visual-latents", "-1"], "--visual-latents", 0),
    ],
)
def test_bench_refuses_out_of_range_counts_before_building_a_model(argv, flag, low, capsys, monkeypatch):
    from hf_ext.models.latent_omni import bench

    def no_model(*a, **k):
        raise AssertionError("a model was built before the bad flag was refused")

    monkeypatch.setattr(bench, "_build", no_model)
    with pytest.raises(SystemExit) as exc:
        bench.main(["--mode", "cpu", "--no-write", *argv])
    assert exc.value.code == 2
    assert f"argument {flag}: must be >= {low}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"max_length": 0},
            r"max_length=0 is invalid; expected None or an int >= 1",
        ),  # refused at the 1st batch
        ({"max_length": 2.5}, r"max_length=2.5 is invalid"),
        ({"sampling_rate": 0}, r"sampling_rate=0 is invalid; expected an int >= 1"),  # empty audio segments
        ({"sampling_rate": -16000}, r"sampling_rate=-16000 is invalid"),
        ({"system_prompt": None}, r"system_prompt=None is invalid; expected a string"),
    ],
)
def test_collator_checks_its_arguments_at_construction(kwargs, match, processor):
    from hf_ext.models.latent_omni import LatentOmniDataCollator

    with pytest.raises(ValueError, match=match):
        LatentOmniDataCollator(processor, **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n": 0}, r"n=0 is invalid; expected an int >= 1"),  # an empty list
        ({"n": -1}, r"n=-1 is invalid"),
        ({"n": 2, "fps": 0}, r"fps=0 is invalid; expected a finite float > 0"),  # ZeroDivisionError
        (
            {"n": 2, "seed": -1},
            r"seed=-1 is invalid; expected an int >= 0",
        ),  # numpy's 'expected non-negative integer'
        ({"n": 2, "frames": 0}, r"frames=0 is invalid; expected an int >= 2"),  # clips without frames
        ({"n": 2, "size": 0}, r"size=0 is invalid; expected an int >= 1"),
        (
            {"n": 2, "seconds_audio": -1.0},
            r"seconds_audio=-1.0 is invalid; expected None or a finite float > 0",
        ),
    ],
)
def test_synthetic_records_check_their_arguments(kwargs, match):
    from hf_ext.models.latent_omni import make_synthetic_records

    with pytest.raises(ValueError, match=match):
        make_synthetic_records(**kwargs)


def test_write_synthetic_jsonl_refuses_bad_arguments_before_touching_the_folder(tmp_path):
    """The folder was created and an existing train.jsonl truncated before the records were made."""
    from hf_ext.models.latent_omni.collator import write_synthetic_jsonl

    (tmp_path / "train.jsonl").write_text("kept\n")
    with pytest.raises(ValueError, match=r"n=0 is invalid"):
        write_synthetic_jsonl(tmp_path, 0)
    with pytest.raises(ValueError, match=r"fps=0 is invalid"):
        write_synthetic_jsonl(tmp_path / "new", 2, fps=0)
    assert (tmp_path / "train.jsonl").read_text() == "kept\n"
    assert not (tmp_path / "media").exists() and not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_slots": 2.5}, r"energy_pool: num_slots=2.5 must be an int >= 1"),  # torch's TypeError
        ({"num_slots": True}, r"energy_pool: num_slots=True must be an int >= 1"),
        ({"num_slots": 2, "eps": -1.0}, r"energy_pool: eps=-1.0 must be a finite float >= 0"),  # weights <= 0
        (
            {"num_slots": 2, "eps": float("nan")},
            r"energy_pool: eps=nan must be a finite float >= 0",
        ),  # NaN slots
    ],
)
def test_energy_pool_checks_its_arguments(kwargs, match):
    import torch

    from hf_ext.models.latent_omni import energy_pool

    with pytest.raises(ValueError, match=match):
        energy_pool(torch.randn(1, 6, 4), **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"use_ospe": "no"}, r"ospe_position_ids: use_ospe='no' must be True or False"),  # truthy: OSPE used
        ({"audio_time_stride": 0}, r"ospe_position_ids: audio_time_stride=0 must be an int >= 1"),  # all at B
        ({"num_visual": -1}, r"ospe_position_ids: num_visual=-1 must be an int >= 0"),  # torch's RuntimeError
        ({"num_audio": 1.5}, r"ospe_position_ids: num_audio=1.5 must be an int >= 0"),
    ],
)
def test_ospe_position_ids_checks_its_arguments(kwargs, match):
    from hf_ext.models.latent_omni import ospe_position_ids

    args = {"num_visual": 8, "num_audio": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        ospe_position_ids(5, args.pop("num_visual"), args.pop("num_audio"), **args)
