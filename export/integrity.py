"""Digests and path confinement: an artifact is checked before any of it runs.

Every file of an artifact but manifest.json is listed in `manifest["files"]` with its size and
sha256; the manifest itself carries `manifest_sha256`, the sha256 of its own content in
canonical JSON (sorted keys, no whitespace, that key left out), so an edit anywhere in it is
caught as well. The checks guard against damage (truncated copies, flipped bits, a half-synced
directory) and against a file swapped in by mistake; anyone able to write the directory can
also rewrite the digests, so they are no signature. Files are verified when the artifact is
loaded, not again while onnxruntime reads them.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import stat
import warnings
from pathlib import Path
from typing import Any, Iterable

from ditopt.errors import ArtifactError

from .layout import MANIFEST_NAME, SEAL_KEY


class ArtifactWarning(UserWarning):
    """Something in an artifact directory that loading ignores (files the manifest does not list)."""


# -- digests --------------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def canonical_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's content as canonical JSON, `manifest_sha256` left out: the same
    for any formatting of the same content."""
    body = {k: v for k, v in manifest.items() if k != SEAL_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def seal(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest as plain JSON values with its `manifest_sha256` set."""
    plain = json.loads(json.dumps(manifest, default=str))  # what a reader will parse
    plain.pop(SEAL_KEY, None)
    plain[SEAL_KEY] = canonical_digest(plain)
    return plain


def check_seal(manifest: dict[str, Any], file: Path) -> None:
    if manifest.get(SEAL_KEY) != canonical_digest(manifest):
        raise ArtifactError(
            f"{file} was changed after export: its content does not match its {SEAL_KEY}. Export the model "
            "again (if you edited it on purpose, write it with ditopt.export.manifest.write_manifest, which "
            "records the new digest)"
        )


def file_table(root: Path, paths: Iterable[str]) -> dict[str, dict[str, Any]]:
    """{path: {sha256, size}} of the artifact's files (paths relative to `root`)."""
    return {p: {"sha256": sha256_file(root / p), "size": (root / p).stat().st_size} for p in sorted(set(paths))}


# -- paths ----------------------------------------------------------------------------------------
def confined_file(root: Path, rel: str) -> Path:
    """`root / rel` where each part is a plain directory or (the last) a regular file, never a
    symbolic link: a link could lead outside the artifact directory."""
    path = root
    parts = rel.split("/")
    for i, part in enumerate(parts):
        path = path / part
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            raise ArtifactError(f"{root} is incomplete: {rel} missing; export the model again") from None
        except OSError as exc:
            raise ArtifactError(f"{root}: cannot read {rel} ({exc})") from None
        if stat.S_ISLNK(info.st_mode):
            shown = "/".join(parts[: i + 1])
            raise ArtifactError(
                f"{root}: {shown} is a symbolic link (to {os.readlink(path)!r}); an artifact holds plain files only, "
                "so nothing it loads can lie outside its directory. Copy the artifact without links, or export it again"
            )
        last = i == len(parts) - 1
        if (last and not stat.S_ISREG(info.st_mode)) or (not last and not stat.S_ISDIR(info.st_mode)):
            raise ArtifactError(f"{root}: {'/'.join(parts[: i + 1])} is not a {'file' if last else 'directory'}; export the model again")
    return path


def walk_entries(root: Path) -> tuple[list[str], list[str]]:
    """(files, directories) under `root`, relative, '/'-separated, links and special files counted
    as files; links are not followed."""
    files, dirs = [], []
    for here, subdirs, names in os.walk(root, followlinks=False):
        rel = Path(here).relative_to(root).as_posix()
        prefix = "" if rel == "." else rel + "/"
        for d in list(subdirs):
            if os.path.islink(os.path.join(here, d)):
                files.append(prefix + d)  # a link to a directory: not walked, reported as an entry
                subdirs.remove(d)
            else:
                dirs.append(prefix + d)
        files.extend(prefix + n for n in names)
    return sorted(files), sorted(dirs)


def verify_files(root: Path, manifest: dict[str, Any]) -> None:
    """Every listed file present, plain, of its size and sha256; ArtifactError naming the first
    that is not. Files the manifest does not list are never loaded: ArtifactWarning names them."""
    for rel, entry in manifest["files"].items():
        path = confined_file(root, rel)
        size = path.stat().st_size
        if size != entry["size"]:
            raise ArtifactError(
                f"{root}: {rel} is {size} bytes, the manifest says {entry['size']} (truncated or replaced); "
                "export the model again"
            )
        if sha256_file(path) != entry["sha256"]:
            raise ArtifactError(
                f"{root}: {rel} does not match its sha256 in the manifest (damaged or modified); export the model again"
            )
    files, _ = walk_entries(root)
    extra = [f for f in files if f != MANIFEST_NAME and f not in manifest["files"]]
    if extra:
        warnings.warn(
            f"{root} holds files its manifest does not list: {extra[:10]}{' ...' if len(extra) > 10 else ''}; "
            "they are not loaded. Remove them, or export the artifact again",
            ArtifactWarning,
            stacklevel=3,
        )


def check_external_data(root: Path, entry: dict[str, Any]) -> None:
    """The ONNX file's external-data locations are exactly files the segment entry lists (so each
    is digest-checked and inside the artifact), read before onnxruntime opens the file."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    rel = entry["file"]
    try:
        model = onnx.load(str(root / rel), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ArtifactError(f"{root}: {rel} is not a readable ONNX model ({type(exc).__name__}: {exc}); export the model again") from None
    allowed = set(entry.get("external_data", []))
    for tensor in _get_all_tensors(model):
        if not uses_external_data(tensor):
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(rel), location))
        if os.path.isabs(location) or resolved.startswith("../") or resolved not in allowed:
            raise ArtifactError(
                f"{root}: {rel} reads tensor {tensor.name!r} from {location!r}, which is not one of the segment's "
                f"listed data files {sorted(allowed)}; export the model again"
            )
