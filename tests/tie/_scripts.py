"""Test helpers: load a ``benchmarks/<name>.py`` script as a module; spy on a callable's SDPA kernel choice."""

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
