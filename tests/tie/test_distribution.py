"""Log-t distribution: MLE recovery, bounded-support E / CVaR / E[1/X] against Monte Carlo, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from hf_ext.generation.tie.distribution import (
    LogT,
    crps_length,
    crps_log,
    cvar_length,
    expected_inverse_length,
    expected_length,
    interval_coverage,
    per_token_index,
    pit,
)


@pytest.mark.parametrize("mu,sigma,nu", [(4.5, 0.9, 3.5), (2.5, 0.3, 6.0)])
def test_mle_recovers_parameters(mu, sigma, nu):
    rng = np.random.default_rng(0)
    x = LogT(mu, sigma, nu).sample(6000, rng)
    fit = LogT.fit(x)
    assert abs(float(fit.mu) - mu) < 0.05
    assert abs(float(fit.sigma) / sigma - 1) < 0.06
    assert abs(float(fit.nu) / nu - 1) < 0.35
    fixed = LogT.fit(x, nu=nu)
    assert float(fixed.nu) == nu and abs(float(fixed.sigma) / sigma - 1) < 0.05


def test_mle_with_censoring_is_unbiased_where_naive_fit_is_not():
    rng = np.random.default_rng(1)
    x = LogT(5.0, 1.0, 3.5).sample(6000, rng)
    cap = 300.0  # ~ 25% censored
    xc = np.minimum(x, cap)
    naive = LogT.fit(xc, nu=3.5)
    cens = LogT.fit(xc, nu=3.5, censor_at=cap)
    assert abs(float(cens.mu) - 5.0) < 0.06
    assert abs(float(cens.sigma) - 1.0) < 0.08
    assert float(naive.sigma) < 0.9  # the cap squeezes a naive fit


@pytest.mark.parametrize("support", ["clip", "truncate"])
@pytest.mark.parametrize(
    "mu,sigma,nu", [(4.0, 0.8, 3.5), (2.0, 0.1, 3.5), (6.5, 1.5, 2.0), (5.0, 0.02, 3.5), (0.3, 1.2, 3.0)]
)
def test_expectation_and_cvar_match_monte_carlo(mu, sigma, nu, support):
    rng = np.random.default_rng(2)
    m_val = 1000.0
    x = LogT(mu, sigma, nu).sample(400_000, rng)
    if support == "clip":
        xs = np.clip(x, 1, m_val)
    else:
        xs = x[(x >= 1) & (x <= m_val)]
    xs = np.sort(xs)
    e_mc = xs.mean()
    cvar_mc = xs[int(0.9 * len(xs)) :].mean()
    e = float(expected_length(mu, sigma, nu, m_val, support))
    c = float(cvar_length(mu, sigma, nu, 0.9, m_val, support))
    assert e == pytest.approx(e_mc, rel=0.02)
    assert c == pytest.approx(cvar_mc, rel=0.03)
    assert 1.0 <= e <= c <= m_val
    inv = float(expected_inverse_length(mu, sigma, nu, m_val, support))
    assert inv == pytest.approx(np.mean(1.0 / xs), rel=0.02)
    assert 1.0 / m_val <= inv <= 1.0
    assert float(per_token_index(mu, sigma, nu, m_val, support)) == pytest.approx(e_mc / inv, rel=0.03)


@pytest.mark.parametrize("support", ["clip", "truncate"])
@pytest.mark.parametrize("sigma,nu", [(1e-3, 3.5), (1e-3, 1.0), (0.01, 3.5)])
def test_narrow_laws_keep_their_tails(sigma, nu, support):
    """A split of the integral at mu +- 4 sigma alone lost the heavy t tails of a narrow law (hints may give any
    sigma > 0): E[X] fell below 1, was not monotone in mu, and CVaR_0.9 fell below E[X]."""
    m_val = 1024.0
    mus = np.linspace(-2.0, 8.0, 401)
    e = expected_length(mus, sigma, nu, m_val, support)
    c = cvar_length(mus, sigma, nu, 0.9, m_val, support)
    assert np.all(e >= 1.0 - 1e-9) and np.all(e <= m_val + 1e-6)
    assert np.all(c >= e - 1e-9)
    if support == "clip":  # documented: monotone in mu
        assert np.all(np.diff(e) >= -1e-9)
    x = np.clip(LogT(3.0, sigma, nu).sample(2_000_000, np.random.default_rng(0)), 1, m_val)
    if support == "clip":
        assert float(expected_length(3.0, sigma, nu, m_val, "clip")) == pytest.approx(x.mean(), rel=0.005)


def test_per_token_index_is_the_median_order_away_from_the_bounds():
    # near log-normal law (large nu), mass far from both bounds: E[X] / E[1/X] = e^{2 mu}, whatever sigma is
    mu = np.array([5.0, 5.0, 5.0, 4.9])
    sigma = np.array([0.05, 0.4, 0.8, 0.1])
    idx = per_token_index(mu, sigma, 30.0, max_value=1e12)
    assert idx[:3] == pytest.approx(np.exp(2 * mu[:3]), rel=0.03)
    assert idx[3] < idx[0]  # a lower median runs first, however narrow the others are
    # the cap makes spread matter: near it, the wider law ranks earlier (its tail is cut)
    near_cap = per_token_index(np.array([6.5, 6.5]), np.array([0.2, 1.0]), 3.5, max_value=1000)
    assert near_cap[1] < near_cap[0]


def test_vectorised_shapes_and_monotonicity():
    mu = np.linspace(1, 7, 13)
    e = expected_length(mu, 0.7, 3.5, 1024)
    c = cvar_length(mu, 0.7, 3.5, 0.9, 1024)
    assert e.shape == c.shape == (13,)
    assert np.all(np.diff(e) > 0) and np.all(np.diff(c) >= 0)
    # wider spread -> larger tail, same median
    assert float(cvar_length(4.0, 1.2, 3.5, 0.9, 1024)) > float(cvar_length(4.0, 0.3, 3.5, 0.9, 1024))
    grid = expected_length(np.zeros((2, 3)) + 3.0, np.ones((2, 1)) * 0.5, 3.5, 512)
    assert grid.shape == (2, 3)


def test_pdf_cdf_ppf_consistent():
    d = LogT(3.0, 0.6, 3.5)
    q = np.array([0.05, 0.5, 0.95])
    x = d.ppf(q)
    np.testing.assert_allclose(d.cdf(x), q, atol=1e-10)
    grid = np.linspace(0.5, 2000, 400_001)
    assert np.trapezoid(d.pdf(grid), grid) == pytest.approx(float(d.cdf(2000) - d.cdf(0.5)), rel=1e-3)


def test_calibration_helpers_are_uniform_for_true_model():
    rng = np.random.default_rng(3)
    mu = rng.normal(4, 1, 4000)
    x = np.round(LogT(mu, 0.5, 3.5).sample(None, rng)).clip(1)
    u = pit(x, mu, 0.5, 3.5, rng=rng)
    hist = np.histogram(u, bins=5, range=(0, 1))[0] / len(u)
    assert np.all(np.abs(hist - 0.2) < 0.04)
    assert interval_coverage(x, mu, 0.5, 3.5, 0.9) == pytest.approx(0.9, abs=0.03)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(mu=np.nan, sigma=1.0, nu=3.5, max_value=100), "mu"),
        (dict(mu=1.0, sigma=-1.0, nu=3.5, max_value=100), "sigma"),
        (dict(mu=1.0, sigma=1.0, nu=3.5, max_value=0), "max_value"),
    ],
)
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        expected_length(**kwargs)
    with pytest.raises(ValueError, match="alpha"):
        cvar_length(1.0, 1.0, 3.5, 1.5, 100)
    with pytest.raises(ValueError, match="samples"):
        LogT.fit([1.0, -2.0, 3.0])


@pytest.mark.parametrize("mu,sigma,m_val", [(6.0, 0.5, 10.0), (9.0, 0.3, 1000.0), (-3.0, 0.4, 50.0)])
def test_truncated_moments_far_outside_the_support_match_quadrature(mu, sigma, m_val):
    """The mass inside [1, M] is tiny here: the normaliser must not cancel catastrophically."""
    from scipy import integrate, stats

    t = stats.t(3.5, loc=mu, scale=sigma)
    b = np.log(m_val)
    z = t.cdf(b) - t.cdf(0.0) if mu > b / 2 else t.sf(0.0) - t.sf(b)
    e_ref = integrate.quad(lambda y: np.exp(y) * t.pdf(y), 0.0, b, epsabs=0, epsrel=1e-10, limit=200)[0] / z
    e = float(expected_length(mu, sigma, 3.5, m_val, "truncate"))
    assert e == pytest.approx(e_ref, rel=1e-4)
    assert 1.0 <= e <= m_val
    # the clipped law is monotone in mu (the truncated one is not: far tails of a t are flat in the window)
    mus = np.linspace(mu - 2, mu + 2, 9)
    assert np.all(np.diff(expected_length(mus, sigma, 3.5, m_val, "clip")) >= -1e-9)
    assert np.all(np.diff(cvar_length(mus, sigma, 3.5, 0.9, m_val, "clip")) >= -1e-9)


@pytest.mark.parametrize(
    "mu,sigma,nu,x",
    [
        (4.0, 0.8, 3.5, 30),
        (5.0, 0.3, 5.0, 200),
        (2.0, 1.2, 3.0, 900),
        (6.5, 0.05, 8.0, 700),
        (3.0, 0.6, 2.5, 1),
    ],
)
def test_crps_matches_monte_carlo(mu, sigma, nu, x):
    """CRPS = E|Y - y| - E|Y - Y'|/2, estimated from samples, in log space and in clipped tokens."""
    rng = np.random.default_rng(5)
    y = mu + sigma * rng.standard_t(nu, size=(2, 600_000))
    mc_log = np.mean(np.abs(y[0] - np.log(x))) - 0.5 * np.mean(np.abs(y[0] - y[1]))
    xs = np.exp(np.minimum(y, np.log(1000.0))).clip(1, 1000)
    mc_tok = np.mean(np.abs(xs[0] - x)) - 0.5 * np.mean(np.abs(xs[0] - xs[1]))
    assert float(crps_log(np.log(x), mu, sigma, nu)) == pytest.approx(mc_log, rel=0.01)
    assert float(crps_length(x, mu, sigma, nu, 1000)) == pytest.approx(mc_tok, rel=0.02, abs=0.05)


