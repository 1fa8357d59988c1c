"""Export: ONNX per segment + manifest, atomic writes, and onnxruntime parity with PyTorch."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
import torch.utils._pytree as pytree
from conftest import build_model, make_inputs

import ditopt
from ditopt.errors import ArtifactError, InputMismatchError
from ditopt.export import export_artifact, load_artifact, read_manifest
from ditopt.export.artifact import _lower_for_onnx
from ditopt.export.manifest import write_manifest
from ditopt.plan import RunSegments
from ditopt.verify import relative_error, tensor_leaves

PARITY = 1e-4


@pytest.fixture(scope="module")
def dit_artifact(tmp_path_factory):
    """Tiny DiT through ditopt.optimize (so the manifest carries a report), tuple output."""
    model = build_model("dit")
    kwargs = {**make_inputs("dit", model), "return_dict": False}
    optimized = ditopt.optimize(model, "identity", example_inputs=kwargs)
    path = export_artifact(optimized, tmp_path_factory.mktemp("dit") / "artifact")
    return model, optimized, path


def _parity(model, runner, kwargs) -> float:
    with torch.no_grad():
        ref = model(**kwargs)
    out = runner(**kwargs)
    assert type(out) is type(ref)
    errors = [relative_error(o, r) for o, r in zip(tensor_leaves(out), tensor_leaves(ref), strict=True)]
    return max(errors)


def test_dit_onnxruntime_parity(dit_artifact):
    model, _, path = dit_artifact
    runner = load_artifact(path)
    # Values the export never saw (the trace used zeros; capture used seed 0).
    kwargs = {**make_inputs("dit", model, seed=1), "return_dict": False}
    kwargs["timestep"] = torch.tensor([137])
    kwargs["class_labels"] = torch.tensor([3])
    assert _parity(model, runner, kwargs) < PARITY


@pytest.mark.parametrize("arch", ["flux", "sd3", "pixart", "wan", "plain"])
def test_onnxruntime_parity(arch, tmp_path):
    """Exported from a DiTGraph with the model's default return type (diffusers: an output
    dataclass, rebuilt by the runner from the stored out spec)."""
    model = build_model(arch)
    graph = ditopt.capture(model, make_inputs(arch, model))
    runner = load_artifact(export_artifact(graph, tmp_path / "artifact"))
    assert _parity(model, runner, make_inputs(arch, model, seed=1)) < PARITY
    if arch == "plain":
        return  # not a diffusers model: no return_dict
    # Exported without return_dict: a sampler's return_dict=False gets the model's tuple.
    kwargs = make_inputs(arch, model, seed=2)
    with torch.no_grad():
        ref = model(**kwargs, return_dict=False)
    out = runner(**kwargs, return_dict=False)
    assert type(out) is tuple and len(out) == len(ref) and relative_error(out[0], ref[0]) < PARITY
    assert type(runner(**kwargs, return_dict=True)) is type(model(**kwargs))
    with pytest.raises(InputMismatchError, match="return_dict must be True or False"):
        runner(**kwargs, return_dict="no")


def test_manifest_describes_segments_signature_and_plan(dit_artifact):
    _, optimized, path = dit_artifact
    graph = optimized.programs[0]
    manifest = read_manifest(path)
    assert json.loads((path / "manifest.json").read_text()) == manifest

    assert manifest["model_class"] == "DiTTransformer2DModel"
    assert manifest["ditopt_version"] == ditopt.__version__
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["structure_hash"] == graph.structure_hash()
    assert [s["name"] for s in manifest["segments"]] == ["prologue", "block.0", "block.1", "epilogue"]
    for entry, seg in zip(manifest["segments"], graph.segments):
        assert entry["file"] == f"segments/{seg.name}.onnx" and (path / entry["file"]).is_file()
        assert all((path / f).is_file() for f in entry["external_data"])
        assert [i["name"] for i in entry["inputs"]] == list(seg.inputs)
        assert [o["name"] for o in entry["outputs"]] == list(seg.outputs)
    assert manifest["segments"][0]["inputs"] == [{"name": "hidden_states", "shape": [1, 4, 8, 8], "dtype": "float32"}]
    assert manifest["segments"][1]["outputs"][0]["shape"] == [1, 16, 32]  # 4x4 patches, 2 heads x 16

    sig = manifest["signature"]
    by_name = {i["name"]: i for i in sig["inputs"]}
    assert by_name["hidden_states"] == {"name": "hidden_states", "kind": "tensor", "shape": [1, 4, 8, 8], "dtype": "float32"}
    assert by_name["timestep"]["dtype"] == "int64"
    assert by_name["return_dict"] == {"name": "return_dict", "kind": "constant", "type": "bool", "value": False}
    assert pytree.treespec_loads(sig["in_spec"]) == graph.signature.in_spec
    assert pytree.treespec_loads(sig["out_spec"]) == graph.signature.out_spec
    assert sig["outputs"] == [{"kind": "env", "name": graph.signature.outputs[0]}]

    assert sig["latent_input"] == "hidden_states" and sig["timestep_input"] == "timestep"
    described = [{k: v for k, v in e.items() if k not in ("spec", "spec_tensor_prefix")} for e in manifest["plan"]]
    assert described == [stage.describe() for stage in graph.plan]
    assert [e["spec"] for e in manifest["plan"]] == [{"kind": "run", "names": list(stage.names)} for stage in graph.plan]
    assert manifest["plan_tensors"] is None and not (path / "plan.safetensors").exists()  # plain runs have no tensors
    assert manifest["report"]["profile"]["name"] == "identity"
    assert manifest["engines"] == {}
    assert not list(path.parent.glob(".artifact.*"))  # no temp or backup directories left


def test_refuses_to_overwrite_without_force(dit_artifact, tmp_path):
    _, optimized, path = dit_artifact
    target = tmp_path / "artifact"
    shutil.copytree(path, target)
    (target / "marker").write_text("old")
    with pytest.raises(ArtifactError, match="force"):
        export_artifact(optimized, target)
    assert (target / "marker").is_file()
    # A file the manifest does not list may be the user's: even force leaves the directory alone.
    with pytest.raises(ArtifactError, match="does not list, which may be yours: marker"):
        export_artifact(optimized, target, force=True)
    assert (target / "marker").is_file()

    (target / "marker").unlink()
    (target / "segments" / "prologue.onnx").write_bytes(b"damaged")  # a damaged artifact is still replaced
    export_artifact(optimized, target, force=True)
    assert read_manifest(target)["segments"][0]["name"] == "prologue"
    load_artifact(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]


def test_force_never_deletes_a_foreign_directory(dit_artifact, tmp_path):
    _, optimized, _ = dit_artifact
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_text("x")
    with pytest.raises(ArtifactError, match="not a ditopt artifact"):
        export_artifact(optimized, tmp_path / "photos", force=True)
    assert (tmp_path / "photos" / "cat.jpg").is_file()


def _fail_on_call(monkeypatch, n: int) -> None:
    real = torch.onnx.export
    calls = {"n": 0}

    def export(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError("simulated exporter failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", export)


def test_failure_midway_leaves_no_partial_artifact(dit_artifact, tmp_path, monkeypatch):
    _, optimized, _ = dit_artifact
    _fail_on_call(monkeypatch, 3)
    with pytest.raises(ArtifactError, match="segment block.1.*simulated exporter failure"):
        export_artifact(optimized, tmp_path / "artifact")
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temp directory


def test_failed_forced_export_keeps_the_old_artifact(dit_artifact, tmp_path, monkeypatch):
    _, optimized, path = dit_artifact
    target = tmp_path / "artifact"
    shutil.copytree(path, target)
    before = (target / "manifest.json").read_text()
    _fail_on_call(monkeypatch, 1)
    with pytest.raises(ArtifactError):
        export_artifact(optimized, target, force=True)
    assert (target / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]


def test_input_mismatch_names_input_and_shapes(dit_artifact):
    model, _, path = dit_artifact
    runner = load_artifact(path)
    kwargs = {**make_inputs("dit", model, resolution=16), "return_dict": False}
    with pytest.raises(InputMismatchError) as err:
        runner(**kwargs)
    message = str(err.value)
    assert "'hidden_states'" in message and "(1, 4, 16, 16)" in message and "(1, 4, 8, 8)" in message
    assert "Export again" in message

    good = {**make_inputs("dit", model), "return_dict": False}
    with pytest.raises(InputMismatchError, match="dtype"):
        runner(**{**good, "hidden_states": good["hidden_states"].double()})
    with pytest.raises(InputMismatchError, match="return_dict"):
        runner(**{**good, "return_dict": True})
    with pytest.raises(InputMismatchError, match="missing input 'class_labels'"):
        runner(**{k: v for k, v in good.items() if k != "class_labels"})


def test_loading_and_running_never_unpickle(dit_artifact, monkeypatch):
    model, _, path = dit_artifact

    def forbidden(*args, **kwargs):
        raise AssertionError("artifact loading must not unpickle")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    runner = load_artifact(path)
    runner(**{**make_inputs("dit", model), "return_dict": False})


class _OpaqueCache(RunSegments):
    kind = "opaque-cache"
    exportable = False


def test_non_exportable_stage_is_named(dit_artifact, tmp_path):
    _, optimized, _ = dit_artifact
    graph = optimized.programs[0]
    graph = graph.evolve(plan=(*graph.plan[:1], _OpaqueCache(("block.0", "block.1")), graph.plan[-1]))
    with pytest.raises(ArtifactError, match="_OpaqueCache"):
        export_artifact(graph, tmp_path / "artifact")
    assert list(tmp_path.iterdir()) == []


def test_runner_refuses_stage_kinds_it_cannot_run(dit_artifact, tmp_path):
    _, _, path = dit_artifact
    target = tmp_path / "artifact"
    shutil.copytree(path, target)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["plan"][1] = {"kind": "first-block-cache", "segments": ["block.0", "block.1"]}
    write_manifest(target, manifest)  # as a ditopt with that stage would write it: sealed
    with pytest.raises(ArtifactError, match="stage kind 'first-block-cache' has no ONNX runtime support yet"):
        load_artifact(target)


def test_lowering_drops_squeeze_of_non_unit_dims():
    """PixArt's epilogue squeezes its 64-token axis: a no-op in PyTorch, an error in ONNX."""

    class Squeezes(torch.nn.Module):
        def forward(self, x):
            return x.squeeze(1) + 1, x.squeeze(2), x.squeeze((1, 2))

    gm = torch.export.export(Squeezes(), (torch.randn(2, 3, 1),)).module()
    lowered = _lower_for_onnx(gm)
    squeezes = [n for n in lowered.graph.nodes if "squeeze" in str(n.target)]
    assert [n.args[1] for n in squeezes] == [2, [2]]  # size-1 dims stay squeezed
    x = torch.randn(2, 3, 1)
    assert all(torch.equal(a, b) for a, b in zip(lowered(x), gm(x)))
    assert _lower_for_onnx(lowered) is lowered  # nothing left to rewrite


