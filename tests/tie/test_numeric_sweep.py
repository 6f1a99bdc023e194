"""Numerical robustness of the log-t law code on the inputs a user hands it: float32 / float16 arrays and torch
tensors (the predictor's forward outputs, possibly bfloat16 or still attached to the graph) instead of float64
numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_ext.generation.tie import distribution as D

MU, SIGMA, NU = np.array([3.0, 4.0, 5.5]), np.array([0.5, 0.8, 1.2]), np.array([3.5, 3.5, 6.0])


def _torch(a: np.ndarray, dtype: torch.dtype, grad: bool = False) -> torch.Tensor:
    return torch.tensor(a, dtype=dtype, requires_grad=grad)


@pytest.mark.parametrize(
    "dtype, grad",
    [(torch.float32, False), (torch.bfloat16, False), (torch.float16, False), (torch.float32, True)],
    ids=["f32", "bf16", "f16", "f32-requires-grad"],
)
def test_law_functions_take_torch_tensors_of_any_float_dtype(dtype, grad):
    """tie_score(**predictor.model(...)) on a bfloat16 predictor raised 'Got unsupported ScalarType BFloat16', and
    on outputs still attached to the graph 'Can't call numpy() on Tensor that requires grad'."""
    mu, sigma, nu = (_torch(a, dtype, grad) for a in (MU, SIGMA, NU))
    # the reference: the same (rounded) values as float64 numpy
    mu64, sigma64, nu64 = (t.detach().double().numpy() for t in (mu, sigma, nu))
    checks = [
        (D.expected_length(mu, sigma, nu, 1024), D.expected_length(mu64, sigma64, nu64, 1024)),
        (D.cvar_length(mu, sigma, nu, 0.9, 1024), D.cvar_length(mu64, sigma64, nu64, 0.9, 1024)),
        (D.per_token_index(mu, sigma, nu, 1024), D.per_token_index(mu64, sigma64, nu64, 1024)),
        (
            D.tie_score(mu, sigma, nu, beta=_torch(np.ones(3), dtype, grad)),
            D.tie_score(mu64, sigma64, nu64, 1.0),
        ),
        (D.LogT(mu, sigma, nu).ppf(0.5), D.LogT(mu64, sigma64, nu64).ppf(0.5)),
        (
            D.pit(_torch(np.array([10.0, 60.0, 300.0]), dtype), mu, sigma, nu),
            D.pit([10.0, 60.0, 300.0], mu64, sigma64, nu64),
        ),
    ]
    for got, want in checks:
        assert isinstance(got, np.ndarray) and got.dtype == np.float64
        np.testing.assert_allclose(got, want, rtol=1e-12)


def test_cvar_takes_a_torch_or_numpy_scalar_alpha():
    """cvar_length(alpha=torch.tensor(0.9)) passed the range check and failed later with 'unsupported operand
    type(s) for -: numpy.ndarray and Tensor'."""
    want = D.cvar_length(MU, SIGMA, NU, 0.9, 1024)
    np.testing.assert_allclose(
        D.cvar_length(MU, SIGMA, NU, torch.tensor(0.9, dtype=torch.float64), 1024), want
    )
    np.testing.assert_allclose(D.cvar_length(MU, SIGMA, NU, np.float64(0.9), 1024), want)


def test_fit_takes_bfloat16_lengths():
    lengths = np.array([12.0, 30.0, 44.0, 80.0, 128.0, 400.0])
    want = D.LogT.fit(lengths)
    got = D.LogT.fit(torch.tensor(lengths, dtype=torch.bfloat16))  # these values are exact in bfloat16
    np.testing.assert_allclose([got.mu, got.sigma, got.nu], [want.mu, want.sigma, want.nu], rtol=1e-9)


def test_predictor_fit_refuses_float16_parameters_before_any_change():
    """fit on a float16 predictor turned its weights NaN at the first AdamW step (eps 1e-8 is 0 in float16) and
    returned {'loss': [1.54, nan, nan]} without an error: the predictor was marked fitted and predict then failed."""
    from hf_ext.generation.tie.predictor import LengthPredictor, PredictorConfig

    data = {
        "prompt": [f"hello {'world ' * i}" for i in range(1, 9)],
        "output_len": [10, 20, 40, 80, 160, 320, 640, 1280],
    }
    p = LengthPredictor(PredictorConfig.tiny(kind="logt"))
    p.model.half()
    before = {k: v.clone() for k, v in p.model.state_dict().items()}
    y_mean = p.model.config.y_mean
    with pytest.raises(ValueError, match="cannot train float16 parameters"):
        p.fit(data)
    assert not p.fitted and p.model.config.y_mean == y_mean
    assert all(torch.equal(before[k], v) for k, v in p.model.state_dict().items())
    p.model.to(torch.bfloat16)  # bfloat16 trains (finite weights and predictions)
    history = p.fit(data)["loss"]
    assert np.all(np.isfinite(history)) and np.all(np.isfinite(p.predict(data["prompt"])["mu"]))
