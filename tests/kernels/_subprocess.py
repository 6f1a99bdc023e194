"""Run one of this folder's case modules in a fresh Python and read back its ``@@RESULT@@`` JSON line.

A fresh process because Triton reads ``TRITON_INTERPRET`` once, when it is first imported: the interpreter
cases need it on, the sm_90 compile cases need it off, and the test session may have imported Triton already.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
MARK = "@@RESULT@@"


def run_case_module(module: str, *, interpret: bool, timeout: float) -> Any:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "kernels"), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", module], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    line = [x for x in proc.stdout.splitlines() if x.startswith(MARK)]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    return json.loads(line[-1][len(MARK) :])