# -- cached plans in the artifact runner ----------------------------------------------------------
DIT_TIMES = [900, 700, 500, 350, 200, 100]


def _dit_sampler(model_in, kwargs, times=DIT_TIMES):
    """A deterministic sampling loop over `times`, returning every call's output (and the final
    sample last): what optimize calibrates on, and what the runtime and the runner replay."""

    def run(model):
        x, outs = kwargs["hidden_states"].clone(), []
        for t in times:
            call = {**kwargs, "hidden_states": x, "timestep": torch.full((x.shape[0],), t)}
            with torch.no_grad():
                out = model(**call)[0]
            outs.append(out)
            x = x - 0.05 * out[:, : x.shape[1]]
        return x

    return run


CACHED_PROFILES = {
    # name: (passes, needs calibration)
    "residual taylor o1": ([{"name": "residual_cache", "interval": 2, "warmup": 1, "order": 1}], False),
    "calibrated fitted": ([{"name": "calibrated_schedule", "computed_steps": 3, "warmup": 2, "order": 1, "history": 2}], True),
    "feature forecast o2": ([{"name": "taylor_forecast", "order": 2, "interval": 2, "warmup": 2}], False),
    # A threshold no change reaches: every step the warm-up and max_cached allow is skipped.
    "probe gate": ([{"name": "probe_cache", "probe_blocks": 1, "threshold": 10.0, "warmup": 2, "max_cached": 2}], False),
    # Both pass families in one artifact: substituted attention on the computed steps.
    "attention + residual": ([{"name": "neighborhood_attention", "tile": 2, "radius": 1, "min_mass": 0.0, "max_cost": None},
                              {"name": "residual_cache", "interval": 2, "warmup": 1, "order": 1}], True),
}


