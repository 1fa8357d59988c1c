"""The manifest's schema: what `load_artifact` accepts before it opens any segment.

pydantic models in strict mode (no coercion: "3" is not a shape, true is not an int), so a
manifest that parses as JSON but holds a wrong type, a missing key, an unsafe path or
inconsistent references is refused with the field named, instead of failing later as a
KeyError or TypeError deep in the runner. Plan entries and stage specs are written by pass
families (`Stage.describe`, `Stage.spec`), so only their common keys are checked here; the
stage loaders check the rest (`ditopt.plan.stage_from_spec`), and the static cache policy,
whose lengths the runner relies on, is checked by `StaticPolicy`.
"""

from __future__ import annotations

from pathlib import PurePosixPath, PureWindowsPath
from typing import Annotated, Any, Literal, Union

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from ditopt.errors import ArtifactError

from .layout import FORMAT, FORMAT_VERSION, MANIFEST_NAME, SEAL_KEY  # noqa: F401  (SEAL_KEY re-exported)


def _relative_path(value: str) -> str:
    """A path inside the artifact directory: relative, '/'-separated, no '..' or '.' parts."""
    if not value or "\x00" in value or "\\" in value:
        raise ValueError(f"{value!r} is not a '/'-separated relative path")
    if PurePosixPath(value).is_absolute() or PureWindowsPath(value).drive:
        raise ValueError(f"{value!r} is absolute; paths in a manifest are relative to the artifact directory")
    if any(part in ("", ".", "..") for part in value.split("/")):
        raise ValueError(f"{value!r} has an empty, '.' or '..' part; paths must stay inside the artifact directory")
    if value == MANIFEST_NAME:
        raise ValueError(f"{MANIFEST_NAME} cannot be listed as one of its own files")
    return value


def _dtype(value: str) -> str:
    if not isinstance(getattr(torch, value, None), torch.dtype):
        raise ValueError(f"{value!r} is not a torch dtype")
    return value


RelPath = Annotated[str, AfterValidator(_relative_path)]
Name = Annotated[str, Field(min_length=1)]
Hex64 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Dim = Annotated[int, Field(ge=0)]
DType = Annotated[str, AfterValidator(_dtype)]
Scalar = Union[bool, int, float, str, None]


