"""Strict field types for profiles and pass configs.

pydantic's default ("lax") mode coerces: `interval = true` reads as 1, `interval = 2.0` as 2,
`rho = "0.5"` as 0.5, `per_channel = 1` as True, and `nan` / `inf` pass as numbers. In a profile
each of these hides a mistake, so the fields use these types instead:

* `Int`: a whole number, nothing else (no bool, no 2.0, no "2").
* `Float`: a finite number; an int is accepted (`min_psnr_db = 30`), a bool or a string is not.
* `Bool`: `true` / `false` only (no 1, no "yes").
* `Step`: a step index, an `Int` >= 0.

Containers stay lax (a TOML array or a Python list fills a tuple field), their items are strict.
"""

from __future__ import annotations

from typing import Annotated, Any, Iterable, Literal

from pydantic import AllowInfNan, Field, Strict

Int = Annotated[int, Strict()]
Float = Annotated[float, Strict(), AllowInfNan(False)]
Bool = Annotated[bool, Strict()]
Step = Annotated[int, Strict(), Field(ge=0)]
Auto = Literal["auto"]


def check_steps(name: str, steps: Iterable[int] | None, *, first_zero: bool = True) -> None:
    """Explicit step indices: at least one, rising strictly, starting at step 0 when `first_zero`
    (step 0 is always computed: there is nothing earlier to reuse or forecast from)."""
    if steps is None:
        return
    steps = list(steps)
    if not steps:
        raise ValueError(f"{name} is empty: list the steps to compute, starting with 0 (e.g. [0, 1, 3, 6]), or leave it out")
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"{name} = {steps} must rise strictly (each step once, in order)")
    if first_zero and steps[0] != 0:
        raise ValueError(f"{name} = {steps} must start with step 0 (the first step is always computed)")


def check_unique(name: str, values: Iterable[Any] | None, *, allow_empty: bool = True) -> None:
    if values is None:
        return
    values = list(values)
    if not values and not allow_empty:
        raise ValueError(f"{name} is empty: list at least one, or leave it out for the default")
    seen = sorted({v for v in values if values.count(v) > 1})
    if seen:
        raise ValueError(f"{name} lists {', '.join(map(str, seen))} more than once")


def check_in(name: str, value: Any, allowed: tuple, what: str) -> None:
    """`value` must be 'auto' or one of `allowed` (e.g. the radii calibration measures)."""
    if value != "auto" and value not in allowed:
        raise ValueError(f"{name} = {value} is not one of {what} ({', '.join(map(str, allowed))}); "
                         f"use one of them, or 'auto'")