@pytest.mark.parametrize("case", list(CACHED_PROFILES))
def test_cached_plan_runs_in_the_artifact_as_in_pytorch(case, tmp_path):
    passes, calibrated = CACHED_PROFILES[case]
    model = build_model("dit")
    kwargs = {**make_inputs("dit", model, batch=2, resolution=16), "return_dict": False}  # an 8x8 token grid
    profile = {"name": case, "budget": {"max_rel_err": 1.0}, "passes": passes}
    extra = {"calibration": _dit_sampler(model, kwargs)} if calibrated else {"num_steps": len(DIT_TIMES)}
    optimized = ditopt.optimize(model, profile, example_inputs=kwargs, **extra)
    path = export_artifact(optimized, tmp_path / "artifact", example_inputs=kwargs)
    manifest = read_manifest(path)
    cached_stage = next(e for e in manifest["plan"] if e["kind"] in ("cached-span", "feature-forecast"))
    static = cached_stage["spec"]["policy"]["type"] == "static"
    if case == "feature forecast o2":  # DiT blocks are additive: the artifact runs the stacked forecast and its gates
        assert cached_stage["spec"]["additive"] and any(p.stem.endswith("_gates") for p in (path / "segments").glob("*.onnx"))
    assert static or cached_stage["spec"]["policy"] == {"type": "probe", "threshold": 10.0, "warmup": 2, "max_cached": 2}
    # Static schedules keep their timesteps (and fitted weights) in plan.safetensors.
    assert (manifest["plan_tensors"] == "plan.safetensors") == static == (path / "plan.safetensors").is_file()
    runner = load_artifact(path)
    if "attention" in case:
        assert any(str(n.target).startswith("ditopt.") for seg in optimized.programs[0].segments for n in seg.module.graph.nodes)

    g = torch.Generator().manual_seed(3)
    optimized.reset()
    for generation in range(2):  # the second starts when the timestep rises again: state is cleared
        xs = [torch.randn(kwargs["hidden_states"].shape, generator=g) for _ in DIT_TIMES]
        cached_steps = 0
        for x, t in zip(xs, DIT_TIMES):
            call = {**kwargs, "hidden_states": x, "timestep": torch.full((2,), t)}
            with torch.no_grad():
                expected, dense = optimized(**call)[0], model(**call)[0]
            out = runner(**call)[0]
            assert runner.last_record.get("cached") == optimized.last_record.get("cached")
            assert runner.last_record.get("computed") == optimized.last_record.get("computed")
            assert relative_error(out, expected) < PARITY, (generation, t)
            if optimized.last_record.get("cached"):
                cached_steps += 1
                assert relative_error(out, dense) > 10 * PARITY  # a forecast, not a computed step
        assert cached_steps >= 2
    # Another step count than calibrated: the artifact re-derives the schedule as the runtime does.
    for t in (850, 600, 300, 150, 50):
        call = {**kwargs, "hidden_states": torch.randn(kwargs["hidden_states"].shape, generator=g), "timestep": torch.full((2,), t)}
        with torch.no_grad():
            expected = optimized(**call)[0]
        out = runner(**call)[0]
        assert runner.last_record.get("cached") == optimized.last_record.get("cached"), t
        assert relative_error(out, expected) < PARITY, t


