"""FSEP fully sharded expert parallelism with load-aware re-layout (LAER-MoE) (issue #7).

Example (inside ``torchrun --nproc_per_node 2``)::

    from hf_ext.accelerate.fsep import FSEPConfig, prepare_fsep
    model = prepare_fsep(model, FSEPConfig())
"""

from __future__ import annotations

from hf_ext.utils.lazy import lazy_exports

_LAZY = {
    "FSEPConfig": "hf_ext.accelerate.fsep.config",
    "FSEPExperts": "hf_ext.accelerate.fsep.layer",
    "FSEPState": "hf_ext.accelerate.fsep.layer",
    "Layout": "hf_ext.accelerate.fsep.planner",
    "LoadPlanner": "hf_ext.accelerate.fsep.planner",
    "FSEPPlugin": "hf_ext.accelerate.fsep.plugin",
    "prepare_fsep": "hf_ext.accelerate.fsep.plugin",
    "remove_fsep": "hf_ext.accelerate.fsep.plugin",
    "save_fsep_pretrained": "hf_ext.accelerate.fsep.plugin",
    "load_fsep_state_dict": "hf_ext.accelerate.fsep.plugin",
    "fsep_full_state_dict": "hf_ext.accelerate.fsep.plugin",
    "fsep_layers": "hf_ext.accelerate.fsep.plugin",
    "prepare_fsep_optimizer": "hf_ext.accelerate.fsep.layer",
    "average_dense_gradients": "hf_ext.accelerate.fsep.plugin",
    "fsep_clip_grad_norm_": "hf_ext.accelerate.fsep.plugin",
    "SUPPORTED_MODEL_TYPES": "hf_ext.accelerate.fsep.plugin",
    "MoEShape": "hf_ext.accelerate.fsep.cost_model",
    "Hardware": "hf_ext.accelerate.fsep.cost_model",
    "layer_cost": "hf_ext.accelerate.fsep.cost_model",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
