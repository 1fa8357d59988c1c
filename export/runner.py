"""Run an exported artifact with onnxruntime: the same keyword call as the original model.

Loading reads JSON, safetensors and ONNX only (never pickle). Before any session is made the
artifact is checked: the manifest against its schema and its own digest, every file against its
size and sha256, every path confined to the directory (no links), every ONNX file's external data
among its segment's listed files; anything wrong is an ArtifactError naming the file. Every call
is checked against the signature the artifact was exported for, because the segments are
specialised to those shapes.

The plan runs as in the PyTorch runtime: stages are rebuilt from their specs (`Stage.spec`,
`ditopt.plan.stage_from_spec`) and run on the host between ONNX segments, with the same step
tracking (`ditopt.runtime.StepTracker`): a call with a larger timestep than the last one starts
a new generation, `reset()` starts one explicitly. A calibrated cache schedule therefore runs
here exactly as it was chosen; conditional-only steps run the exported half-batch segments
(`manifest["half_program"]`), or compute both halves where the artifact has none (the
manifest's notes say why).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.utils._pytree as pytree

from ditopt.errors import ArtifactError, InputMismatchError
from ditopt.plan import RunSegments, Stage, stage_from_spec
from ditopt.runtime import StepTracker, read_timestep

from .integrity import check_external_data, verify_files
from .manifest import MANIFEST_NAME, PLAN_TENSORS, constant_matches, decode_constant, load_spec, read_manifest, torch_dtype
from .schema import validate_static_policy

# Stage kinds an entry without a spec (artifacts written before specs) can still run as.
SUPPORTED_STAGES = {"run"}


class _ArtifactSegment:
    """One exported segment as the plan stages see a segment: its value names, and `run(env)`."""

    def __init__(self, runner: "ArtifactRunner", entry: dict[str, Any], session: str | None) -> None:
        self.name, self.kind, self.block = entry["name"], entry["kind"], entry.get("block")
        self.inputs = tuple(i["name"] for i in entry["inputs"])
        self.outputs = tuple(o["name"] for o in entry["outputs"])
        self.module = self  # stages memoise on id(segment.module)
        self._runner, self._session = runner, session
        self._empty = bool(entry.get("empty")) and not self.inputs and not self.outputs

    def run(self, env: dict[str, Any]) -> None:
        if self._session is None and self._empty:
            return
        if self._session is None:
            raise ArtifactError(f"segment {self.name} of this program was not exported (no ONNX file)")
        self._runner.run_session(self._session, self.outputs, env)


class _ArtifactGraph:
    """What plan stages read of a DiTGraph (segments by name, value shapes, the latent and
    timestep inputs, the signature's outputs), backed by the artifact's segments: the exported
    program's, or the half-batch program's (`prefix` names its sessions)."""

    def __init__(self, runner: "ArtifactRunner", entries: list[dict[str, Any]], outputs: list[str | None],
                 timestep_input: str | None, latent_input: str | None, prefix: str = "") -> None:
        self.segments = tuple(_ArtifactSegment(runner, e, prefix + e["name"] if e.get("file") else None) for e in entries)
        self._by_name = {s.name: s for s in self.segments}
        self.main_segments = tuple(s for s in self.segments if s.kind != "variant")
        self.signature = type("ArtifactSignature", (), {"outputs": tuple(outputs)})()
        self.timestep_input, self.latent_input = timestep_input, latent_input
        shapes = {v["name"]: tuple(v["shape"]) for e in entries for v in (*e["inputs"], *e["outputs"])}
        self.meta: dict[str, Any] = {"_value_shapes": shapes}

    def segment(self, name: str) -> _ArtifactSegment:
        return self._by_name[name]

    def at_step(self, step: int) -> "_ArtifactGraph":
        return self  # export refuses graphs with early-step variants


HALF_PREFIX = "half/"  # session names of the half-batch program's segments


def _session_files(manifest: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(session name, segment entry) of every ONNX file in the artifact."""
    files = [(e["name"], e) for e in manifest["segments"] if e.get("file")]
    half = manifest.get("half_program") or {}
    return files + [(HALF_PREFIX + e["name"], e) for e in half.get("segments", []) if e.get("file")]


def _plan_tensors(root: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    if not manifest.get("plan_tensors"):
        return {}
    name = manifest["plan_tensors"]
    file = root / name
    if not file.is_file():
        raise ArtifactError(f"{root} is incomplete: {name} missing; export the model again")
    from safetensors.torch import load

    try:
        return load(file.read_bytes())
    except Exception as exc:  # safetensors' own error types
        raise ArtifactError(f"{root}: {name} is not a readable safetensors file ({exc}); export the model again") from None


def _check_static_policy(root: Path, i: int, spec: dict[str, Any], own: dict[str, torch.Tensor]) -> None:
    """A static schedule's lengths and tensors, which its loader and the runner index blindly."""
    where = f"{root / MANIFEST_NAME}: plan stage {i} ({spec.get('kind')!r})"
    policy = validate_static_policy(spec["policy"], f"{where} policy")
    steps = len(policy.compute)
    refs = [(policy.timesteps, None)] + [(w.tensor, sum(w.lengths)) for w in policy.weights if w is not None]
    for name, numel in refs:
        tensor = own.get(name)
        if tensor is None:
            raise ArtifactError(f"{where} reads tensor {name!r}, which {PLAN_TENSORS} does not hold; export the model again")
        if tensor.dim() != 1 or (numel is not None and tensor.numel() != numel) or (numel is None and tensor.numel() not in (0, steps)):
            raise ArtifactError(
                f"{where}: tensor {name!r} in {PLAN_TENSORS} has shape {tuple(tensor.shape)}, which does not fit its "
                f"schedule of {steps} steps; export the model again"
            )


def _plan_stages(root: Path, manifest: dict[str, Any]) -> list[Stage]:
    """The manifest's plan as stages: rebuilt from each entry's spec, or a plain run of its
    segments; ArtifactError for a stage this runtime cannot run."""
    tensors = _plan_tensors(root, manifest)
    file = root / MANIFEST_NAME
    stages: list[Stage] = []
    for i, entry in enumerate(manifest["plan"]):
        kind, spec = entry.get("kind"), entry.get("spec")
        if spec is None:
            if kind not in SUPPORTED_STAGES:
                raise ArtifactError(
                    f"{file}: stage kind {kind!r} has no ONNX runtime support yet; run this model with the "
                    "PyTorch runtime (ditopt.optimize) instead"
                )
            stages.append(RunSegments(tuple(entry["segments"])))
            continue
        prefix = entry.get("spec_tensor_prefix") or ""
        own = {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}
        if isinstance(spec.get("policy"), dict) and spec["policy"].get("type") == "static":
            _check_static_policy(root, i, spec, own)
        try:
            stages.append(stage_from_spec(spec, own))
        except KeyError as exc:
            if exc.args == (spec.get("kind"),):  # stage_from_spec: no loader for the kind
                raise ArtifactError(
                    f"{file}: plan stage {i} (kind {kind!r}) cannot be rebuilt here: no loader for {exc}; install the ditopt "
                    "version or plugin that wrote the artifact, or run the model with the PyTorch runtime"
                ) from None
            raise ArtifactError(f"{file}: plan stage {i} (kind {kind!r}) has an invalid spec (no key {exc}); export the model again") from None
        except Exception as exc:  # the loader's own checks (ValueError, TypeError, ...)
            raise ArtifactError(f"{file}: plan stage {i} (kind {kind!r}) has an invalid spec ({exc}); export the model again") from exc
    return stages


class ArtifactRunner:
    """Callable replaying an artifact's plan on onnxruntime sessions, one per segment."""

    def __init__(self, path: Path, manifest: dict[str, Any], sessions: dict[str, Any], plan: list[Stage] | None = None) -> None:
        self.path = path
        self.manifest = manifest
        self.sessions = sessions
        sig = manifest["signature"]
        self._inputs: list[dict[str, Any]] = sig["inputs"]
        file = path / MANIFEST_NAME
        self._in_spec = _load_spec(file, sig, "in_spec")
        if self._in_spec is None:
            raise ArtifactError(f"{file}: the artifact's input spec names a container type that is not available here")
        # An output container type that is not registered here (e.g. a diffusers output class
        # from another version) degrades to a plain tuple of the output leaves.
        self._out_spec = _load_spec(file, sig, "out_spec")
        self._check_specs(file, sig)
        self._feeds = {name: [i.name for i in sess.get_inputs()] for name, sess in sessions.items()}
        self._keywords = list(self._in_spec.child(1).context)
        outputs = [o["name"] if o["kind"] == "env" else None for o in sig["outputs"]]
        self._graph = _ArtifactGraph(self, manifest["segments"], outputs, sig.get("timestep_input"), sig.get("latent_input"))
        half = manifest.get("half_program")
        self._half = (None if half is None else
                      _ArtifactGraph(self, half["segments"], half["outputs"], sig.get("timestep_input"), half.get("latent_input"), HALF_PREFIX))
        self._plan = _plan_stages(path, manifest) if plan is None else plan
        steps = [len(e["spec"]["policy"]["compute"]) for e in manifest["plan"]
                 if (e.get("spec") or {}).get("policy", {}).get("type") == "static"]
        self.tracker = StepTracker(max(steps) if steps else None)
        self.last_record: dict[str, Any] = {}

    def _check_specs(self, file: Path, sig: dict[str, Any]) -> None:
        """The specs fit the call (positional args, keyword dict) and the input/output lists."""
        spec = self._in_spec
        if not (spec.type is tuple and spec.num_children == 2 and spec.child(1).type is dict
                and all(isinstance(k, str) for k in spec.child(1).context)):
            raise ArtifactError(f"{file}: signature.in_spec is not an (args, kwargs) call; export the model again")
        if spec.num_leaves != len(sig["inputs"]):
            raise ArtifactError(
                f"{file}: signature.in_spec has {spec.num_leaves} leaves for {len(sig['inputs'])} inputs; export the model again"
            )
        if self._out_spec is not None and self._out_spec.num_leaves != len(sig["outputs"]):
            raise ArtifactError(
                f"{file}: signature.out_spec has {self._out_spec.num_leaves} leaves for {len(sig['outputs'])} outputs; "
                "export the model again"
            )

    def reset(self) -> None:
        """Start a new generation: clear every stage's cross-step state."""
        self.tracker.reset()

    @property
    def model_class(self) -> str:
        return self.manifest["model_class"]

    def __repr__(self) -> str:
        return f"ArtifactRunner({self.model_class}, {str(self.path)!r}, segments={list(self.sessions)})"

    # -- inputs -----------------------------------------------------------------------------------
    def _flatten(self, args: tuple, kwargs: dict[str, Any]) -> list[Any]:
        if args:
            raise TypeError(
                f"call the artifact with keyword arguments ({', '.join(self._keywords)}), as the model was exported"
            )
        unexpected = [k for k in kwargs if k not in self._keywords]
        if unexpected:
            raise InputMismatchError(
                f"unexpected input(s) {unexpected}; this artifact was exported for inputs {self._keywords}. "
                "Export again with the inputs you call it with."
            )
        ordered: dict[str, Any] = {}
        entries = iter(self._inputs)
        kw_spec = self._in_spec.child(1)
        for key, child in zip(self._keywords, kw_spec.children()):
            leaf_entries = [next(entries) for _ in range(child.num_leaves)]
            if key in kwargs:
                ordered[key] = kwargs[key]
            elif child.is_leaf() and leaf_entries[0]["kind"] == "constant" and leaf_entries[0].get("value", 0) is None:
                ordered[key] = None  # left out, as it was None at export
            else:
                raise InputMismatchError(
                    f"missing input {key!r}; this artifact was exported for inputs {self._keywords}"
                )
        leaves, spec = pytree.tree_flatten(((), ordered))
        if spec != self._in_spec:
            raise InputMismatchError(
                f"the inputs' structure differs from the exported one:\n  expected {self._in_spec}\n  found    {spec}\n"
                "Export again with inputs structured like the ones you call it with."
            )
        return leaves

    def _check(self, leaves: list[Any]) -> dict[str, Any]:
        env: dict[str, Any] = {}
        for entry, leaf in zip(self._inputs, leaves):
            name = entry["name"]
            if entry["kind"] == "constant":
                if not constant_matches(entry, leaf):
                    expected = entry.get("value", entry.get("repr"))
                    raise InputMismatchError(
                        f"input {name!r} is {leaf!r}, but the artifact was exported for {expected!r}; "
                        f"export again with {name}={leaf!r}"
                    )
                continue
            if isinstance(leaf, np.ndarray):
                leaf = torch.from_numpy(leaf)
            if not isinstance(leaf, torch.Tensor):
                raise InputMismatchError(
                    f"input {name!r} must be a tensor of shape {tuple(entry['shape'])} and dtype {entry['dtype']}, "
                    f"got {type(leaf).__name__}"
                )
            expected_shape, found_shape = tuple(entry["shape"]), tuple(leaf.shape)
            if found_shape != expected_shape:
                raise InputMismatchError(
                    f"input {name!r} has shape {found_shape}, but the artifact was exported for shape "
                    f"{expected_shape}; its segments are specialised to that shape. Export again with inputs "
                    "of this shape (one artifact per resolution / batch size)."
                )
            if leaf.dtype != torch_dtype(entry["dtype"]):
                raise InputMismatchError(
                    f"input {name!r} has dtype {str(leaf.dtype).removeprefix('torch.')}, but the artifact was "
                    f"exported for {entry['dtype']}; cast it, or export again with this dtype"
                )
            if leaf.dtype == torch.bfloat16:
                raise ArtifactError(f"input {name!r} is bfloat16, which the numpy bridge to onnxruntime cannot carry")
            env[name] = leaf.detach().cpu()
        return env

    # -- execution ----------------------------------------------------------------------------------
    def run_session(self, session: str, outputs: tuple[str, ...], env: dict[str, Any]) -> None:
        feeds = {k: _as_numpy(env[k]) for k in self._feeds[session]}
        env.update(zip(outputs, (torch.from_numpy(r) for r in self.sessions[session].run(list(outputs), feeds))))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # diffusers' `return_dict` picks only the output container. Where the artifact was
        # exported without it (the model's default), `return_dict=False` asks for the tuple a
        # diffusers model returns then, so samplers written for the model run on the artifact.
        as_tuple = False
        if "return_dict" in kwargs and "return_dict" not in self._keywords:
            flag = kwargs.pop("return_dict")
            if not isinstance(flag, bool):
                raise InputMismatchError(f"return_dict must be True or False, not {flag!r}")
            as_tuple = not flag
        env = self._check(self._flatten(args, kwargs))
        tin = self._graph.timestep_input
        ctx = self.tracker.advance(read_timestep(env.get(tin)) if tin else None)
        if self._half is not None:
            ctx.second_half = lambda: self._half
        for stage in self._plan:
            stage.run(self._graph, env, ctx)
        self.last_record = ctx.record
        flat = [
            decode_constant(o) if o["kind"] == "constant" else _as_tensor(env[o["name"]])
            for o in self.manifest["signature"]["outputs"]
        ]
        if self._out_spec is None or as_tuple:
            return tuple(flat)
        return pytree.tree_unflatten(flat, self._out_spec)


def _load_spec(file: Path, sig: dict[str, Any], key: str) -> pytree.TreeSpec | None:
    try:
        return load_spec(sig[key])
    except ArtifactError as exc:
        raise ArtifactError(f"{file}: signature.{key}: {exc}") from None


def _as_numpy(value: Any) -> Any:
    return value.detach().contiguous().numpy() if isinstance(value, torch.Tensor) else value


def _as_tensor(value: Any) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))


