"""Name registration done at ``import hf_ext``.

Each component owns one function here. A function may only register names (attention
implementations, Auto classes, scheduler keys); it must not import diffusers, trl or triton,
and it must be idempotent. Failures are logged, never raised: a broken optional integration
must not make ``import hf_ext`` fail.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("hf_ext")

_DONE = False


def register_all() -> None:
    """Run every component's registration once."""
    global _DONE
    if _DONE:
        return
    _DONE = True
    for fn in _REGISTRATIONS:
        try:
            fn()
        except Exception as exc:  # pragma: no cover - depends on installed versions
            logger.warning("hf_ext: registration %s failed: %s", fn.__name__, exc)


# Components append their registration functions to this list (one line each).
_REGISTRATIONS: list = []
