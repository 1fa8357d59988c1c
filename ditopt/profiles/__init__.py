"""Validated optimization profiles: an ordered list of pass configs, a backend, a budget.

Presets ship as TOML files next to this module. `load_profile` accepts a Profile, a preset
name, or a path to a TOML file; every problem is an InvalidProfileError naming the field.
"""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import InvalidProfileError, UnknownPassError
from ..registry import PassConfig, get_pass

PROFILE_VERSION = 1


class Budget(BaseModel):
    """Quality the optimized model must keep against the original."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_psnr_db: float | None = Field(None, gt=0, description="PSNR of final samples vs the original, same seeds")
    max_rel_err: float | None = Field(1e-4, gt=0, description="relative L2 error of one denoiser call vs the original")
    psnr_confidence: float = Field(
        0.9, ge=0.5, lt=1.0,
        description="one-sided confidence that the mean PSNR over new seeds meets min_psnr_db, judged from the "
                    "held-out samples (Student t bound); 0.5 checks the held-out mean itself",
    )
    retry_margin_db: float = Field(
        1.0, ge=0,
        description="after a held-out miss, the search's PSNR target on the calibration inputs rises by the "
                    "shortfall plus this margin: smaller lands nearer the budget, at the risk of another retry",
    )


class VerifySettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    timesteps: int = Field(3, ge=1, le=64, description="timesteps sampled for the per-call check")
    seed: int = 1234


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
        params = {k: v for k, v in data.items() if k != "name"}
        spec = get_pass(data["name"])
        return {"name": data["name"], "config": spec.config.model_validate(params)}

    def dump(self) -> dict[str, Any]:
        return {"name": self.name, **self.config.model_dump(mode="json")}


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    version: int = PROFILE_VERSION
    description: str = ""
    backend: Literal["pytorch", "onnxruntime", "tensorrt"] = "pytorch"
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
        return self

    def dump(self) -> dict[str, Any]:
        """JSON/TOML-ready dict that `Profile.model_validate` reads back to an equal profile."""
        data = self.model_dump(mode="json", exclude={"passes"})
        data["passes"] = [p.dump() for p in self.passes]
        return data


def _validate(data: dict[str, Any], source: str) -> Profile:
    try:
        return Profile.model_validate(data)
    except UnknownPassError as exc:
        raise UnknownPassError(f"{source}: {exc}") from None
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(profile)'}: {err['msg']}" for err in exc.errors()
        )
        raise InvalidProfileError(f"{source}: invalid profile: {problems}") from None


def preset_names() -> list[str]:
    folder = resources.files(__package__) / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_profile(profile: "Profile | str | Path | dict[str, Any]") -> Profile:
    if isinstance(profile, Profile):
        return profile
    if isinstance(profile, dict):
        return _validate(profile, "profile dict")
    text_source = str(profile)
    path = Path(text_source)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise InvalidProfileError(f"profile file {path} does not exist")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise InvalidProfileError(f"{path}: not valid TOML: {exc}") from None
        return _validate(data, str(path))
    folder = resources.files(__package__) / "presets"
    preset = folder / f"{text_source}.toml"
    if not preset.is_file():
        raise InvalidProfileError(
            f"unknown profile {text_source!r}: not a file, and not a preset ({', '.join(preset_names())})"
        )
    return _validate(tomllib.loads(preset.read_text()), f"preset {text_source}")
