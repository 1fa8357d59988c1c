"""Write an optimized DiT as an artifact directory: one ONNX file per segment + manifest.json.

The directory is built in a temporary sibling (same filesystem) and renamed into place, so a
reader sees either the old artifact, the new one, or none: never a half-written one. An export
holds a lock next to the target (`.NAME.ditopt-lock`, flock) for its whole run: a second export
to the same target is refused at once, and under the lock any `.NAME.tmp-*` / `.NAME.old-*`
sibling is known to be left by a killed export, so it is removed (an `.old` one put back when
the kill fell between the two renames and the target is missing). `force` replaces only a
directory ditopt wrote: its manifest.json is a ditopt artifact manifest of a known format
version and it holds nothing that manifest does not list. Every file and directory is created
with the user's umask.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

import ditopt
from ditopt.capture import call_key, normalize_call
from ditopt.errors import ArtifactError, InputMismatchError
from ditopt.graph import Constant, DiTGraph, Segment
from ditopt.registry import onnx_translations
from ditopt.runtime import OptimizedDiT

from .integrity import file_table, sha256_file, walk_entries
from .manifest import (
    ENGINES_DIR,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    PLAN_TENSORS,
    SEGMENTS_DIR,
    dump_spec,
    encode_constant,
    encode_key_constant,
    parse_manifest_file,
    tensor_entry,
    write_manifest,
)

aten = torch.ops.aten


def export_artifact(
    optimized_or_graph: OptimizedDiT | DiTGraph,
    out_dir: str | os.PathLike,
    *,
    example_inputs: dict[str, Any] | None = None,
    force: bool = False,
    opset: int | None = None,
    verify_with: Callable[[Any], Any] | None = None,
    verify_tol: float = 1e-3,
) -> Path:
    """Export every segment of a captured graph to ONNX and write the artifact to `out_dir`.

    Given an `OptimizedDiT`, the program for `example_inputs`' shape signature is exported
    (captured now if the model has not seen that signature), or its first program when no
    inputs are given; its optimization report goes into the manifest. Given a `DiTGraph`,
    `example_inputs` (optional) must match the signature it was captured for.

    An existing artifact at `out_dir` is replaced only with `force=True`, and only where it is
    one ditopt wrote (a ditopt manifest of a known format version, and no file it does not
    list); anything else raises ArtifactError and is left as it is. A second export to the same
    `out_dir` while this one runs raises ArtifactError. Returns `out_dir`.

    `verify_with(model)`: a run (e.g. the user's sampling loop at the exported shape) done with
    the PyTorch runtime and with the written artifact before it is moved into place; where
    their outputs differ by more than `verify_tol` (relative L2) nothing is written and
    ArtifactError says by how much. The result goes into `manifest["verification"]`.
    """
    target = Path(out_dir)
    graph, report = _select_program(optimized_or_graph, example_inputs)
    _check_exportable(graph)
    place = Path(os.path.abspath(target))  # '..' and '.' resolved, links kept: the name of the entry to write
    if place.parent == place:
        raise ArtifactError(f"cannot export to {target}: choose a directory below it")
    try:
        place.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ArtifactError(f"cannot create {place.parent} for the artifact ({exc})") from None
    with _export_lock(place):
        _clean_stale(place)
        _check_target(place, force)
        half, no_half = _half_program(optimized_or_graph, graph, example_inputs)
        opset = _export_opset([graph] + ([half] if half is not None else []), opset)
        tmp = _make_tmp(place)
        try:
            (tmp / SEGMENTS_DIR).mkdir()
            stems = [segment_file_stem(seg.name) for seg in graph.segments]
            if len(set(stems)) != len(stems):
                raise ArtifactError(f"segment names {[s.name for s in graph.segments]} map to clashing file names {stems}")
            segments = [_export_segment(seg, tmp, opset) for seg in graph.segments]
            plan, tensors = _plan(graph)
            if tensors:
                from safetensors.torch import save

                # Bytes written by Python, not safetensors' save_file, which creates the file mode 0600.
                (tmp / PLAN_TENSORS).write_bytes(save({k: v.contiguous() for k, v in tensors.items()}))
            manifest = _manifest(graph, report, segments, example_inputs, plan, PLAN_TENSORS if tensors else None)
            if half is not None:
                manifest["half_program"] = _half_entry(graph, half, tmp, opset)
            manifest["notes"] += _plan_notes(graph, half, no_half)
            files, _ = walk_entries(tmp)
            manifest["files"] = file_table(tmp, [f for f in files if f != MANIFEST_NAME])
            manifest["size_bytes"] = sum(entry["size"] for entry in manifest["files"].values())
            manifest["initializer_bytes"] = _initializer_bytes(tmp, manifest)
            write_manifest(tmp, manifest)
            if verify_with is not None:
                manifest["verification"] = _verify(optimized_or_graph, tmp, verify_with, verify_tol)
                write_manifest(tmp, manifest)
            _move_into_place(tmp, place, force)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError):  # disk full, permissions: named, and nothing was written
                raise ArtifactError(f"writing the artifact for {target} failed ({exc}); nothing was written") from exc
            raise
    return target


# -- choosing what to export ----------------------------------------------------------------------
def _select_program(obj: Any, example_inputs: dict[str, Any] | None) -> tuple[DiTGraph, Any]:
    if isinstance(obj, OptimizedDiT):
        report = obj.report
        if example_inputs is not None:
            return obj.program_for(normalize_call(obj.original, (), dict(example_inputs))), report
        if not obj.programs:
            raise ArtifactError("the optimized model holds no program yet; pass example_inputs={...} to export one")
        return obj.programs[0], report
    if isinstance(obj, DiTGraph):
        if example_inputs is not None and call_key(dict(example_inputs)) != obj.signature.key:
            raise InputMismatchError(
                "example_inputs do not match the shapes, dtypes or constants this DiTGraph was captured for; "
                "capture the model again with these inputs, or export without example_inputs"
            )
        return obj, None
    raise ArtifactError(f"export_artifact takes an OptimizedDiT or a DiTGraph, not {type(obj).__name__}")


def _verify(obj: Any, tmp: Path, run: Callable[[Any], Any], tol: float) -> dict[str, Any]:
    """Run `run` with the PyTorch runtime and with the artifact written at `tmp` (each from a
    fresh generation); the largest relative error over the outputs' tensors, or ArtifactError."""
    from ditopt.verify import relative_error, tensor_leaves

    from .runner import load_artifact

    if not isinstance(obj, OptimizedDiT):
        raise ArtifactError("verify_with needs the OptimizedDiT (the PyTorch runtime to compare the artifact with)")
    runner = load_artifact(tmp)
    obj.reset()
    with torch.no_grad():
        expected = tensor_leaves(run(obj))
    obj.reset()
    got = tensor_leaves(run(runner))
    if len(got) != len(expected) or not expected:
        raise ArtifactError(f"verification run returned {len(got)} tensors from the artifact and {len(expected)} from the runtime")
    error = max(relative_error(g, e) for g, e in zip(got, expected))
    if not error <= tol:  # NaN fails too
        raise ArtifactError(
            f"the artifact's outputs differ from the PyTorch runtime's by {error:.3g} (relative L2) on the verification "
            f"run, above the tolerance {tol:g}; nothing was written. Check the notes of a plan the runner runs "
            "differently (conditional-only steps without half-batch segments), or raise verify_tol"
        )
    return {"max_rel_err": error, "tolerance": tol, "outputs": len(expected)}


def _check_exportable(graph: DiTGraph) -> None:
    names = {seg.name for seg in graph.segments}
    if graph.early_steps:
        # The manifest's plan runs every call the same way: the step switch would be lost.
        rules = ", ".join(f"block {r.block} for {r.steps} steps ({r.reason or r.suffix})" for r in graph.early_steps)
        raise ArtifactError(
            f"the graph runs other segment versions on the first steps of every generation ({rules}); "
            "artifacts have no step state, so the export would silently run the later steps' version on every step. "
            "Optimize with dense_steps=0 in the attention passes (full_steps=0 in layer_prune) to export this model"
        )
    for stage in graph.plan:
        if not getattr(type(stage), "exportable", True):
            raise ArtifactError(
                f"plan stage {type(stage).__name__} (kind {stage.kind!r}) declares that it cannot be exported; "
                "remove the pass that adds it from the profile to export this model"
            )
        missing = [n for n in stage.segment_names() if n not in names]
        if missing:
            raise ArtifactError(f"plan stage {stage.kind!r} names segments the graph does not have: {missing}")


def _make_tmp(place: Path) -> Path:
    """A new sibling directory for the artifact being written, created with the user's umask
    (mkdtemp would make it private, and the rename would keep that)."""
    while True:
        tmp = place.parent / f".{place.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            os.mkdir(tmp)
            return tmp
        except FileExistsError:
            continue


LOCK_SUFFIX = ".ditopt-lock"


@contextlib.contextmanager
def _export_lock(place: Path) -> Iterator[Path]:
    """Hold `.NAME.ditopt-lock` beside the target for the export: a second export to the same
    target gets ArtifactError at once, never a race on the renames. flock is released by the
    kernel when a process dies, so a killed export leaves no lock that blocks the next one."""
    lock = place.parent / f".{place.name}{LOCK_SUFFIX}"
    fd = _acquire(lock, place)
    try:
        yield lock
    finally:
        # Unlinked while still held: an export waiting on this file finds it gone and retries
        # on a fresh one (see _acquire), so two exports never hold two different files.
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


def _busy(lock: Path, place: Path, how: str) -> ArtifactError:
    return ArtifactError(
        f"another export to {place} is running (it holds {lock}); wait for it to finish, or export to another "
        f"directory{how}"
    )


def _acquire(lock: Path, place: Path) -> int:
    try:
        import fcntl
    except ImportError:  # no flock (Windows): an exclusive create, which a killed export leaves behind
        try:
            return os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            raise _busy(lock, place, f". If none is running, a killed one left the lock: delete {lock}") from None
        except OSError as exc:
            raise ArtifactError(f"cannot create the export lock {lock} ({exc})") from None
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o666)
        except OSError as exc:
            raise ArtifactError(f"cannot create the export lock {lock} ({exc})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise _busy(lock, place, "") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"ditopt export pid {os.getpid()}\n".encode())
            return fd
        os.close(fd)  # the holder unlinked it as we locked it: lock the current file


# What an export's temporary (or replaced, `.old`) directory holds at its top level.
_OWN_ENTRIES = {MANIFEST_NAME, PLAN_TENSORS, SEGMENTS_DIR, ENGINES_DIR}


def _clean_stale(place: Path) -> None:
    """Remove `.NAME.tmp-*` and `.NAME.old-*` siblings that killed exports left behind. Runs under
    the export lock, so none belongs to a running export (to this target: the exact name pattern
    keeps another target's out). Where the target is missing, the kill came between moving the
    old artifact aside and the new one in: the newest `.old` directory is put back first."""
    pattern = re.compile(re.escape(f".{place.name}.") + r"(tmp|old)-[a-z0-9_]{8}")
    stale = []
    for entry in place.parent.iterdir():
        if not (pattern.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink()):
            continue
        try:
            top = {p.name for p in entry.iterdir()}
        except OSError:  # unreadable: not ours to judge, so not ours to remove
            continue
        if top <= _OWN_ENTRIES:
            stale.append(entry)
        else:
            warnings.warn(f"{entry} looks like a stale export directory but holds {sorted(top - _OWN_ENTRIES)}, which "
                          "ditopt does not write; left in place", stacklevel=4)
    olds = sorted((e for e in stale if ".old-" in e.name), key=lambda e: e.stat().st_mtime)
    if olds and not (place.exists() or place.is_symlink()):
        with contextlib.suppress(OSError):
            os.replace(olds[-1], place)
            stale.remove(olds[-1])
    for entry in stale:
        shutil.rmtree(entry, ignore_errors=True)


def _check_target(target: Path, force: bool) -> None:
    if not (target.exists() or target.is_symlink()):
        return
    if target.is_symlink():
        raise ArtifactError(
            f"{target} is a symbolic link (to {os.readlink(target)!r}); ditopt does not replace links. Export to the "
            "directory it points to, or remove the link"
        )
    if target.is_dir() and not any(target.iterdir()):
        return  # an empty directory made for the artifact
    if not force:
        raise ArtifactError(f"{target} already exists; pass force=True (CLI: --force) to overwrite it")
    problem = _not_replaceable(target)
    if problem:
        raise ArtifactError(
            f"{target} exists and {problem}; refusing to delete it even with force. Remove it yourself or choose "
            "another directory."
        )


def _not_replaceable(target: Path) -> str | None:
    """Why `target` is not a directory ditopt wrote and may replace; None where it is one."""
    if not target.is_dir():
        return "is not a directory"
    try:
        manifest = parse_manifest_file(target / MANIFEST_NAME)
    except ArtifactError as exc:
        return f"is not a ditopt artifact ({exc})"
    if manifest.get("format") != FORMAT:
        return f'is not a ditopt artifact (its {MANIFEST_NAME} has no "format": "{FORMAT}")'
    try:
        listed = _listed_files(manifest)
    except (TypeError, KeyError, AttributeError, ValueError) as exc:
        return f"has a ditopt manifest from which the files ditopt wrote cannot be read ({exc})"
    files, dirs = walk_entries(target)
    unlisted = [f for f in files if f != MANIFEST_NAME and f not in listed]
    if unlisted:
        shown = ", ".join(unlisted[:10]) + (" ..." if len(unlisted) > 10 else "")
        return f"holds files its ditopt manifest does not list, which may be yours: {shown}"
    parents = {"/".join(f.split("/")[:i]) for f in listed for i in range(1, f.count("/") + 1)}
    foreign_dirs = [d for d in dirs if d not in parents]
    if foreign_dirs:
        return f"holds directories ditopt did not write: {', '.join(foreign_dirs[:10])}"
    return None


def _listed_files(manifest: dict[str, Any]) -> set[str]:
    """The files a ditopt manifest of a known version says ditopt wrote (relative paths)."""
    from .schema import _relative_path

    version = manifest.get("format_version")
    if version == FORMAT_VERSION:
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not an object")
        paths = set(files)
    elif version == 1:  # no file table: the segments' files, their data, the plan tensors
        entries = list(manifest["segments"]) + list((manifest.get("half_program") or {}).get("segments", []))
        paths = set()
        for entry in entries:
            if entry.get("file"):
                # Version 1 listed a half-batch segment's data under the main segments' directory;
                # the exporter wrote it beside the segment's file, as `<file>.data`.
                paths.update([entry["file"], entry["file"] + ".data", *entry.get("external_data", [])])
        if manifest.get("plan_tensors"):
            paths.add(manifest["plan_tensors"])
        paths.update(e["file"] for e in (manifest.get("engines") or {}).values())
    else:
        raise ValueError(f"format version {version!r} is not one this ditopt knows")
    for path in paths:
        if not isinstance(path, str):
            raise TypeError(f"file path {path!r} is not a string")
        _relative_path(path)  # a listed '../x' must never make a file outside count as listed
    return paths


def _move_into_place(tmp: Path, target: Path, force: bool) -> None:
    old = None
    try:
        if not (target.exists() or target.is_symlink()) or (
            target.is_dir() and not target.is_symlink() and not any(target.iterdir())
        ):
            os.replace(tmp, target)  # also replaces an empty directory
            return
        _check_target(target, force)  # it may have changed while we were exporting
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            os.replace(old, target)
            raise
    except OSError as exc:
        # Something other than a ditopt export (which the lock keeps out) wrote the target meanwhile.
        raise ArtifactError(
            f"could not move the new artifact into {target} ({exc}): another process changed {target} during the "
            "export. Nothing was replaced; check what writes there, then export again"
        ) from None
    shutil.rmtree(old, ignore_errors=True)


# -- segments -------------------------------------------------------------------------------------
def _placeholder_values(seg: Segment) -> list[Any]:
    return [n.meta.get("val") for n in seg.module.graph.nodes if n.op == "placeholder"]


def _output_values(seg: Segment) -> list[Any]:
    out = next(n for n in seg.module.graph.nodes if n.op == "output")
    results = out.args[0]
    results = results if isinstance(results, (list, tuple)) else (results,)
    return [r.meta.get("val") if hasattr(r, "meta") else r for r in results]


def _tensor_entries(seg: Segment, names: tuple[str, ...], values: list[Any], what: str) -> list[dict[str, Any]]:
    entries = []
    for name, value in zip(names, values):
        if not isinstance(value, torch.Tensor):
            raise ArtifactError(
                f"segment {seg.name} {what} {name} is a {type(value).__name__}, not a tensor; ONNX segments "
                "exchange tensors only"
            )
        entries.append(tensor_entry(name, value))
    return entries


def segment_file_stem(name: str) -> str:
    """A file name for a segment on every filesystem: variant names hold ':' (block.0:record),
    which Windows refuses."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def _segment_io(seg: Segment) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The manifest entries (name, shape, dtype) of a segment's inputs and outputs."""
    return (_tensor_entries(seg, seg.inputs, _placeholder_values(seg), "input"),
            _tensor_entries(seg, seg.outputs, _output_values(seg), "output"))


def _export_segment(seg: Segment, root: Path, opset: int | None, subdir: str = "") -> dict[str, Any]:
    inputs, outputs = _segment_io(seg)
    if not seg.inputs and not seg.outputs:
        # Nothing to compute (a model that returns its last block's stream has an empty
        # epilogue): no file, and the runner's segment does nothing.
        return {"name": seg.name, "kind": seg.kind, "block": seg.block, "file": None, "empty": True,
                "inputs": inputs, "outputs": outputs}
    # The graph is static, so values do not matter to the trace: zeros of the recorded shapes.
    args = tuple(
        torch.zeros(v.shape, dtype=v.dtype, device=v.device) for v in _placeholder_values(seg)
    )
    rel = f"{SEGMENTS_DIR}/{subdir}{segment_file_stem(seg.name)}.onnx"
    path = root / rel
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = _lower_for_onnx(_lower_custom_ops(seg.module, args))
            program = _onnx_program(module, args, opset)
        _name_io(program.model, seg.inputs, seg.outputs)
        program.save(str(path), external_data=True)
    except ArtifactError:
        raise
    except Exception as exc:
        raise ArtifactError(
            f"ONNX export of segment {seg.name} failed: {type(exc).__name__}: {str(exc)[:800]}"
        ) from exc
    if not path.is_file():
        raise ArtifactError(f"ONNX export of segment {seg.name} wrote no file at {rel}")
    data = sorted(p.name for p in path.parent.iterdir() if p.name.startswith(path.name + "."))
    return {
        "name": seg.name,
        "kind": seg.kind,
        "block": seg.block,
        "file": rel,
        "external_data": [f"{SEGMENTS_DIR}/{subdir}{d}" for d in data],  # beside the file, half/ included
        "sha256": sha256_file(path),
        "opset": _opset_of(path),
        "inputs": inputs,
        "outputs": outputs,
    }


def _lower_custom_ops(module: fx.GraphModule, args: tuple) -> fx.GraphModule:
    """Re-trace a segment holding ops with a registered export lowering (the kernels' custom
    attention ops) through those lowerings: standard torch ops the ONNX exporter translates."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from ditopt.registry import export_lowerings

    translated = onnx_translations()  # exported as themselves (custom_translation_table), not lowered
    lowerings = {op: fn for op, fn in export_lowerings().items() if op not in translated}
    if not any(n.op == "call_function" and n.target in lowerings for n in module.graph.nodes):
        return module
    # Then functionalized: the CPU paths write into slices of preallocated outputs (out=, index
    # assignment), which the exporter's own torch.export refuses while weights require grad. Two
    # traces because decompositions run below a functionalization wrapped around the first.
    with torch.no_grad():
        lowered = make_fx(module, decomposition_table=lowerings)(*args)
        return make_fx(torch.func.functionalize(lowered))(*args)


def _onnx_program(module: fx.GraphModule, args: tuple, opset: int | None) -> Any:
    """torch.onnx's export of a (lowered) segment. Ops with an ONNX translation (the quantized
    linears) go through `custom_translation_table`; a segment holding one is optimized here
    rather than by the exporter, with the same passes, except that nothing computed from a
    low-bit initializer is constant-folded: the exporter's folding would turn a small layer's
    codes back into a float weight (TLQ's table lookup) or int64 indices."""
    translations = onnx_translations()
    table = {op: translate(opset or _default_opset()) for op, (translate, _) in translations.items()}
    quantized = any(n.op == "call_function" and n.target in translations for n in module.graph.nodes)
    program = torch.onnx.export(module, args, dynamo=True, opset_version=opset, verbose=False,
                                custom_translation_table=table, optimize=not quantized)
    if quantized:
        import onnxscript

        keep = _from_low_bit_initializers(program.model)
        onnxscript.optimizer.optimize_ir(program.model, should_fold=lambda node: False if node in keep else None)
        onnxscript.rewriter.onnx_fusions.fuse(program.model)
        _pack_low_bit_initializers(program.model)
    return program


def _from_low_bit_initializers(model: Any) -> set[Any]:
    """The nodes whose inputs derive from an 8- or 4-bit integer initializer (the weights' codes),
    Shape and Size aside."""
    import onnx_ir as ir

    low = {ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT4, ir.DataType.UINT4}
    derived = {id(v) for v in model.graph.initializers.values() if v.dtype in low}
    nodes = set()
    for node in model.graph:
        if node.op_type in ("Shape", "Size") or not any(v is not None and id(v) in derived for v in node.inputs):
            continue
        nodes.add(node)
        derived.update(id(v) for v in node.outputs)
    return nodes


def _default_opset() -> int:
    """The opset torch.onnx exports at when given none."""
    try:
        from torch.onnx import _constants

        return int(_constants.ONNX_DEFAULT_OPSET)
    except (ImportError, AttributeError, ValueError):
        return 20


def _export_opset(graphs: list[DiTGraph], opset: int | None) -> int | None:
    """The opset to export every segment at: `opset` as given, or the exporter's default, raised
    where an op with an ONNX translation needs a newer one (int4 weights: 21). A given opset
    too old for such an op is an ArtifactError naming it."""
    translations = onnx_translations()
    need, where = 0, ""
    for graph in graphs:
        for seg in graph.segments:
            for node in seg.module.graph.nodes:
                entry = translations.get(node.target) if node.op == "call_function" else None
                if entry is None or entry[1] is None:
                    continue
                version = entry[1](*node.args, **node.kwargs)
                if version is not None and version > need:
                    need, where = version, f"{node.target} in segment {seg.name} ({_describe_call(node)})"
    if not need or (opset is None and need <= _default_opset()):
        return opset
    if opset is None:
        return need
    if opset < need:
        raise ArtifactError(
            f"opset = {opset} cannot express {where}: int4 / uint4 DequantizeLinear with blocked scales arrives in "
            f"opset {need}. Export with opset >= {need} (or leave opset unset), or quantize those weights to int8"
        )
    return opset


def _describe_call(node: fx.Node) -> str:
    return ", ".join(repr(a) for a in node.args if isinstance(a, (str, int)) and not isinstance(a, bool))


def _pack_low_bit_initializers(model: Any) -> None:
    """Fold each Cast of an initializer to int4 / uint4 into an int4 / uint4 initializer (two codes
    a byte on disk). The quantized linears' translations emit these Casts, as torch has no 4-bit
    buffers, and the exporter's constant folding stops at 8192 elements."""
    import ml_dtypes
    import onnx_ir as ir

    kinds = {ir.DataType.UINT4: ml_dtypes.uint4, ir.DataType.INT4: ml_dtypes.int4}
    graph = model.graph
    for node in list(graph):
        if node.op_type != "Cast" or node.domain not in ("", "ai.onnx") or "to" not in node.attributes:
            continue
        kind = ir.DataType(node.attributes["to"].as_int())
        src = node.inputs[0]
        if kind not in kinds or src is None or not src.is_initializer() or src.const_value is None:
            continue
        codes = src.const_value.numpy()
        if codes.size and (codes.min() < (0 if kind == ir.DataType.UINT4 else -8) or codes.max() > (15 if kind == ir.DataType.UINT4 else 7)):
            continue  # a real conversion, not codes already in range: leave it to the runtime
        out = node.outputs[0]
        packed = ir.Value(name=f"{src.name}_{kind.name.lower()}", shape=ir.Shape(codes.shape), type=ir.TensorType(kind),
                          const_value=ir.Tensor(codes.astype(kinds[kind]), dtype=kind, name=f"{src.name}_{kind.name.lower()}"))
        graph.register_initializer(packed)
        out.replace_all_uses_with(packed)
        graph.remove(node, safe=True)
        if not src.uses():
            del graph.initializers[src.name]


def _initializer_bytes(root: Path, manifest: dict[str, Any]) -> dict[str, int]:
    """Bytes of the ONNX segments' initializers by element type (int8, uint4, float, ...): what
    the quantized weights take against the float ones."""
    import onnx

    from .runner import _session_files

    sizes = {onnx.TensorProto.UINT4: 0.5, onnx.TensorProto.INT4: 0.5}
    totals: dict[str, float] = {}
    for _, seg in _session_files(manifest):
        model = onnx.load(str(root / seg["file"]), load_external_data=False)
        for t in model.graph.initializer:
            n = 1
            for d in t.dims:
                n *= d
            width = sizes.get(t.data_type) or onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
            name = onnx.TensorProto.DataType.Name(t.data_type).lower()
            totals[name] = totals.get(name, 0) + n * width
    return {k: int(-(-v // 1)) for k, v in sorted(totals.items())}


def _lower_for_onnx(module: fx.GraphModule) -> fx.GraphModule:
    """Rewrite what torch's ONNX exporter lowers wrongly; the segment itself is left alone.

    `squeeze(dim)` on a dimension that is not 1 is a no-op in PyTorch, but the exporter emits an
    ONNX Squeeze on it, which onnxruntime rejects (PixArt's epilogue squeezes the token axis).
    Such squeezes are dropped, or narrowed to the size-1 dimensions among those named.
    """
    squeezes = [
        n for n in module.graph.nodes
        if n.op == "call_function" and n.target in (aten.squeeze.dim, aten.squeeze.dims)
    ]
    plans = []
    for node in squeezes:
        val = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
        if not isinstance(val, torch.Tensor):
            continue
        dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
        keep = [d for d in dims if val.shape[d] == 1]
        if len(keep) != len(dims):
            plans.append((node.name, keep))
    if not plans:
        return module
    graph = fx.Graph()
    out = graph.graph_copy(module.graph, {})
    graph.output(out)
    nodes = {n.name: n for n in graph.nodes}
    for name, keep in plans:
        node = nodes[name]
        if keep:
            node.target, node.args = aten.squeeze.dims, (node.args[0], keep)
        else:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    return fx.GraphModule(module, graph)


def _name_io(model: Any, inputs: tuple[str, ...], outputs: tuple[str, ...]) -> None:
    """Name the ONNX graph's inputs and outputs after the segment's environment names.

    The exporter names inner values after the nodes of its own re-trace, whose numbering can
    collide with the environment names (Flux: an inner "add_10" beside the output "add_10"),
    so colliding inner values are renamed first.
    """
    import onnx_ir as ir

    graph = model.graph
    if len(graph.inputs) != len(inputs) or len(graph.outputs) != len(outputs):
        raise ArtifactError(
            f"the exported ONNX graph has {len(graph.inputs)} inputs / {len(graph.outputs)} outputs, the segment "
            f"{len(inputs)} / {len(outputs)}"
        )
    io = {id(v) for v in (*graph.inputs, *graph.outputs)}
    wanted = set(inputs) | set(outputs)
    taken = {v.name for node in ir.traversal.RecursiveGraphIterator(graph) for v in node.outputs}
    taken |= {v.name for v in graph.inputs} | set(graph.initializers) | wanted
    inner = [*graph.initializers.values(), *(v for node in ir.traversal.RecursiveGraphIterator(graph) for v in node.outputs)]
    for value in inner:
        if id(value) not in io and value.name in wanted:
            n = 0
            while f"{value.name}__{n}" in taken:
                n += 1
            value.name = f"{value.name}__{n}"
            taken.add(value.name)
    for value, name in zip(graph.inputs, inputs):
        value.name = name
    for value, name in zip(graph.outputs, outputs):
        value.name = name


def _opset_of(path: Path) -> int | None:
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # a stub or foreign file: the opset is informational only
        return None
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


# -- manifest -------------------------------------------------------------------------------------
def _signature(graph: DiTGraph, example_inputs: dict[str, Any] | None) -> dict[str, Any]:
    sig = graph.signature
    leaves: list[Any] = []
    if example_inputs is not None:
        leaves, _ = pytree.tree_flatten(((), dict(example_inputs)))
    inputs = []
    for i, (name, key) in enumerate(zip(sig.input_names, sig.key[1])):
        if key[0] == "tensor":
            inputs.append({"name": name, "kind": "tensor", "shape": list(key[1]), "dtype": key[2].removeprefix("torch.")})
            continue
        # The key holds the constant's repr; the example's value keeps its exact type when it is that constant.
        leaf_matches = i < len(leaves) and not isinstance(leaves[i], torch.Tensor) and repr(leaves[i]) == key[1]
        value = encode_constant(leaves[i]) if leaf_matches else encode_key_constant(key[1])
        inputs.append({"name": name, "kind": "constant", **value})
    outputs = [
        {"kind": "constant", **encode_constant(o.value)} if isinstance(o, Constant) else {"kind": "env", "name": o}
        for o in sig.outputs
    ]
    return {
        "inputs": inputs,
        "in_spec": dump_spec(sig.in_spec),
        "outputs": outputs,
        "out_spec": dump_spec(sig.out_spec),
        "timestep_input": graph.timestep_input,
        "latent_input": graph.latent_input,
    }


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return versions


def _plan(graph: DiTGraph) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """The plan for the manifest: each stage's description, plus its full parameters ("spec")
    where the stage can be rebuilt from data; their tensors, named per stage, for PLAN_TENSORS."""
    plan: list[dict[str, Any]] = []
    tensors: dict[str, torch.Tensor] = {}
    for i, stage in enumerate(graph.plan):
        entry = stage.describe()
        spec = stage.spec()
        if spec is not None:
            params, named = spec
            prefix = f"stage{i}."
            # Tensor names in the spec are prefixed so two stages with the same key cannot collide.
            entry["spec"] = json.loads(json.dumps(params))  # plain JSON (tuples to lists); fails loudly if not
            entry["spec_tensor_prefix"] = prefix
            tensors.update({prefix + k: v.detach().cpu() for k, v in named.items()})
        plan.append(entry)
    return plan, tensors


HALF_DIR = "half/"  # under SEGMENTS_DIR: the half-batch program's segments


def _half_program(obj: Any, graph: DiTGraph, example_inputs: dict[str, Any] | None) -> tuple[DiTGraph | None, str | None]:
    """The program for the second half of the call's rows, which the plan's conditional-only
    steps run (`OptimizedDiT.second_half_program`); or (None, why there is none); (None, None)
    where the plan has no such steps."""
    if not any(stage.uses_second_half() for stage in graph.plan):
        return None, None
    if not isinstance(obj, OptimizedDiT) or example_inputs is None:
        return None, "export the OptimizedDiT with example_inputs to include the half-batch segments"
    call = normalize_call(obj.original, (), dict(example_inputs))
    leaves, _ = pytree.tree_flatten(((), call))
    latent = graph.bind(leaves).get(graph.latent_input) if graph.latent_input else None
    if not isinstance(latent, torch.Tensor):
        return None, "the model has no latent input to halve"
    half = obj.second_half_program(call, latent)
    return (half, None) if isinstance(half, DiTGraph) else (None, half)


def _half_entry(graph: DiTGraph, half: DiTGraph, root: Path, opset: int | None) -> dict[str, Any]:
    """The half-batch program for the manifest: every main segment's value names and shapes (the
    runner checks what a span reads against them), with ONNX files for the segments the
    conditional-only stages run on it."""
    run = {n for stage in graph.plan if stage.uses_second_half() for n in stage.segment_names()}
    (root / SEGMENTS_DIR / HALF_DIR).mkdir()
    segments = []
    for seg in half.main_segments:
        if seg.name in run:
            segments.append(_export_segment(seg, root, opset, HALF_DIR))
        else:
            inputs, outputs = _segment_io(seg)
            segments.append({"name": seg.name, "kind": seg.kind, "block": seg.block, "file": None,
                             "inputs": inputs, "outputs": outputs})
    outputs = [o if isinstance(o, str) else None for o in half.signature.outputs]
    return {"segments": segments, "outputs": outputs, "latent_input": half.latent_input}


def _plan_notes(graph: DiTGraph, half: DiTGraph | None, no_half: str | None) -> list[str]:
    if half is not None:
        return [f"conditional-only steps (CFG reuse) run the half-batch segments in {SEGMENTS_DIR}/{HALF_DIR}"]
    if no_half is not None:
        return [f"conditional-only steps (CFG reuse) compute both halves of the batch in the artifact runner ({no_half}): "
                "those steps cost a full step there, and give a full step's values"]
    return []


def _manifest(graph: DiTGraph, report: Any, segments: list[dict[str, Any]], example_inputs: dict[str, Any] | None,
              plan: list[dict[str, Any]], plan_tensors: str | None) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "ditopt_version": ditopt.__version__,
        "versions": _versions(),
        "model_class": graph.model_class,
        "structure_hash": graph.structure_hash(),
        "signature": _signature(graph, example_inputs),
        "segments": segments,
        "plan": plan,
        "plan_tensors": plan_tensors,
        "notes": list(graph.notes),
        "structure": graph.summary(),
        "report": report.to_dict() if hasattr(report, "to_dict") else None,
        # Filled by a TensorRT build: {segment name: {"file": "engines/<segment>.plan",
        # "precision": ..., "gpu": ..., "compute_capability": ..., "tensorrt": ...,
        # "onnx_sha256": the segment's sha256 it was built from}}.
        "engines_dir": ENGINES_DIR,
        "engines": {},
    }
