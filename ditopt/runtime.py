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

The user's model is never modified, also not through this module afterwards (docs/design.md,
"The user's model is never modified"). The module runs its own copies of the programs' module
trees, whose tensors are its own objects sharing the user's storage (no copy up front): an
in-place change to the user's weights is seen, and nothing here writes them. Every call that
hands out this module's tensors or writes them in place (`parameters()`, `named_parameters()`,
`buffers()`, `named_buffers()`, `state_dict()`, `get_parameter()`, `get_buffer()`,
`load_state_dict()`, `apply()`, `share_memory()`) first gives it private copies of the tensors
it still shares (copy on write, once). Conversions (`.to()`, `.half()`, `.double()`, `.cuda()`)
make new tensors anyway and so copy nothing more; `requires_grad_()`, `zero_grad()`, `train()`
and `eval()` change only this module's own objects. Attributes of the user's model that are
modules, tensors or methods of it are not handed out (`OriginalAttributeError`; use `.original`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import types
from collections import OrderedDict
from typing import Any, Callable, Iterator

import torch
import torch.utils._pytree as pytree
from torch import nn

from .capture import alias, call_key, carry_source, module_tensors, normalize_call, source_of
from .inputs import check_call_inputs
from .errors import DitoptError
from .backends import SegmentCompiler, check_runtime_backend
from .graph import DiTGraph
from .plan import StepContext


class OriginalAttributeError(AttributeError, DitoptError):
    """An attribute of the user's model that `OptimizedDiT` does not hand out: a module, a
    tensor or a method of the user's model. Writing to it (or calling it) would change the
    user's model, and would not change what the optimized module runs. `optimized.original`
    is the user's model itself."""


# --------------------------------------------------------------------------------------------
# Tensors and module trees
# --------------------------------------------------------------------------------------------
def _storage_key(t: torch.Tensor) -> tuple | None:
    """Where a tensor's values live: (device, storage address); None when nothing can be written
    there (no elements, meta tensors) or the tensor has no plain storage."""
    if t.numel() == 0 or t.device.type == "meta":
        return None
    try:
        return (str(t.device), t.untyped_storage().data_ptr())
    except Exception:  # tensor subclasses without a plain storage
        return None


def _is_alias(t: torch.Tensor, of: torch.Tensor) -> bool:
    """Whether `t` views exactly `of`'s values: same storage, offset, shape, strides, dtype."""
    return (t.dtype == of.dtype and t.device == of.device and t.shape == of.shape and t.stride() == of.stride()
            and t.storage_offset() == of.storage_offset() and _storage_key(t) == _storage_key(of))


_COPIED_CONTAINERS = (dict, OrderedDict, list, set)


def copy_tree(module: nn.Module, memo: dict[int, nn.Module], swap: Callable[[torch.Tensor], torch.Tensor] | None = None) -> nn.Module:
    """A copy of a module tree that shares code, graphs and tensors (`swap` maps each tensor,
    when given) but no container: which tensor, submodule or hook a copy holds can change
    without touching the original. Plain dicts, lists and sets in a module's __dict__ are
    copied one level (a memo's table, GraphModule's meta); other values are shared."""
    found = memo.get(id(module))
    if found is not None:
        return found
    new = object.__new__(type(module))
    memo[id(module)] = new
    state = {}
    for name, value in module.__dict__.items():
        if type(value) in _COPIED_CONTAINERS:
            value = copy.copy(value)
        elif isinstance(value, types.MethodType) and value.__self__ is module:
            value = types.MethodType(value.__func__, new)
        state[name] = value
    new.__dict__.update(state)
    new._modules = {k: copy_tree(c, memo, swap) if c is not None else None for k, c in module._modules.items()}
    if swap is not None:
        for store in (new._parameters, new._buffers):
            for name, t in store.items():
                if t is not None:
                    store[name] = swap(t)
        for name, value in list(new.__dict__.items()):
            if isinstance(value, torch.Tensor):
                new.__dict__[name] = swap(value)
    return new


def _takes_source(build: Callable) -> bool:
    try:
        return "source" in inspect.signature(build).parameters
    except (TypeError, ValueError):
        return False


def _holds_state(value: Any, depth: int = 0) -> bool:
    """Whether an attribute of the user's model gives write access to it: a module, a tensor,
    a method bound to a module, or a container of those."""
    if isinstance(value, (nn.Module, torch.Tensor)):
        return True
    if isinstance(value, types.MethodType) and isinstance(value.__self__, nn.Module):
        return True
    if depth < 2 and isinstance(value, (list, tuple, set, frozenset)):
        return any(_holds_state(v, depth + 1) for v in value)
    if depth < 2 and isinstance(value, dict):
        return any(_holds_state(v, depth + 1) for v in value.values())
    return False


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


def _fresh_parameter(p: nn.Parameter) -> nn.Parameter:
    """A Parameter on `p`'s storage with a version counter of its own (no copy)."""
    with torch.no_grad():
        try:
            data = torch.empty(0, dtype=p.dtype, device=p.device).set_(p.untyped_storage(), p.storage_offset(), p.size(), p.stride())
        except Exception:  # tensor subclasses: a copy
            data = p.detach().clone()
    new = nn.Parameter(data, requires_grad=p.requires_grad)
    new.grad = p.grad
    carry_source(new, p)
    return new


def read_timestep(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        if value.numel() == 0:
            return None
        return float(value.reshape(-1)[0])
    if isinstance(value, (int, float)):
        return float(value)
    return None


class OptimizedDiT(nn.Module):
    """Drop-in replacement for the original transformer (e.g. `pipe.transformer`).

    It never modifies the user's model (`.original`), also not afterwards:

    * Its tensors are its own objects sharing the user's storage: no copy up front, and an
      in-place change of the user's weights is seen. A tensor the user replaces
      (`p.data = ...`, `.to()` on the user's model) is not: this module keeps its own.
    * Copy on write: `parameters()`, `named_parameters()`, `buffers()`, `named_buffers()`,
      `state_dict()` (any `keep_vars`), `get_parameter()`, `get_buffer()`, `load_state_dict()`,
      `apply()` and `share_memory()` first replace every tensor still shared with the user's
      model by a private copy (once; one more copy of the weights in memory), so an optimizer
      step, an in-place op or a load changes this module only. To count or read the user's
      weights without that copy, use `optimized.original.parameters()`.
    * `.to()`, `.half()`, `.double()`, `.float()`, `.cuda()` convert this module's tensors
      (each once) and copy nothing more; `dtype` and `device` follow them, and new input shapes
      are captured with this module's weights. `requires_grad_()`, `zero_grad()`, `train()` and
      `eval()` change only this module's own objects.
    * Unknown attributes are read from the user's model (`config` and plain values, as
      diffusers pipelines read them), except modules, tensors and methods of it, which raise
      `OriginalAttributeError` (use `.original`). `cache_context()` is a no-op.
    * Segment modules reached through internals (`segment_modules`, `programs`) share the
      user's storage until the copy: do not write into them.
    """

    def __init__(
        self,
        original: nn.Module,
        build: Callable[[dict[str, Any]], DiTGraph],
        first: tuple[dict[str, Any], DiTGraph] | None = None,
        num_steps: int | None = None,
        report: Any = None,
        max_programs: int = 8,
        backend: str = "pytorch",
        compile_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        # Not registered as a submodule: .to()/.half() on the optimized model must never touch
        # the user's model, and its parameters must not be counted twice.
        object.__setattr__(self, "_original", original)
        object.__setattr__(self, "_build", build)
        # A build that takes `source=` captures the model it is given: the user's model while this
        # module runs the user's tensors, else a stand-in holding this module's own (_capture_source).
        object.__setattr__(self, "_build_takes_source", _takes_source(build))
        self._programs: OrderedDict[tuple, DiTGraph] = OrderedDict()
        # Segment modules of the live programs (this module's own copies of the graphs' module
        # trees), registered so .to()/.parameters() see what runs. Their tensors are this
        # module's own objects, sharing the user's storage until a call that could write them
        # makes them private (module docstring).
        self.segment_modules = nn.ModuleDict()
        self._program_ids: dict[tuple, str] = {}
        self._halves: dict[tuple, tuple[int | None] | str] = {}  # call key -> how to halve it, or why it cannot be
        self._next_id = 0
        self._max_programs = max_programs
        self.tracker = StepTracker(num_steps)
        self.report = report
        self.stats: Any = None  # calibration statistics, when the profile used them
        self.last_record: dict[str, Any] = {}
        # backend="inductor": every segment module this module owns runs through torch.compile,
        # compiled on its first call (per program, hence per input shape); see ditopt.backends.
        self.backend = check_runtime_backend(backend)
        self.compiler = SegmentCompiler(dict(compile_options or {})) if backend == "inductor" else None
        if first is not None:
            kwargs, graph = first
            self._remember(call_key(kwargs), graph)

    # -- diffusers compatibility ----------------------------------------------------------------
    @property
    def config(self) -> Any:
        return getattr(self._original, "config", None)

    def _first_parameter(self) -> torch.Tensor:
        own = next(iter(self.segment_modules.parameters()), None)  # this module's own, not handed out
        return own if own is not None else next(self._original.parameters())

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the weights this module runs (it follows `.half()` etc. on this module)."""
        return self._first_parameter().dtype

    @property
    def device(self) -> torch.device:
        return self._first_parameter().device

    @property
    def original(self) -> nn.Module:
        """The user's model itself (never modified by ditopt)."""
        return self._original

    @contextlib.contextmanager
    def cache_context(self, name: str) -> Iterator[None]:
        """What diffusers pipelines wrap each branch's call in (`with transformer.cache_context(
        "cond"):`) for diffusers' own cache hooks. Those hooks do not run here (the plan decides
        what is cached), so it does nothing, and the user's model gets no hook registry."""
        yield

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_"):
                raise
            original = object.__getattribute__(self, "_original")
            value = getattr(original, name)
            if _holds_state(value):
                kind = ("method" if isinstance(value, types.MethodType) else "module" if isinstance(value, nn.Module)
                        else "tensor" if isinstance(value, torch.Tensor) else "container of modules or tensors")
                raise OriginalAttributeError(
                    f"OptimizedDiT does not hand out {name!r}, a {kind} of the user's {type(original).__name__}: "
                    "the optimized module runs its own captured segments, so through it the user's model could only "
                    f"be changed, never the optimized one. For the user's own model use `.original.{name}`; for this "
                    "module's weights, `.parameters()` / `.state_dict()`."
                ) from None
            return value

    # -- weights --------------------------------------------------------------------------------
    def _slots(self, params: bool = True, buffers: bool = True) -> list[tuple[dict, str, torch.Tensor]]:
        """Every (dict, name, tensor) holding a tensor in this module's trees."""
        found = []
        for module in self.modules():
            stores = ([module._parameters] if params else []) + ([module._buffers] if buffers else [])
            for store in stores:
                found.extend((store, name, t) for name, t in store.items() if t is not None)
        return found

    def _user_storages(self) -> set[tuple]:
        return {k for t in module_tensors(self._original) if (k := _storage_key(t)) is not None}

    def _make_private(self, params: bool = True, buffers: bool = True) -> int:
        """Copy on write: replace every tensor that still shares the user's storage by a private
        copy (a new object: its version counter is its own), once per tensor so ties stay
        tied. Returns how many tensors were copied."""
        user = self._user_storages()
        done: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for store, name, t in self._slots(params, buffers):
            hit = done.get(id(t))
            if hit is None:
                new = t
                if _storage_key(t) in user:
                    with torch.no_grad():
                        data = t.detach().clone()
                    if isinstance(t, nn.Parameter):
                        new = nn.Parameter(data, requires_grad=t.requires_grad)
                        new.grad = t.grad
                    else:
                        new = data
                    carry_source(new, t)
                hit = done[id(t)] = (t, new)
            store[name] = hit[1]
        return sum(1 for old, new in done.values() if new is not old)

    def _apply(self, fn: Callable, recurse: bool = True) -> "OptimizedDiT":
        # Each distinct tensor is converted once, so tensors shared by several segments or
        # programs stay one tensor (torch converts a buffer once per module holding it).
        user = self._user_storages()
        before = self._slots()
        shared = {id(t): t for _, _, t in before if isinstance(t, nn.Parameter) and _storage_key(t) in user}
        results: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def once(t: torch.Tensor) -> torch.Tensor:
            hit = results.get(id(t))
            if hit is None:
                hit = results[id(t)] = (t, fn(t))
            return hit[1]

        super()._apply(once, recurse)
        results.clear()
        # torch keeps a converted Parameter's object, and with it the user's version counter:
        # an alias that no longer shares the user's storage gets an object of its own.
        fresh: dict[int, torch.Tensor] = {}
        for store, name, t in self._slots(buffers=False):
            if id(t) in shared and _storage_key(t) not in user:
                if id(t) not in fresh:
                    fresh[id(t)] = _fresh_parameter(t)
                store[name] = fresh[id(t)]
        # What each tensor stands for follows it (new captures read this module's tensors).
        for (store, name, old), now in zip(before, [store[name] for store, name, _ in before]):
            carry_source(now, old)
        self.tracker.reset()  # cached step state holds tensors of the old dtype/device
        return self

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        self._make_private(buffers=False)
        return super().parameters(recurse)

    def named_parameters(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Parameter]]:
        self._make_private(buffers=False)
        return super().named_parameters(*args, **kwargs)

    def buffers(self, recurse: bool = True) -> Iterator[torch.Tensor]:
        self._make_private(params=False)
        return super().buffers(recurse)

    def named_buffers(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, torch.Tensor]]:
        self._make_private(params=False)
        return super().named_buffers(*args, **kwargs)

    def get_parameter(self, target: str) -> nn.Parameter:
        self._make_private(buffers=False)
        return super().get_parameter(target)

    def get_buffer(self, target: str) -> torch.Tensor:
        self._make_private(params=False)
        return super().get_buffer(target)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        # Also without keep_vars: its tensors share this module's storage and may be written.
        self._make_private()
        return super().state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        if self.compiler is not None and self.compiler.options.get("freezing"):
            raise DitoptError(
                "this module's segments were compiled with compile_options={'freezing': True}, which makes the weights "
                "constants of the compiled code: loaded weights would not be used. Load them into your model and "
                "optimize it again (or optimize without freezing)")
        before = self._slots()
        if not assign:
            self._make_private()
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        for store, name, old in before:
            now = store.get(name)
            if now is not None:
                carry_source(now, old)
        self.reset()  # cached steps and memos were computed with the old weights
        return result

    def apply(self, fn: Callable[[nn.Module], None]) -> "OptimizedDiT":
        self._make_private()
        return super().apply(fn)

    def share_memory(self) -> "OptimizedDiT":
        self._make_private()  # share_memory_() moves a storage in place
        return super().share_memory()

    def requires_grad_(self, requires_grad: bool = True) -> "OptimizedDiT":
        # Only this module's own Parameter objects change; nothing is copied.
        for p in {id(t): t for _, _, t in self._slots(buffers=False)}.values():
            p.requires_grad_(requires_grad)
        return self

    def zero_grad(self, set_to_none: bool = True) -> None:
        # Gradients are this module's own (accumulated on its objects): nothing is copied.
        for p in {id(t): t for _, _, t in self._slots(buffers=False)}.values():
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                if p.grad.grad_fn is not None:
                    p.grad.detach_()
                else:
                    p.grad.requires_grad_(False)
                p.grad.zero_()

    def _currents(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """id(user's tensor) -> (that tensor, the tensor this module runs in its place)."""
        found: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for _, _, t in self._slots():
            src = source_of(t)
            if src is not None and id(src) not in found:
                found[id(src)] = (src, t)
        return found

    def _capture_source(self) -> nn.Module:
        """The model a new capture traces: the user's model while every tensor this module runs
        is the user's (same storage, dtype, layout); otherwise a stand-in, the user's module tree
        holding this module's tensors (after `.double()`, `load_state_dict()`, an optimizer
        step), so that a new shape runs what the other shapes run."""
        currents = self._currents()
        if all(_is_alias(t, src) for src, t in currents.values()):
            return self._original
        return copy_tree(self._original, {}, swap=lambda u: currents[id(u)][1] if id(u) in currents else u)

    def _own(self, graph: DiTGraph) -> DiTGraph:
        """The graph with this module's own copy of its module trees, whose tensors that stand
        for the user's are this module's (one object per user tensor across all programs)."""
        memo: dict[int, nn.Module] = {}
        segments = tuple(dataclasses.replace(seg, module=copy_tree(seg.module, memo)) for seg in graph.segments)
        currents = self._currents()
        for module in memo.values():
            for store in (module._parameters, module._buffers):
                for name, t in store.items():
                    src = source_of(t) if t is not None else None
                    if src is None:
                        continue
                    if id(src) not in currents:
                        currents[id(src)] = (src, alias(t, source=src))
                    store[name] = currents[id(src)][1]
        # Underscored meta entries are caches keyed on module identities: not carried over.
        return graph.evolve(segments=segments, meta={k: v for k, v in graph.meta.items() if not k.startswith("_")})

    # -- programs -------------------------------------------------------------------------------
    def _remember(self, key: tuple, graph: DiTGraph) -> DiTGraph:
        graph = self._own(graph)
        self._programs[key] = graph
        self._programs.move_to_end(key)
        pid = f"program{self._next_id}"
        self._next_id += 1
        if self.compiler is not None:
            attached: set[int] = set()
            for seg in graph.segments:
                if id(seg.module) not in attached:
                    attached.add(id(seg.module))
                    self.compiler.attach(seg.module, pid, seg.name)
        self._program_ids[key] = pid
        self.segment_modules[pid] = nn.ModuleList([seg.module for seg in graph.segments])
        while len(self._programs) > self._max_programs:
            old, _ = self._programs.popitem(last=False)
            del self.segment_modules[self._program_ids.pop(old)]
        return graph

    def program_for(self, kwargs: dict[str, Any]) -> DiTGraph:
        key = call_key(kwargs)
        graph = self._programs.get(key)
        if graph is None:
            graph = self._build(kwargs, source=self._capture_source()) if self._build_takes_source else self._build(kwargs)
            graph = self._remember(key, graph)
        return graph

    def prepare(self, *args: Any, **kwargs: Any) -> None:
        """Capture now every program a call like this one will run (its own and, where the plan
        computes half batches on some steps, the half-batch one), so that no capture happens
        inside the first generation (timing, profiling). With backend="inductor", also compile
        every segment of those programs now (for calls with gradients off)."""
        call = normalize_call(self._original, args, kwargs)
        graph = self.program_for(call)
        programs = [graph]
        if graph.latent_input is not None and any(stage.uses_second_half() for stage in graph.plan):
            leaves, _ = pytree.tree_flatten(((), call))
            half = self.second_half_program(call, graph.bind(leaves)[graph.latent_input])
            programs += [half] if isinstance(half, DiTGraph) else []
        if self.compiler is not None:
            # Compile every segment now (inference: grad off), on zeros of its captured shapes
            # and strides, which the compiled code is guarded on like the real inputs.
            device = self.device
            with torch.no_grad():
                for program in programs:
                    for seg in program.segments:
                        vals = [n.meta.get("val") for n in seg.module.graph.nodes if n.op == "placeholder"]
                        if all(isinstance(v, torch.Tensor) for v in vals):
                            seg.module(*(torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=device).zero_() for v in vals))

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
        """Start a new generation: clear caches, step index and CFG branch state, and drop what
        exact memos remember (`conditioning_memo`; they also notice in-place weight changes by
        themselves, except writes through `.data`, which only this call covers). A new
        generation detected from the timesteps clears the step state only."""
        self.tracker.reset()
        for module in self.modules():
            drop = getattr(module, "drop_remembered", None)
            if isinstance(drop, types.MethodType):
                drop()

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
        check_call_inputs(self._original, call)  # a label beyond the embedding table: a named error, not an IndexError
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
