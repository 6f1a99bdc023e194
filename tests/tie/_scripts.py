"""Test helpers: load a ``benchmarks/<name>.py`` script as a module; spy on a callable's SDPA kernel choice; write
a stand-in for the Azure trace (a clean clone and the device machine lack the real one)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def load_script(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` imported under the module name ``name`` (executed afresh on every call)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def spy_cudnn_flag(monkeypatch: Any, target: Any, name: str) -> list[bool]:
    """Replace ``target.<name>`` with a spy (undone by ``monkeypatch``); the list it returns collects, for each
    call, whether SDPA could use cuDNN's kernel inside it."""
    import torch

    seen: list[bool] = []
    real = getattr(target, name)

    def spy(*args: Any, **kw: Any) -> Any:
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return real(*args, **kw)

    monkeypatch.setattr(target, name, spy)
    return seen


def stand_in_trace(path: Path, n: int = 64, seconds: float = 6.4, seed: int = 0) -> Path:
    """Write ``n`` requests evenly over ``seconds`` in the Azure LLM trace's CSV format (prompt lengths 20-2,999,
    output lengths 20-2,999 drawn uniformly) to ``path``; returns ``path``."""
    import datetime as dt

    import numpy as np

    lens = np.random.default_rng(seed).integers(20, 3000, size=(n, 2))
    t0 = dt.datetime(2023, 11, 16, 18, 15)
    stamps = [t0 + dt.timedelta(seconds=seconds * i / n) for i in range(n)]
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        + "".join(f"{t:%Y-%m-%d %H:%M:%S.%f}0,{p},{o}\n" for t, (p, o) in zip(stamps, lens))
    )
    return path
