"""DataFlex selectors: less, nice, cluster_less, loss, delta_loss, near, random."""

from hf_ext.callbacks.dataflex.selectors.gradient import ClusterLessSelector, LessSelector, NiceSelector
from hf_ext.callbacks.dataflex.selectors.loss import DeltaLossSelector, LossSelector
from hf_ext.callbacks.dataflex.selectors.near import NearSelector, kmeans
from hf_ext.callbacks.dataflex.selectors.random import RandomSelector

__all__ = [
    "ClusterLessSelector",
    "DeltaLossSelector",
    "LessSelector",
    "LossSelector",
    "NearSelector",
    "NiceSelector",
    "RandomSelector",
    "kmeans",
]
