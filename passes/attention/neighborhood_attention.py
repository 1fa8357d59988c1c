"""2-D neighbourhood attention (NATTEN-style tiled windows) where calibration shows a layer's attention is local."""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field, model_validator

from ditopt.graph import DiTGraph
from ditopt.profiles.fields import Int, check_in
from ditopt.registry import PassContext, PassResult, register_pass

from .collector import RADII
from .substitution import AttentionConfig, AutoOr, substitute

class NeighborhoodAttentionConfig(AttentionConfig):
    radius: Union[Annotated[Int, Field(ge=0)], AutoOr] = Field("auto", description="window radius in tiles, one of the calibrated radii 1, 2, 3; auto: smallest calibrated radius keeping min_mass")

    @model_validator(mode="after")
    def _calibrated_radius(self) -> "NeighborhoodAttentionConfig":
        check_in("radius", self.radius, RADII, "the radii calibration measures")
        return self


@register_pass("neighborhood_attention", NeighborhoodAttentionConfig, needs=("attention",), lossy=True,
               example={"tile": 2, "min_mass": 0.0, "max_cost": None, "radius": 1})
def neighborhood_attention(graph: DiTGraph, config: NeighborhoodAttentionConfig, ctx: PassContext) -> PassResult:
    """Replace self/joint attention by tiled 2-D neighbourhood attention where calibration shows it is local."""
    return substitute(graph, config, ctx, "neighborhood")
