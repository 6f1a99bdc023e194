"""Every selector / mixer / weighter on a synthetic task whose right answer is known.

Domains (see hf_ext.callbacks.dataflex.synthetic): ``clean`` (learnable counting), ``noisy``
(random labels, irreducible loss), ``hard`` (learnable but slower).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_ext.callbacks.dataflex.base import UpdateContext
from hf_ext.callbacks.dataflex.ops import default_collate, per_sample_loss
from hf_ext.callbacks.dataflex.registry import build
from hf_ext.callbacks.dataflex.synthetic import make_mixture, tiny_model, train_steps

NAMES = ["clean", "hard", "noisy"]  # sorted, as DataFlex encodes domain names
N = 32
DATA = make_mixture({"clean": N, "hard": N, "noisy": N}, seed=0)
DOM = np.repeat(np.arange(3), N)
CLEAN_TARGET = make_mixture({"clean": 8}, seed=1)


def ctx(model, **kw):
    base = dict(model=model, dataset=DATA, domain_ids=DOM, domain_names=NAMES, seed=0, step=1)
    base.update(kw)
    return UpdateContext(**base)


def share(idx, d):
    return float(np.mean(DOM[idx] == d))


@pytest.fixture(scope="module")
def warm():
    """A tiny model after 30 AdamW steps on the uniform mixture, and its optimizer (Adam moments)."""
    m = tiny_model()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    train_steps(m, DATA, 30, optimizer=opt)
    return m, opt


# ------------------------------------------------------------------------ target-set selectors
@pytest.mark.parametrize(
    "args",
    [
        {"precondition": "adam"},
        {"precondition": "sgd", "projection": "sketch"},
    ],
    ids=["adam-gaussian", "sgd-sketch"],
)
def test_less_picks_target_aligned_samples(warm, args):
    m, opt = warm
    idx = build("selector", "less", budget=0.25, proj_dim=128, **args).run(
        ctx(m, target_dataset=CLEAN_TARGET, optimizer=opt), len(DATA)
    )
    assert len(idx) == 24
    assert share(idx, 0) >= 0.9  # the target is the clean domain (1/3 of the pool)


def test_near_picks_nearest_to_target(warm):
    m, _ = warm
    idx = build("selector", "near", budget=0.25, knn=3).run(ctx(m, target_dataset=CLEAN_TARGET), len(DATA))
    assert share(idx, 0) == 1.0


def test_nice_policy_gradient_targets_rewarded_tokens():
    """Reward = fraction of sampled completion tokens from the clean range: NICE must pick clean data."""
    m = tiny_model()

    def reward(prompt, completion):
        return float(np.mean([4 <= t < 24 for t in completion]))

    sel = build(
        "selector", "nice", budget=12, mc_samples=16, max_new_tokens=8, precondition="sgd", proj_dim=128
    )
    idx = sel.run(ctx(m, target_dataset=[{"input_ids": [1]}] * 8, reward_fn=reward), len(DATA))
    assert share(idx, 0) >= 0.75


def test_nice_leaves_the_global_rng_alone():
    """NICE reseeded the global torch RNG (an audit found it), changing the training run's later draws; its
    sampling is now seeded inside fork_rng: the caller's RNG stream continues, the selection stays seeded."""
    m = tiny_model()
    small = [DATA[i] for i in (0, 1, N, 2 * N)]
    kw = dict(dataset=small, domain_ids=None, domain_names=[], target_dataset=[{"input_ids": [1]}] * 2)
    kw["reward_fn"] = lambda p, c: float(c[0] % 2)
    sel = build("selector", "nice", budget=2, mc_samples=2, max_new_tokens=2, precondition="sgd", proj_dim=8)
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    expected = torch.rand(3)
    torch.set_rng_state(before)
    a = sel.run(ctx(m, **kw), len(small))
    torch.testing.assert_close(torch.rand(3), expected)
    torch.manual_seed(99)  # a different caller state gives the same (seeded) selection
    assert sel.run(ctx(m, **kw), len(small)).tolist() == a.tolist()