def test_crps_is_proper_and_limits():
    """Averaged over draws of the true law, the true parameters score best (a proper score); a very
    narrow forecast scores the absolute error, as a point forecast does."""
    rng = np.random.default_rng(6)
    x = np.round(LogT(4.0, 0.7, 3.5).sample(20_000, rng)).clip(1, 1000)
    y = np.log(x)
    true_log = crps_log(y, 4.0, 0.7, 3.5).mean()
    true_tok = crps_length(x, 4.0, 0.7, 3.5, 1000).mean()
    for mu, sigma in [(4.3, 0.7), (3.7, 0.7), (4.0, 0.35), (4.0, 1.4)]:
        assert crps_log(y, mu, sigma, 3.5).mean() > true_log
        assert crps_length(x, mu, sigma, 3.5, 1000).mean() > true_tok
    assert float(crps_log(5.0, 4.0, 1e-6, 3.5)) == pytest.approx(1.0, rel=1e-4)
    assert float(crps_length(300, np.log(100.0), 1e-5, 3.5, 1000)) == pytest.approx(200.0, rel=1e-3)
    assert crps_length(np.array([10, 20]), np.array([[2.0], [3.0]]), 0.5, 3.5, 1000).shape == (2, 2)
    with pytest.raises(ValueError, match="nu"):
        crps_log(1.0, 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="max_value"):
        crps_length(10, 1.0, 1.0, 3.5, 0)


@pytest.mark.parametrize(
    "kwargs", [{"censor_at": float("nan")}, {"censor_at": 0}, {"nu": 0.0}, {"nu": float("inf")}]
)
def test_fit_refuses_a_censoring_point_or_nu_it_cannot_use(kwargs):
    """censor_at=NaN fitted as if nothing were censored, censor_at=0 failed with "math domain error", and nu=0 ran
    the optimiser on NaN likelihoods before LogT refused the result."""
    x = np.exp(np.random.default_rng(0).standard_t(3.5, 50) * 0.5 + 3.0)
    with pytest.raises(ValueError, match=f"{next(iter(kwargs))} must be None or a finite number > 0"):
        LogT.fit(x, **kwargs)
