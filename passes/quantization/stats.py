"""Per-layer activation statistics, measured by replaying the original blocks on the recorded
calibration rows (ditopt.calibration.replay) and reading every linear layer's input on the way.

Per site: per-input-channel absmax, the fluctuation J = ||X||_F / sqrt(B N C) of ALGORITHMS.md
(the input's RMS), and the channel outlier ratio max_c absmax_c / median_c absmax_c, which is what
ARS decides on (J alone moves with the layer's scale; the ratio says whether a few channels carry
outliers). Per step bucket as well, since DiT activations drift along the trajectory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ditopt.calibration.replay import BUCKETS, CalibrationReplay
from ditopt.graph import DiTGraph

from .rewrite import Site


@dataclass
class LayerStats:
    absmax: torch.Tensor  # [I]
    mean_sq: torch.Tensor  # [I] per-channel mean square (weights the weight quantizers' error)
    j: float
    outlier_ratio: float
    by_step: dict[str, float]  # outlier ratio per step bucket

    def to_dict(self) -> dict[str, Any]:
        return {"j": self.j, "outlier_ratio": self.outlier_ratio, "outlier_ratio_by_step": self.by_step}


def _outlier_ratio(channel_absmax: torch.Tensor) -> float:
    return float(channel_absmax.max() / channel_absmax.median().clamp_min(1e-12))


def linear_input_stats(replay: CalibrationReplay, graph: DiTGraph, sites: list[Site]) -> dict[str, LayerStats]:
    by_segment: dict[str, dict[str, str]] = {}
    for site in sites:
        for node in site.nodes:
            by_segment.setdefault(site.segment, {})[node] = site.target
    absmax: dict[str, list[torch.Tensor]] = {}
    chan_sq: dict[str, torch.Tensor] = {}
    count: dict[str, int] = {}

    def sink(target: str, x: torch.Tensor) -> None:
        x2 = x.detach().float().reshape(x.shape[0], -1, x.shape[-1])  # [batch, tokens, C]
        absmax.setdefault(target, []).append(x2.abs().amax(1))  # per row: [batch, C]
        chan_sq[target] = chan_sq.get(target, 0) + x2.pow(2).sum((0, 1))
        count[target] = count.get(target, 0) + x2.numel()

    replay.read(by_segment, sink)
    stats = {}
    for target, parts in absmax.items():
        rows = torch.cat(parts, 0)  # [replayed rows, C]
        chan = rows.amax(0)
        by_step = {name: _outlier_ratio(rows[replay.bucket == i].amax(0))
                   for i, name in enumerate(BUCKETS) if (replay.bucket == i).any()}
        mean_sq = chan_sq[target] / (count[target] / chan.numel())
        j = float(chan_sq[target].sum() / max(count[target], 1)) ** 0.5
        stats[target] = LayerStats(chan, mean_sq, j, _outlier_ratio(chan), by_step)
    return stats