class _Model(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class _Open(BaseModel):
    """Entries other code writes (plan stages, engines): common keys checked, others kept."""

    model_config = ConfigDict(strict=True, extra="allow")


class TensorEntry(_Model):
    name: Name
    shape: list[Dim]
    dtype: DType


class _Constant(_Model):
    """A constant as `encode_constant` writes it: a JSON scalar `value`, or a `repr`."""

    type: str
    value: Scalar = None
    repr: str | None = None

    @model_validator(mode="after")
    def _value_or_repr(self) -> "_Constant":
        given = {"value", "repr"} & self.model_fields_set
        if len(given) != 1:
            raise ValueError("a constant holds exactly one of 'value' and 'repr'")
        return self


class TensorInput(_Model):
    name: Name
    kind: Literal["tensor"]
    shape: list[Dim]
    dtype: DType


class ConstantInput(_Constant):
    name: Name
    kind: Literal["constant"]


class EnvOutput(_Model):
    kind: Literal["env"]
    name: Name


class ConstantOutput(_Constant):
    kind: Literal["constant"]


class Signature(_Model):
    inputs: list[Annotated[Union[TensorInput, ConstantInput], Field(discriminator="kind")]]
    in_spec: str
    outputs: list[Annotated[Union[EnvOutput, ConstantOutput], Field(discriminator="kind")]] = Field(min_length=1)
    out_spec: str
    timestep_input: str | None
    latent_input: str | None

    @model_validator(mode="after")
    def _named_inputs_exist(self) -> "Signature":
        names = [i.name for i in self.inputs]
        if len(set(names)) != len(names):
            raise ValueError(f"input names repeat: {names}")
        tensors = {i.name for i in self.inputs if i.kind == "tensor"}
        for key in ("timestep_input", "latent_input"):
            value = getattr(self, key)
            if value is not None and value not in tensors:
                raise ValueError(f"{key} {value!r} is not one of the tensor inputs {sorted(tensors)}")
        return self


class SegmentEntry(_Model):
    """An exported segment (file, digest, values), or an empty one (`empty`: it reads and writes
    nothing, as the epilogue of a model that returns its last block's stream; no file)."""

    name: Name
    kind: Literal["prologue", "block", "epilogue", "variant"]
    block: Dim | None
    file: RelPath | None
    external_data: list[RelPath] = []
    sha256: Hex64 | None = None
    opset: int | None = None
    empty: bool = False
    inputs: list[TensorEntry]
    outputs: list[TensorEntry]

    @model_validator(mode="after")
    def _exported_or_empty(self) -> "SegmentEntry":
        if self.empty:
            if self.file is not None or self.external_data or self.inputs or self.outputs:
                raise ValueError(f"segment {self.name} is marked empty but lists a file or values")
        elif self.file is None or self.sha256 is None or not self.outputs:
            raise ValueError(f"segment {self.name} needs a file, its sha256 and at least one output")
        return self


class HalfSegmentEntry(_Model):
    """A half-batch segment: exported (file, digest) where conditional-only steps run it, else
    only its value names and shapes."""

    name: Name
    kind: Literal["prologue", "block", "epilogue", "variant"]
    block: Dim | None
    file: RelPath | None
    external_data: list[RelPath] = []
    sha256: Hex64 | None = None
    opset: int | None = None
    inputs: list[TensorEntry]
    outputs: list[TensorEntry] = Field(min_length=1)

    @model_validator(mode="after")
    def _exported_has_digest(self) -> "HalfSegmentEntry":
        if self.file is not None and self.sha256 is None:
            raise ValueError(f"half-batch segment {self.name} has a file but no sha256")
        if self.file is None and self.external_data:
            raise ValueError(f"half-batch segment {self.name} lists external data but no file")
        return self


class HalfProgram(_Model):
    segments: list[HalfSegmentEntry]
    outputs: list[str | None]
    latent_input: str | None


class StageSpec(_Open):
    kind: Name


class PlanEntry(_Open):
    kind: Name
    segments: list[Name]
    spec: StageSpec | None = None
    spec_tensor_prefix: str | None = None


class WeightsRef(_Model):
    tensor: Name
    lengths: list[Dim]


class StaticPolicy(_Open):
    """`passes.caching.stage.policy_spec` of a StaticSchedule: one entry per calibrated step."""

    type: Literal["static"]
    compute: list[bool] = Field(min_length=1)
    timesteps: Name  # a tensor name in plan.safetensors, under the stage's prefix
    on_mismatch: str
    weights: list[WeightsRef | None]
    cond_only: list[bool]
    cfg_delta_order: int

    @model_validator(mode="after")
    def _one_entry_per_step(self) -> "StaticPolicy":
        steps = len(self.compute)
        for key in ("weights", "cond_only"):
            if len(getattr(self, key)) not in (0, steps):
                raise ValueError(f"{key} has {len(getattr(self, key))} entries for {steps} steps")
        return self


class EngineEntry(_Open):
    file: RelPath
    onnx_sha256: Hex64


class Verification(_Model):
    max_rel_err: float
    tolerance: float
    outputs: Dim


class FileEntry(_Model):
    sha256: Hex64
    size: Dim


class Manifest(_Model):
    format: Literal[FORMAT]  # type: ignore[valid-type]
    format_version: Literal[FORMAT_VERSION]  # type: ignore[valid-type]
    ditopt_version: str
    versions: dict[str, str | None]
    model_class: str
    structure_hash: str
    signature: Signature
    segments: list[SegmentEntry] = Field(min_length=1)
    plan: list[PlanEntry] = Field(min_length=1)
    plan_tensors: RelPath | None
    notes: list[str]
    structure: dict[str, Any]
    report: dict[str, Any] | None
    engines_dir: RelPath
    engines: dict[str, EngineEntry]
    half_program: HalfProgram | None = None
    verification: Verification | None = None
    files: dict[RelPath, FileEntry]
    size_bytes: Dim | None = None  # the listed files' total size at export (everything but manifest.json; informational)
    initializer_bytes: dict[str, Dim] | None = None  # ONNX initializer bytes by element type (int8, uint4, float, ...)
    manifest_sha256: Hex64

    @model_validator(mode="after")
    def _references_are_consistent(self) -> "Manifest":
        names = [s.name for s in self.segments]
        if len(set(names)) != len(names):
            raise ValueError(f"segment names repeat: {names}")
        for i, entry in enumerate(self.plan):
            unknown = [n for n in entry.segments if n not in names]
            if unknown:
                raise ValueError(f"plan stage {i} ({entry.kind}) names segments the artifact does not have: {unknown}")
        exported = [s for s in self.segments if not s.empty]
        if self.half_program is not None:
            half = [s.name for s in self.half_program.segments]
            if len(set(half)) != len(half):
                raise ValueError(f"half-batch segment names repeat: {half}")
            exported += [s for s in self.half_program.segments if s.file is not None]
        files = [s.file for s in exported]
        if len(set(files)) != len(files):
            raise ValueError(f"two segments share a file: {files}")
        # Every file a segment, the plan or an engine reads must have a digest.
        referenced = {f for s in exported for f in (s.file, *s.external_data)}
        referenced |= {e.file for e in self.engines.values()}
        if self.plan_tensors is not None:
            referenced.add(self.plan_tensors)
        undigested = sorted(referenced - set(self.files))
        if undigested:
            raise ValueError(f"files {undigested} are used but have no sha256 in 'files'")
        for seg in exported:
            if seg.sha256 != self.files[seg.file].sha256:
                raise ValueError(f"segment {seg.name}: sha256 differs from the one 'files' gives for {seg.file}")
        return self


def _location(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def describe_errors(exc: ValidationError, limit: int = 5, prefix: str = "") -> str:
    """A ValidationError as 'field.path: message; ...' (the first `limit` errors)."""
    parts = [f"{prefix}{_location(e['loc'])}: {e['msg']}" for e in exc.errors()[:limit]]
    more = exc.error_count() - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def validate_manifest(manifest: dict[str, Any], file: Any) -> Manifest:
    """The manifest as a `Manifest`, or ArtifactError naming `file` and the fields at fault."""
    try:
        return Manifest.model_validate(manifest)
    except ValidationError as exc:
        raise ArtifactError(
            f"{file} does not match the ditopt artifact schema (format version {FORMAT_VERSION}): "
            f"{describe_errors(exc)}. The artifact is damaged or was edited; export the model again"
        ) from None


def validate_static_policy(policy: Any, where: str) -> StaticPolicy:
    try:
        return StaticPolicy.model_validate(policy)
    except ValidationError as exc:
        raise ArtifactError(f"{where} is not a valid static cache schedule: {describe_errors(exc)}; export the model again") from None
