"""Where the optimized model's segments run: the `backend` of a profile or of `optimize()`.

* ``pytorch``: the segments' fx GraphModules run eagerly (the default).
* ``inductor``: every segment is compiled with `torch.compile` (Inductor: C++/OpenMP on CPU,
  Triton on CUDA), once per input shape, ``fullgraph=True`` and ``dynamic=False``. The host-side
  plan (cache schedules, forecasts, CFG state) is unchanged: it runs between compiled segments
  exactly as between eager ones. The runtime keeps one program per input-shape signature, each
  with its own segment modules, so each shape compiles once and later calls reuse the compiled
  code (`SegmentCompiler.log` counts compiles and their time per segment). The kernels' custom
  ops (``torch.ops.ditopt.*``) carry fake implementations, so compilation traces through them.
* ``onnxruntime`` / ``tensorrt``: the engines of an exported artifact (``ditopt export``,
  `ditopt.export.export_artifact` and ``--engine``). `optimize()` returns a PyTorch module, so
  in a profile these values build the eager module that export turns into the artifact (a
  ProfileWarning says so), and ``optimize(backend=...)`` refuses them with a BackendError.

A segment whose compilation fails runs eagerly instead, and the log says why (`fallback`):
the model stays usable, and the report shows which segments are not compiled.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import fx

from .errors import DitoptError

RUNTIME_BACKENDS = ("pytorch", "inductor")  # what optimize() can return
ARTIFACT_BACKENDS = ("onnxruntime", "tensorrt")  # engines of an exported artifact
BACKENDS = RUNTIME_BACKENDS + ARTIFACT_BACKENDS


class BackendError(DitoptError):
    """A backend optimize() cannot run, or one whose compiler is not available here."""


def check_runtime_backend(backend: Any) -> str:
    """`backend` as optimize() takes it, or a BackendError saying what to write instead."""
    if backend in RUNTIME_BACKENDS:
        return backend
    if backend in ARTIFACT_BACKENDS:
        engine = "onnx" if backend == "onnxruntime" else "tensorrt"
        raise BackendError(
            f"backend={backend!r} is the engine of an exported artifact, not of the module optimize() returns: "
            f"optimize with backend='pytorch' (or 'inductor'), then export it: `ditopt export MODEL OUT -p PROFILE "
            f"--engine {engine}` or ditopt.export.export_artifact(optimized, OUT)"
        )
    raise BackendError(f"backend={backend!r}: use one of {', '.join(repr(b) for b in BACKENDS)}")


@dataclass
class CompiledSegment:
    """What compiling one segment module cost: compiles (one per input shape / grad mode /
    dtype the segment was called with) and the wall time of the calls that compiled."""

    program: str
    segment: str
    compiles: int = 0
    compile_s: float = 0.0
    calls: int = 0
    fallback: str | None = None  # why the segment runs eagerly, when its compilation failed

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class SegmentCompiler:
    """Compiles segment modules with Inductor and records each compile.

    `options` are Inductor config patches (`torch._inductor.config`), applied per compile only,
    never to the process' global config."""

    options: dict[str, Any] = field(default_factory=dict)
    log: list[CompiledSegment] = field(default_factory=list)

    def attach(self, module: fx.GraphModule, program: str, segment: str) -> None:
        """Make `module` (a copy the runtime owns) run its forward through torch.compile. The
        compiled function is an instance attribute, so the class's forward (shared with the
        graph the module was copied from) stays eager everywhere else."""
        entry = CompiledSegment(program, segment)
        self.log.append(entry)
        eager = type(module).forward.__get__(module)
        compiled = torch.compile(eager, backend=self._backend(entry), fullgraph=True, dynamic=False)

        def forward(*args: Any) -> Any:
            entry.calls += 1
            if entry.fallback is not None:
                return eager(*args)
            before = entry.compiles
            start = time.perf_counter()
            try:
                out = compiled(*args)
            except Exception as exc:  # a graph break or a lowering Inductor does not support
                entry.fallback = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
                return eager(*args)
            if entry.compiles != before:
                entry.compile_s += time.perf_counter() - start
            return out

        module.forward = forward

    def _backend(self, entry: CompiledSegment) -> Callable:
        from torch._inductor.compile_fx import compile_fx

        options = dict(self.options)

        def inductor(gm: fx.GraphModule, example_inputs: list[Any]) -> Any:
            entry.compiles += 1
            return compile_fx(gm, example_inputs, config_patches=options)

        return inductor

    def summary(self) -> dict[str, Any]:
        """For the report: compiles and compile seconds in all and per segment."""
        return {
            "compiled_segments": sum(1 for e in self.log if e.compiles and e.fallback is None),
            "compiles": sum(e.compiles for e in self.log),
            "compile_s": round(sum(e.compile_s for e in self.log), 3),
            "eager_fallbacks": [e.to_dict() for e in self.log if e.fallback is not None],
            "segments": [e.to_dict() for e in self.log],
        }
