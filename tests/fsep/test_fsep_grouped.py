"""FSEP's grouped-GEMM expert compute against the per-expert loop (outputs and gradients)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from hf_ext.accelerate.fsep.config import FSEPConfig
from hf_ext.accelerate.fsep.layer import FSEPExperts


def _layer(h: int, i: int, choice: str = "auto") -> SimpleNamespace:
    """What the expert-compute methods read from an FSEPExperts (no process group needed)."""
    return SimpleNamespace(
        hidden=h, intermediate=i, act_fn=torch.nn.functional.silu, config=FSEPConfig(expert_compute=choice)
    )


def _compare(device: str, per_slot: list[int], h: int = 64, i: int = 32, pad: int = 0) -> None:
    g = torch.Generator().manual_seed(0)
    c = len(per_slot)
    # rows of [gate_up | down] flattened, with padding after them as in FSEP's [C_me, N * S] buffers
    w0 = (torch.randn(c, 3 * i * h + pad, generator=g) * 0.05).to(device, torch.bfloat16)[:, : 3 * i * h]
    x0 = torch.randn(sum(per_slot), h, generator=g).to(device, torch.bfloat16)
    outs, grads = [], []
    for fn in (FSEPExperts._experts_loop, FSEPExperts._experts_grouped):
        w = w0.clone().requires_grad_() if not pad else w0.detach().requires_grad_()
        x = x0.clone().requires_grad_()
        y = fn(_layer(h, i), x, w, per_slot)
        y.float().square().sum().backward()
        outs.append(y.detach().float())
        grads.append((x.grad.float(), w.grad.float()))
    scale = outs[0].abs().max()
    assert outs[1].shape == (sum(per_slot), h)
    assert float((outs[0] - outs[1]).abs().max()) <= 2e-2 * float(scale)
    for a, b in zip(grads[0], grads[1]):
        assert float((a - b).abs().max()) <= 3e-2 * float(a.abs().max() + 1e-6)


def _cpu_grouped_mm_works() -> bool:
    try:
        x = torch.randn(4, 16, dtype=torch.bfloat16)
        w = torch.randn(2, 16, 8, dtype=torch.bfloat16)
        torch._grouped_mm(x, w, offs=torch.tensor([1, 4], dtype=torch.int32))
        return True
    except Exception:  # noqa: BLE001 - any failure: this torch has no CPU kernel for it
        return False


@pytest.mark.skipif(not _cpu_grouped_mm_works(), reason="this torch has no CPU bf16 grouped_mm")
@pytest.mark.parametrize("per_slot", [[5, 0, 7, 3], [1], [0, 9], [16, 16, 16]])
def test_grouped_matches_the_loop_on_cpu(per_slot):
    _compare("cpu", per_slot)


def test_choice_is_validated_and_explained():
    with pytest.raises(ValueError, match="expert_compute"):
        FSEPConfig(expert_compute="fast")
    x = torch.randn(4, 64)
    w = torch.randn(2, 3 * 32 * 64)
    assert FSEPExperts._use_grouped_mm(_layer(64, 32, "auto"), x, w, [2, 2]) is False  # CPU fp32: the loop
    assert FSEPExperts._use_grouped_mm(_layer(64, 32, "loop"), x, w, [2, 2]) is False
    with pytest.raises(RuntimeError, match="expert_compute='grouped_mm'.*cpu"):
        FSEPExperts._use_grouped_mm(_layer(64, 32, "grouped_mm"), x, w, [2, 2])
    assert (
        FSEPExperts._use_grouped_mm(_layer(64, 32, "grouped_mm"), x, w, [0, 0]) is False
    )  # no rows: nothing


@pytest.mark.gpu
@pytest.mark.parametrize("per_slot", [[37, 0, 200, 3, 64], [1], [512] * 8])
def test_grouped_matches_the_loop_on_cuda(per_slot):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    _compare("cuda", per_slot, h=256, i=128)
    _compare(
        "cuda", per_slot, h=256, i=128, pad=8
    )  # rows of a padded [C, N * S] buffer, as FSEP gathers them
    x = torch.randn(32, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(16, 3 * 128 * 256, device="cuda", dtype=torch.bfloat16)
    assert FSEPExperts._use_grouped_mm(_layer(256, 128, "auto"), x, w, [2] * 16) is True
    assert FSEPExperts._use_grouped_mm(_layer(256, 128, "auto"), x[:8], w[:2], [4, 4]) is False  # few experts
    assert FSEPExperts._use_grouped_mm(_layer(256, 128, "grouped_mm"), x[:8], w[:2], [4, 4]) is True
