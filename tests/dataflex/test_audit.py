"""Regression tests of a correctness audit of DataFlex (each failed before its fix)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_ext.callbacks.dataflex.base import UpdateContext
from hf_ext.callbacks.dataflex.ops import default_collate
from hf_ext.callbacks.dataflex.registry import build
from hf_ext.callbacks.dataflex.synthetic import make_mixture, tiny_model

NAMES = ["clean", "hard", "noisy"]
DATA = make_mixture({"clean": 6, "hard": 6, "noisy": 6}, seed=0)
DOM = np.repeat(np.arange(3), 6)


def _token_losses(model, items):
    batch = default_collate(items)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    lab = batch["labels"][:, 1:]
    tok = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)).float(),
        lab.reshape(-1),
        reduction="none",
        ignore_index=-100,
    ).view(lab.shape)
    return tok, (lab != -100).float()


def test_doremi_excess_loss_is_clipped_per_token():
    """DoReMi (Algorithm 1): lambda_d = sum over the domain's tokens of max(l_proxy,j - l_ref,j, 0) / #tokens.
    The excess was clipped per sample (after averaging each sample's tokens), which lets tokens where the proxy is
    better cancel tokens where it is worse and underestimates the excess loss."""
    proxy, ref = tiny_model(seed=0), tiny_model(seed=1)
    mx = build("mixer", "doremi", probe_size=6)  # the whole domain: no sampling
    ctx = UpdateContext(
        model=proxy, dataset=DATA, domain_ids=DOM, domain_names=NAMES, reference_model=ref, seed=0, step=3
    )
    got = mx.excess_losses(ctx)
    want = []
    for d in range(3):
        items = [DATA[i] for i in np.flatnonzero(np.equal(DOM, d))]
        lp, mask = _token_losses(proxy, items)
        lr, _ = _token_losses(ref, items)
        want.append(float(((lp - lr).clamp(min=0) * mask).sum() / mask.sum()))
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("name", ["less", "nice", "cluster_less", "near"])
@pytest.mark.parametrize("bad", [0, -2])
def test_target_size_must_be_positive(name, bad):
    """target_size=0 drew an empty target set: less scored every candidate NaN and silently kept the first k
    (dataset order), near failed mid-training in a matmul; now a ValueError names the field at build time."""
    with pytest.raises(
        ValueError, match=r"target_size must be None \(the whole target set\) or > 0, got " + str(bad)
    ):
        build("selector", name, target_size=bad)


def test_dynamic_mixer_rejects_initial_weights():
    """mixer 'dynamic' accepted initial_weights (a field of every mixer) and silently started from its schedule's
    first point instead."""
    sched = [{"step": 0, "weights": [1, 1, 1]}]
    with pytest.raises(ValueError, match="initial_weights is not used by mixer 'dynamic'"):
        build("mixer", "dynamic", initial_weights=[0.8, 0.1, 0.1], schedule=sched)
    build("mixer", "dynamic", schedule=sched)  # without it: fine


def test_negative_seed_is_rejected_by_the_config():
    """seed=-1 was accepted and failed at the first update, mid-training (numpy: 'expected non-negative integer')."""
    from hf_ext.callbacks.dataflex.config import DataFlexConfig

    with pytest.raises(ValueError, match=r"seed must be an integer >= 0, got -1"):
        DataFlexConfig(selector="random", seed=-1)


def test_bench_module_entry_point_honours_its_arguments(tmp_path):
    """`python -m hf_ext.callbacks.dataflex.bench --methods ... --no-write` ignored every argument (main() got no
    argv): it ran every method and appended to benchmarks/results. A bad --methods must now fail at once."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_EXT_RESULTS_DIR": str(tmp_path)}  # the old code would write its results here
    try:
        r = subprocess.run(
            [sys.executable, "-m", "hf_ext.callbacks.dataflex.bench", "--methods", "bogus", "--no-write"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the bench ignored --methods bogus and started benchmarking")
    assert r.returncode == 2 and "argument --methods" in r.stderr, r.stderr[-2000:]
    assert not list(tmp_path.iterdir())
