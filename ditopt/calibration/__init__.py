"""Calibration: run the user's own sampling loop on an instrumented model and keep frozen,
serialisable statistics of the trajectory.

`calibrate(model, graph, needs, fn)` wraps the captured graph in a runtime whose plan records,
per step and CFG branch, the trajectory (the core's step recorder, `steps.py`: step count,
timesteps, CFG batch layout) and what the requested collectors need (registered by the pass
families that read them: caching's "trajectory" residual sketches, "attention", and the core's
"block_inputs"); `fn(instrumented)` is the user's sampling code (for the zoo:
`lambda m: bundle.sample(classes, seeds, model=m)`). What `fn` returns (final samples) is kept
as the reference for end-to-end checks.

Stats are stamped with the graph's structure hash and the number of steps, saved as one
safetensors file (tensors + JSON metadata, no pickle), and reused when the hash matches.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import CalibrationError
from ..graph import DiTGraph
from ..io import atomic_write_bytes
from ..runtime import OptimizedDiT
from .steps import StepLog

# 2: the block residual sketches are collector "trajectory"'s (passes/caching), their meta under
# meta["trajectory"]; version 1 (core-recorded, meta at the top level) loads as version 2.
STATS_VERSION = 2


@dataclass
class CalibStats:
    """Statistics of one calibration run. Tensors are indexed [trajectory, step, ...]."""

    graph_hash: str
    model_class: str
    num_steps: int
    timesteps: list[float]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    reference_samples: torch.Tensor | None = None

    def require(self, name: str, collector: str | None = None) -> torch.Tensor:
        """Tensor `name`; a CalibrationError naming the collector that records it when absent."""
        if name not in self.tensors:
            by = f"collector {collector!r}" if collector else "the collector that provides it"
            raise CalibrationError(f"calibration stats have no {name!r}; re-run calibration with {by} "
                                   "(optimize calibrates with the collectors its profile's passes need)")
        return self.tensors[name]

    def trajectory_samples(self, num_samples: int) -> list[int] | None:
        """Which of the calibration function's `num_samples` returned samples each recorded
        trajectory belongs to, or None where the batching does not say.

        Trajectories are recorded per (generation, CFG branch, batch row). Generations are taken
        to return their samples in order; a generation of r rows returns r samples, or r / 2 when
        CFG is batched into the call (rows i and i + r/2 are one sample's two branches, as
        diffusers pipelines and the zoo build them)."""
        layout = self.meta.get("trajectory_layout")
        if not layout:
            return None
        rows_per_gen: dict[int, int] = {}
        for generation, _branch, rows in layout:
            rows_per_gen.setdefault(generation, rows)
        total = sum(rows_per_gen.values())
        if total == num_samples:
            per_sample = 1
        elif total == 2 * num_samples and all(r % 2 == 0 for r in rows_per_gen.values()):
            per_sample = 2
        else:
            return None
        offsets, offset = {}, 0
        for generation, rows in rows_per_gen.items():
            offsets[generation] = offset
            offset += rows // per_sample
        owners = []
        for generation, _branch, rows in layout:
            share = rows // per_sample
            owners.extend(offsets[generation] + row % share for row in range(rows))
        return owners

    def restricted_to_samples(self, keep: list[int], num_samples: int) -> "CalibStats | None":
        """These stats with only the trajectories of the samples in `keep` (indices into the
        calibration function's returned samples) and those reference samples; None where the
        trajectories cannot be matched to samples. Lets the budget search fit and judge on some
        samples while the others stay unseen for the held-out check."""
        owners = self.trajectory_samples(num_samples)
        if owners is None:
            return None
        keep_set = set(keep)
        per_trajectory = self.collector_per_trajectory()
        rows = torch.tensor([i for i, owner in enumerate(owners) if owner in keep_set], dtype=torch.long)
        count = len(owners)
        tensors = {
            name: (t.index_select(0, rows) if name in per_trajectory and t.dim() and t.shape[0] == count else t)
            for name, t in self.tensors.items()
        }
        meta = {**self.meta, "trajectories": int(rows.numel()),
                "trajectory_layout": None, "restricted_to_samples": sorted(keep_set)}
        reference = self.reference_samples[sorted(keep_set)] if self.reference_samples is not None else None
        return CalibStats(self.graph_hash, self.model_class, self.num_steps, list(self.timesteps), tensors, meta, reference)

    def collector_per_trajectory(self) -> set[str]:
        """Tensors a collector declared as indexed [trajectory, ...] in the core's trajectory
        order (its meta's `per_trajectory`): what a restriction to some samples subsets."""
        return {n for m in self.meta.values() if isinstance(m, dict) for n in m.get("per_trajectory", ())}

    def check_graph(self, graph: DiTGraph) -> None:
        if graph.meta.get("capture_hash", graph.structure_hash()) != self.graph_hash:
            raise CalibrationError(
                f"calibration stats were collected on graph {self.graph_hash}, not on this model's graph "
                f"{graph.meta.get('capture_hash', graph.structure_hash())}: re-run calibration for this model and input shape"
            )

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save

        tensors = {k: v.contiguous() for k, v in self.tensors.items()}
        if self.reference_samples is not None:
            tensors["reference_samples"] = self.reference_samples.contiguous()
        header = {
            "version": STATS_VERSION,
            "graph_hash": self.graph_hash,
            "model_class": self.model_class,
            "num_steps": self.num_steps,
            "timesteps": self.timesteps,
            "meta": self.meta,
        }
        return atomic_write_bytes(path, save(tensors, metadata={"ditopt": json.dumps(header)}))

    @classmethod
    def load(cls, path: str | Path) -> "CalibStats":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise CalibrationError(f"no calibration stats at {path}")
        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {}).get("ditopt", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        version = header.get("version")
        if version == 1:
            header = _from_version_1(header, tensors)
        elif version != STATS_VERSION:
            raise CalibrationError(f"{path}: stats version {version} is not {STATS_VERSION}; re-run calibration")
        ref = tensors.pop("reference_samples", None)
        return cls(header["graph_hash"], header["model_class"], header["num_steps"], header["timesteps"], tensors, header["meta"], ref)


def _from_version_1(header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Version 1 recorded the block residual sketches in the core, their meta at the top level:
    the same tensors, the meta moved to where collector "trajectory" keeps it."""
    meta = dict(header["meta"])
    if "block_residual_sketch" in tensors:
        meta["trajectory"] = {**{k: meta.pop(k) for k in ("blocks", "sketch", "stream_shape") if k in meta},
                              "per_trajectory": ["block_residual_sketch", "block_residual_norm"]}
    return {**header, "version": STATS_VERSION, "meta": meta}


def calibrate(
    model: nn.Module,
    graph: DiTGraph,
    needs: list[str] | tuple[str, ...],
    fn: Callable[[nn.Module], Any],
    *,
    progress: bool = True,
) -> CalibStats:
    """Run `fn` (the user's sampling loop) on an instrumented runtime and return stats.

    The trajectory (step count, timesteps, CFG batch layout, the samples `fn` returns) is always
    recorded. The names in `needs` are collectors registered by the pass families that read
    them (`ditopt.registry.register_collector`): a factory `f(graph)` returning an object with
    `instrument(graph) -> graph` (add recording stages or outputs; never change results) and
    `summarise() -> (tensors, meta)`; its meta is kept as `stats.meta[name]`, and the tensors its
    meta lists as `per_trajectory` follow the core's trajectory order.
    """
    from ..capture import capture
    from ..registry import get_collector

    log = StepLog()
    collectors = []
    for name in needs:
        try:
            collectors.append(get_collector(name)(graph))
        except Exception as exc:  # unknown collector: say which
            raise CalibrationError(f"cannot set up calibration collector {name!r}: {exc}") from exc

    def build(kwargs: dict[str, Any]) -> DiTGraph:
        g = log.instrument(capture(model, kwargs))
        for collector in collectors:
            g = collector.instrument(g)
        return g

    instrumented = OptimizedDiT(model, build)
    with torch.no_grad():
        samples = fn(instrumented)
    steps, timesteps, layout, trajectories = log.trajectory()
    stats = CalibStats(
        graph_hash=graph.meta.get("capture_hash", graph.structure_hash()),
        model_class=graph.model_class,
        num_steps=steps,
        timesteps=timesteps,
        meta={
            "trajectories": trajectories,
            "trajectory_layout": layout,
            # Every call had equal latent halves: CFG batched into one call (rows of the first
            # half unconditional). Lets calibrated_schedule try conditional-only steps.
            "batched_cfg": log.batched_cfg(),
        },
        reference_samples=samples.detach().cpu() if isinstance(samples, torch.Tensor) else None,
    )
    for collector in collectors:
        tensors, meta = collector.summarise()
        stats.tensors.update(tensors)
        stats.meta[collector.name] = meta
    return stats
