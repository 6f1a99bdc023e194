"""hf_ext.utils.atomic.atomic_write_text: the saves' whole-file writes."""

from __future__ import annotations

import os

from hf_ext.utils.atomic import atomic_write_text


def test_atomic_write_gives_the_permissions_of_a_plain_write(tmp_path):
    plain = tmp_path / "plain.json"
    plain.write_text("{}")
    atomic = tmp_path / "atömic.json"
    atomic_write_text(atomic, "{}")
    assert atomic.read_text(encoding="utf-8") == "{}"
    assert os.stat(atomic).st_mode == os.stat(plain).st_mode
    atomic_write_text(str(atomic), "[]")  # replaces, leaves nothing else behind
    assert atomic.read_text(encoding="utf-8") == "[]"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atömic.json", "plain.json"]
