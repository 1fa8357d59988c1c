"""Calibration: run the user's own sampling loop on an instrumented model and keep frozen,
serialisable statistics of the trajectory.

`calibrate(model, graph, needs, fn)` wraps the captured graph in a runtime whose plan records,
per step and CFG branch, what the requested collectors need; `fn(instrumented)` is the user's
sampling code (for the zoo: `lambda m: bundle.sample(classes, seeds, model=m)`). What `fn`
returns (final samples) is kept as the reference for end-to-end checks.

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
from ..graph import DiTGraph, latent_halves_equal
from ..io import atomic_write_bytes
from ..plan import RunSegments, Stage, StepContext
from ..runtime import OptimizedDiT
from .streams import SpanIO, span_io

STATS_VERSION = 1
# Tensors indexed [trajectory, ...]: what a restriction to some samples' trajectories subsets.
PER_TRAJECTORY = ("block_residual_sketch", "block_residual_norm")
SKETCH_SIZE = 2048  # residual elements kept per block and step: enough to estimate norms of differences


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

    def require(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise CalibrationError(f"calibration stats have no {name!r}; re-run calibration with the collector that provides it")
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
        per_trajectory = set(PER_TRAJECTORY) | self.collector_per_trajectory()
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
        """Tensors a plugin collector declared as indexed [trajectory, ...] in the core's
        trajectory order (its meta's `per_trajectory`), so a restriction subsets them too."""
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
        if header.get("version") != STATS_VERSION:
            raise CalibrationError(f"{path}: stats version {header.get('version')} is not {STATS_VERSION}; re-run calibration")
        ref = tensors.pop("reference_samples", None)
        return cls(header["graph_hash"], header["model_class"], header["num_steps"], header["timesteps"], tensors, header["meta"], ref)


class TrajectoryRecorder(Stage):
    """Runs the blocks one by one and records, per call, what the caching passes need:
    a fixed random sketch of each block's residual on the image stream and its norm."""

    kind = "calibration-recorder"

    def __init__(self, io: SpanIO, block_names: tuple[str, ...], sink: "Recording") -> None:
        self.io, self.block_names, self.sink = io, block_names, sink

    def segment_names(self) -> tuple[str, ...]:
        return self.block_names

    def run(self, graph: DiTGraph, env: dict[str, Any], ctx: StepContext) -> None:
        stream_in = self.io.primary_input
        residuals = []
        for name in self.block_names:
            seg = graph.segment(name)
            before = env[stream_in] if stream_in in env else None
            seg.run(env)
            # The primary stream's name changes block to block: follow the block's own pairing.
            out_name = self.sink.block_stream[name]
            after = env[out_name]
            residuals.append(self.sink.sketch(after - before) if before is not None else None)
            stream_in = out_name
        self.sink.add(ctx, residuals, batched_cfg=latent_halves_equal(graph, env))
        ctx.record.setdefault("computed", []).extend(self.block_names)


class Recording:
    """Host-side store filled during calibration."""

    def __init__(self, graph: DiTGraph, seed: int = 0) -> None:
        self.block_stream = {seg.name: span_io(graph, (seg.name,)).primary_output for seg in graph.block_segments}
        self.seed = seed
        self.index: torch.Tensor | None = None
        self.row_shape: tuple[int, ...] = ()  # one batch row of the first sketched stream
        self.calls: list[dict[str, Any]] = []

    def sketch(self, residual: torch.Tensor) -> torch.Tensor:
        flat = residual.detach().float().reshape(residual.shape[0], -1)
        if self.index is None:
            gen = torch.Generator().manual_seed(self.seed)
            k = min(SKETCH_SIZE, flat.shape[1])
            self.index = torch.randperm(flat.shape[1], generator=gen)[:k].sort().values
            self.row_shape = tuple(residual.shape[1:])
        return flat[:, self.index.to(flat.device)].cpu()

    def add(self, ctx: StepContext, residuals: list[torch.Tensor], batched_cfg: bool = False) -> None:
        self.calls.append(
            {"generation": ctx.generation, "step": ctx.step, "branch": ctx.branch, "timestep": ctx.timestep, "res": torch.stack(residuals, 1),
             "batched_cfg": batched_cfg}
        )


class TrajectoryCollector:
    """The built-in collector: block residual sketches per step and branch (caching passes)."""

    name = "trajectory"

    def __init__(self, graph: DiTGraph) -> None:
        self.recording = Recording(graph)

    def instrument(self, g: DiTGraph) -> DiTGraph:
        blocks = tuple(s.name for s in g.block_segments)
        recorder = TrajectoryRecorder(span_io(g, blocks), blocks, self.recording)
        plan = (RunSegments((g.prologue.name,)), recorder, RunSegments((g.epilogue.name,)))
        return g.evolve(plan=plan)


def calibrate(
    model: nn.Module,
    graph: DiTGraph,
    needs: list[str] | tuple[str, ...],
    fn: Callable[[nn.Module], Any],
    *,
    progress: bool = True,
) -> CalibStats:
    """Run `fn` (the user's sampling loop) on an instrumented runtime and return stats.

    The trajectory (step count, timesteps, block residual sketches) is always recorded. Other
    names in `needs` are collectors registered by plugins (`ditopt.registry.register_collector`):
    a factory `f(graph)` returning an object with `instrument(graph) -> graph` (add recording
    stages or outputs; never change results) and `summarise() -> (tensors, meta)`.
    """
    from ..capture import capture
    from ..registry import get_collector

    trajectory = TrajectoryCollector(graph)
    extra = []
    for name in needs:
        if name == "trajectory":
            continue
        try:
            extra.append(get_collector(name)(graph))
        except Exception as exc:  # unknown collector: say which
            raise CalibrationError(f"cannot set up calibration collector {name!r}: {exc}") from exc

    def build(kwargs: dict[str, Any]) -> DiTGraph:
        g = trajectory.instrument(capture(model, kwargs))
        for collector in extra:
            g = collector.instrument(g)
        return g

    instrumented = OptimizedDiT(model, build)
    with torch.no_grad():
        samples = fn(instrumented)
    if not trajectory.recording.calls:
        raise CalibrationError("the calibration function never called the model it was given; it must sample with that model")
    stats = _summarise(graph, trajectory.recording, samples)
    for collector in extra:
        tensors, meta = collector.summarise()
        stats.tensors.update(tensors)
        stats.meta[collector.name] = meta
    return stats


def _summarise(graph: DiTGraph, recording: Recording, samples: Any) -> CalibStats:
    calls = recording.calls
    steps = max(c["step"] for c in calls) + 1
    # One trajectory per (generation, branch, row): rows of a batched call are separate trajectories.
    trajectories: dict[tuple[int, int], dict[int, torch.Tensor]] = {}
    timesteps: dict[int, float] = {}
    for c in calls:
        trajectories.setdefault((c["generation"], c["branch"]), {})[c["step"]] = c["res"]
        if c["timestep"] is not None:
            timesteps.setdefault(c["step"], c["timestep"])
    complete = [t for t in trajectories.values() if len(t) == steps]
    # (generation, branch, rows) of each complete trajectory group, in stacking order; set only
    # when every generation was recorded whole, so rows can be matched to returned samples.
    layout = [[g, b, int(next(iter(t.values())).shape[0])] for (g, b), t in trajectories.items() if len(t) == steps]
    if len(complete) != len(trajectories):
        layout = None
    if not complete:
        raise CalibrationError("no complete sampling trajectory was recorded: the calibration function must run whole generations")
    # [trajectories, steps, blocks, sketch]; rows of a batch become trajectories too.
    stacked = torch.cat([torch.stack([t[s] for s in range(steps)], 0).transpose(0, 1) for t in complete], 0)
    norms = stacked.norm(dim=-1)
    tensors = {"block_residual_sketch": stacked.half(), "block_residual_norm": norms}
    if recording.index is not None:
        # Which element of a batch row each sketch column is (flat index into `stream_shape`):
        # lets a pass fit per-channel quantities from the sketch.
        tensors["sketch_index"] = recording.index.clone()
    reference = samples.detach().cpu() if isinstance(samples, torch.Tensor) else None
    return CalibStats(
        graph_hash=graph.meta.get("capture_hash", graph.structure_hash()),
        model_class=graph.model_class,
        num_steps=steps,
        timesteps=[timesteps.get(s, float("nan")) for s in range(steps)],
        tensors=tensors,
        meta={
            "trajectories": int(stacked.shape[0]),
            "blocks": [s.name for s in graph.block_segments],
            "sketch": int(stacked.shape[-1]),
            "stream_shape": list(recording.row_shape),
            "trajectory_layout": layout,
            # Every call had equal latent halves: CFG batched into one call (rows of the first
            # half unconditional). Lets calibrated_schedule try conditional-only steps.
            "batched_cfg": all(c["batched_cfg"] for c in calls),
        },
        reference_samples=reference,
    )
