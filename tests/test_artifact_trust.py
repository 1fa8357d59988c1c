"""Artifacts are checked before they run, and --force never deletes what ditopt did not write.

One small artifact is built per module (a one-block DiT with a calibrated CFG schedule, so it
holds every kind of file: ONNX segments, their external data, plan.safetensors and half-batch
segments) under umask 027; each case damages a copy of it. Every case must end in ArtifactError
naming the file at fault: never a raw KeyError, protobuf, onnxruntime or safetensors error.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from conftest import make_inputs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ditopt
from ditopt.errors import ArtifactError
from ditopt.export import export_artifact, load_artifact, read_manifest
from ditopt.export import artifact as artifact_mod
from ditopt.export.integrity import ArtifactWarning, sha256_file
from ditopt.export.manifest import FORMAT_VERSION, write_manifest
from ditopt.verify import relative_error

TIMES = [900, 700, 500, 350, 200, 100]
UMASK = 0o027

# One file of each kind in the artifact, by role.
KINDS = {
    "onnx": "segments/block.0.onnx",
    "external data": "segments/block.0.onnx.data",
    "half onnx": "segments/half/block.0.onnx",
    "half external data": "segments/half/block.0.onnx.data",
    "plan tensors": "plan.safetensors",
}


def _one_block_dit() -> torch.nn.Module:
    import diffusers

    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=1,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=1,
    ).eval()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(artifact path, optimized model, a call): exported once, under umask 027."""
    model = _one_block_dit()
    kwargs = {**make_inputs("dit", model, batch=2), "return_dict": False}
    kwargs["hidden_states"] = torch.cat([kwargs["hidden_states"][:1]] * 2)  # batched CFG: equal halves
    kwargs["class_labels"] = torch.tensor([0, 1])

    def sampler(m):
        x = kwargs["hidden_states"][:1].clone()
        for t in TIMES:
            with torch.no_grad():
                out = m(**{**kwargs, "hidden_states": torch.cat([x, x]), "timestep": torch.full((2,), t)})[0]
            x = x - 0.05 * (out[:1] + 1.5 * (out[1:] - out[:1]))[:, :4]
        return x

    cfg = {"name": "calibrated_schedule", "compute_steps": (0, 1, 2, 3, 5), "cond_only_steps": (3, 5),
           "forecast": "taylor", "order": 1}
    optimized = ditopt.optimize(model, {"name": "cfg", "budget": {"max_rel_err": 1.0}, "passes": [cfg]},
                                example_inputs=kwargs, calibration=sampler)
    previous = os.umask(UMASK)
    try:
        path = export_artifact(optimized, tmp_path_factory.mktemp("trust") / "artifact", example_inputs=kwargs)
    finally:
        os.umask(previous)
    return path, optimized, kwargs


@pytest.fixture
def copy(built, tmp_path):
    """A fresh copy of the artifact to damage."""
    return Path(shutil.copytree(built[0], tmp_path / "artifact", symlinks=True))


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def _refused(path: Path, *names: str) -> str:
    """load_artifact's ArtifactError, which must name each of `names`."""
    with pytest.raises(ArtifactError) as err:
        load_artifact(path)
    message = str(err.value)
    for name in names:
        assert name in message, message
    return message


def _redigest(path: Path, rel: str) -> None:
    """Record `rel`'s new content in the manifest, as a writer that changed it on purpose would."""
    manifest = _manifest(path)
    manifest["files"][rel] = {"sha256": sha256_file(path / rel), "size": (path / rel).stat().st_size}
    for seg in manifest["segments"] + manifest["half_program"]["segments"]:
        if seg["file"] == rel:
            seg["sha256"] = manifest["files"][rel]["sha256"]
    write_manifest(path, manifest)


