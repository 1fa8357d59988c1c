"""Export: ONNX per segment + a JSON manifest, and an onnxruntime runner for the artifact.

    from ditopt.export import export_artifact, load_artifact
    export_artifact(optimized, "out/dit-artifact")
    runner = load_artifact("out/dit-artifact")
    sample = runner(hidden_states=..., timestep=..., class_labels=..., return_dict=False)[0]

Artifact layout::

    manifest.json             format, versions, signature, segments, plan, report, engines
    plan.safetensors          tensors of the plan stages' specs (a static schedule's timesteps
                              and fitted forecast weights), when a stage has any
    segments/<name>.onnx      one per segment: prologue, block.0 .. block.N-1, epilogue, and the
                              variants a pass added (block.i:record as block.i_record.onnx)
    segments/<name>.onnx.data weights stored as ONNX external data
    segments/half/<name>.onnx the half-batch program's segments that conditional-only steps run
    engines/<name>.plan       (later) TensorRT engines, listed in manifest["engines"][<name>]
                              with precision, GPU and the sha256 of the ONNX file built from

manifest.json (format "ditopt-artifact", format_version 2; schema in export/schema.py)::

    ditopt_version, versions{python, torch, onnx, onnxscript, onnxruntime}, model_class,
    structure_hash (DiTGraph.structure_hash of the exported program),
    signature{inputs: [{name, kind: "tensor", shape, dtype} | {name, kind: "constant", type,
              value (JSON) or repr}], in_spec, out_spec (treespec_dumps strings),
              outputs: [{kind: "env", name} | {kind: "constant", type, value}], timestep_input,
              latent_input},
    segments: [{name, kind, block, file, external_data, sha256, opset,
                inputs/outputs: [{name, shape, dtype}]}]   in execution order,
    plan: [stage.describe() + {spec (Stage.spec() JSON), spec_tensor_prefix}], plan_tensors
          ("plan.safetensors" or null), notes, structure (DiTGraph.summary()),
    report (OptimizationReport.to_dict() or null), engines_dir, engines {},
    half_program {segments (as above; file null where not exported), outputs, latent_input}
          (only with conditional-only steps), verification {max_rel_err, tolerance, outputs}
          (only when export ran verify_with),
    files {path: {sha256, size}}   every file of the artifact but manifest.json,
    manifest_sha256                sha256 of the manifest's canonical JSON without this key

`load_artifact` checks all of it before it opens a session (see `export/integrity.py` and
docs/design.md, "Export"): schema, the manifest's digest, every file's size and sha256, paths
confined to the directory with no links, ONNX external data among the listed files. Edit a
manifest with `ditopt.export.manifest.write_manifest`, which records its new digest.

The runner rebuilds the plan's stages from their specs and runs them on the host between
segments (cache schedules included; see docs/design.md, "Export"). It rebuilds diffusers
output dataclasses from out_spec (importing only `diffusers.*`
modules a spec names); an out_spec naming a type it cannot load degrades to a tuple.
"""

from ditopt.export.artifact import export_artifact
from ditopt.export.integrity import ArtifactWarning
from ditopt.export.manifest import FORMAT, FORMAT_VERSION, read_manifest, write_manifest
from ditopt.export.runner import ArtifactRunner, load_artifact

__all__ = ["ArtifactRunner", "ArtifactWarning", "FORMAT", "FORMAT_VERSION", "export_artifact", "load_artifact",
           "read_manifest", "write_manifest"]
