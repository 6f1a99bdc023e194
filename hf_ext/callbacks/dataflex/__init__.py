"""DataFlex: dynamic data selection, mixture and reweighting for transformers / TRL trainers (issue #9).

Switch on with one line::

    trainer = DataFlexTrainer(model, args, train_dataset=ds, dataflex="dataflex.yaml")
    # or, with a stock Trainer (selectors and mixers):
    Trainer(..., callbacks=[DataFlexCallback.from_config("dataflex.yaml", train_dataset=ds)])

Methods are built by name: ``build("selector", "less", budget=0.3)``; see
:mod:`hf_ext.callbacks.dataflex.registry`. ``DataFlexSFTTrainer`` (TRL) is created lazily.
"""

from __future__ import annotations

from hf_ext.utils.lazy import lazy_exports

_LAZY = {
    "DataFlexConfig": "hf_ext.callbacks.dataflex.config",
    "DataFlexCallback": "hf_ext.callbacks.dataflex.callback",
    "DataFlexSampler": "hf_ext.callbacks.dataflex.sampler",
    "DataFlexTrainer": "hf_ext.callbacks.dataflex.trainer",
    "DataFlexMixin": "hf_ext.callbacks.dataflex.trainer",
    "DataFlexSFTTrainer": "hf_ext.callbacks.dataflex.trainer",
    "make_dataflex_trainer": "hf_ext.callbacks.dataflex.trainer",
    "UpdateContext": "hf_ext.callbacks.dataflex.base",
    "build": "hf_ext.callbacks.dataflex.registry",
    "names": "hf_ext.callbacks.dataflex.registry",
    "register": "hf_ext.callbacks.dataflex.registry",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