# -- the artifact as written ------------------------------------------------------------------------
def test_the_artifact_lists_every_file_and_loads_and_runs(built, copy):
    path, optimized, kwargs = built
    manifest = read_manifest(copy)
    assert manifest["format_version"] == FORMAT_VERSION
    on_disk = sorted(p.relative_to(copy).as_posix() for p in copy.rglob("*") if p.is_file())
    assert sorted(manifest["files"]) == [p for p in on_disk if p != "manifest.json"]
    assert set(KINDS.values()) <= set(manifest["files"])
    # Half-batch segments list their own data files (they named the main segments' before).
    half = [s for s in manifest["half_program"]["segments"] if s["file"]]
    assert half and all(d.startswith("segments/half/") for s in half for d in s["external_data"])

    runner = load_artifact(copy)
    optimized.reset()
    call = {**kwargs, "timestep": torch.full((2,), TIMES[0])}
    with torch.no_grad():
        expected = optimized(**call)[0]
    assert relative_error(runner(**call)[0], expected) < 1e-4


def test_files_and_directories_follow_the_umask(built):
    path = built[0]
    entries = [path, *path.rglob("*")]
    modes = {p.relative_to(path).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in entries}
    assert {m for p, m in modes.items() if (path / p).is_dir()} == {0o777 & ~UMASK}, modes
    assert {m for p, m in modes.items() if (path / p).is_file()} == {0o666 & ~UMASK}, modes


