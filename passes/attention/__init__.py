"""Attention substitution (issue #5): calibrated 2-D neighbourhood and PISA block-sparse
attention, and distilled linear attention (issue #35). Importing registers the "attention"
calibration collector and the passes `neighborhood_attention`, `block_sparse_attention` and
`linear_attention`."""

from . import block_sparse_attention, collector, linear_attention, neighborhood_attention  # noqa: F401  (registers)
from .collector import AttentionCollector, attention_heatmap
from .masses import attention_masses

__all__ = ["AttentionCollector", "attention_heatmap", "attention_masses"]
