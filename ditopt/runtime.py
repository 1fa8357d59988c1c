"""The drop-in optimized model: same forward signature and return type as the original.

It runs a DiTGraph's plan over static segments and owns the state that lives across denoising
steps. How calls map to steps (documented in docs/design.md):

* The diffusion timestep is read on the host from the `timestep` input (first element).
* A call with the same timestep as the previous call is the next CFG branch of the same step
  (CFG run as two calls); each branch gets its own state. With CFG batched into one call, both
  branches are rows of the same tensors and share one state slot.
* A call with a smaller timestep is the next step. A call with a larger timestep starts a new
  generation and clears all state. `reset()` (or `with model.generation():`) starts one
  explicitly. Models without a timestep input count every call as a step; a generation then
  ends after the calibrated number of steps, or at `reset()`.
* With CFG batched into one call, a cached span may compute only the second half of the rows
  on some steps (`second_half_program`, captured on first use) and rebuild the first half.
* Blocks with early-step variants (`ditopt.plan.EarlySteps`, e.g. attention substitution's
  `dense_steps`) run those variants on the first steps of every generation (`DiTGraph.at_step`).

One program (captured graph + rewritten plan) is kept per input shape signature: a new batch
size or resolution is captured again from the original model and the same passes are replayed.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Any, Callable, Iterator

import torch
import torch.utils._pytree as pytree
from torch import nn

from .capture import call_key, normalize_call
from .graph import DiTGraph
from .plan import StepContext


class StepTracker:
    """Maps successive calls to (generation, step, CFG branch)."""

    def __init__(self, num_steps: int | None = None) -> None:
        self.num_steps = num_steps
        self.generation = -1
        self.reset()

    def reset(self) -> None:
        self.generation += 1
        self.step = -1
        self.branch = 0
        self.last_timestep: float | None = None
        self.branch_states: dict[int, dict[str, Any]] = {}

    def advance(self, timestep: float | None) -> StepContext:
        last = self.last_timestep
        if timestep is not None and last is not None and timestep == last:
            self.branch += 1
        else:
            new_generation = timestep is not None and last is not None and timestep > last
            # Without a timestep, a generation is `num_steps` calls long (when known).
            if timestep is None and self.num_steps is not None and self.step + 1 >= self.num_steps:
                new_generation = True
            if new_generation:
                self.reset()
            self.step += 1
            self.branch = 0
        self.last_timestep = timestep
        state = self.branch_states.setdefault(self.branch, {})
        return StepContext(
            step=self.step,
            branch=self.branch,
            timestep=timestep,
            generation=self.generation,
            state=state,
            num_steps=self.num_steps,
        )


def read_timestep(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        if value.numel() == 0:
            return None
        return float(value.reshape(-1)[0])
    if isinstance(value, (int, float)):
        return float(value)
    return None


class OptimizedDiT(nn.Module):
    """Drop-in replacement for the original transformer (e.g. `pipe.transformer`)."""

    def __init__(
        self,
        original: nn.Module,
        build: Callable[[dict[str, Any]], DiTGraph],
        first: tuple[dict[str, Any], DiTGraph] | None = None,
        num_steps: int | None = None,
        report: Any = None,
        max_programs: int = 8,
    ) -> None:
        super().__init__()
        # Not registered as a submodule: .to()/.half() on the optimized model must never touch
        # the user's model, and its parameters must not be counted twice.
        object.__setattr__(self, "_original", original)
        object.__setattr__(self, "_build", build)
        self._programs: OrderedDict[tuple, DiTGraph] = OrderedDict()
        # Segment modules of the live programs, registered so .to()/.parameters() see what runs.
        # They share parameter tensors with the original model (no copy); rewrites make new ones.
        self.segment_modules = nn.ModuleDict()
        self._program_ids: dict[tuple, str] = {}
        self._halves: dict[tuple, tuple[int | None] | str] = {}  # call key -> how to halve it, or why it cannot be
        self._next_id = 0
        self._max_programs = max_programs
        self.tracker = StepTracker(num_steps)
        self.report = report
        self.stats: Any = None  # calibration statistics, when the profile used them
        self.last_record: dict[str, Any] = {}
        if first is not None:
            kwargs, graph = first
            self._remember(call_key(kwargs), graph)

    # -- diffusers compatibility ----------------------------------------------------------------
    @property
    def config(self) -> Any:
        return getattr(self._original, "config", None)

    @property
    def dtype(self) -> torch.dtype:
        return next(self._original.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self._original.parameters()).device

    @property
    def original(self) -> nn.Module:
        return self._original

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_"):
                raise
            return getattr(object.__getattribute__(self, "_original"), name)

    # -- programs -------------------------------------------------------------------------------
    def _remember(self, key: tuple, graph: DiTGraph) -> None:
        self._programs[key] = graph
        self._programs.move_to_end(key)
        pid = f"program{self._next_id}"
        self._next_id += 1
        self._program_ids[key] = pid
        self.segment_modules[pid] = nn.ModuleList([seg.module for seg in graph.segments])
        while len(self._programs) > self._max_programs:
            old, _ = self._programs.popitem(last=False)
            del self.segment_modules[self._program_ids.pop(old)]

    def program_for(self, kwargs: dict[str, Any]) -> DiTGraph:
        key = call_key(kwargs)
        graph = self._programs.get(key)
        if graph is None:
            graph = self._build(kwargs)
            self._remember(key, graph)
        return graph

    def prepare(self, *args: Any, **kwargs: Any) -> None:
        """Capture now every program a call like this one will run (its own and, where the plan
        computes half batches on some steps, the half-batch one), so that no capture happens
        inside the first generation (timing, profiling)."""
        call = normalize_call(self._original, args, kwargs)
        graph = self.program_for(call)
        if graph.latent_input is not None and any(stage.uses_second_half() for stage in graph.plan):
            leaves, _ = pytree.tree_flatten(((), call))
            self.second_half_program(call, graph.bind(leaves)[graph.latent_input])

    def second_half_program(self, call: dict[str, Any], latent: torch.Tensor) -> DiTGraph | str:
        """The program for the call made of the second half of every batch-carrying input (the
        conditional rows of a batched-CFG call), for steps that compute only those
        (`calibrated_schedule`'s conditional-only steps); or why there is none.

        Batch-carrying: a tensor whose first dim is the latent's. That can also be a tensor of
        another meaning that happens to be as long (FLUX's text ids with as many text tokens as
        rows): when the capture with every such tensor halved fails, each is tried whole in
        turn. A stage using the program still checks the shapes of what it reads."""
        rows = latent.shape[0] if latent.dim() else 0
        if rows < 2 or rows % 2:
            return f"a batch of {rows} rows has no second half"
        leaves, spec = pytree.tree_flatten(call)
        long = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == rows and v is not latent]

        def halved(whole: int | None) -> dict[str, Any]:
            return pytree.tree_unflatten([v[rows // 2 :] if i in long and i != whole or v is latent else v for i, v in enumerate(leaves)], spec)

        key = call_key(call)
        known = self._halves.get(key)  # which input stays whole (None: none), or why no choice captures
        if known is not None:
            return known if isinstance(known, str) else self.program_for(halved(known[0]))
        errors = []
        for whole in [None, *long]:
            try:
                graph = self.program_for(halved(whole))
            except Exception as exc:  # a capture that fails for this choice of batch inputs
                errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                continue
            self._halves[key] = (whole,)
            return graph
        reason = "no half-batch capture succeeded (" + "; ".join(errors[:2]) + ")"
        self._halves[key] = reason
        return reason

    @property
    def programs(self) -> list[DiTGraph]:
        return list(self._programs.values())

    # -- state ----------------------------------------------------------------------------------
    def reset(self) -> None:
        """Start a new generation: clear caches, step index and CFG branch state."""
        self.tracker.reset()

    @contextlib.contextmanager
    def generation(self) -> Iterator["OptimizedDiT"]:
        self.reset()
        try:
            yield self
        finally:
            self.reset()

    # -- execution ------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        call = normalize_call(self._original, args, kwargs)
        graph = self.program_for(call)
        leaves, _ = pytree.tree_flatten(((), call))
        env = graph.bind(leaves)
        timestep = read_timestep(env.get(graph.timestep_input)) if graph.timestep_input else None
        ctx = self.tracker.advance(timestep)
        # Blocks with early-step variants (plan.EarlySteps) run them on this generation's first
        # steps: the host picks the graph version for the step before any segment runs.
        early = [r.block for r in graph.early_rules_at(ctx.step)]
        if early:
            ctx.record["early_steps"] = early
        if graph.latent_input is not None:
            ctx.second_half = lambda: self.second_half_program(call, env[graph.latent_input])
        graph = graph.at_step(ctx.step)
        for stage in graph.plan:
            stage.run(graph, env, ctx)
        self.last_record = ctx.record
        return graph.collect_outputs(env)
