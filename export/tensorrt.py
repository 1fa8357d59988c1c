"""TensorRT engines from an exported artifact: one engine per ONNX segment.

`check_onnx_for_tensorrt` is a structural check, run anywhere (no TensorRT, no GPU): the rules
TensorRT's ONNX parser needs of a segment, each broken rule one line naming the node or input.

* the default-domain opset lies in what the parser reads (9 .. `TENSORRT_MAX_OPSET`);
* no node, local function or opset import of a custom domain (``com.microsoft``, ``pkg.*``,
  ``ditopt``): TensorRT has no kernels for them without a plugin;
* every input dimension is either a number or a named dynamic dimension with a declared range
  (`dynamic`: name -> (min, opt, max)), from which the optimization profile is built;
* Q/DQ (explicit quantization): every QuantizeLinear feeds only DequantizeLinear nodes, its
  scale is a constant, its zero point (when given) is constant zero, its output type is int8
  or float8 (TensorRT's symmetric int8 / fp8). A computed scale is what `quantize`'s dynamic
  per-token activations export to (valid ONNX, which onnxruntime runs); TensorRT takes static
  scales only: `quantize activation_scales = "static"` calibrates one per layer.
* pre-quantized weights (a DequantizeLinear of an initializer): signed int8 / int4 / float8
  codes with a constant scale and a zero zero point (TensorRT's IDequantizeLayer rejects
  asymmetric weights, so `quantize`'s uint4 int4 format does not pass), feeding the linear
  operator (MatMul, Gemm, Conv), where TensorRT fuses the pair, directly or through a
  Transpose / Reshape.

`build_engines` builds, with the TensorRT Python API, one serialized engine per segment of an
artifact (precision flags, one optimization profile from the artifact's declared shapes, a
timing cache shared by the segments and kept on disk for the next build) into a directory of
its own: the artifact's manifest lists every file of the artifact, so the engines do not go
inside it. It needs `tensorrt` (``pip install "ditopt[tensorrt]"``) and a CUDA device;
`require_tensorrt` says which is missing. Running the engines in place of the onnxruntime
sessions is not part of this module yet.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from ditopt.errors import ArtifactError, MissingExtraError

# The newest default-domain opset TensorRT's ONNX parser reads (TensorRT 11.x per NVIDIA's ONNX
# opset guide; 10.x parsers stop earlier: pass max_opset= for an older TensorRT). The parser is
# backward compatible to opset 9.
TENSORRT_MIN_OPSET = 9
TENSORRT_MAX_OPSET = 25
DEFAULT_DOMAINS = ("", "ai.onnx")
QUANT_TYPES = {"INT8", "FLOAT8E4M3FN"}
WEIGHT_TYPES = {"INT8", "INT4", "FLOAT8E4M3FN"}  # pre-quantized weights TensorRT reads (signed, symmetric)
LINEAR_OPS = {"MatMul", "Gemm", "Conv", "ConvTranspose"}
PRECISIONS = ("fp32", "tf32", "fp16", "bf16", "int8", "fp8")
ENGINE_INDEX = "engines.json"
TIMING_CACHE = "timing.cache"


def require_tensorrt() -> Any:
    """The `tensorrt` module, or MissingExtraError (exit code 2) naming what is missing (the
    package, or a CUDA device) and how to get it."""
    try:
        import tensorrt
    except ImportError:
        raise MissingExtraError('building TensorRT engines needs tensorrt, which the default install leaves out: '
                                'pip install "ditopt[tensorrt]" (on a machine with an NVIDIA GPU and CUDA)') from None
    import torch

    if not torch.cuda.is_available():
        raise MissingExtraError("building TensorRT engines needs a CUDA device, and torch sees none "
                                "(torch.cuda.is_available() is False): run on a machine with an NVIDIA GPU and a CUDA build of torch")
    return tensorrt


def _constant_values(model: Any) -> dict[str, Any]:
    """Initializers and Constant-node outputs by name: name -> TensorProto."""
    found = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                found[node.output[0]] = value
    return found


def check_onnx_for_tensorrt(model: Any, dynamic: dict[str, tuple[int, int, int]] | None = None,
                            max_opset: int = TENSORRT_MAX_OPSET) -> list[str]:
    """What in `model` (an onnx ModelProto or a path) TensorRT's ONNX parser would refuse; empty
    when it follows every rule above. `dynamic` gives each named dynamic dimension its (min,
    opt, max) range."""
    import onnx
    from onnx import numpy_helper

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    dynamic = dict(dynamic or {})
    problems: list[str] = []
    opsets = {o.domain: o.version for o in model.opset_import}
    version = next((opsets[d] for d in DEFAULT_DOMAINS if d in opsets), None)
    if version is None:
        problems.append("no default-domain (ai.onnx) opset import")
    elif not TENSORRT_MIN_OPSET <= version <= max_opset:
        problems.append(f"opset {version} is outside what TensorRT's parser reads ({TENSORRT_MIN_OPSET}..{max_opset}); "
                        f"export with opset_version in that range")
    custom = sorted(d for d in opsets if d not in DEFAULT_DOMAINS)
    if custom:
        problems.append(f"opset imports of custom domains {custom}: TensorRT has no kernels for them without a plugin")
    if model.functions:
        problems.append(f"{len(model.functions)} local function(s) ({', '.join(sorted({f.domain for f in model.functions}))}): "
                        "inline them (onnx.inliner.inline_local_functions)")
    for node in model.graph.node:
        if node.domain not in DEFAULT_DOMAINS:
            problems.append(f"node {node.name or node.op_type} is {node.domain}::{node.op_type}, a custom-domain op")
    for value in model.graph.input:
        for i, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                continue
            name = dim.dim_param if dim.HasField("dim_param") else ""
            if not name:
                problems.append(f"input {value.name} dimension {i} has neither a size nor a name: declare it")
            elif name not in dynamic:
                problems.append(f"input {value.name} dimension {i} is dynamic ({name!r}) with no declared (min, opt, max) range")
            else:
                lo, opt, hi = dynamic[name]
                if not 0 < lo <= opt <= hi:
                    problems.append(f"dynamic dimension {name!r}: range {dynamic[name]} is not 0 < min <= opt <= max")
    consts = _constant_values(model)
    consumers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    elem_names = {v: k for k, v in onnx.TensorProto.DataType.items()}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.domain not in DEFAULT_DOMAINS:
            continue
        where = f"QuantizeLinear {node.name or node.output[0]}"
        users = consumers.get(node.output[0], [])
        if not users or any(u.op_type != "DequantizeLinear" for u in users):
            problems.append(f"{where} feeds {sorted({u.op_type for u in users}) or 'nothing'}: TensorRT needs a "
                            "DequantizeLinear right after every QuantizeLinear (Q/DQ pairs)")
        if len(node.input) < 2 or node.input[1] not in consts:
            problems.append(f"{where}: its scale is computed, not a constant (dynamic quantization, as quantize's per-token "
                            "activations): TensorRT needs constant scales; quantize with activation_scales = 'static'")
        if len(node.input) > 2 and node.input[2]:
            zero = consts.get(node.input[2])
            if zero is None:
                problems.append(f"{where}: its zero point is computed, not a constant")
            else:
                kind = elem_names.get(zero.data_type, str(zero.data_type))
                if kind not in QUANT_TYPES:
                    problems.append(f"{where}: quantizes to {kind}; TensorRT takes int8 or float8 (e4m3)")
                elif kind == "INT8" and numpy_helper.to_array(zero).any():
                    problems.append(f"{where}: non-zero zero point (TensorRT's int8 is symmetric)")
    initializers = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.domain not in DEFAULT_DOMAINS or node.input[0] not in initializers:
            continue
        where = f"DequantizeLinear {node.name or node.output[0]} of the weight {node.input[0]}"
        kind = elem_names.get(initializers[node.input[0]].data_type, "?")
        if kind not in WEIGHT_TYPES:
            problems.append(f"{where}: {kind} codes; TensorRT's quantized weights are {', '.join(sorted(WEIGHT_TYPES))} "
                            "(signed, symmetric): quantize those weights to int8")
        if len(node.input) < 2 or node.input[1] not in consts:
            problems.append(f"{where}: its scale is computed, not a constant")
        if len(node.input) > 2 and node.input[2]:
            zero = consts.get(node.input[2])
            if zero is None or numpy_helper.to_array(zero).astype("int32").any():
                problems.append(f"{where}: a zero point that is not constant zero (asymmetric weights); TensorRT's "
                                "IDequantizeLayer takes symmetric ones")
        users, seen = list(consumers.get(node.output[0], [])), set()
        while any(u.op_type in ("Transpose", "Reshape") for u in users):  # through layout ops to the linear op
            step = []
            for u in users:
                if u.op_type in ("Transpose", "Reshape") and id(u) not in seen:
                    seen.add(id(u))
                    step += consumers.get(u.output[0], [])
                elif u.op_type not in ("Transpose", "Reshape"):
                    step.append(u)
            users = step
        if not users or any(u.op_type not in LINEAR_OPS for u in users):
            problems.append(f"{where} feeds {sorted({u.op_type for u in users}) or 'nothing'}: TensorRT needs a "
                            f"pre-quantized weight's DequantizeLinear to feed the linear operator ({', '.join(sorted(LINEAR_OPS))})")
    return problems


def check_artifact_for_tensorrt(artifact: str | Path, max_opset: int = TENSORRT_MAX_OPSET) -> dict[str, list[str]]:
    """`check_onnx_for_tensorrt` on every ONNX segment of an artifact: file -> problems (only the
    files with some). The artifact's segments are exported at static shapes, so their inputs
    declare no dynamic dimension."""
    from .manifest import read_manifest
    from .runner import _session_files

    root = Path(artifact)
    manifest = read_manifest(root)
    found = {}
    for _, seg in _session_files(manifest):
        problems = check_onnx_for_tensorrt(root / seg["file"], max_opset=max_opset)
        if problems:
            found[seg["file"]] = problems
    return found


def _precision_flags(trt: Any, config: Any, precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: use one of {', '.join(PRECISIONS)}")
    flags = {"fp16": ["FP16"], "bf16": ["BF16"], "int8": ["INT8", "FP16"], "fp8": ["FP8", "FP16"], "tf32": ["TF32"]}
    if precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)  # plain fp32: no reduced-precision GEMMs
    for name in flags.get(precision, []):
        config.set_flag(getattr(trt.BuilderFlag, name))


def build_engine(trt: Any, onnx_path: Path, shapes: dict[str, tuple[int, ...]], precision: str, cache: Any,
                 logger: Any, workspace_bytes: int) -> bytes:
    """One serialized engine for one ONNX segment: static `shapes` (input -> shape) give the
    optimization profile min = opt = max; `cache` is the builder's shared timing cache."""
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ArtifactError(f"TensorRT's ONNX parser refused {onnx_path}: {errors[:1000]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    _precision_flags(trt, config, precision)
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = tuple(shapes.get(tensor.name, tuple(tensor.shape)))
        profile.set_shape(tensor.name, shape, shape, shape)
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise ArtifactError(f"TensorRT could not build an engine for {onnx_path} (precision {precision}); see its log above")
    return bytes(engine)


def build_engines(artifact: str | Path, out_dir: str | Path | None = None, precision: str = "fp16",
                  segments: Iterable[str] | None = None, workspace_bytes: int = 1 << 30) -> Path:
    """Build one TensorRT engine per ONNX segment of the artifact at `artifact` into `out_dir`
    (default: `<artifact>.tensorrt`, beside it): `<segment>.engine` files, `engines.json` (segment ->
    engine file, input shapes, precision, TensorRT version) and `timing.cache`, which a later build
    reuses. Refuses segments that fail `check_onnx_for_tensorrt` before building anything."""
    from .manifest import read_manifest
    from .runner import _session_files

    trt = require_tensorrt()
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: use one of {', '.join(PRECISIONS)}")
    root = Path(artifact)
    manifest = read_manifest(root)
    wanted = set(segments) if segments is not None else None
    entries = [(name, seg) for name, seg in _session_files(manifest) if wanted is None or name in wanted]
    problems = {seg["file"]: p for _, seg in entries if (p := check_onnx_for_tensorrt(root / seg["file"]))}
    if problems:
        listed = "; ".join(f"{f}: {', '.join(p)}" for f, p in problems.items())
        raise ArtifactError(f"{root}: segments TensorRT cannot parse: {listed}")
    out = Path(out_dir) if out_dir is not None else root.with_name(root.name + ".tensorrt")
    out.mkdir(parents=True, exist_ok=True)
    logger = trt.Logger(trt.Logger.WARNING)
    cache_file = out / TIMING_CACHE
    probe = trt.Builder(logger).create_builder_config()
    cache = probe.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
    index = {"precision": precision, "tensorrt": trt.__version__, "artifact": str(root), "engines": {}}
    for name, seg in entries:
        shapes = {i["name"]: tuple(i["shape"]) for i in seg["inputs"]}
        engine = build_engine(trt, root / seg["file"], shapes, precision, cache, logger, workspace_bytes)
        file = name.replace("/", "__") + ".engine"
        (out / file).write_bytes(engine)
        index["engines"][name] = {"file": file, "inputs": {k: list(v) for k, v in shapes.items()},
                                  "outputs": [o["name"] for o in seg["outputs"]]}
    cache_file.write_bytes(bytes(cache.serialize()))
    (out / ENGINE_INDEX).write_text(json.dumps(index, indent=1) + "\n")
    return out
