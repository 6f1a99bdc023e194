"""DataFlex weighters: loss, adapt."""

from hf_ext.callbacks.dataflex.weighters.adapt import AdaptWeighter
from hf_ext.callbacks.dataflex.weighters.loss import LossWeighter

__all__ = ["AdaptWeighter", "LossWeighter"]
