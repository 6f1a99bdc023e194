"""Write a file whole or not at all (a save that fails leaves the previous file in place)."""

from __future__ import annotations

import contextlib
import os
import uuid


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file in the same folder and ``os.replace``.

    The temporary file is created like any new file (permissions from the umask, as ``open(path, "w")`` gives) and
    removed when the write fails."""
    path = os.fspath(path)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