# -- damaged files -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("size", ["half", "empty"])
def test_a_truncated_file_is_named(copy, kind, size):
    rel = KINDS[kind]
    data = (copy / rel).read_bytes()
    (copy / rel).write_bytes(data[: len(data) // 2] if size == "half" else b"")
    assert "truncated or replaced" in _refused(copy, rel)


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_flipped_byte_is_named(copy, kind):
    rel = KINDS[kind]
    data = bytearray((copy / rel).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / rel).write_bytes(bytes(data))
    assert "does not match its sha256" in _refused(copy, rel)


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_missing_file_is_named(copy, kind):
    (copy / KINDS[kind]).unlink()
    assert "incomplete" in _refused(copy, KINDS[kind])


@pytest.mark.parametrize("damage", ["half", "empty", "flip", "delete"])
def test_a_damaged_manifest_is_named(copy, damage):
    file = copy / "manifest.json"
    data = bytearray(file.read_bytes())
    if damage == "delete":
        file.unlink()
    elif damage == "flip":
        data[len(data) // 2] ^= 0xFF  # 0xFF never appears in UTF-8 text
        file.write_bytes(bytes(data))
    else:
        file.write_bytes(bytes(data[: len(data) // 2]) if damage == "half" else b"")
    _refused(copy, "manifest.json")


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.floats(0, 1, exclude_max=True), mask=st.integers(1, 255))
def test_any_byte_flip_in_the_manifest_is_caught_or_harmless(copy, where, mask):
    file = copy / "manifest.json"
    original = file.read_bytes()
    data = bytearray(original)
    at = int(where * len(data))
    data[at] ^= mask
    file.write_bytes(bytes(data))
    try:
        try:  # compared as canonical text: NaN != NaN would call an unchanged report changed
            same = _canonical(json.loads(bytes(data).decode("utf-8"))) == _canonical(json.loads(original))
        except (UnicodeDecodeError, ValueError, RecursionError):
            same = False
        if same:  # e.g. a space turned into a tab: the content is unchanged, and it still loads
            load_artifact(copy)
        else:
            _refused(copy, "manifest.json")
    finally:
        file.write_bytes(original)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(list(KINDS)), where=st.floats(0, 1, exclude_max=True), mask=st.integers(1, 255))
def test_any_byte_flip_in_a_data_file_is_named(copy, kind, where, mask):
    file = copy / KINDS[kind]
    original = file.read_bytes()
    data = bytearray(original)
    data[int(where * len(data))] ^= mask
    file.write_bytes(bytes(data))
    try:
        _refused(copy, KINDS[kind], "sha256")
    finally:
        file.write_bytes(original)


def test_a_file_whose_new_digest_was_recorded_is_still_refused_by_its_reader(built, copy):
    """Past the digests (a writer recorded a broken file's), the readers fail: safetensors,
    onnx, onnxruntime; their errors become ArtifactError naming the file too."""
    for rel in ("plan.safetensors", "segments/block.0.onnx"):
        (copy / rel).write_bytes(b"not what it should be")
        _redigest(copy, rel)
        _refused(copy, rel)
        shutil.copy2(built[0] / rel, copy / rel)
        _redigest(copy, rel)
    load_artifact(copy)


# -- paths that leave the artifact ---------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["../x.onnx", "segments/../../x.onnx", "/etc/passwd", "C:/x.onnx", "segments\\x.onnx", ""])
@pytest.mark.parametrize("field", ["file", "external_data", "plan_tensors"])
def test_a_path_that_leaves_the_artifact_is_refused(copy, bad, field):
    manifest = _manifest(copy)
    seg = manifest["segments"][1]
    if field == "file":
        old, seg["file"] = seg["file"], bad
    elif field == "external_data":
        old, seg["external_data"] = seg["external_data"][0], [bad]
    else:
        old, manifest["plan_tensors"] = manifest["plan_tensors"], bad
    manifest["files"][bad] = manifest["files"].pop(old)  # listed with a digest, as a crafted manifest would
    write_manifest(copy, manifest)
    _refused(copy, "manifest.json", repr(bad))


def test_a_file_linked_from_outside_is_refused(copy, tmp_path):
    rel = KINDS["external data"]
    outside = tmp_path / "outside.data"
    shutil.move(copy / rel, outside)
    (copy / rel).symlink_to(outside)  # the same bytes, so the same digest: only the link gives it away
    _refused(copy, rel, "symbolic link")


def test_a_linked_directory_is_refused(copy, tmp_path):
    shutil.move(copy / "segments" / "half", tmp_path / "half")
    (copy / "segments" / "half").symlink_to(tmp_path / "half", target_is_directory=True)
    _refused(copy, "segments/half", "symbolic link")


def test_a_linked_manifest_is_refused(copy, tmp_path):
    shutil.move(copy / "manifest.json", tmp_path / "manifest.json")
    (copy / "manifest.json").symlink_to(tmp_path / "manifest.json")
    _refused(copy, "manifest.json", "symbolic link")


def test_onnx_external_data_outside_its_listed_files_is_refused(copy, tmp_path):
    """The ONNX file names its data files itself; a location other than the segment's listed
    (digest-checked) ones is refused before onnxruntime reads it."""
    import onnx

    rel = KINDS["onnx"]
    shutil.copy(copy / KINDS["external data"], tmp_path / "stolen.data")
    model = onnx.load(str(copy / rel), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../../stolen.data"
    (copy / rel).write_bytes(model.SerializeToString())
    _redigest(copy, rel)
    _refused(copy, rel, "'../../stolen.data'")


def test_a_file_the_manifest_does_not_list_is_named_in_a_warning_and_never_loaded(copy):
    """The documented choice: an unlisted file is never read (ONNX data locations must be listed
    files), so it warns rather than refuses."""
    (copy / "segments" / "block.0_new.onnx").write_bytes(b"dropped in by hand")
    with pytest.warns(ArtifactWarning, match="segments/block.0_new.onnx"):
        runner = load_artifact(copy)
    assert not any("new" in name for name in runner.sessions)


# -- the manifest's fields -------------------------------------------------------------------------------
TOP_LEVEL = ["format", "format_version", "ditopt_version", "versions", "model_class", "structure_hash", "signature",
             "segments", "plan", "plan_tensors", "notes", "structure", "report", "engines_dir", "engines",
             "half_program", "files", "size_bytes", "initializer_bytes", "manifest_sha256"]
# half_program: without it the runner computes conditional-only steps in full; the sizes are
# informational (artifacts written before they were recorded lack them).
OPTIONAL = {"half_program", "size_bytes", "initializer_bytes"}


def test_the_field_cases_cover_every_top_level_key(copy):
    assert sorted(_manifest(copy)) == sorted(TOP_LEVEL)


def _wrong_type(value):
    if value is None or isinstance(value, bool):
        return 1.5
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return 7
    if isinstance(value, list):
        return {"0": value}
    return [value]


FIELD_CASES = [(k, e, s) for k in TOP_LEVEL for e in ("remove", "wrong type") for s in (False, True)
               if not (s and k == "manifest_sha256")]  # resealing would put the digest back


@pytest.mark.parametrize("key,edit,sealed", FIELD_CASES)
def test_a_removed_or_mistyped_field_is_named(copy, key, edit, sealed):
    """Unsealed: an edit after export. Sealed: a manifest a broken writer produced, which only
    the schema catches; its error names the field."""
    manifest = _manifest(copy)
    if edit == "remove":
        del manifest[key]
    else:
        manifest[key] = _wrong_type(manifest[key])
    if sealed:
        write_manifest(copy, manifest)
    else:
        (copy / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if sealed and edit == "remove" and key in OPTIONAL:
        load_artifact(copy)
        return
    message = _refused(copy, "manifest.json")
    if sealed:
        assert key in message


def _static_policy(m):
    return next(e for e in m["plan"] if e["kind"] == "cached-span")["spec"]["policy"]


def _constant_input(m):
    return next(i for i in m["signature"]["inputs"] if i["kind"] == "constant")


def _set(getter, key, value):
    def edit(m):
        getter(m)[key] = value
    return edit


def _delete(getter, key):
    def edit(m):
        del getter(m)[key]
    return edit


NESTED = {
    "shape as text": (_set(lambda m: m["segments"][0]["inputs"][0], "shape", "1,4,8,8"), "segments.0.inputs.0.shape"),
    "negative dim": (_set(lambda m: m["segments"][0]["inputs"][0], "shape", [-1, 4, 8, 8]), "segments.0.inputs.0.shape.0"),
    "bool as dim": (_set(lambda m: m["segments"][0]["inputs"][0], "shape", [True, 4, 8, 8]), "segments.0.inputs.0.shape.0"),
    "unknown dtype": (_set(lambda m: m["segments"][0]["outputs"][0], "dtype", "float99"), "float99"),
    "segment without name": (_delete(lambda m: m["segments"][0], "name"), "segments.0.name"),
    "repeated segment name": (lambda m: m["segments"][1].update(name=m["segments"][0]["name"]), "segment names repeat"),
    "unknown segment kind": (_set(lambda m: m["segments"][0], "kind", "middle"), "segments.0.kind"),
    "plan names a missing segment": (_set(lambda m: m["plan"][0], "segments", ["block.7"]), "block.7"),
    "stage spec without kind": (_delete(lambda m: m["plan"][1]["spec"], "kind"), "plan.1.spec.kind"),
    "spec missing a key its loader reads": (_delete(lambda m: m["plan"][1]["spec"], "blocks"), "no key 'blocks'"),
    "unknown input kind": (_set(lambda m: m["signature"]["inputs"][0], "kind", "tensorish"), "signature.inputs.0"),
    "constant without value": (_delete(_constant_input, "value"), "exactly one of 'value' and 'repr'"),
    "latent input not an input": (_set(lambda m: m["signature"], "latent_input", "latents"), "'latents'"),
    "malformed in_spec": (_set(lambda m: m["signature"], "in_spec", "[1, {"), "signature.in_spec"),
    "in_spec of another call": (lambda m: m["signature"].update(in_spec=m["signature"]["out_spec"]), "signature.in_spec"),
    "file without digest": (_delete(lambda m: m["files"], KINDS["onnx"]), "no sha256"),
    "segment digest not the file's": (_set(lambda m: m["segments"][1], "sha256", "0" * 64), "sha256 differs"),
    "digest not hex": (_set(lambda m: m["files"][KINDS["onnx"]], "sha256", "xyz"), "files"),
    "size as text": (_set(lambda m: m["files"][KINDS["onnx"]], "size", "12"), "files"),
    "exported half segment without digest": (lambda m: next(s for s in m["half_program"]["segments"] if s["file"]).update(sha256=None),
                                             "has a file but no sha256"),
    "schedule longer than its timesteps": (lambda m: [_static_policy(m)[k].append(False) for k in ("compute", "cond_only")],
                                           "plan.safetensors"),
    "cond_only of another length": (_set(_static_policy, "cond_only", [True]), "cond_only has 1 entries"),
    "schedule reads a missing tensor": (_set(_static_policy, "timesteps", "nope"), "'nope'"),
    "schedule of the wrong type": (_set(_static_policy, "compute", "yes"), "compute"),
    "verification of the wrong type": (lambda m: m.update(verification={"max_rel_err": "small"}), "verification"),
    "engine outside the artifact": (_set(lambda m: m, "engines", {"block.0": {"file": "../e.plan", "onnx_sha256": "0" * 64}}), "'../e.plan'"),
}


@pytest.mark.parametrize("case", list(NESTED))
def test_an_inconsistent_sealed_manifest_is_named(copy, case):
    edit, expected = NESTED[case]
    manifest = _manifest(copy)
    edit(manifest)
    write_manifest(copy, manifest)
    _refused(copy, "manifest.json", expected)


FOREIGN = {
    "web extension": b'{"manifest_version": 3, "name": "x", "version": "1.0"}',
    "ditopt format without version": b'{"format": "ditopt-artifact"}',
    "JSON list": b"[1, 2, 3]",
    "empty": b"",
    "not UTF-8": b'\xff\xfe{"format": 1}',
    "deeply nested": b"[" * 100_000,
}


@pytest.mark.parametrize("case", list(FOREIGN))
def test_a_foreign_manifest_is_named(copy, case):
    (copy / "manifest.json").write_bytes(FOREIGN[case])
    message = _refused(copy, "manifest.json")
    if case == "web extension":
        assert "not a ditopt artifact manifest" in message and "manifest_version" in message


@pytest.mark.parametrize("version,words", [(1, "older ditopt"), (FORMAT_VERSION + 1, "newer than this ditopt"),
                                           ("2", "not a known"), (True, "not a known")])
def test_another_format_version_is_refused_with_the_fix(copy, version, words):
    manifest = _manifest(copy)
    manifest["format_version"] = version
    old = words == "older ditopt"
    if old:  # as version 1 wrote it: no file table, no seal
        del manifest["files"], manifest["manifest_sha256"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    message = _refused(copy, "manifest.json", words)
    if old:
        assert "Re-export the model with this ditopt" in message


# -- --force, stale directories, concurrent exports --------------------------------------------------------
def _tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() if p.is_file() else b"<dir>" for p in path.rglob("*")}


FORCE_REFUSALS = {
    "web extension": "not a ditopt artifact",
    "newer ditopt": "format version 3 is not one this ditopt knows",
    "damaged file table": "cannot be read",
    "listed path outside": "cannot be read",
    "user's file": "which may be yours: segments/notes.txt",
    "user's directory": "did not write: checkpoints",
    "plain file": "is not a directory",
}


@pytest.mark.parametrize("case", list(FORCE_REFUSALS))
def test_force_leaves_what_ditopt_did_not_write_untouched(built, tmp_path, case):
    path, optimized, kwargs = built
    target = tmp_path / "target"
    if case == "web extension":
        (target / "icons").mkdir(parents=True)
        (target / "manifest.json").write_text('{"manifest_version": 3, "name": "x"}')
        (target / "background.js").write_text("chrome.runtime.onInstalled.addListener(() => {});")
        (target / "icons" / "icon.png").write_bytes(b"\x89PNG")
    elif case == "plain file":
        target.write_text("not a directory")
    else:
        shutil.copytree(path, target)
        manifest = _manifest(target)
        if case == "newer ditopt":
            manifest["format_version"] = 3
        elif case == "damaged file table":
            manifest["files"] = "x"
        elif case == "listed path outside":
            manifest["files"]["../elsewhere.txt"] = {"sha256": "0" * 64, "size": 0}
        elif case == "user's file":
            (target / "segments" / "notes.txt").write_text("mine")
        elif case == "user's directory":
            (target / "checkpoints").mkdir()
        (target / "manifest.json").write_text(json.dumps(manifest))
    before = _tree(target) if target.is_dir() else target.read_bytes()
    with pytest.raises(ArtifactError, match=FORCE_REFUSALS[case]) as err:
        export_artifact(optimized, target, example_inputs=kwargs, force=True)
    assert "refusing to delete it even with force" in str(err.value)
    assert (_tree(target) if target.is_dir() else target.read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]  # no lock or temp directory left


def test_force_replaces_an_artifact_and_clears_what_killed_exports_left(built, tmp_path):
    path, optimized, _ = built
    target = tmp_path / "artifact"
    shutil.copytree(path, target)
    # A damaged artifact as format version 1 wrote it (no file table; half-batch segments listing
    # the main segments' data files): still ditopt's, so replaced.
    manifest = _manifest(target)
    del manifest["files"], manifest["manifest_sha256"]
    manifest["format_version"] = 1
    for seg in manifest["half_program"]["segments"]:
        seg["external_data"] = [d.replace("segments/half/", "segments/") for d in seg.get("external_data", [])]
    (target / "manifest.json").write_text(json.dumps(manifest))
    (target / "segments" / "block.0.onnx").write_bytes(b"damaged")
    stale_tmp = tmp_path / ".artifact.tmp-1a2b3c4d"
    (stale_tmp / "segments").mkdir(parents=True)
    (stale_tmp / "segments" / "prologue.onnx").write_bytes(b"half-written")
    stale_old = Path(shutil.copytree(path, tmp_path / ".artifact.old-deadbeef"))
    not_ours = tmp_path / ".artifact.tmp-99999999"
    not_ours.mkdir()
    (not_ours / "thesis.tex").write_text("mine")
    other_target = tmp_path / ".artifact.tmp-x.tmp-12345678"  # a temp dir of target "artifact.tmp-x"
    other_target.mkdir()
    with pytest.warns(UserWarning, match="thesis.tex"):
        export_artifact(optimized.programs[0], target, force=True)  # a DiTGraph: three segments, quick
    assert not stale_tmp.exists() and not stale_old.exists()
    assert (not_ours / "thesis.tex").is_file() and other_target.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["artifact", not_ours.name, other_target.name])
    assert "half_program" not in read_manifest(target)  # the new artifact, complete
    load_artifact(target)


def test_an_artifact_moved_aside_by_a_killed_export_is_put_back(built, tmp_path):
    """Killed between its two renames, an export leaves the old artifact as `.NAME.old-*` and no
    target: the next export puts it back before deciding anything."""
    path, optimized, _ = built
    shutil.copytree(path, tmp_path / ".artifact.old-0badf00d")
    with pytest.raises(ArtifactError, match="already exists; pass force"):
        export_artifact(optimized, tmp_path / "artifact")
    load_artifact(tmp_path / "artifact")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]


def test_a_concurrent_export_to_the_same_target_is_refused(built, tmp_path):
    """Another process exporting to the same target holds its lock; this export stops at once
    with ArtifactError, and leaves the other's files alone."""
    import subprocess
    import sys

    path, optimized, _ = built
    target = tmp_path / "artifact"
    shutil.copytree(path, target)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()", str(tmp_path / ".artifact.ditopt-lock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = _tree(target)
        with pytest.raises(ArtifactError, match="another export to .*artifact is running"):
            export_artifact(optimized, target, force=True)
        assert _tree(target) == before
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    # Its holder gone, the lock is free again: a killed export never blocks the next one.
    with artifact_mod._export_lock(target.absolute()):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]


def test_a_target_changed_during_the_rename_is_an_artifact_error(tmp_path, monkeypatch):
    """A process outside the lock (not a ditopt export) writing the target between the check
    and the rename: ArtifactError, not the raw OSError."""
    tmp = tmp_path / ".artifact.tmp-00000000"
    tmp.mkdir()

    def replace(src, dst):
        raise OSError(errno.ENOTEMPTY, "Directory not empty", str(dst))

    monkeypatch.setattr(artifact_mod.os, "replace", replace)
    with pytest.raises(ArtifactError, match="another process changed .*Nothing was replaced"):
        artifact_mod._move_into_place(tmp, tmp_path / "artifact", force=False)