def test_cluster_less_takes_a_quota_from_every_cluster(warm):
    m, opt = warm
    c = ctx(m, target_dataset=CLEAN_TARGET, optimizer=opt)
    plain = build("selector", "less", budget=0.25, proj_dim=128).run(c, len(DATA))
    div = build("selector", "cluster_less", budget=0.25, proj_dim=128, n_clusters=3).run(c, len(DATA))
    # LESS alone concentrates on the target's domain; clustering spreads the budget over all three
    assert np.bincount(DOM[plain], minlength=3).min() <= 1
    assert np.bincount(DOM[div], minlength=3).tolist() == [8, 8, 8]
    # inside a cluster it keeps the best LESS scores: the clean picks are the top clean ones
    scores = build("selector", "less", proj_dim=128).scores(c, np.arange(N))
    assert set(div[DOM[div] == 0]) == set(np.argsort(-scores)[:8])


# -------------------------------------------------------------------------- loss selectors
def test_loss_selector_takes_highest_loss(warm):
    m, _ = warm
    idx = build("selector", "loss", budget=0.25).run(ctx(m), len(DATA))
    loss = per_sample_loss(m, DATA, list(range(len(DATA)))).numpy()
    assert set(idx) == set(np.argsort(-loss)[:24])
    assert share(idx, 2) > 0.6  # noisy labels have the highest loss
    low = build("selector", "loss", budget=0.25, focus="low").run(ctx(m), len(DATA))
    assert share(low, 0) > 0.9


def test_delta_loss_drops_unlearnable_noisy_domain():
    m = tiny_model()
    sel = build("selector", "delta_loss", budget=0.5)
    sel.on_train_begin(ctx(m, step=0), len(DATA))
    train_steps(m, DATA, 40)
    idx = sel.run(ctx(m, step=40), len(DATA))
    assert share(idx, 2) <= 0.05 and len(idx) == 48
    # its memory round-trips (checkpoint state)
    st = sel.state_dict()
    sel2 = build("selector", "delta_loss", budget=0.5)
    sel2.load_state_dict(st)
    assert sel2._prev == sel._prev and sel2._prev_step == 40
    # ready only once scores from an earlier step exist; select without any earlier scoring is an error
    fresh = build("selector", "delta_loss", budget=0.5)
    assert not fresh.ready(ctx(m, step=0))
    with pytest.raises(ValueError, match="delta_loss needs an earlier scoring"):
        fresh.run(ctx(m, step=0), len(DATA))
    fresh.on_train_begin(ctx(m, step=0), len(DATA))
    assert not fresh.ready(ctx(m, step=0)) and fresh.ready(ctx(m, step=1))


def test_random_selector_is_uniform_and_seeded():
    c = ctx(None)
    a = build("selector", "random", budget=0.5).run(c, len(DATA))
    b = build("selector", "random", budget=0.5).run(c, len(DATA))
    other = build("selector", "random", budget=0.5).run(ctx(None, step=2), len(DATA))
    assert a.tolist() == b.tolist() and a.tolist() != other.tolist()
    assert len(set(a)) == 48
    counts = np.zeros(len(DATA))
    for s in range(200):
        counts[build("selector", "random", budget=0.5).run(ctx(None, step=s), len(DATA))] += 1
    assert abs(counts.mean() - 100) < 1e-9 and counts.std() < 15  # binomial sd = sqrt(200 * .25) ~ 7


def test_selector_pool_size_and_budget_count():
    idx = build("selector", "random", budget=5, pool_size=20).run(ctx(None), len(DATA))
    assert len(idx) == 5


# ----------------------------------------------------------------------------------- mixers
@pytest.fixture(scope="module")
def proxy_and_reference():
    proxy = train_steps(tiny_model(seed=0), DATA, 15)
    ref = train_steps(tiny_model(seed=1), DATA, 150, seed=1)
    return proxy, ref


def test_doremi_downweights_noisy_domain(proxy_and_reference):
    proxy, ref = proxy_and_reference
    mx = build("mixer", "doremi", eta=1.0, smoothing=1e-3, probe_size=16)
    w = mx.init_weights(NAMES)
    for step in range(3):
        w = mx.update(ctx(proxy, reference_model=ref, step=step), w)
    assert w[2] < 0.05 and w[2] == w.min()  # noisy: no excess loss to remove
    assert abs(w.sum() - 1) < 1e-9 and (w >= 1e-3 / 3).all()  # smoothing floor
    ex = mx.last_excess
    assert ex[2] < ex[0] and ex[2] < ex[1]
    avg = mx.average_weights()
    assert avg.shape == (3,) and avg[2] < 1 / 3


