"""The block stack replayed on recorded calibration activations (collector "block_inputs"), shared
by the passes that measure a candidate rewrite's error or fit a replacement on real activations
(layer pruning; quantization).

`CalibrationReplay` rebuilds, from the statistics, the values the blocks read on a sample of
(trajectory, step) rows, runs a candidate graph's blocks and epilogue on them in batches of the
graph's own batch size, and measures the final output's squared error against the original's,
overall and per step bucket. The original run also keeps, per stream value at every block
boundary, a fixed subset of its tokens: the teacher activations a bridge is fitted on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.fx as fx

from ditopt.errors import CalibrationError
from ditopt.graph import DiTGraph

from .block_inputs import PREFIX

BUCKETS = ("early", "middle", "late")
FIT_TOKENS = 32  # tokens per row kept for fitting bridges


@dataclass
class ReplayError:
    total: float  # sum of squared error / sum of squared original output, over all rows
    buckets: dict[str, float]  # the same per third of the recorded steps

    def to_dict(self) -> dict[str, Any]:
        return {"rel_sq_err": self.total, "by_step": self.buckets}


class _NodeReader(fx.Interpreter):
    """Runs a segment, handing the watched nodes' `arg`-th argument to `sink(key, value)`."""

    def __init__(self, module: fx.GraphModule, watch: dict[str, str], arg: int, sink) -> None:
        super().__init__(module)
        self.watch, self.arg, self.sink = watch, arg, sink

    def run_node(self, n: fx.Node) -> Any:
        if n.name in self.watch:
            self.sink(self.watch[n.name], self.env[n.args[self.arg]])
        return super().run_node(n)


