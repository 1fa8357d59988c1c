"""The artifact manifest: a JSON description of an exported DiTGraph.

Everything the runner needs to check and replay a call lives here as plain JSON (never pickle):
the call signature (one entry per flattened input leaf, the pytree specs as
`torch.utils._pytree.treespec_dumps` strings), the segment files with their tensor names,
shapes and dtypes, and the plan.
"""

from __future__ import annotations

import ast
import importlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree

from ditopt.errors import ArtifactError

FORMAT = "ditopt-artifact"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
# Tensors of the plan stages' specs (fitted forecast weights, timesteps), safetensors.
PLAN_TENSORS = "plan.safetensors"
SEGMENTS_DIR = "segments"
ENGINES_DIR = "engines"

_JSON_SCALARS = (bool, int, float, str, type(None))


# -- constants ------------------------------------------------------------------------------------
def encode_constant(value: Any) -> dict[str, Any]:
    """A non-tensor leaf as JSON. Values JSON cannot hold keep their repr, compared as text."""
    if isinstance(value, _JSON_SCALARS):
        return {"type": type(value).__name__, "value": value}
    return {"type": type(value).__name__, "repr": repr(value)}


def constant_from_repr(text: str) -> Any:
    """Recover a constant from the repr a CallSignature key stores (literals only)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return _Unparsed(text)


class _Unparsed:
    """A constant known only by its repr (e.g. an enum): encoded by that repr."""

    def __init__(self, text: str) -> None:
        self.text = text


def encode_key_constant(text: str) -> dict[str, Any]:
    value = constant_from_repr(text)
    if isinstance(value, _Unparsed):
        return {"type": "unknown", "repr": value.text}
    return encode_constant(value)


def constant_matches(entry: dict[str, Any], value: Any) -> bool:
    if "value" in entry:
        # bool is an int in Python: compare types too, so True never passes for 1.
        return type(value).__name__ == entry["type"] and value == entry["value"]
    return repr(value) == entry["repr"]


def decode_constant(entry: dict[str, Any]) -> Any:
    if "value" in entry:
        return entry["value"]
    raise ArtifactError(
        f"the artifact's output contains a constant of type {entry['type']} ({entry['repr']}) that JSON "
        "cannot hold; the ONNX runner cannot rebuild it"
    )


# -- tensors --------------------------------------------------------------------------------------
def tensor_entry(name: str, value: Any) -> dict[str, Any]:
    return {"name": name, "shape": [int(s) for s in value.shape], "dtype": str(value.dtype).removeprefix("torch.")}


def torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ArtifactError(f"manifest names an unknown dtype {name!r}")
    return dtype


# -- pytree specs ---------------------------------------------------------------------------------
def dump_spec(spec: pytree.TreeSpec) -> str:
    return pytree.treespec_dumps(spec)


def load_spec(text: str) -> pytree.TreeSpec | None:
    """Load a spec; None when it names a container type that is not registered here.

    Types from diffusers (output dataclasses such as Transformer2DModelOutput) register
    themselves with torch's pytree when their module is imported, so their module is imported
    first. Modules outside diffusers are never imported on a manifest's say-so.
    """
    for type_name in _spec_types(json.loads(text)):
        module = type_name.rsplit(".", 1)[0]
        if module.startswith("diffusers.") and type_name not in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
            try:
                importlib.import_module(module)
            except ImportError:
                pass
    try:
        return pytree.treespec_loads(text)
    except (NotImplementedError, KeyError, ValueError, TypeError):
        return None


def _spec_types(node: Any) -> list[str]:
    if isinstance(node, list):  # [protocol, spec]
        return _spec_types(node[1])
    found = [node["type"]] if node.get("type") else []
    for child in node.get("children_spec", []):
        found.extend(_spec_types(child))
    return found


# -- files ----------------------------------------------------------------------------------------
def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of the artifact at `path`, checked for format and version."""
    file = Path(path) / MANIFEST_NAME
    if not file.is_file():
        raise ArtifactError(f"{path} is not a ditopt artifact: {MANIFEST_NAME} is missing")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{file} is not valid JSON ({exc}); the artifact is damaged, export it again") from exc
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{file} is not a ditopt artifact manifest (format {manifest.get('format')!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has artifact format version {manifest.get('format_version')}; this ditopt reads version "
            f"{FORMAT_VERSION}. Export the model again with this ditopt."
        )
    return manifest
