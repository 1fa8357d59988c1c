"""The artifact manifest: a JSON description of an exported DiTGraph.

Everything the runner needs to check and replay a call lives here as plain JSON (never pickle):
the call signature (one entry per flattened input leaf, the pytree specs as
`torch.utils._pytree.treespec_dumps` strings), the segment files with their tensor names,
shapes and dtypes, the plan, and a sha256 for every file and for the manifest itself
(`export/integrity.py`). `read_manifest` checks format, version, schema (`export/schema.py`)
and that digest.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree

from ditopt.errors import ArtifactError

from .layout import ENGINES_DIR, FORMAT, FORMAT_VERSION, MANIFEST_NAME, PLAN_TENSORS, SEGMENTS_DIR  # noqa: F401  (re-exported)

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
    """Load a spec; None when it names a container type that is not registered here;
    ArtifactError when it is no spec at all.

    Types from diffusers (output dataclasses such as Transformer2DModelOutput) register
    themselves with torch's pytree when their module is imported, so their module is imported
    first. Modules outside diffusers are never imported on a manifest's say-so.
    """
    try:
        type_names = _spec_types(json.loads(text))
    except (ValueError, TypeError, AttributeError, IndexError, KeyError, RecursionError) as exc:
        raise ArtifactError(f"the manifest's pytree spec is malformed ({type(exc).__name__}: {exc}); export the model again") from None
    for type_name in type_names:
        module = type_name.rsplit(".", 1)[0]
        if module.startswith("diffusers.") and type_name not in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
            try:
                importlib.import_module(module)
            except Exception:  # not importable here: the spec degrades (see the runner)
                pass
    if any(t not in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE for t in type_names):
        return None
    try:
        return pytree.treespec_loads(text)
    except Exception as exc:  # every type is known, so the structure itself is wrong
        raise ArtifactError(f"the manifest's pytree spec is malformed ({type(exc).__name__}: {exc}); export the model again") from None


def _spec_types(node: Any) -> list[str]:
    if isinstance(node, list):  # [protocol, spec]
        if len(node) != 2:
            raise ValueError("a spec is [protocol, tree]")
        return _spec_types(node[1])
    if not isinstance(node, dict):
        raise TypeError(f"a spec node is an object, not {type(node).__name__}")
    found = [node["type"]] if node.get("type") is not None else []
    if found and not isinstance(found[0], str):
        raise TypeError("a spec node's type is a string")
    children = node.get("children_spec", [])
    if not isinstance(children, list):
        raise TypeError("children_spec is a list")
    for child in children:
        found.extend(_spec_types(child))
    return found


# -- files ----------------------------------------------------------------------------------------
def parse_manifest_file(file: Path) -> dict[str, Any]:
    """The JSON object in `file`, or ArtifactError saying why it is none (missing, a link, not
    UTF-8, not JSON, not an object)."""
    if file.is_symlink():
        raise ArtifactError(f"{file} is a symbolic link; an artifact holds plain files only. Copy the artifact without links")
    if not file.is_file():
        raise ArtifactError(f"{file.parent} is not a ditopt artifact: {MANIFEST_NAME} is missing")
    try:
        manifest = json.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ArtifactError(f"{file} is not UTF-8 text ({exc}); the artifact is damaged, export it again") from None
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ArtifactError(f"{file} is not valid JSON ({exc}); the artifact is damaged, export it again") from None
    except OSError as exc:
        raise ArtifactError(f"cannot read {file} ({exc})") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{file} is not a ditopt artifact manifest (a JSON {type(manifest).__name__}, not an object)")
    return manifest


def check_format(manifest: dict[str, Any], file: Path) -> None:
    """ArtifactError unless `manifest` is a ditopt artifact manifest of this FORMAT_VERSION."""
    if manifest.get("format") != FORMAT:
        keys = ", ".join(sorted(map(str, manifest))[:8]) or "none"
        raise ArtifactError(
            f"{file} is not a ditopt artifact manifest: it has no \"format\": \"{FORMAT}\" (format "
            f"{manifest.get('format')!r}; keys: {keys}). Point this at a directory written by ditopt export"
        )
    version = manifest.get("format_version")
    if version == FORMAT_VERSION:
        return
    if isinstance(version, int) and not isinstance(version, bool) and 0 < version < FORMAT_VERSION:
        raise ArtifactError(
            f"{file} is from an older ditopt (artifact format version {version}); this ditopt reads "
            f"version {FORMAT_VERSION}, whose manifest lists a sha256 for every file. Re-export the model with this "
            "ditopt (ditopt export ... --force replaces the old artifact)"
        )
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise ArtifactError(
            f"{file} has artifact format version {version}, newer than this ditopt reads ({FORMAT_VERSION}); "
            "upgrade ditopt, or re-export the model with this one"
        )
    raise ArtifactError(f"{file}: format_version {version!r} is not a known artifact format version; export the model again")


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the artifact at `path`, checked for format, version, schema and its own
    digest (not the other files' digests: `load_artifact` checks those)."""
    from .integrity import check_seal
    from .schema import validate_manifest

    file = Path(path) / MANIFEST_NAME
    manifest = parse_manifest_file(file)
    check_format(manifest, file)
    validate_manifest(manifest, file)
    check_seal(manifest, file)
    return manifest


def write_manifest(path: str | os.PathLike, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write `manifest` to the artifact at `path` with its digest recomputed; returns it as written.
    The other files' digests ("files") are the caller's to keep true."""
    from .integrity import seal

    sealed = seal(manifest)
    (Path(path) / MANIFEST_NAME).write_text(json.dumps(sealed, indent=2) + "\n")
    return sealed
