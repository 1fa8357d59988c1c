"""The artifact's names and format version: the one module the manifest, its schema and its
integrity checks all read (so that none of them imports another for a constant)."""

FORMAT = "ditopt-artifact"
# 2: every file listed with its sha256 and size ("files"), the manifest sealed by its own
# digest ("manifest_sha256"), half-batch segments' external data listed under their own dir.
FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
SEAL_KEY = "manifest_sha256"  # the manifest's own digest, over its canonical JSON without this key
# Tensors of the plan stages' specs (fitted forecast weights, timesteps), safetensors.
PLAN_TENSORS = "plan.safetensors"
SEGMENTS_DIR = "segments"
ENGINES_DIR = "engines"
