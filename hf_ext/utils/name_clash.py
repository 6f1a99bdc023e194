"""One policy for names hf_ext registers in other libraries' registries (attention implementations, continuous
batching schedulers, Auto classes).

hf_ext never silently replaces an entry it did not make:

* the automatic registration (``import hf_ext`` and its post-import hooks) leaves a foreign entry in place and
  warns once (:class:`RegistrationClashWarning`), naming the registry, the name, the entry found and the fix;
* an explicit call (``enable_sale``, ``register_sale()``, ``enable_tie_scheduler``, ``tie.cb.register()``,
  ``latent_omni.register_now()``) raises a ``ValueError`` with the same text before it changes anything;
* ``overwrite=True`` on those calls hands the name to hf_ext on purpose; the undo calls (``tie.cb.unregister()``,
  ``sale.unregister_sale()``, ``latent_omni.unregister()``) remove hf_ext's entries and put the replaced one back.

Registering our own object again (a second ``import hf_ext``, a reload that made fresh copies of our modules,
enabling twice) is silent: an entry counts as ours when it is our object or has our object's module and
qualified name.

Example:
    >>> import json
    >>> may_register("demo registry", "x", None, json.dumps, fix="", on_clash="raise")
    True
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import MutableMapping
from typing import Any

ON_CLASH = ("raise", "warn")

_WARNED: set[tuple[str, str]] = set()
_LOCK = threading.Lock()


class RegistrationClashWarning(UserWarning):
    """A name hf_ext registers was already taken by another object, which hf_ext left in place."""


def _ident(obj: Any) -> tuple[str, str] | None:
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str):
        return None
    return module, qualname


def is_ours(current: Any, ours: Any) -> bool:
    """``current`` is ``ours`` or an earlier copy of it (same module and qualified name, e.g. after a reload)."""
    if current is ours:
        return True
    ident = _ident(ours)
    return ident is not None and _ident(current) == ident


def clash_message(registry: str, name: str, current: Any, fix: str) -> str:
    """The text of the warning / error for ``name`` in ``registry`` held by ``current``."""
    return (
        f"{name!r} in {registry} is already registered to {current!r}, which is not hf_ext's; hf_ext left it in "
        f"place. Register yours under another name, or call {fix} to give {name!r} to hf_ext."
    )


def check_on_clash(on_clash: str) -> None:
    """Refuse an ``on_clash`` value other than ``"raise"`` / ``"warn"``."""
    if on_clash not in ON_CLASH:
        raise ValueError(f"on_clash must be one of {ON_CLASH}, got {on_clash!r}")


def may_register(registry: str, name: str, current: Any, ours: Any, *, fix: str, on_clash: str) -> bool:
    """Whether ``ours`` may be stored under ``name`` where ``current`` is now (``None``: nothing there).

    Args:
        registry: the registry in words, e.g. ``"transformers' AttentionInterface"``.
        name: the key.
        current: the entry under ``name`` now, or ``None``.
        ours: the object hf_ext registers.
        fix: the call that hands the name to hf_ext, for the message (e.g. ``"register_sale(overwrite=True)"``).
        on_clash: ``"raise"`` (``ValueError``) or ``"warn"`` (once per registry and name, then ``False``).

    Returns:
        ``True`` when the name is free or already ours; ``False`` when a foreign entry is kept (``"warn"``).
    """
    check_on_clash(on_clash)
    if current is None or is_ours(current, ours):
        return True
    msg = clash_message(registry, name, current, fix)
    if on_clash == "raise":
        raise ValueError(msg)
    with _LOCK:
        first = (registry, name) not in _WARNED
        _WARNED.add((registry, name))
    if first:
        warnings.warn(msg, RegistrationClashWarning, stacklevel=3)
    return False


def note_replaced(replaced: dict[str, Any], slot: str, current: Any, ours: Any) -> None:
    """Before ``ours`` is written where ``current`` is: keep a foreign ``current`` in ``replaced[slot]`` for the undo
    call, and forget what was kept there when the place is empty (a replaced entry someone deleted since is gone)."""
    if current is None:
        replaced.pop(slot, None)
    elif not is_ours(current, ours):
        replaced[slot] = current


def remove_ours(
    table: MutableMapping[Any, Any], key: Any, ours: Any, replaced: dict[str, Any], slot: str
) -> None:
    """The undo of a registration: delete ``table[key]`` where it is still ``ours`` and put back the entry kept in
    ``replaced[slot]`` (taken out of ``replaced``); a no-op where the entry is not ours."""
    if not is_ours(table.get(key), ours):
        return
    del table[key]
    if slot in replaced:
        table[key] = replaced.pop(slot)
