"""Pass registry. Pass families live outside the core and register themselves here.

A pass is a pure function `apply(graph, config, ctx) -> PassResult` registered for a frozen
pydantic config class, with a declared contract (`PassSpec`: what it needs, gives and conflicts
with; passes/README.md says how to add a family). Plugins (the `ditopt.passes` and `ditopt.kernels` packages, or third
parties) are found through the `ditopt.plugins` entry-point group, so the core never imports
them by name.
"""

from __future__ import annotations

import importlib
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Callable

from pydantic import BaseModel, ConfigDict

from .errors import InvalidProfileError, UnknownPassError

if TYPE_CHECKING:
    from .graph import DiTGraph


class PassConfig(BaseModel):
    """Base class for pass configs: frozen, and unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class PassLevel(str, Enum):
    """What a pass rewrites. A str enum, so profiles and reports read "node" / "plan"."""

    NODE = "node"  # the segments' graphs (checked per call against the original)
    PLAN = "plan"  # the step schedule (checked end to end on held-out samples)


@dataclass
class SearchContext:
    """What the budget search offers a lossy pass; owned by `optimize`, read by passes.

    evaluate(candidate) -> PSNR (dB) of final samples with the candidate against the original
    model's, on the samples the search may see (never the held-out ones); None where the user gave
    no calibration function returning samples. A candidate is a DiTGraph (its plan runs on a
    capture at the sampling shape: enough for plan-level passes) or a rewrite
    `fn(graph) -> DiTGraph` (node-level passes: the evaluator applies it to a capture at the
    sampling shape after the profile's earlier passes, since the sampling batch differs from the
    example inputs the pass saw). `tighten_db`: how far above the budget the search must aim after
    held-out misses (optimize raises it between attempts). `memo(name)`: a dict the search keeps
    across attempts for one pass's sampled plans (sampling is deterministic), so a retry does not
    sample the same plan twice; it is keyed by what the earlier passes resolved to as well.

    Several lossy passes in one profile share one error budget: `optimize` gives the k-th of n
    lossy passes (profile order) a cumulative share k/n of the allowed squared error, i.e. it aims
    `share_db = 10*log10(n/k)` above the budget, and the last one the budget itself; each
    evaluator measures the composition with the earlier passes, so what an earlier pass left
    unspent goes to the later ones. `earlier` / `position` are set per pass by `apply_passes`."""

    evaluate: Callable[[Any], float] | None = None
    tighten_db: float = 0.0
    share_db: float = 0.0
    earlier: Callable[["DiTGraph"], "DiTGraph"] | None = None
    position: tuple = ()
    _memos: dict[Any, dict] = field(default_factory=dict)

    def memo(self, name: str) -> dict:
        return self._memos.setdefault((name, self.position), {})

    def target_psnr_db(self, budget: Any, margin_db: float = 0.0) -> float | None:
        """The PSNR a search aims for: the budget, plus this pass's share of the error budget,
        plus the pass's margin, plus the tightening from held-out misses; None without a PSNR
        budget."""
        floor = getattr(budget, "min_psnr_db", None)
        return None if floor is None else floor + self.share_db + margin_db + self.tighten_db

    @contextmanager
    def at_pass(self, *, share_db: float, earlier: Callable[["DiTGraph"], "DiTGraph"] | None, position: tuple):
        """Within: the search state of one pass position of the profile (restored after)."""
        saved = (self.share_db, self.earlier, self.position)
        self.share_db, self.earlier, self.position = share_db, earlier, position
        try:
            yield self
        finally:
            self.share_db, self.earlier, self.position = saved


def budget_shares(lossy: list[bool]) -> list[float]:
    """Per pass (profile order): how far above the PSNR budget its search aims so that n lossy
    passes share the squared-error budget in equal cumulative parts (0 for exact passes and for
    the last lossy one)."""
    n = sum(lossy)
    shares, k = [], 0
    for is_lossy in lossy:
        k += int(is_lossy)
        shares.append(10.0 * math.log10(n / k) if is_lossy else 0.0)
    return shares


@dataclass
class PassContext:
    """What a pass may read besides the graph. Passes never write to it."""

    model: Any  # the user's original model (read-only)
    stats: Any = None  # CalibStats when the profile's passes need calibration
    budget: Any = None  # the profile's quality budget
    num_steps: int | None = None
    search: SearchContext = field(default_factory=SearchContext)


@dataclass
class PassOutcome:
    """What a searched (lossy) pass chose, in types `optimize` reads instead of report keys.

    predicted_psnr_db / target_psnr_db: the chosen setting's PSNR on the search's samples (a
    prediction, confirmed or refuted by the held-out check) and what it aimed for. saving: the
    fraction of multiply-adds (or block evaluations) it removes, where it knows. on_miss: the
    config change to try first when the held-out check misses (e.g. {"cfg_reuse": "off"})."""

    predicted_psnr_db: float | None = None
    target_psnr_db: float | None = None
    saving: float | None = None
    on_miss: dict[str, Any] | None = None

    @property
    def headroom_db(self) -> float:
        if self.predicted_psnr_db is None or self.target_psnr_db is None:
            return 0.0
        return max(0.0, self.predicted_psnr_db - self.target_psnr_db)


@dataclass
class PassResult:
    graph: "DiTGraph"
    modified: bool
    report: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable: what changed, predicted saving
    # A pass that searched (e.g. over a budget) names the concrete pass and config it chose, so
    # that replaying the profile on a new input shape repeats the choice instead of the search,
    # and the report records the resolved configuration.
    replay: tuple[str, PassConfig] | None = None
    outcome: PassOutcome | None = None
    # A pass that fitted tensors on calibration activations (distilled or least-squares weights)
    # gives the rewrite that applies its choice, those tensors included, to a graph captured at
    # another call shape: replays run it instead of the pass, so the weights are fitted once and
    # every call shape runs the model that was searched and verified (refitting per shape would
    # train again, and on a batch the recorded rows may not fill).
    rewrite: Callable[["DiTGraph"], "DiTGraph"] | None = None


@dataclass(frozen=True)
class PassSpec:
    """A registered pass and its contract.

    needs: calibration collectors it reads. after: passes that must come earlier in a profile
    when both are present. requires: capabilities an earlier pass of the profile must ensure.
    ensures: capabilities it gives the graph (e.g. "step_schedule": it owns the step schedule).
    conflicts: capabilities that must not come from any other pass of the same profile (every
    caching pass ensures and conflicts with "step_schedule": one caching pass per profile).
    lossy: it trades quality for speed and is searched or gated against the budget."""

    name: str
    config: type[PassConfig]
    apply: Callable[["DiTGraph", PassConfig, PassContext], PassResult]
    needs: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    level: PassLevel = PassLevel.NODE
    description: str = ""
    requires: tuple[str, ...] = ()
    ensures: tuple[str, ...] = ()
    conflicts: tuple[str, ...] = ()
    lossy: bool = False
    family: str = ""  # the module that registered it (its folder under passes/)
    # A config (as profile keys) that fires on a small diffusers DiT calibrated with `needs`,
    # without a budget search: what the contract test (tests/test_pass_contract.py) runs.
    example: dict[str, Any] = field(default_factory=dict)


_PASSES: dict[str, PassSpec] = {}
_PLUGINS_LOADED = False


def register_pass(
    name: str,
    config: type[PassConfig],
    *,
    needs: tuple[str, ...] = (),
    after: tuple[str, ...] = (),
    level: PassLevel | str = PassLevel.NODE,
    description: str = "",
    requires: tuple[str, ...] = (),
    ensures: tuple[str, ...] = (),
    conflicts: tuple[str, ...] = (),
    lossy: bool = False,
    example: dict[str, Any] | None = None,
) -> Callable:
    """Decorator: register `fn(graph, config, ctx) -> PassResult` as pass `name`."""
    level = PassLevel(level)

    def decorator(fn: Callable) -> Callable:
        if name in _PASSES and _PASSES[name].apply is not fn:
            raise ValueError(f"pass {name!r} is already registered by {_PASSES[name].apply.__module__}")
        _PASSES[name] = PassSpec(
            name, config, fn, tuple(needs), tuple(after), level,
            description or (fn.__doc__ or "").strip().split("\n")[0],
            tuple(requires), tuple(ensures), tuple(conflicts), lossy, fn.__module__, dict(example or {}),
        )
        return fn

    return decorator


def check_pass_contracts(names: list[str]) -> None:
    """Raise InvalidProfileError when a profile's passes break a declared contract: a
    capability one pass conflicts with is ensured by another, or a required capability is not
    ensured by an earlier pass. `names` in profile order."""
    specs = [get_pass(n) for n in names]
    for i, spec in enumerate(specs):
        for j, other in enumerate(specs):
            clash = sorted(set(spec.conflicts) & set(other.ensures)) if i != j else []
            if clash:
                raise InvalidProfileError(
                    f"passes {spec.name!r} and {other.name!r} both claim {', '.join(clash)} and cannot share a profile; "
                    "keep one of them"
                )
        earlier = {c for other in specs[:i] for c in other.ensures}
        missing = [c for c in spec.requires if c not in earlier]
        if missing:
            providers = sorted(n for n, s in available_passes().items() if set(missing) & set(s.ensures))
            raise InvalidProfileError(
                f"pass {spec.name!r} needs {', '.join(missing)} from an earlier pass of the profile; add one of "
                f"{providers or '(none installed)'} before it"
            )


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


# ONNX translations: a custom op that has a direct ONNX form (the quantized linears as
# QuantizeLinear / DequantizeLinear around a Gemm) maps to a factory `translate(opset) -> fn`,
# `fn` an onnxscript-traced function handed to torch.onnx's `custom_translation_table`; such an op
# is not re-traced through an export lowering. `min_opset(*args)` (optional) gives the lowest
# default-domain opset a call with those arguments can be expressed at (int4: 21), or None.
_ONNX_TRANSLATIONS: dict[Any, tuple[Callable, Callable | None]] = {}


def register_onnx_translation(op: Any, translate: Callable, min_opset: Callable | None = None) -> None:
    """Export `op` (an OpOverload) as the ONNX nodes `translate(opset)(*args)` emits."""
    _ONNX_TRANSLATIONS[op] = (translate, min_opset)


def onnx_translations() -> dict[Any, tuple[Callable, Callable | None]]:
    load_plugins()
    return dict(_ONNX_TRANSLATIONS)


# Report figures: a family that can draw its calibration for a user to check (the attention
# family's layer x head map of attention locality) registers the drawing; `ditopt optimize
# --report R.json` writes every registered figure next to the report as R<suffix>, naming no family.
@dataclass(frozen=True)
class ReportFigure:
    """`draw(stats, report, path)`: writes the figure to `path` and returns it, or returns None when
    the calibration holds nothing it can draw. `report` is the optimization report as a dict (what
    the passes chose); `title` is what the CLI prints beside the path."""

    title: str
    suffix: str
    draw: Callable[[Any, dict[str, Any], Any], Any]


_REPORT_FIGURES: dict[str, ReportFigure] = {}


def register_report_figure(title: str, suffix: str) -> Callable:
    """Decorator: register `fn(stats, report, path) -> path | None` as the figure `title`, written
    next to a report as REPORT<suffix> (e.g. ".attention.png")."""

    def decorator(fn: Callable) -> Callable:
        known = next((f for f in _REPORT_FIGURES.values() if f.suffix == suffix and f.title != title), None)
        if known is not None:
            raise ValueError(f"report figure suffix {suffix!r} is already used by {known.title!r}")
        _REPORT_FIGURES[title] = ReportFigure(title, suffix, fn)
        return fn

    return decorator


def report_figures() -> dict[str, ReportFigure]:
    load_plugins()
    return dict(sorted(_REPORT_FIGURES.items()))
