"""PISA top-rho block-sparse attention (with first-order compensation) where calibration shows a
layer's attention is block-sparse."""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field, model_validator

from ditopt.graph import DiTGraph
from ditopt.profiles.fields import Bool, Float, check_in
from ditopt.registry import PassContext, PassResult, register_pass

from .collector import RHOS
from .substitution import AttentionConfig, AutoOr, substitute

class BlockSparseAttentionConfig(AttentionConfig):
    rho: Union[Annotated[Float, Field(gt=0.0, le=1.0)], AutoOr] = Field("auto", description="fraction of key blocks kept, one of the calibrated 0.125, 0.25, 0.5; auto: smallest calibrated rho keeping min_mass")
    compensate: Bool = Field(True, description="first-order compensation for the skipped blocks (PISA)")

    @model_validator(mode="after")
    def _calibrated_rho(self) -> "BlockSparseAttentionConfig":
        check_in("rho", self.rho, RHOS, "the fractions calibration measures")
        return self


@register_pass("block_sparse_attention", BlockSparseAttentionConfig, needs=("attention",), lossy=True,
               example={"tile": 2, "min_mass": 0.0, "max_cost": None, "rho": 0.5})
def block_sparse_attention(graph: DiTGraph, config: BlockSparseAttentionConfig, ctx: PassContext) -> PassResult:
    """Replace self/joint attention by PISA top-rho block-sparse attention where calibration shows it is block-sparse."""
    return substitute(graph, config, ctx, "block_sparse")
