"""hf_ext: drop-in components from recent systems papers for the Hugging Face stack.

Importing ``hf_ext`` is cheap: it registers names (attention implementations, Auto classes,
schedulers) with the libraries that are already imported or cheap to import, and loads every
component lazily on first attribute access.

Example:
    >>> import hf_ext
    >>> sorted(c.name for c in hf_ext.registry.COMPONENTS)[:2]
    ['adaspa', 'autoparallel']
"""

from __future__ import annotations

from hf_ext.utils.lazy import lazy_exports

__version__ = "0.1.0"

# Public lazy attributes: name -> "module:attribute".  Components add their one-line entry here.
_LAZY: dict[str, str] = {
    "registry": "hf_ext.registry:",
    "DataFlexConfig": "hf_ext.callbacks.dataflex.config:DataFlexConfig",
    "DataFlexCallback": "hf_ext.callbacks.dataflex.callback:DataFlexCallback",
    "DataFlexTrainer": "hf_ext.callbacks.dataflex.trainer:DataFlexTrainer",
    "FSEPConfig": "hf_ext.accelerate.fsep.config:FSEPConfig",
    "FSEPPlugin": "hf_ext.accelerate.fsep.plugin:FSEPPlugin",
    "prepare_fsep": "hf_ext.accelerate.fsep.plugin:prepare_fsep",
    "apply_plan": "hf_ext.accelerate.autoparallel.apply:apply_plan",
    "search_plan": "hf_ext.accelerate.autoparallel.search:search_plan",
    "SALEConfig": "hf_ext.attention.sale.config:SALEConfig",
    "enable_sale": "hf_ext.attention.sale.integration:enable_sale",
    "disable_sale": "hf_ext.attention.sale.integration:disable_sale",
    "TIEConfig": "hf_ext.generation.tie.config:TIEConfig",
    "enable_tie_scheduler": "hf_ext.generation.tie.cb:enable_tie_scheduler",
}

# `from hf_ext import *` exports the lazy names (each is imported then, not by `import hf_ext`)
__all__ = ["__version__", *_LAZY]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())

from hf_ext import _register  # noqa: E402

_register.register_all()
