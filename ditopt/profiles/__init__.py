"""Validated optimization profiles: an ordered list of pass configs, a backend, a budget.

Presets ship as TOML files next to this module. `load_profile` accepts a Profile, a preset
name, or a path to a TOML file; every problem is an InvalidProfileError naming the field, the
value given and what to write instead. Numbers and booleans are strict (see `fields`):
`interval = true`, `interval = 2.0`, `rho = "0.5"` and `nan` are errors, not coerced.
"""

from __future__ import annotations

import difflib
import re
import tomllib
import warnings
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from ..errors import InvalidProfileError, ProfileWarning, UnknownPassError
from ..registry import PassConfig, check_pass_contracts, get_pass
from .fields import Bool, Float, Int

PROFILE_VERSION = 1


class Budget(BaseModel):
    """Quality the optimized model must keep against the original."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_psnr_db: Float | None = Field(None, gt=0, description="PSNR of final samples vs the original, same seeds")
    max_rel_err: Float | None = Field(1e-4, gt=0, description="relative L2 error of one denoiser call vs the original")
    psnr_confidence: Float = Field(
        0.9, ge=0.5, lt=1.0,
        description="one-sided confidence that the mean PSNR over new seeds meets min_psnr_db, judged from the "
                    "held-out samples (Student t bound); 0.5 checks the held-out mean itself",
    )
    retry_margin_db: Float = Field(
        1.0, ge=0,
        description="after a held-out miss, the search's PSNR target on the calibration inputs rises by the "
                    "shortfall plus this margin: smaller lands nearer the budget, at the risk of another retry",
    )


class VerifySettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: Bool = True
    timesteps: Int = Field(3, ge=1, le=64, description="timesteps sampled for the per-call check")
    seed: Int = Field(1234, ge=0)


class PassEntry(BaseModel):
    """One pass in a profile: `name` plus the pass's own parameters, validated by its config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    config: PassConfig

    @model_validator(mode="before")
    @classmethod
    def _split(cls, data: Any) -> Any:
        if isinstance(data, PassEntry):
            return data
        if not isinstance(data, dict) or "name" not in data:
            raise ValueError("each pass needs a 'name'")
        if "config" in data and isinstance(data["config"], PassConfig):
            return data
        if not isinstance(data["name"], str):
            raise ValueError(f"a pass name is a string, e.g. name = \"taylor_forecast\"; got {data['name']!r}")
        params = {k: v for k, v in data.items() if k != "name"}
        spec = get_pass(data["name"])
        config = spec.config.model_validate(params)
        _refuse_coercion(spec.config, params, config)
        return {"name": data["name"], "config": config}

    def dump(self) -> dict[str, Any]:
        return {"name": self.name, **self.config.model_dump(mode="json")}


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    version: Int = PROFILE_VERSION
    description: str = ""
    # Where optimize()'s module runs its segments: "pytorch" (eager) or "inductor" (torch.compile);
    # "onnxruntime" / "tensorrt" name an exported artifact's engine (ditopt.backends).
    backend: Literal["pytorch", "inductor", "onnxruntime", "tensorrt"] = "pytorch"
    budget: Budget = Budget()
    verify: VerifySettings = VerifySettings()
    passes: tuple[PassEntry, ...] = ()

    @model_validator(mode="after")
    def _check(self) -> "Profile":
        if self.version != PROFILE_VERSION:
            raise ValueError(f"version {self.version} is not supported (this ditopt reads version {PROFILE_VERSION})")
        names = [p.name for p in self.passes]
        for i, entry in enumerate(self.passes):
            for earlier in get_pass(entry.name).after:
                if earlier in names[i + 1 :]:
                    raise ValueError(f"pass {earlier!r} must come before {entry.name!r}")
        for i, entry in enumerate(self.passes):
            for j in range(i):
                if self.passes[j] == entry:
                    raise ValueError(f"passes {j} and {i} are the same pass {entry.name!r} with the same settings; remove one")
        # Declared contracts (PassSpec.requires / ensures / conflicts): e.g. every caching pass
        # claims the step schedule, so a profile holds one of them.
        check_pass_contracts(names)
        return self

    def dump(self) -> dict[str, Any]:
        """JSON/TOML-ready dict that `Profile.model_validate` reads back to an equal profile."""
        data = self.model_dump(mode="json", exclude={"passes"})
        data["passes"] = [p.dump() for p in self.passes]
        return data


