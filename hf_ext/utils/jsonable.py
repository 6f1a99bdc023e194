"""Plain-Python copies of nested results for ``json`` (numpy scalars, tuples, non-string keys)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def to_jsonable(value: Any, *, finite: bool = False) -> Any:
    """``value`` with dict keys as ``str``, tuples as lists and numpy scalars as Python numbers, recursively.

    ``finite=True``: NaN and infinities become ``None`` too (strict JSON, e.g. an HTTP response, has no NaN);
    otherwise they stay (Python's ``json`` writes and reads them back).
    """
    if isinstance(value, dict):
        return {str(k): to_jsonable(v, finite=finite) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, finite=finite) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if finite and isinstance(value, float) and not math.isfinite(value):
        return None
    return value
