"""The README and docs/ stay true: every ```python block runs, and the component table matches the registry."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"^```python[^\n]*\n(.*?)^```", re.S | re.M)


def _blocks() -> list[tuple[str, int, str]]:
    out = []
    for doc in DOCS:
        if not doc.exists():
            continue
        for i, m in enumerate(_BLOCK.finditer(doc.read_text())):
            out.append((doc.relative_to(ROOT).as_posix(), i, m.group(1)))
    return out


BLOCKS = _blocks()


@pytest.mark.parametrize("doc,idx,code", BLOCKS, ids=[f"{d}#{i}" for d, i, _ in BLOCKS])
def test_doc_python_block_runs(doc, idx, code, tmp_path):
    res = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={
            **__import__("os").environ,
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1",
        },
    )
    assert res.returncode == 0, f"{doc} block {idx} failed:\n{code}\n--- stderr ---\n{res.stderr[-3000:]}"


def test_readme_quickstart_has_exactly_the_two_commands():
    text = (ROOT / "README.md").read_text()
    quick = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    cmds = [
        ln.strip()
        for blk in re.findall(r"```bash\n(.*?)```", quick, re.S)
        for ln in blk.splitlines()
        if ln.strip()
    ]
    assert cmds == ["make demo", "make test"]


def test_readme_table_matches_registry():
    from hf_ext import registry

    text = (ROOT / "README.md").read_text()
    rows = {}
    for ln in text.splitlines():
        m = re.match(r"\|\s*\[?`?([a-z_]+)`?\]?[^|]*\|\s*([^|]+?)\s*\|", ln)
        if m and m.group(1) in registry.names():
            rows[m.group(1)] = m.group(2)
    for c in registry.COMPONENTS:
        assert c.name in rows, f"README component table lacks {c.name}"
        want = "built" if c.status == "built" else "planned"
        assert want in rows[c.name].lower(), (
            f"README says {rows[c.name]!r} for {c.name}, registry says {c.status}"
        )