class CalibrationReplay:
    @staticmethod
    def recorded(stats: Any) -> bool:
        """Whether `stats` holds the block inputs a replay needs."""
        return stats is not None and bool((stats.meta.get("block_inputs") or {}).get("names"))

    def __init__(self, graph: DiTGraph, stats: Any, max_rows: int = 128, seed: int = 0) -> None:
        if not self.recorded(stats):
            raise CalibrationError("this pass replays the blocks on calibration activations: calibrate with the "
                                   "'block_inputs' collector (the pass's needs), with a calibration function that samples")
        meta = stats.meta["block_inputs"]
        if meta.get("unreplayable"):
            raise CalibrationError(f"the blocks read {', '.join(meta['unreplayable'])}, which change between calls but "
                                   "have no batch dimension; the blocks of this model cannot be replayed")
        self.graph = graph
        self.batch = self._batch(graph, set(meta["batched"]))
        batched = {n: stats.tensors[PREFIX + n] for n in meta["batched"]}
        self.shared = {n: stats.tensors[PREFIX + n] for n in meta["shared"]}
        steps = list(meta["steps"])
        first = next(iter(batched.values()))
        traj, nsteps = first.shape[0], first.shape[1]
        flat = {n: t.reshape(traj * nsteps, *t.shape[2:]) for n, t in batched.items()}
        total = traj * nsteps
        usable = (min(max_rows, total) // self.batch) * self.batch
        if usable == 0:
            raise CalibrationError(f"calibration recorded {total} rows, fewer than the graph's batch of {self.batch}")
        gen = torch.Generator().manual_seed(seed)
        rows = torch.randperm(total, generator=gen)[:usable].sort().values
        self.values = {n: t.index_select(0, rows) for n, t in flat.items()}
        step_of_row = torch.tensor(steps).repeat(traj).index_select(0, rows)
        last = max(steps) if steps else 0
        self.bucket = torch.clamp((step_of_row.float() * len(BUCKETS) / (last + 1)).long(), max=len(BUCKETS) - 1)
        self.rows = usable
        self.seed = seed
        self._reference: list[list[torch.Tensor]] | None = None
        self.teacher: dict[str, torch.Tensor] = {}  # stream value name -> [rows * k, d] kept tokens
        self._token_index: dict[tuple[int, int], torch.Tensor] = {}

    @staticmethod
    def _batch(graph: DiTGraph, batched: set[str]) -> int:
        """The captured batch: the leading size of the first block's per-sample inputs (not of
        shared ones such as FLUX's rotary table, whose leading size is the token count)."""
        seg = graph.block_segments[0]
        vals = [n.meta.get("val") for n in seg.module.graph.nodes if n.op == "placeholder"]
        sizes = {int(v.shape[0]) for name, v in zip(seg.inputs, vals)
                 if name in batched and isinstance(v, torch.Tensor) and v.dim()}
        if len(sizes) != 1:
            raise CalibrationError(f"the first block's per-sample inputs disagree on the batch size ({sorted(sizes)}); "
                                   "the blocks of this model cannot be replayed")
        return sizes.pop()

    def envs(self) -> Iterator[tuple[slice, dict[str, Any]]]:
        for start in range(0, self.rows, self.batch):
            sl = slice(start, start + self.batch)
            env = {n: v[sl] for n, v in self.values.items()}
            env.update(self.shared)
            yield sl, env

    def run(self, graph: DiTGraph, keep: set[str] = frozenset()) -> tuple[list[list[torch.Tensor]], dict[str, list[torch.Tensor]]]:
        """Epilogue outputs per batch, and the values named in `keep` per batch."""
        outs, kept = [], {n: [] for n in keep}
        blocks = [s for s in graph.main_segments if s.kind != "prologue"]
        with torch.no_grad():
            for _, env in self.envs():
                for seg in blocks:
                    seg.run(env)
                    for n in keep & set(seg.outputs):
                        kept[n].append(env[n])
                # The model's outputs, not the epilogue's: a stack without an epilogue returns the
                # last block's stream directly.
                outs.append([env[o] for o in graph.signature.outputs if isinstance(o, str)])
        return outs, kept

    def reference(self) -> list[list[torch.Tensor]]:
        if self._reference is None:
            streams = {o for s in self.graph.block_segments for o in s.outputs} | set(self.graph.block_segments[0].inputs)
            outs, kept = self.run(self.graph, keep=streams)
            self._reference = outs
            for name in self.graph.block_segments[0].inputs:
                if name in self.values:
                    kept[name] = [self.values[name]]
            for name, parts in kept.items():
                if parts and parts[0].dim() == 3:
                    self.teacher[name] = self._subsample(torch.cat(parts, 0))
        return self._reference

    def _subsample(self, value: torch.Tensor, per_row: int = FIT_TOKENS) -> torch.Tensor:
        """[rows, tokens, d] -> [rows * k, d]: the same k token positions for every value with
        this many tokens, so inputs and outputs of an interval line up."""
        tokens = value.shape[1]
        key = (tokens, per_row)
        if key not in self._token_index:
            gen = torch.Generator().manual_seed(self.seed + tokens)
            self._token_index[key] = torch.randperm(tokens, generator=gen)[:min(per_row, tokens)].sort().values
        return value[:, self._token_index[key]].reshape(-1, value.shape[-1]).float()

    def error(self, graph: DiTGraph) -> ReplayError:
        ref = self.reference()
        outs, _ = self.run(graph)
        num = torch.zeros(self.rows)
        den = torch.zeros(self.rows)
        for b, (got, want) in enumerate(zip(outs, ref)):
            sl = slice(b * self.batch, (b + 1) * self.batch)
            for g, w in zip(got, want):
                if isinstance(w, torch.Tensor) and w.is_floating_point():
                    num[sl] += (g.float() - w.float()).pow(2).reshape(self.batch, -1).sum(1)
                    den[sl] += w.float().pow(2).reshape(self.batch, -1).sum(1)
        if not torch.isfinite(num).all():
            return ReplayError(float("inf"), {k: float("inf") for k in BUCKETS})
        buckets = {}
        for i, name in enumerate(BUCKETS):
            mask = self.bucket == i
            if mask.any():
                buckets[name] = float(num[mask].sum() / den[mask].sum().clamp_min(1e-30))
        return ReplayError(float(num.sum() / den.sum().clamp_min(1e-30)), buckets)

    def read(self, watch: dict[str, dict[str, str]], sink, arg: int = 0) -> None:
        """Replay the original blocks on every batch of rows, handing `sink(key, value)` the
        `arg`-th argument of each watched node ({segment name: {node name: key}})."""
        blocks = [s for s in self.graph.main_segments if s.kind != "prologue"]
        with torch.no_grad():
            for _, env in self.envs():
                for seg in blocks:
                    args = [env[n] for n in seg.inputs]
                    nodes = watch.get(seg.name)
                    out = _NodeReader(seg.module, nodes, arg, sink).run(*args) if nodes else seg.module(*args)
                    env.update(zip(seg.outputs, out))

    def block_io(self, blocks: set[int]) -> dict[int, list[tuple[tuple, tuple]]]:
        """Per block in `blocks`, per batch of rows: its segment's inputs and outputs as the
        original blocks compute them (whole tokens): what a block-wise distillation trains a
        rewritten block on, with the original as the teacher."""
        out: dict[int, list[tuple[tuple, tuple]]] = {b: [] for b in blocks}
        segments = [s for s in self.graph.main_segments if s.kind != "prologue"]
        with torch.no_grad():
            for _, env in self.envs():
                for seg in segments:
                    args = tuple(env[n] for n in seg.inputs)
                    outs = tuple(seg.module(*args))
                    env.update(zip(seg.outputs, outs))
                    if seg.kind == "block" and seg.block in out:
                        out[seg.block].append((args, outs))
        return out

    def node_inputs(self, watch: dict[str, dict[str, str]], arg: int = 0,
                    per_row: int = FIT_TOKENS) -> dict[str, torch.Tensor]:
        """The `arg`-th argument of watched nodes ({segment name: {node name: key}}) as the
        original blocks compute them on the replayed rows, at `per_row` tokens of each row (the
        same positions for every value with as many tokens): {key: [rows * per_row, d]}. What
        a pass fits a replacement of a sub-layer on (the MoE router, for one)."""
        parts: dict[str, list[torch.Tensor]] = {}

        def sink(key: str, value: torch.Tensor) -> None:
            if value.dim() == 3:
                parts.setdefault(key, []).append(value.detach())

        self.read(watch, sink, arg)
        return {key: self._subsample(torch.cat(p, 0), per_row) for key, p in parts.items()}

    def conditioning(self, module: torch.nn.Module, inputs: tuple[str, ...]) -> torch.Tensor:
        """A block's modulation vectors [rows, dm] on the replayed rows."""
        parts = []
        with torch.no_grad():
            for _, env in self.envs():
                out = module(*[env[n] for n in inputs])
                parts.append(torch.cat(list(out), -1).float())
        return torch.cat(parts, 0)