def test_doremi_exponentiated_gradient_formula():
    """DoReMi Algorithm 1: alpha' = alpha_{t-1} exp(eta * lambda); alpha_t = (1 - c) alpha'/sum + c / D.

    The smoothed alpha_t is the state of the next update (an audit found the unsmoothed one was fed back).
    """
    mx = build("mixer", "doremi", eta=0.5, smoothing=0.1)
    lam = np.array([1.0, 0.0, 2.0])
    mx.excess_losses = lambda c: lam  # the formula, independent of any model
    w = mx.update(ctx(None), None)
    alpha = np.exp(0.5 * lam) / np.exp(0.5 * lam).sum()
    np.testing.assert_allclose(w, 0.9 * alpha + 0.1 / 3)
    w2 = mx.update(ctx(None), w)
    a = w * np.exp(0.5 * lam)
    np.testing.assert_allclose(w2, 0.9 * a / a.sum() + 0.1 / 3)


def test_doremi_feeds_smoothed_weights_back():
    """A domain driven to the smoothing floor recovers as fast as the paper's recursion says."""
    c, eta = 1e-3, 1.0
    mx = build("mixer", "doremi", eta=eta, smoothing=c)
    seq = [np.array([8.0, 0.0])] * 10 + [np.array([0.0, 8.0])] * 3
    it = iter(seq)
    mx.excess_losses = lambda _: next(it)
    c2 = UpdateContext(model=None, dataset=None, domain_names=["a", "b"])
    ref, w = np.array([0.5, 0.5]), None
    for lam in seq:
        w = mx.update(c2, w)
        ap = ref * np.exp(eta * lam)
        ref = (1 - c) * ap / ap.sum() + c / 2
        np.testing.assert_allclose(w, ref, rtol=1e-9)
    assert w[1] > 0.99  # the old recursion (unsmoothed state) left domain b near 0.6 after 2 updates
    # the state round-trips
    mx2 = build("mixer", "doremi", eta=eta, smoothing=c)
    mx2.load_state_dict(mx.state_dict())
    np.testing.assert_allclose(mx2._log_alpha, np.log(w))


def test_odm_upweights_hard_domain_from_training_losses():
    """EXP3 with importance-weighted training-loss rewards: the high-loss (hard) domain gains weight."""
    mx = build("mixer", "odm", alpha=0.5)
    names = ["easy", "hard"]
    w0 = mx.init_weights(names)
    # one update by hand: R = (1 - alpha) * L / pi, pi = (1 - D eps_t) softmax(eps_{t-1} R) + eps_t
    c = UpdateContext(
        model=None,
        dataset=None,
        domain_names=names,
        step=50,
        observed_loss=np.array([16.0, 96.0]),
        observed_count=np.array([32.0, 32.0]),
    )
    w = mx.update(c, w0)
    r = 0.5 * np.array([0.5, 3.0]) / 0.5
    e_prev, e = np.sqrt(np.log(2) / (2 * 49)), np.sqrt(np.log(2) / (2 * 50))
    np.testing.assert_allclose(w, (1 - 2 * e) * np.exp(e_prev * r) / np.exp(e_prev * r).sum() + e)
    assert w[1] > 0.5
    rng = np.random.default_rng(0)
    hard = []
    for step in range(60, 400, 10):
        n = rng.multinomial(64, w)
        c = UpdateContext(
            model=None,
            dataset=None,
            domain_names=names,
            step=step,
            observed_loss=np.array([0.5, 3.0]) * n,
            observed_count=n.astype(float),
        )
        w = mx.update(c, w)
        hard.append(w[1])
    assert min(hard) > 0.52  # the hard arm stays up-weighted round after round
    assert w.min() >= mx.eps(390, 2) - 1e-12  # exploration floor


def test_odm_probe_fallback_on_real_model(proxy_and_reference):
    proxy, _ = proxy_and_reference
    mx = build("mixer", "odm", alpha=0.0, probe_size=8)
    w = mx.update(ctx(proxy, step=200), mx.init_weights(NAMES))
    # with the proxy half-trained: noisy > hard > clean in loss, and in weight
    assert w[2] > w[1] > w[0]


