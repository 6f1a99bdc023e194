"""Name registry for DataFlex methods: ``build("selector", "less", **cfg)``.

Three kinds of method exist: ``selector`` (which samples to train on next), ``mixer`` (domain
weights) and ``weighter`` (per-sample loss weights). A method registers itself with
:func:`register`; :func:`build` instantiates it from keyword arguments, checking names and
fields before any work.

Example:
    >>> from hf_ext.callbacks.dataflex.registry import build, names
    >>> "less" in names("selector")
    True
    >>> build("mixer", "dynamic", schedule=[{"step": 0, "weights": [0.5, 0.5]}]).name
    'dynamic'
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

KINDS = ("selector", "mixer", "weighter")

_REGISTRY: dict[str, dict[str, type]] = {k: {} for k in KINDS}
_LOADED = False


def register(kind: str, name: str) -> Callable[[type], type]:
    """Class decorator registering a method under ``(kind, name)``."""
    _check_kind(kind)

    def deco(cls: type) -> type:
        _REGISTRY[kind][name] = cls
        cls.name = name  # type: ignore[attr-defined]
        return cls

    return deco


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not a DataFlex method kind; allowed: {', '.join(KINDS)}")


def _load_builtin() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from hf_ext.callbacks.dataflex import mixers, selectors, weighters  # noqa: F401  (registers)


def names(kind: str) -> list[str]:
    """Registered method names of one kind, sorted."""
    _check_kind(kind)
    _load_builtin()
    return sorted(_REGISTRY[kind])


def get_class(kind: str, name: str) -> type:
    """The class registered as ``(kind, name)``; ``ValueError`` listing the registered names otherwise."""
    _check_kind(kind)
    _load_builtin()
    try:
        return _REGISTRY[kind][name]
    except KeyError:
        raise ValueError(
            f"unknown DataFlex {kind} {name!r}; registered {kind}s: {', '.join(sorted(_REGISTRY[kind]))}"
        ) from None


def coerce_value(owner: str, field_name: str, annotation: Any, value: Any) -> Any:
    """Check/convert ``value`` for a field annotated ``float``/``int``/``bool`` (optionally ``| None``).

    Strings that parse as the number are converted (YAML reads ``1e-3`` as a string); anything else
    of the wrong type, and a NaN or infinite float, is a ``ValueError`` naming ``owner``'s field. Other
    annotations pass unchanged.
    """
    ann = str(annotation).replace(" ", "")
    optional = ann.endswith("|None") or ann.startswith("None|")
    base = ann.replace("|None", "").replace("None|", "")
    if base not in ("float", "int", "bool"):
        return value
    if value is None:
        if optional:
            return None
        raise ValueError(f"{owner} field {field_name!r} must be a {base}, got None")
    want = ("an int" if base == "int" else f"a {base}") + (" or None" if optional else "")
    if base == "bool":
        if isinstance(value, bool):
            return value
        raise ValueError(f"{owner} field {field_name!r} must be {want} (true/false), got {value!r}")
    if isinstance(value, bool):
        raise ValueError(f"{owner} field {field_name!r} must be {want}, got the boolean {value!r}")
    if isinstance(value, str):
        try:
            value = float(value.strip()) if base == "float" else int(value.strip())
        except ValueError:
            raise ValueError(
                f"{owner} field {field_name!r} must be {want}, got the string {value!r}"
            ) from None
    if base == "float" and isinstance(value, (int, float)):
        if not math.isfinite(value):  # NaN passes every range check (`nan <= 0` is False)
            raise ValueError(
                f"{owner} field {field_name!r} must be a finite float{' or None' if optional else ''}, got {value!r}"
            )
        return float(value)
    if base == "int":
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    raise ValueError(f"{owner} field {field_name!r} must be {want}, got {value!r}")


def build(kind: str, name: str, **cfg: Any) -> Any:
    """Instantiate the method ``name`` of ``kind`` with its config fields ``cfg``.

    Raises ``ValueError`` for an unknown kind/name (listing the registered ones) or an unknown
    config field (listing the allowed fields).
    """
    cls = get_class(kind, name)
    if dataclasses.is_dataclass(cls):
        allowed = [f.name for f in dataclasses.fields(cls) if f.init]
        bad = sorted(set(cfg) - set(allowed))
        if bad:
            raise ValueError(f"{kind} {name!r} got unknown config field(s) {bad}; allowed fields: {allowed}")
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        cfg = {k: coerce_value(f"{kind} {name!r}", k, types[k], v) for k, v in cfg.items()}
    return cls(**cfg)
