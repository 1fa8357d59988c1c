"""Export: ONNX per segment + a JSON manifest, and an onnxruntime runner for the artifact.

    from ditopt.export import export_artifact, load_artifact
    export_artifact(optimized, "out/dit-artifact")
    runner = load_artifact("out/dit-artifact")
    sample = runner(hidden_states=..., timestep=..., class_labels=..., return_dict=False)[0]

Artifact layout::

    manifest.json             format, versions, signature, segments, plan, report, engines
    segments/<name>.onnx      one per segment: prologue, block.0 .. block.N-1, epilogue
    segments/<name>.onnx.data weights stored as ONNX external data
    engines/<name>.plan       (later) TensorRT engines, listed in manifest["engines"][<name>]
                              with precision, GPU and the sha256 of the ONNX file built from
"""

from .artifact import export_artifact
from .manifest import FORMAT, FORMAT_VERSION, read_manifest
from .runner import ArtifactRunner, load_artifact

__all__ = ["ArtifactRunner", "FORMAT", "FORMAT_VERSION", "export_artifact", "load_artifact", "read_manifest"]
