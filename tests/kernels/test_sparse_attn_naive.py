"""SALE torch references and the ops API on CPU (no Triton): semantics of selection and attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_ext_kernels.sparse_attn import block_sparse_attention, naive, ops, sale_attention, sale_block_mask
from hf_ext_kernels.sparse_attn.inputs import structured_qkv


def _sdpa(q, k, v, *, causal, kpm=None):
    """Dense reference through torch SDPA (explicit bottom-right causal + padding mask, GQA expanded)."""
    g = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    sq, sk = q.shape[2], k.shape[2]
    allow = torch.ones(sq, sk, dtype=torch.bool)
    if causal:
        allow = torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + (sk - sq)
    allow = allow[None, None].expand(q.shape[0], 1, sq, sk)
    if kpm is not None:
        allow = allow & kpm[:, None, None, :]
    out = F.scaled_dot_product_attention(q.float(), kr.float(), vr.float(), attn_mask=allow)
    return torch.nan_to_num(out, nan=0.0) * allow.any(-1, keepdim=True)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("sq,sk", [(97, 97), (50, 130)])
def test_all_true_mask_equals_sdpa(causal, sq, sk):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, sq, 32), torch.randn(2, 2, sk, 32), torch.randn(2, 2, sk, 32)
    mask = torch.ones(1, 1, -(-sq // 32), -(-sk // 16), dtype=torch.bool)
    out = block_sparse_attention(q, k, v, mask, block_q=32, block_k=16, causal=causal, backend="torch")
    torch.testing.assert_close(out, _sdpa(q, k, v, causal=causal), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("causal", [True, False])
def test_tau_zero_equals_dense_with_padding(causal):
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 4, 150, 32), torch.randn(2, 1, 150, 32), torch.randn(2, 1, 150, 32)
    kpm = torch.ones(2, 150, dtype=torch.bool)
    kpm[0, :40] = False  # left padding
    kpm[1, -23:] = False  # right padding
    out, mask = sale_attention(
        q,
        k,
        v,
        tau=0.0,
        causal=causal,
        key_padding_mask=kpm,
        block_q=32,
        block_k=32,
        local_window=0,
        backend="torch",
        return_mask=True,
    )
    assert not torch.isnan(out).any()
    vis = naive.visible_block_mask(150, 150, 32, 32, causal=causal, key_padding_mask=kpm)
    assert torch.equal(mask, vis[:, None].expand_as(mask))  # tau -> 0 keeps every visible block
    torch.testing.assert_close(out, _sdpa(q, k, v, causal=causal, kpm=kpm), atol=2e-5, rtol=1e-4)
    if causal:  # left-padded rows see only padded keys: exact zeros
        assert out[0, :, :40].abs().max() == 0


def test_forced_blocks_always_kept():
    torch.manual_seed(2)
    q, k = torch.randn(1, 2, 300, 32), torch.randn(1, 2, 300, 32)
    bq, bk, w = 32, 16, 40
    mask = sale_block_mask(
        q, k, tau=1.0, block_q=bq, block_k=bk, local_window=w, sink_blocks=2, backend="torch"
    )
    nqb = mask.shape[2]
    for qb in range(nqb):
        i0, i1 = qb * bq, min((qb + 1) * bq, 300) - 1
        assert mask[..., qb, : min(2, i1 // bk + 1)].all(), "sink blocks"
        for kb in range(max(i0 - w, 0) // bk, i1 // bk + 1):
            assert mask[..., qb, kb].all(), f"local/diagonal block {qb},{kb}"
        assert not mask[..., qb, i1 // bk + 1 :].any(), "blocks above the diagonal are never kept"
    # with tau=1 nothing outside the forced blocks survives on random data
    forced = naive.forced_block_mask(1, 300, 300, bq, bk, sink_blocks=2, local_window=w, causal=True)
    vis = naive.visible_block_mask(300, 300, bq, bk, causal=True)
    assert torch.equal(mask[0, 0], (forced & vis)[0])


def test_density_monotone_in_tau_and_online_superset_of_exact():
    q, k, _ = structured_qkv(1, 2, 1, 640, 64, seed=3, dtype=torch.float32, min_gap=128)
    dens = []
    for tau in (0.0, 1e-4, 1e-3, 1e-2, 5e-2, 0.2, 1.0):
        m = sale_block_mask(q, k, tau=tau, block_q=32, block_k=32, local_window=32, backend="torch")
        e = naive.sale_block_mask_ref(q, k, tau=tau, block_q=32, block_k=32, local_window=32, mode="exact")
        assert (m | ~e).all(), "online (running) threshold keeps a superset of the two-pass selection"
        dens.append(m.float().mean().item())
    assert all(a >= b for a, b in zip(dens, dens[1:])), dens
    assert dens[0] > 2 * dens[-1]


def test_retrieval_block_kept():
    torch.manual_seed(4)
    s, d = 1024, 64
    q, k, v = torch.randn(1, 1, s, d) * 0.3, torch.randn(1, 1, s, d) * 0.3, torch.randn(1, 1, s, d)
    needle = torch.randn(d)
    needle = needle / needle.norm() * 10.0  # logit 12.5: the needle holds > 99% of the mass
    k[0, 0, 200] += needle  # far key in key block 200 // 32 = 6
    q[0, 0, 900:910] += needle  # queries in block 900 // 64 = 14 look it up
    mask = sale_block_mask(q, k, tau=0.05, block_q=64, block_k=32, local_window=64, backend="torch")
    assert mask[0, 0, 14, 6]
    far = mask[0, 0, 14, 1:24]  # non-forced far blocks of that query block
    assert far.float().mean() < 0.3  # ... mostly dropped
    out = block_sparse_attention(q, k, v, mask, block_q=64, block_k=32, backend="torch")
    ref = _sdpa(q, k, v, causal=True)
    err = (out[0, 0, 900:910] - ref[0, 0, 900:910]).abs().max()
    assert err < 0.05, err


def test_row_stride_scores_subset():
    q, k, _ = structured_qkv(1, 2, 2, 512, 64, seed=5, dtype=torch.float32, min_gap=64, span=8)
    full = sale_block_mask(q, k, tau=0.02, block_q=64, block_k=32, backend="torch")
    half = sale_block_mask(q, k, tau=0.02, block_q=64, block_k=32, backend="torch", row_stride=2)
    assert half.sum() <= full.sum() + 4 and half.sum() > 0


def test_bad_inputs_raise_clear_errors(monkeypatch):
    q, k, v = torch.randn(1, 4, 64, 32), torch.randn(1, 2, 64, 32), torch.randn(1, 2, 64, 32)
    with pytest.raises(ValueError, match="dtype"):
        sale_attention(q.to(torch.float64), k, v, tau=0.01, backend="torch")
    with pytest.raises(ValueError, match="tau"):
        sale_attention(q, k, v, tau=1.5, backend="torch")
    with pytest.raises(ValueError, match="tau"):
        sale_attention(q, k, v, tau=torch.tensor([0.1, 0.2]), backend="torch")
    with pytest.raises(ValueError, match="multiple"):
        sale_attention(q, torch.randn(1, 3, 64, 32), torch.randn(1, 3, 64, 32), tau=0.0, backend="torch")
    with pytest.raises(ValueError, match="block_q"):
        sale_block_mask(q, k, tau=0.0, block_q=48, backend="torch")
    with pytest.raises(ValueError, match="bits"):
        sale_block_mask(q, k, tau=0.0, bits=3, backend="torch")
    with pytest.raises(ValueError, match="backend"):
        sale_block_mask(q, k, tau=0.0, backend="cuda")
    with pytest.raises(ValueError, match="key_padding_mask"):
        sale_block_mask(q, k, tau=0.0, key_padding_mask=torch.ones(1, 63, dtype=torch.bool), backend="torch")
    with pytest.raises(ValueError, match="block_mask"):
        block_sparse_attention(q, k, v, torch.ones(1, 4, 3, 3, dtype=torch.bool), backend="torch")
    with pytest.raises(ValueError, match="device"):
        sale_attention(q, k.to("meta"), v, tau=0.0, backend="torch")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # conftest turns the interpreter on for CPU runs
    q64, k64, v64 = (torch.randn(1, h, 64, 64) for h in (4, 2, 2))
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        sale_attention(q64, k64, v64, tau=0.0, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(ops, "interpreter_problem", lambda: None)  # the versions installed here do not matter
    with pytest.raises(ValueError, match="head_dim 32 .*supported: \\(64, 128\\)"):
        sale_attention(q, k, v, tau=0.0, backend="triton")  # raised before any Triton work
    with pytest.raises(ValueError, match="row_stride"):
        sale_block_mask(q, k, tau=0.0, row_stride=3, backend="torch")


@pytest.mark.parametrize(
    ("triton_version", "numpy_version", "broken"),
    [
        ("3.6.0", "2.4.0", True),
        ("3.6.1+cu130", "2.5.2", True),
        ("3.6.0", "2.3.5", False),
        ("3.7.0", "2.5.2", False),
    ],
)
def test_interpreter_problem_names_the_broken_version_pair(triton_version, numpy_version, broken):
    """Triton 3.6's interpreter fails with numpy >= 2.4 (seen on the device: triton 3.6.0, numpy 2.5.2, an opaque
    InterpreterError from the first runtime loop bound)."""
    problem = ops.interpreter_problem(triton_version, numpy_version)
    assert (problem is not None) == broken
    if broken:
        assert f"triton {triton_version}" in problem and "triton>=3.7" in problem and "numpy<2.4" in problem


def test_triton_backend_on_cpu_with_a_broken_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(
        ops, "interpreter_problem", lambda: "Triton's CPU interpreter fails with triton 3.6.0"
    )
    q, k, v = (torch.randn(1, h, 64, 64) for h in (4, 2, 2))
    for call in (
        lambda: sale_attention(q, k, v, tau=0.0, backend="triton"),
        lambda: sale_block_mask(q, k, tau=0.0, backend="triton"),
        lambda: block_sparse_attention(q, k, v, torch.ones(1, 4, 1, 1, dtype=torch.bool), backend="triton"),
    ):
        with pytest.raises(RuntimeError, match="interpreter fails with triton 3.6.0"):
            call()


@pytest.mark.parametrize("sq,sk", [(10, 0), (0, 5)])
def test_empty_query_or_key_sequence(sq, sk):
    """No query or no key: an empty mask and zero rows (as the Triton path returns), not an IndexError."""
    q, k, v = torch.randn(1, 2, sq, 32), torch.randn(1, 1, sk, 32), torch.randn(1, 1, sk, 32)
    nqb, nkb = -(-sq // 32), -(-sk // 16)
    out, mask = sale_attention(q, k, v, tau=0.1, block_q=32, block_k=16, backend="torch", return_mask=True)
    assert mask.shape == (1, 2, nqb, nkb) and not mask.any()
    assert out.shape == q.shape and (out == 0).all()
    full = torch.ones(1, 1, nqb, nkb, dtype=torch.bool)
    for causal in (True, False):
        out = block_sparse_attention(q, k, v, full, block_q=32, block_k=16, causal=causal, backend="torch")
        assert out.shape == q.shape and (out == 0).all()


@pytest.mark.parametrize(
    "args,match",
    [
        ((1, 3, 2, 64, 32), "multiple of KV heads"),
        ((1, 2, 0, 64, 32), "hkv"),
        ((1, 2, 1, 0, 32), "sequence length s"),
    ],
)
def test_structured_qkv_rejects_bad_shapes(args, match):
    """Heads that are not a GQA multiple or an empty sequence: a ValueError naming the argument (they failed
    deep inside with a broadcast error, a ZeroDivisionError or 'math domain error')."""
    with pytest.raises(ValueError, match=match):
        structured_qkv(*args)


def test_empty_batch():
    """B = 0: an empty mask and output (as the Triton path returns); the torch backend's mask raised in torch.cat."""
    q, k, v = torch.randn(0, 2, 40, 32), torch.randn(0, 1, 40, 32), torch.randn(0, 1, 40, 32)
    out, mask = sale_attention(q, k, v, tau=0.1, block_q=32, block_k=32, backend="torch", return_mask=True)
    assert mask.shape == (0, 2, 2, 2) and mask.dtype == torch.bool and out.shape == q.shape


