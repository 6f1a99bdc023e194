"""DataFlex mixers: doremi, odm, dynamic."""

from hf_ext.callbacks.dataflex.mixers.doremi import DoReMiMixer
from hf_ext.callbacks.dataflex.mixers.dynamic import DynamicMixer
from hf_ext.callbacks.dataflex.mixers.odm import ODMMixer

__all__ = ["DoReMiMixer", "DynamicMixer", "ODMMixer"]