def test_a_damaged_or_foreign_plan_is_refused_with_the_fix(tmp_path):
    model = build_model("dit")
    kwargs = {**make_inputs("dit", model, batch=2), "return_dict": False}
    profile = {"name": "c", "budget": {"max_rel_err": 1.0}, "passes": CACHED_PROFILES["calibrated fitted"][0]}
    optimized = ditopt.optimize(model, profile, example_inputs=kwargs, calibration=_dit_sampler(model, kwargs))
    path = export_artifact(optimized, tmp_path / "artifact", example_inputs=kwargs)

    missing = tmp_path / "missing"
    shutil.copytree(path, missing)
    (missing / "plan.safetensors").unlink()
    with pytest.raises(ArtifactError, match="incomplete: plan.safetensors missing; export the model again"):
        load_artifact(missing)

    foreign = tmp_path / "foreign"
    shutil.copytree(path, foreign)
    manifest = json.loads((foreign / "manifest.json").read_text())
    entry = next(e for e in manifest["plan"] if e["kind"] == "cached-span")
    entry["spec"]["kind"] = entry["kind"] = "plugin-cache"
    write_manifest(foreign, manifest)
    with pytest.raises(ArtifactError, match="kind 'plugin-cache'.*cannot be rebuilt here"):
        load_artifact(foreign)

    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    next(e for e in manifest["plan"] if e["kind"] == "cached-span")["spec"]["policy"]["type"] = "sometimes"
    write_manifest(broken, manifest)
    with pytest.raises(ArtifactError, match="invalid spec.*unknown cache policy type 'sometimes'"):
        load_artifact(broken)