def _refuse_coercion(config_cls: type[PassConfig], params: dict[str, Any], config: PassConfig) -> None:
    """A pass config that is not strict itself (a plugin's) must still not turn `true` into 1,
    "2" into 2 or 2.0 into 2 behind the user's back."""
    errors = []
    for key, given in params.items():
        got = getattr(config, key, None)
        if isinstance(given, bool) and not isinstance(got, bool):
            expected = "a boolean"
        elif isinstance(given, str) and not isinstance(got, str):
            expected = "a string"
        elif isinstance(given, float) and isinstance(got, int) and not isinstance(got, bool):
            expected = "a fractional number"
        else:
            continue
        kind = {"int": "a valid integer", "float": "a valid number"}.get(type(got).__name__, f"a {type(got).__name__}")
        errors.append(InitErrorDetails(
            type=PydanticCustomError("coerced", "Input should be {kind}, not {expected}", {"kind": kind, "expected": expected}),
            loc=(key,), input=given))
    if errors:
        raise ValidationError.from_exception_data(config_cls.__name__, errors)


# Union members pydantic names in an error's location (`warmup.constrained-int`, `rho.literal['auto']`).
_UNION_TAG = re.compile(r"^((constrained|strict|lax)-)?(int|float|str|bool|none|literal\[.*\]|tuple\[.*\]|function-\w+\[.*\]|.*-or-.*)$")


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (dict, list, tuple)) and len(repr(value)) > 60:
        return type(value).__name__
    return repr(value)


def _fields_for(loc: tuple, data: Any) -> tuple[str, dict[str, Any]]:
    """(how to name `loc` for a user, the fields of the model holding its last key)."""
    if loc and loc[0] == "passes" and len(loc) >= 2 and isinstance(loc[1], int):
        entry = data.get("passes")[loc[1]] if isinstance(data, dict) and isinstance(data.get("passes"), (list, tuple)) else None
        name = entry.get("name") if isinstance(entry, dict) else getattr(entry, "name", None)
        where = f"passes[{loc[1]}]" + (f" ({name})" if isinstance(name, str) else "")
        rest = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[2:])
        try:
            fields = dict(get_pass(name).config.model_fields) if isinstance(name, str) else {}
        except UnknownPassError:
            fields = {}
        return where + rest, fields if len(loc) == 3 else {}
    models = {"budget": Budget, "verify": VerifySettings}
    fields = dict(models[loc[0]].model_fields) if len(loc) == 2 and loc[0] in models else dict(Profile.model_fields) if len(loc) == 1 else {}
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    return where or "(profile)", fields


def _hint(kinds: set[str], given: Any) -> str:
    if isinstance(given, bool) and kinds & {"int_type", "float_type", "literal_error", "coerced", "int_parsing", "float_parsing"}:
        return " (true/false is a boolean, not a number: write the number itself, e.g. 2)"
    if isinstance(given, str) and kinds & {"int_type", "float_type", "coerced", "bool_type"}:
        return " (a quoted string: drop the quotes, e.g. 2 or true)"
    if isinstance(given, float) and kinds & {"int_type", "int_from_float", "coerced"}:
        if given == given and abs(given) != float("inf") and given.is_integer():
            return f" (a whole number is expected: write {int(given)}, not {given!r})"
        return " (a whole number is expected, e.g. 2)"
    if "finite_number" in kinds:
        return " (nan and inf are not allowed here)"
    if "bool_type" in kinds:
        return " (write true or false)"
    return ""