@pytest.mark.parametrize("bad", ["no", "False", None, 2, -1, 0.0, 1.5, torch.tensor(True)])
def test_causal_must_be_a_bool(bad):
    # `causal="no"` used to be truthy, i.e. causal; every entry point now refuses a non-bool before any work
    import numpy as np

    q, k, v = (torch.randn(1, 2, 48, 16) for _ in range(3))
    mask = torch.ones(1, 2, 3, 3, dtype=torch.bool)
    kw = dict(block_q=16, block_k=16, backend="torch")
    calls = {
        "sale_block_mask": lambda c: sale_block_mask(q, k, tau=0.0, causal=c, local_window=0, **kw),
        "block_sparse_attention": lambda c: block_sparse_attention(q, k, v, mask, causal=c, **kw),
        "sale_attention": lambda c: sale_attention(q, k, v, tau=0.0, causal=c, local_window=0, **kw),
        "sale_block_mask_ref": lambda c: naive.sale_block_mask_ref(
            q, k, tau=0.0, causal=c, block_q=16, block_k=16, local_window=0
        ),
        "block_sparse_attention_ref": lambda c: naive.block_sparse_attention_ref(
            q, k, v, None, causal=c, block_q=16, block_k=16
        ),
        "dense_attention_ref": lambda c: naive.dense_attention_ref(q, k, v, causal=c),
        "visibility": lambda c: naive.visibility(4, 4, causal=c),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match="causal must be a bool"):
            call(bad)
        # accepted spellings agree with the bools
        for good, same in ((np.bool_(False), False), (0, False), (1, True), (np.int64(1), True)):
            torch.testing.assert_close(call(good), call(same), msg=name)