def test_conditional_only_steps_run_the_exported_half_batch_segments(tmp_path):
    model = build_model("dit")
    kwargs = {**make_inputs("dit", model, batch=2), "return_dict": False}
    kwargs["hidden_states"] = torch.cat([kwargs["hidden_states"][:1]] * 2)  # batched CFG: equal halves
    kwargs["class_labels"] = torch.tensor([0, 1])

    def cfg_sampler(m):
        x = kwargs["hidden_states"][:1].clone()
        for t in DIT_TIMES:
            with torch.no_grad():
                out = m(**{**kwargs, "hidden_states": torch.cat([x, x]), "timestep": torch.full((2,), t)})[0]
            x = x - 0.05 * (out[:1] + 1.5 * (out[1:] - out[:1]))[:, :4]
        return x

    cfg = {"name": "calibrated_schedule", "compute_steps": (0, 1, 2, 3, 5), "cond_only_steps": (3, 5), "forecast": "taylor", "order": 1}
    optimized = ditopt.optimize(model, {"name": "cfg", "budget": {"max_rel_err": 1.0}, "passes": [cfg]},
                                example_inputs=kwargs, calibration=cfg_sampler)
    path = export_artifact(optimized, tmp_path / "artifact", example_inputs=kwargs)
    manifest = read_manifest(path)
    half = manifest["half_program"]
    exported = [e["name"] for e in half["segments"] if e["file"]]
    assert exported == ["block.0", "block.1"] and all((path / e["file"]).is_file() for e in half["segments"] if e["file"])
    assert half["segments"][0]["inputs"][0]["shape"][0] == 1  # the half program takes one of the two rows
    assert any("run the half-batch segments" in n for n in manifest["notes"])
    runner = load_artifact(path)
    optimized.reset()
    x = kwargs["hidden_states"]
    for step, t in enumerate(DIT_TIMES):
        call = {**kwargs, "hidden_states": x, "timestep": torch.full((2,), t)}
        with torch.no_grad():
            expected, dense = optimized(**call)[0], model(**call)[0]
        out = runner(**call)[0]
        assert runner.last_record.get("cond_only") == optimized.last_record.get("cond_only")
        assert "cond_only_declined" not in runner.last_record
        error = relative_error(out, expected)
        assert error < PARITY, step
        if step in (3, 5):
            assert runner.last_record["cond_only"] == ["block.0", "block.1"]
            assert relative_error(out, dense) > 10 * max(error, 1e-6)  # the first half was rebuilt, not computed
        x = x - 0.05 * out[:1].repeat(2, 1, 1, 1)[:, :4]


def test_conditional_only_steps_compute_in_full_in_the_runner_and_the_manifest_says_so(tmp_path):
    from ditopt.passes.caching import CachedSpan, StaticSchedule

    model = build_model("dit")
    kwargs = {**make_inputs("dit", model, batch=2), "return_dict": False}
    kwargs["hidden_states"] = torch.cat([kwargs["hidden_states"][:1]] * 2)  # batched CFG: equal halves
    graph = ditopt.capture(model, kwargs)
    blocks = tuple(s.name for s in graph.segments if s.kind == "block")
    policy = StaticSchedule((True, True, False, True), cond_only=(False, False, False, True))
    graph = graph.evolve(plan=(graph.plan[0], CachedSpan(blocks, policy, order=1), graph.plan[-1]))
    path = export_artifact(graph, tmp_path / "artifact")  # a DiTGraph: no runtime to capture the half program
    notes = read_manifest(path)["notes"]
    assert any("compute both halves" in n and "export the OptimizedDiT with example_inputs" in n for n in notes)
    assert "half_program" not in read_manifest(path)
    runner = load_artifact(path)
    x = kwargs["hidden_states"]
    for step, t in enumerate(DIT_TIMES[:4]):
        call = {**kwargs, "hidden_states": x, "timestep": torch.full((2,), t)}
        out = runner(**call)[0]
        with torch.no_grad():
            dense = model(**call)[0]
        if step == 3:
            assert runner.last_record["cond_only_declined"] == ["the runtime offers no half-batch program"]
            assert relative_error(out, dense) < PARITY  # computed in full: the dense result
        x = x - 0.05 * out[:, : x.shape[1]]


