"""Pass registry. Pass families live outside the core and register themselves here.

A pass is a pure function `apply(graph, config, ctx) -> PassResult` registered for a frozen
pydantic config class. Plugins (the `ditopt.passes` and `ditopt.kernels` packages, or third
parties) are found through the `ditopt.plugins` entry-point group, so the core never imports
them by name.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Callable

from pydantic import BaseModel, ConfigDict

from .errors import UnknownPassError

if TYPE_CHECKING:
    from .graph import DiTGraph


class PassConfig(BaseModel):
    """Base class for pass configs: frozen, and unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class PassContext:
    """What a pass may read besides the graph. Passes never write to it."""

    model: Any  # the user's original model (read-only)
    stats: Any = None  # CalibStats when the profile's passes need calibration
    budget: Any = None  # the profile's quality budget
    num_steps: int | None = None
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassResult:
    graph: "DiTGraph"
    modified: bool
    report: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable: what changed, predicted saving
    # A pass that searched (e.g. over a budget) names the concrete pass and config it chose, so
    # that replaying the profile on a new input shape repeats the choice instead of the search.
    replay: tuple[str, PassConfig] | None = None


@dataclass(frozen=True)
class PassSpec:
    name: str
    config: type[PassConfig]
    apply: Callable[["DiTGraph", PassConfig, PassContext], PassResult]
    needs: tuple[str, ...] = ()  # calibration collectors this pass reads
    after: tuple[str, ...] = ()  # passes that must come earlier in a profile when both are present
    level: str = "node"  # "node" rewrites segment graphs; "plan" rewrites the step schedule
    description: str = ""


_PASSES: dict[str, PassSpec] = {}
_PLUGINS_LOADED = False


def register_pass(
    name: str,
    config: type[PassConfig],
    *,
    needs: tuple[str, ...] = (),
    after: tuple[str, ...] = (),
    level: str = "node",
    description: str = "",
) -> Callable:
    """Decorator: register `fn(graph, config, ctx) -> PassResult` as pass `name`."""

    def decorator(fn: Callable) -> Callable:
        if name in _PASSES and _PASSES[name].apply is not fn:
            raise ValueError(f"pass {name!r} is already registered by {_PASSES[name].apply.__module__}")
        _PASSES[name] = PassSpec(name, config, fn, tuple(needs), tuple(after), level, description or (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return decorator


def load_plugins() -> None:
    """Import every module of the `ditopt.plugins` entry-point group once."""
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    for ep in entry_points(group="ditopt.plugins"):
        importlib.import_module(ep.value)


def _lookup(table: dict[str, Any], name: str, what: str) -> Any:
    load_plugins()
    try:
        return table[name]
    except KeyError:
        known = ", ".join(sorted(table)) or "(none installed)"
        raise UnknownPassError(f"unknown {what} {name!r}; installed: {known}") from None


def get_pass(name: str) -> PassSpec:
    return _lookup(_PASSES, name, "pass")


def available_passes() -> dict[str, PassSpec]:
    load_plugins()
    return dict(sorted(_PASSES.items()))


# Collectors of calibration statistics register the same way; `needs` names them.
_COLLECTORS: dict[str, Any] = {}


def register_collector(name: str) -> Callable:
    def decorator(factory: Callable) -> Callable:
        _COLLECTORS[name] = factory
        return factory

    return decorator


def get_collector(name: str) -> Any:
    return _lookup(_COLLECTORS, name, "calibration collector")


# Export lowerings: a custom op the ONNX exporter cannot translate (the kernels' `ditopt::` ops)
# maps to a function of standard torch ops computing the same result; export re-traces a segment
# through it before handing it to the exporter. Kernels register their ops here.
_EXPORT_LOWERINGS: dict[Any, Callable] = {}


def register_export_lowering(op: Any, fn: Callable) -> None:
    """Export `op` (an OpOverload) as what `fn(*args, **kwargs)` traces to."""
    _EXPORT_LOWERINGS[op] = fn


def export_lowerings() -> dict[Any, Callable]:
    load_plugins()
    return dict(_EXPORT_LOWERINGS)