def test_dynamic_schedule_interpolates():
    mx = build(
        "mixer",
        "dynamic",
        schedule=[
            {"step": 0, "weights": {"clean": 1.0, "hard": 1.0, "noisy": 2.0}},
            {"step": 10, "weights": [1, 0, 0]},
        ],
    )
    np.testing.assert_allclose(mx.init_weights(NAMES), [0.25, 0.25, 0.5])
    np.testing.assert_allclose(mx.update(ctx(None, step=5), None), [0.625, 0.125, 0.25])
    np.testing.assert_allclose(mx.update(ctx(None, step=50), None), [1, 0, 0])
    step = build(
        "mixer",
        "dynamic",
        interpolation="step",
        schedule=[{"step": 0, "weights": [1, 1, 1]}, {"step": 10, "weights": [1, 0, 0]}],
    )
    np.testing.assert_allclose(step.update(ctx(None, step=9), None), [1 / 3] * 3)
    with pytest.raises(ValueError, match="unknown domain"):
        mx.weights_at(0, ["a", "b", "c"])


# -------------------------------------------------------------------------------- weighters
def test_loss_weighter_softmax_of_losses():
    w = build("weighter", "loss", temperature=2.0).weights(
        torch.tensor([1.0, 2.0, 4.0, 1.0]), torch.arange(4), None, 0
    )
    torch.testing.assert_close(w, torch.softmax(torch.tensor([0.5, 1.0, 2.0, 0.5]), 0) * 4)
    assert abs(float(w.mean()) - 1) < 1e-6 and w[2] == w.max()
    clipped = build("weighter", "loss", temperature=0.1, max_weight=2.0).weights(
        torch.tensor([1.0, 2.0, 4.0, 1.0]), torch.arange(4), None, 0
    )
    assert float(clipped.max()) <= 2.0 + 1e-6 and abs(float(clipped.mean()) - 1) < 1e-6


def test_adapt_weighter_prefers_domains_still_learning():
    """Domain 0's loss keeps falling, domain 1 (noisy) is flat: domain 0 ends up with more weight."""
    wt = build("weighter", "adapt", beta=1.0)
    dom = torch.tensor([0, 0, 1, 1])
    for t in range(20):
        losses = torch.tensor([3.0 * 0.85**t, 3.1 * 0.85**t, 3.0, 3.05])
        w = wt.weights(losses, torch.arange(4), dom, t)
    assert w[0] > 1.2 and w[2] < 0.8 and abs(float(w.mean()) - 1) < 1e-6
    # per-sample mode (no domains) behaves the same way
    ws = build("weighter", "adapt", beta=1.0)
    for t in range(20):
        w = ws.weights(torch.tensor([3.0 * 0.85**t, 3.0]), torch.tensor([7, 9]), None, t)
    assert w[0] > w[1]


def test_adapt_weighter_downweights_noisy_domain_in_training():
    m = tiny_model()
    wt = build("weighter", "adapt", beta=1.0)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    for t in range(25):
        idx = rng.choice(len(DATA), 12)
        batch = default_collate([DATA[i] for i in idx])
        out = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        from hf_ext.callbacks.dataflex.ops import sequence_loss_terms

        s, c = sequence_loss_terms(out.logits, batch["labels"])
        w = wt.weights((s / c).detach(), torch.as_tensor(idx), torch.as_tensor(DOM[idx]), t)
        loss = (s * w).sum() / c.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    trends = [wt.trend(d) for d in range(3)]
    assert trends[2] < trends[0] and trends[2] < trends[1]


def test_adapt_weighter_observes_a_sample_drawn_twice_in_a_batch_once():
    """Per-sample mode moved a sample's loss averages once per row, so an index drawn twice in one batch (mixture
    plans draw with replacement) took two EMA steps, and its two rows got different weights. Like a domain with
    several rows, a sample now takes one step per batch with the mean of its losses, and its rows share one weight."""
    dup = build("weighter", "adapt", beta=1.0)
    ref = build("weighter", "adapt", beta=1.0)
    dup.weights(torch.tensor([4.0, 2.0]), torch.tensor([5, 7]), None, 0)
    ref.weights(torch.tensor([4.0, 2.0]), torch.tensor([5, 7]), None, 0)
    w = dup.weights(torch.tensor([1.0, 3.0, 2.0]), torch.tensor([5, 5, 7]), None, 1)
    w_ref = ref.weights(torch.tensor([2.0, 2.0]), torch.tensor([5, 7]), None, 1)  # sample 5's mean loss, once
    assert dup.state_dict() == ref.state_dict()
    assert dup.trend(-6) == ref.trend(-6) > 0  # sample 5: loss 4 -> 2, still falling
    assert w[0] == w[1] and w[0] > w[2] and abs(float(w.mean()) - 1) < 1e-6
    assert w_ref[0] > w_ref[1]
