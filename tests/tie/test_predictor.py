"""Length predictors: log-t NLL training beats a constant predictor; baselines train; save/load; bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hf_ext.generation.tie.config import PredictorConfig
from hf_ext.generation.tie.data import generate_workload, match_to_lengths, to_dataset
from hf_ext.generation.tie.distribution import crps_length, crps_log
from hf_ext.generation.tie.predictor import (
    LengthPredictor,
    constant_logt_baseline,
    listmle_loss,
    logt_nll,
    pairwise_loss,
)


@pytest.fixture(scope="module")
def splits():
    return to_dataset(generate_workload(640, seed=11)), to_dataset(generate_workload(300, seed=12))


@pytest.fixture(scope="module")
def logt_predictor(splits):
    torch.set_num_threads(1)
    p = LengthPredictor(PredictorConfig.tiny(kind="logt"))
    p.fit(splits[0])
    return p


def test_logt_predictor_beats_constant_nll(logt_predictor, splits):
    train, test = splits
    mu0, s0, nu0 = constant_logt_baseline(train["output_len"])
    y = torch.tensor(np.log(np.asarray(test["output_len"], dtype=np.float64)))
    const_nll = float(logt_nll(y, torch.tensor(mu0), torch.tensor(s0), torch.tensor(nu0)).mean())
    ev = logt_predictor.evaluate(test, max_new_tokens=1000)
    assert ev["nll"] < const_nll - 0.15, (ev, const_nll)
    assert ev["spearman"] > 0.4
    assert 0.3 < ev["coverage90"] <= 1.0
    lens = np.asarray(test["output_len"], dtype=np.float64)
    assert ev["crps_log"] < float(crps_log(np.log(lens), mu0, s0, nu0).mean())
    assert ev["crps_tokens"] < float(crps_length(lens, mu0, s0, nu0, 1000).mean())
    with pytest.raises(ValueError, match="max_new_tokens"):
        logt_predictor.evaluate(test, max_new_tokens=0)


def test_save_and_load_roundtrip(logt_predictor, tmp_path):
    prompts = ["Write a detailed essay about climate change.", "What is 3 times 4?"]
    logt_predictor.save_pretrained(tmp_path / "pred")
    again = LengthPredictor.from_pretrained(tmp_path / "pred")
    a, b = logt_predictor.predict(prompts), again.predict(prompts)
    assert {k: v.shape for k, v in again.predict([]).items()} == {"mu": (0,), "sigma": (0,), "nu": (0,)}
    for k in ("mu", "sigma", "nu"):
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["point", "ltr"])
def test_baseline_predictors_learn_the_order(kind, splits):
    torch.set_num_threads(1)
    p = LengthPredictor(PredictorConfig.tiny(kind=kind))
    p.fit(splits[0])
    ev = p.evaluate(splits[1], max_new_tokens=1000)
    assert ev["spearman"] > 0.4, ev
    if kind == "point":  # a point forecast's CRPS is its absolute error
        assert ev["crps_log"] == ev["mae_log"]
        lens = np.clip(np.asarray(splits[1]["output_len"], dtype=np.float64), 1, 1000)
        mu = p.predict(splits[1]["prompt"])["mu"]
        assert ev["crps_tokens"] == pytest.approx(float(np.mean(np.abs(np.clip(np.exp(mu), 1, 1000) - lens))))
    assert set(p.predict(["hello there"])) == ({"mu"} if kind == "point" else {"score"})
    empty = p.predict([])  # no prompts: the same keys, empty (was {})
    assert set(empty) == set(p.predict(["hello there"])) and all(v.shape == (0,) for v in empty.values())


def test_ranking_losses_prefer_the_right_order():
    y = torch.tensor([1.0, 2.0, 3.0, 4.0])
    good, bad = y.clone(), -y
    assert listmle_loss(good, y) < listmle_loss(bad, y)
    assert pairwise_loss(good, y) < pairwise_loss(bad, y)


def test_matcher_keeps_lengths_and_couples_prompts():
    pool = generate_workload(400, seed=3)
    lengths = [3, 3, 3, 900, 900, 900]
    rows = match_to_lengths(lengths, pool, seed=0)
    assert [r["output_len"] for r in rows] == lengths
    short_mu = np.mean([r["mu"] for r in rows[:3]])
    long_mu = np.mean([r["mu"] for r in rows[3:]])
    assert long_mu - short_mu > 2.0


def test_workload_has_no_numeric_label_leak_and_heavy_tail():
    rows = generate_workload(3000, seed=0)
    lens = np.array([r["output_len"] for r in rows])
    assert not any(str(r["output_len"]) + " tokens" in r["prompt"] for r in rows)
    assert np.percentile(lens, 99) / np.median(lens) > 5  # heavy tail


def test_bad_input():
    p = LengthPredictor(PredictorConfig.tiny(kind="logt"))
    with pytest.raises(ValueError, match="empty"):
        p.predict(["fine", ""])
    with pytest.raises(ValueError, match="output_len"):
        p.fit({"prompt": ["a", "b"], "output_len": [3, float("nan")]})
    with pytest.raises(ValueError, match="output_len must hold one finite length >= 1"):  # was NaN metrics
        p.evaluate({"prompt": ["a", "b", "c"], "output_len": [0, 5, -3]})
    with pytest.raises(ValueError, match="kind"):
        PredictorConfig(kind="quantile")
    with torch.no_grad():
        for prm in p.model.head.parameters():
            prm.fill_(float("nan"))
    p.fitted = True
    with pytest.raises(ValueError, match="non-finite"):
        p.predict(["a prompt"])


def test_student_t_log_sf_matches_scipy_with_gradients():
    from scipy import stats

    from hf_ext.generation.tie.predictor import student_t_log_sf

    for nu in (2.0, 3.5, 8.0, 30.0):
        z = torch.linspace(-30, 60, 91, dtype=torch.float64)
        got = student_t_log_sf(z, torch.tensor(nu, dtype=torch.float64)).numpy()
        np.testing.assert_allclose(np.exp(got), stats.t.sf(z.numpy(), nu), rtol=1e-6)
    z = torch.tensor([-1.0, 0.3, 2.0], dtype=torch.float64, requires_grad=True)
    student_t_log_sf(z, torch.tensor(3.5, dtype=torch.float64)).sum().backward()
    want = -np.exp(stats.t.logpdf([-1.0, 0.3, 2.0], 3.5) - stats.t.logsf([-1.0, 0.3, 2.0], 3.5))
    np.testing.assert_allclose(z.grad.numpy(), want, rtol=1e-6)


def test_censored_training_keeps_the_tail_of_capped_lengths():
    """Half the long answers hit the cap: treated as exact lengths the fitted spread collapses; as right-censored
    (censor_at) the predictor keeps the true spread and the chance of reaching the cap."""
    from scipy import stats

    rng = np.random.default_rng(0)
    topics = ["rome", "paris", "cats", "rivers", "music", "trains", "stars", "bread"]
    prompts, lens, long_capped = [], [], []
    for k in rng.integers(0, 2, 400):
        t = topics[rng.integers(0, len(topics))]
        short = k == 0
        prompts.append(
            f"Answer briefly: what is {t}?" if short else f"Write a detailed long essay about {t}."
        )
        x = math.exp(math.log(20 if short else 300) + 0.4 * rng.standard_t(3.5))
        lens.append(int(min(max(1, round(x)), 300)))
        if not short:
            long_capped.append(lens[-1] >= 300)
    data = {"prompt": prompts, "output_len": lens}
    fits = {}
    for cens in (None, 300):
        p = LengthPredictor(PredictorConfig.tiny(epochs=6, censor_at=cens))
        p.fit(data)
        fits[cens] = p.predict(["Write a detailed long essay about rome."])
    assert fits[None]["sigma"][0] < 0.25  # the cap squeezed the spread (true 0.4)
    got = fits[300]
    assert 0.3 < got["sigma"][0] < 0.6
    p_cap = stats.t.sf((math.log(300) - got["mu"][0]) / got["sigma"][0], got["nu"][0])
    assert abs(p_cap - np.mean(long_capped)) < 0.15
    with pytest.raises(ValueError, match="censor_at must be None or an int >= 2"):
        PredictorConfig(censor_at=1)


def test_no_rows_or_a_non_positive_batch_size_is_refused_before_any_change():
    """``fit`` on an empty dataset set the length normalisation to NaN (every later prediction non-finite) and then
    failed with an IndexError; ``evaluate`` on one answered NaN metrics; ``predict(batch_size=-1)`` answered empty
    arrays for a non-empty prompt list and ``batch_size=0`` failed inside ``range()``."""
    p = LengthPredictor(PredictorConfig.tiny(kind="logt"))
    before = (p.model.config.y_mean, p.model.config.y_std)
    with pytest.raises(ValueError, match="fit needs at least one row"):
        p.fit({"prompt": [], "output_len": []})
    assert (p.model.config.y_mean, p.model.config.y_std) == before and not p.fitted
    p.fitted = True
    with pytest.raises(ValueError, match="evaluate needs at least one row"):
        p.evaluate({"prompt": [], "output_len": []})
    for bs in (0, -1, 2.5):
        with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
            p.predict(["hello there"], batch_size=bs)
    assert p.predict(["hello there", "hi"], batch_size=1)["mu"].shape == (2,)


def test_a_loaded_predictor_keeps_nu_fixed_when_trained_again(logt_predictor, splits, tmp_path):
    """``from_pretrained`` gives back every parameter trainable: fine-tuning a loaded predictor whose ν is fixed
    (``learn_nu=False``, the default; e.g. the refresher's warm start of a served predictor) moved ν off 3.5."""
    logt_predictor.save_pretrained(tmp_path / "pred")
    again = LengthPredictor.from_pretrained(tmp_path / "pred")
    assert not again.config.learn_nu and not again.model.log_nu.requires_grad
    torch.set_num_threads(1)
    again.config.epochs = 1
    again.fit(splits[1])
    assert again.predict(["What is 3 times 4?"])["nu"][0] == pytest.approx(3.5, rel=1e-6)