def _session_options(ort: Any) -> Any:
    """No spinning: after a run, onnxruntime's intra-op threads busy-wait for the next one by
    default, and the host work between segments (a cache stage's forecast in torch) then ran
    on cores they held: on dit-digits `balanced`, a skipped step's multiply-adds took 6 ms
    instead of 0.1 ms, and sampling through the artifact was 3.7x slower than the PyTorch
    runtime (`benchmarks/exploration/export_balanced.py`).

    As many intra-op threads as torch uses (`torch.get_num_threads()`, what `torch.set_num_threads`
    set), so the artifact and the PyTorch runtime it is compared with share one thread budget;
    onnxruntime's own default is every physical core. The graph optimisation level stays at
    onnxruntime's default, ORT_ENABLE_ALL (its fusions of LayerNorm, GELU and MatMul+Add)."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = torch.get_num_threads()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def load_artifact(path: str | os.PathLike, providers: Sequence[Any] | None = None) -> ArtifactRunner:
    """Open the artifact at `path` with one onnxruntime session per segment.

    `providers` defaults to `["CPUExecutionProvider"]`. The plan's stages run on the host as in
    the PyTorch runtime (caching stages included); a stage kind this installation cannot
    rebuild raises ArtifactError, before any session is made.

    Checked first, each failure an ArtifactError naming the file: the manifest (format, version,
    schema, its own digest), every listed file (present, not a link, size, sha256), the plan's
    tensors, each ONNX file's external-data locations (only its segment's listed files), and
    each session's input and output names. Files the manifest does not list are never read;
    ArtifactWarning names them.
    """
    import onnxruntime as ort

    root = Path(path)
    manifest = read_manifest(root)  # format, version, schema, the manifest's own digest
    verify_files(root, manifest)  # every file's size and sha256, no links
    plan = _plan_stages(root, manifest)  # fails on an unsupported stage before any session is built
    sessions = {}
    for name, seg in _session_files(manifest):
        check_external_data(root, seg)
        try:
            session = ort.InferenceSession(str(root / seg["file"]), _session_options(ort),
                                           providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as exc:  # onnxruntime's Fail / InvalidGraph / InvalidProtobuf ...
            raise ArtifactError(
                f"{root}: onnxruntime cannot load {seg['file']} ({type(exc).__name__}: {str(exc)[:500]}); export the model "
                "again (with this onnxruntime, if the artifact comes from another installation)"
            ) from None
        _check_session_io(root, seg, session)
        sessions[name] = session
    return ArtifactRunner(root, manifest, sessions, plan)


def _check_session_io(root: Path, seg: dict[str, Any], session: Any) -> None:
    """The ONNX graph takes and gives the values its manifest entry names, which the runner
    feeds and reads by name."""
    got = ({i.name for i in session.get_inputs()}, {o.name for o in session.get_outputs()})
    want = ({i["name"] for i in seg["inputs"]}, {o["name"] for o in seg["outputs"]})
    if not (got[0] <= want[0] and got[1] >= want[1]):
        raise ArtifactError(
            f"{root}: {seg['file']} takes {sorted(got[0])} and gives {sorted(got[1])}, but its manifest entry (segment "
            f"{seg['name']}) says {sorted(want[0])} and {sorted(want[1])}; export the model again"
        )