def describe_errors(exc: ValidationError, data: Any) -> list[str]:
    """One line per wrong field: where (pass index and name), the value given, what is expected
    and, where it is clear, what to write instead."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and _UNION_TAG.match(p)))
        groups.setdefault(loc, []).append(err)
    lines = []
    for loc, errs in groups.items():
        where, fields = _fields_for(loc, data)
        kinds = {e["type"] for e in errs}
        given = errs[0].get("input")
        if kinds == {"extra_forbidden"}:
            key = str(loc[-1]) if loc else "?"
            known = sorted(fields)
            close = difflib.get_close_matches(key, known, n=1)
            takes = f"; known keys: {', '.join(known)}" if known else "; this pass takes no settings" if loc[0] == "passes" else ""
            lines.append(f"{where}: unknown key{' (did you mean ' + repr(close[0]) + '?)' if close else ''}{takes}")
            continue
        messages: list[str] = []
        for e in errs:
            msg = e["msg"].removeprefix("Value error, ")
            if messages and msg.startswith("Input should be "):  # another member of a union: "..., or 'auto'"
                msg = msg.removeprefix("Input should be ")
            elif msg.startswith("Input should"):
                msg = "should" + msg.removeprefix("Input should")
            if msg not in messages:
                messages.append(msg)
        shown = "" if given is None or isinstance(given, dict) or kinds <= {"value_error", "missing", "assertion_error"} else f" = {_toml(given)}"
        lines.append(f"{where}{shown}: {', or '.join(messages)}{_hint(kinds, given)}")
    return lines


def _validate(data: dict[str, Any], source: str) -> Profile:
    if not isinstance(data, dict):
        raise InvalidProfileError(f"{source}: a profile is a table of keys (name, budget, passes, ...), not {type(data).__name__}")
    try:
        profile = Profile.model_validate(data)
    except UnknownPassError as exc:
        raise UnknownPassError(f"{source}: {exc}") from None
    except ValidationError as exc:
        problems = "; ".join(describe_errors(exc, data))
        raise InvalidProfileError(f"{source}: invalid profile: {problems}") from None
    if profile.backend in ("onnxruntime", "tensorrt"):
        warnings.warn(
            f"{source}: backend = {profile.backend!r} is not used by optimize(), which always returns a PyTorch "
            f"module (eager here); to run through {profile.backend}, export the optimized model (ditopt export "
            "--engine, or ditopt.export.export_artifact). Write backend = \"pytorch\" (or \"inductor\") to silence "
            "this warning.",
            ProfileWarning, stacklevel=3,
        )
    return profile


def preset_names() -> list[str]:
    folder = resources.files(__package__) / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def read_profile_file(path: Path) -> dict[str, Any]:
    """The TOML table in `path`; InvalidProfileError naming the file for a missing file, a
    directory, an unreadable file, bytes that are not UTF-8 or text that is not TOML."""
    if path.is_dir():
        raise InvalidProfileError(f"profile {path} is a directory; give the path of a .toml file (or a preset name: {', '.join(preset_names())})")
    if not path.exists():
        raise InvalidProfileError(f"profile file {path} does not exist (preset names: {', '.join(preset_names())})")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InvalidProfileError(f"profile file {path} cannot be read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise InvalidProfileError(
            f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at line {line}, offset {exc.start}); TOML files are "
            "UTF-8: re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None
    try:
        return tomllib.loads(text.removeprefix("\ufeff"))
    except tomllib.TOMLDecodeError as exc:
        raise InvalidProfileError(f"{path}: not valid TOML: {exc}") from None


def load_profile(profile: "Profile | str | Path | dict[str, Any]") -> Profile:
    if isinstance(profile, Profile):
        return profile
    if isinstance(profile, dict):
        return _validate(profile, "profile dict")
    if not isinstance(profile, (str, Path)):
        raise InvalidProfileError(
            f"a profile is a preset name ({', '.join(preset_names())}), a path to a TOML file, a dict or a "
            f"ditopt.Profile, not {type(profile).__name__}"
        )
    text_source = str(profile)
    if not text_source.strip():
        raise InvalidProfileError(f"the profile name is empty; give a preset ({', '.join(preset_names())}) or a TOML file")
    path = Path(text_source)
    if path.suffix.lower() == ".toml" or path.exists():
        return _validate(read_profile_file(path), str(path))
    folder = resources.files(__package__) / "presets"
    preset = folder / f"{text_source}.toml"
    if "/" in text_source or "\\" in text_source or not preset.is_file():
        raise InvalidProfileError(
            f"unknown profile {text_source!r}: not a file, and not a preset ({', '.join(preset_names())})"
        )
    return _validate(tomllib.loads(preset.read_text(encoding="utf-8")), f"preset {text_source}")
