"""Run an exported artifact with onnxruntime: the same keyword call as the original model.

Loading reads JSON and ONNX only (never pickle). Every call is checked against the signature
the artifact was exported for, because the segments are specialised to those shapes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.utils._pytree as pytree

from ditopt.errors import ArtifactError, InputMismatchError

from .manifest import constant_matches, decode_constant, load_spec, read_manifest, torch_dtype

SUPPORTED_STAGES = {"run"}


class ArtifactRunner:
    """Callable replaying an artifact's plan on onnxruntime sessions, one per segment."""

    def __init__(self, path: Path, manifest: dict[str, Any], sessions: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self.sessions = sessions
        sig = manifest["signature"]
        self._inputs: list[dict[str, Any]] = sig["inputs"]
        self._in_spec = load_spec(sig["in_spec"])
        if self._in_spec is None:
            raise ArtifactError(f"{path}: the artifact's input spec names a container type that is not available here")
        # An output container type that is not registered here (e.g. a diffusers output class
        # from another version) degrades to a plain tuple of the output leaves.
        self._out_spec = load_spec(sig["out_spec"])
        self._segments = {s["name"]: s for s in manifest["segments"]}
        self._feeds = {name: [i.name for i in sess.get_inputs()] for name, sess in sessions.items()}
        self._keywords = list(self._in_spec.child(1).context)

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
            env[name] = leaf.detach().cpu().numpy()
        return env

    # -- execution ----------------------------------------------------------------------------------
    def run_segment(self, name: str, env: dict[str, np.ndarray]) -> None:
        """Run one segment on numpy values from `env` and add its outputs to it."""
        sess = self.sessions[name]
        outputs = [o["name"] for o in self._segments[name]["outputs"]]
        results = sess.run(outputs, {k: env[k] for k in self._feeds[name]})
        env.update(zip(outputs, results))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        env = self._check(self._flatten(args, kwargs))
        for stage in self.manifest["plan"]:
            for name in stage["segments"]:
                self.run_segment(name, env)
        flat = [
            decode_constant(o) if o["kind"] == "constant" else torch.from_numpy(np.ascontiguousarray(env[o["name"]]))
            for o in self.manifest["signature"]["outputs"]
        ]
        if self._out_spec is None:
            return tuple(flat)
        return pytree.tree_unflatten(flat, self._out_spec)


def load_artifact(path: str | os.PathLike, providers: Sequence[Any] | None = None) -> ArtifactRunner:
    """Open the artifact at `path` with one onnxruntime session per segment.

    `providers` defaults to `["CPUExecutionProvider"]`. Only plans made of plain segment runs
    execute here; an artifact whose plan holds other stages (caching) raises ArtifactError.
    """
    import onnxruntime as ort

    root = Path(path)
    manifest = read_manifest(root)
    for stage in manifest["plan"]:
        if stage.get("kind") not in SUPPORTED_STAGES:
            raise ArtifactError(
                f"stage kind {stage.get('kind')!r} has no ONNX runtime support yet; run this model with the "
                "PyTorch runtime (ditopt.optimize) instead"
            )
    sessions = {}
    for seg in manifest["segments"]:
        file = root / seg["file"]
        missing = [f for f in (seg["file"], *seg.get("external_data", [])) if not (root / f).is_file()]
        if missing:
            raise ArtifactError(f"{root} is incomplete: {missing} missing; export the model again")
        sessions[seg["name"]] = ort.InferenceSession(str(file), providers=list(providers or ["CPUExecutionProvider"]))
    return ArtifactRunner(root, manifest, sessions)