# -- attention substitution: the kernels' custom ops lower to standard ONNX --------------------------
@pytest.mark.parametrize("arch,attention", [
    ("dit", {"name": "neighborhood_attention", "tile": 2, "radius": 1}),
    ("dit", {"name": "neighborhood_attention", "tile": 4, "radius": 1}),  # 14x14 grid: partial tiles
    ("dit", {"name": "block_sparse_attention", "tile": 2, "rho": 0.5}),
    ("flux", {"name": "neighborhood_attention", "tile": 2, "radius": 1}),  # text tokens: the lse merge
    ("flux", {"name": "block_sparse_attention", "tile": 2, "rho": 0.5}),
    # ditopt::linear_attention lowers to its formula (matmuls, elu/relu, a grouped Conv)
    ("dit", {"name": "linear_attention", "layers": {"0": "relu", "1": "elu"}, "distill_steps": 2, "rows": 4}),
    ("flux", {"name": "linear_attention", "layers": {"0": "elu"}, "distill_steps": 2, "rows": 4}),
])
def test_substituted_attention_exports_and_matches_the_pytorch_runtime(arch, attention, tmp_path):
    import onnx

    model = build_model(arch)
    resolution = (28 if attention.get("tile") == 4 else 16) if arch == "dit" else None  # grid 14x14 / 8x8
    kwargs = make_inputs(arch, model, batch=2, resolution=resolution)
    # NA / PISA forced onto every layer (the test models' attention is not local); linear names its layers
    forced = attention if attention["name"] == "linear_attention" else {**attention, "min_mass": 0.0, "max_cost": None}

    def calibration(m):
        with torch.no_grad():
            return m(**kwargs)[0]

    optimized = ditopt.optimize(model, {"name": "a", "budget": {"max_rel_err": 1.0}, "passes": [forced]},
                                example_inputs=kwargs, calibration=calibration)
    graph = optimized.programs[0]
    ops = {str(n.target) for s in graph.segments for n in s.module.graph.nodes if n.op == "call_function"}
    assert any(op.startswith("ditopt.") for op in ops)  # the substitution is in the graph
    path = export_artifact(optimized, tmp_path / "artifact", example_inputs=kwargs)
    for entry in read_manifest(path)["segments"]:
        domains = {node.domain for node in onnx.load(str(path / entry["file"]), load_external_data=False).graph.node}
        assert not any("ditopt" in d for d in domains), entry["name"]
    runner = load_artifact(path)
    call = make_inputs(arch, model, batch=2, seed=4, resolution=resolution)
    with torch.no_grad():
        expected = optimized(**call)
        dense = model(**call)
    out = runner(**call)
    error = relative_error(tensor_leaves(out)[0], tensor_leaves(expected)[0])
    assert error < PARITY
    # Substituted, not dense: the artifact is much closer to the substituted model than to the dense one.
    assert relative_error(tensor_leaves(out)[0], tensor_leaves(dense)[0]) > 10 * max(error, 1e-6)


def test_verification_runs_the_artifact_beside_the_runtime_before_writing_it(tmp_path):
    model = build_model("dit")
    kwargs = {**make_inputs("dit", model, batch=2), "return_dict": False}
    passes, _ = CACHED_PROFILES["residual taylor o1"]
    optimized = ditopt.optimize(model, {"name": "v", "budget": {"max_rel_err": 1.0}, "passes": passes},
                                example_inputs=kwargs, num_steps=len(DIT_TIMES))
    trajectory = _dit_sampler(model, kwargs)  # a whole generation: computed and cached steps
    path = export_artifact(optimized, tmp_path / "ok", example_inputs=kwargs, verify_with=trajectory)
    check = read_manifest(path)["verification"]
    assert 0 < check["max_rel_err"] < PARITY and check["outputs"] == 1
    # A tolerance the float differences of onnxruntime cannot meet: refused, and nothing written.
    with pytest.raises(ArtifactError, match=r"differ from the PyTorch runtime's by .* above the tolerance 1e-12; nothing was written"):
        export_artifact(optimized, tmp_path / "strict", example_inputs=kwargs, verify_with=trajectory, verify_tol=1e-12)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]  # no artifact, no temp directory left
    graph = optimized.programs[0]
    with pytest.raises(ArtifactError, match="verify_with needs the OptimizedDiT"):
        export_artifact(graph, tmp_path / "graph", verify_with=trajectory)
