"""Probe: bad inputs through ditopt's public API and CLI, each classified by what came back.

    python benchmarks/probes/bad_inputs.py [--json benchmarks/results/probes/bad_inputs.json] [--only GROUP]

Every case is a bad (or borderline) input a user can plausibly write: profiles with wrong types,
out-of-range values, unknown keys; profile files that are not UTF-8, not TOML, a directory or
missing; model specs that do not resolve; example inputs of the wrong kind; calibration functions
that misbehave; calls on an optimized model with inputs it was not built for; zoo sampling with
labels out of range; CLI options that make no sense. Each outcome is one of

    named_error     a ditopt error (a DitoptError subclass; the CLI: exit 2/1 with a message, or a usage error)
    warning         accepted with a warning raised by ditopt's own code
    raw_exception   another exception escaped (a bug: a traceback instead of a message)
    silent_accept   a bad value accepted without a word (a bug)
    silent_wrong    accepted, but the result is wrong (a bug)
    rejected_valid  a valid input refused (a bug)
    ok              a valid (or harmless) input accepted with the right result

and the table prints case -> outcome (with the message), then the counts; --json writes them all.
Cases whose expectation is "either" accept a named error or a correct result.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))  # toy_models: DiTs whose outputs are known by hand

import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

import ditopt  # noqa: E402
from ditopt import errors as _errors  # noqa: E402
from ditopt.errors import DitoptError  # noqa: E402

# ditopt's own warnings (an older tree, probed for the "before" counts, has no common base)
DitoptWarning = getattr(_errors, "DitoptWarning", _errors.QualityGateWarning)
# where ditopt's code lives: this checkout, or the tree on PYTHONPATH a "before" run imports
CODE_ROOTS = {str(ROOT), str(Path(ditopt.__file__).resolve().parents[1])}

BUGS = ("raw_exception", "silent_accept", "silent_wrong", "rejected_valid")
OUTCOMES = ("named_error", "warning", "ok") + BUGS


class Wrong(Exception):
    """A case found the result wrong (raised by the case itself, after the call it probes)."""


class Reached(Exception):
    """A CLI command got past its input checks into the expensive part (patched in for the probe)."""


@dataclass
class Case:
    group: str
    name: str
    fn: Callable[[], Any]
    expect: str = "reject"  # "reject": a bad input; "accept": a valid one; "either"


CASES: list[Case] = []


def case(group: str, name: str, expect: str = "reject"):
    def register(fn):
        CASES.append(Case(group, name, fn, expect))
        return fn

    return register


# ---------------------------------------------------------------------------------------------
# shared fixtures (built lazily, once)
# ---------------------------------------------------------------------------------------------
_CACHE: dict[str, Any] = {}


def once(key: str, make: Callable[[], Any]) -> Any:
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


def tiny_dit():
    def make():
        from diffusers import DiTTransformer2DModel

        torch.manual_seed(0)
        return DiTTransformer2DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
            sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=1,
        ).eval()

    return once("dit", make)


def fresh_dit():
    """A copy of the tiny DiT for cases that change their model (the shared one stays as built)."""
    import copy

    return copy.deepcopy(tiny_dit())


def dit_inputs(batch: int = 1, **override):
    from ditopt.inputs import synthesize_inputs

    kwargs = synthesize_inputs(tiny_dit(), batch_size=batch)
    kwargs.update(override)
    return kwargs


def optimized_dit():
    return once("opt_dit", lambda: ditopt.optimize(tiny_dit(), "identity"))


def toy():
    from toy_models import AffineDiT

    return AffineDiT().eval()


def toy_inputs(batch: int = 2):
    from toy_models import toy_inputs as make

    return make(batch=batch)


def toy_sampler(steps: int = 6, samples: int = 4):
    from toy_models import euler_sampler

    x0 = torch.randn(samples, 4, 8, generator=torch.Generator().manual_seed(0))
    loops = [euler_sampler(x0[i : i + 2], [1.0 - j / steps for j in range(steps)]) for i in range(0, samples, 2)]
    return lambda model: torch.cat([loop(model) for loop in loops])


def bundle():
    from ditopt import zoo

    return once("zoo", lambda: zoo.load("dit-digits"))


def profile(passes=None, **top):
    data = {"name": "probe", **top}
    if passes is not None:
        data["passes"] = passes
    return data


def load(data):
    return ditopt.load_profile(data)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> bool:
    a, b = a.double(), b.double()
    if torch.isnan(a).any() or torch.isnan(b).any():
        return bool(torch.equal(torch.isnan(a), torch.isnan(b)))
    return float((a - b).norm() / b.norm().clamp_min(1e-12)) <= tol


def first(out):
    return out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)


def parity(kwargs: dict[str, Any], opt=None, model=None):
    """Call the original and the optimized model on `kwargs`: when the original refuses them,
    the optimized model must refuse them too (the case expects an error); when both run, the
    outputs must match (else Wrong)."""
    model = model or tiny_dit()
    opt = opt or optimized_dit()
    with torch.no_grad():
        try:
            ref = first(model(**kwargs, return_dict=False))
        except Exception:
            ref = None
        out = first(opt(**kwargs, return_dict=False))
    if ref is None:
        return "the original refuses these inputs, the optimized model ran them"
    if not close(out, ref):
        raise Wrong("optimized output differs from the original's")
    return None


# ---------------------------------------------------------------------------------------------
# profiles: values (dicts through load_profile)
# ---------------------------------------------------------------------------------------------
def _bad_budget(name, **budget):
    case("profile.budget", name)(lambda: load(profile(budget=budget)))


def _bad_verify(name, **verify):
    case("profile.verify", name)(lambda: load(profile(verify=verify)))


def _bad_pass(pass_name, label, expect="reject", **fields):
    case("profile.pass", f"{pass_name} {label}", expect)(lambda: load(profile([{"name": pass_name, **fields}])))


_bad_budget("min_psnr_db = true", min_psnr_db=True)
_bad_budget("min_psnr_db = '30'", min_psnr_db="30")
_bad_budget("min_psnr_db = -1", min_psnr_db=-1)
_bad_budget("min_psnr_db = 0", min_psnr_db=0)
_bad_budget("min_psnr_db = nan", min_psnr_db=math.nan)
_bad_budget("min_psnr_db = inf", min_psnr_db=math.inf)
_bad_budget("max_rel_err = true", max_rel_err=True)
_bad_budget("max_rel_err = 0", max_rel_err=0)
_bad_budget("max_rel_err = nan", max_rel_err=math.nan)
_bad_budget("max_rel_err = '1e-4'", max_rel_err="1e-4")
_bad_budget("psnr_confidence = 1.0", psnr_confidence=1.0)
_bad_budget("psnr_confidence = 0.3", psnr_confidence=0.3)
_bad_budget("psnr_confidence = true", psnr_confidence=True)
_bad_budget("retry_margin_db = -1", retry_margin_db=-1)
_bad_budget("retry_margin_db = nan", retry_margin_db=math.nan)
_bad_budget("unknown key min_psnr", min_psnr=30)
case("profile.budget", "min_psnr_db = 30 (int for a float)", "accept")(lambda: load(profile(budget={"min_psnr_db": 30})))
case("profile.budget", "budget = 30 (not a table)")(lambda: load(profile(budget=30)))

_bad_verify("timesteps = 0", timesteps=0)
_bad_verify("timesteps = 1000", timesteps=1000)
_bad_verify("timesteps = 2.5", timesteps=2.5)
_bad_verify("timesteps = 2.0", timesteps=2.0)
_bad_verify("timesteps = true", timesteps=True)
_bad_verify("timesteps = '3'", timesteps="3")
_bad_verify("enabled = 'yes'", enabled="yes")
_bad_verify("enabled = 1", enabled=1)
_bad_verify("seed = 1.5", seed=1.5)
_bad_verify("seed = true", seed=True)
_bad_verify("seed = '7'", seed="7")

case("profile.top", "name missing")(lambda: load({"passes": []}))
case("profile.top", "name = 3")(lambda: load({"name": 3}))
case("profile.top", "version = 2")(lambda: load(profile(version=2)))
case("profile.top", "version = '1'")(lambda: load(profile(version="1")))
case("profile.top", "version = true")(lambda: load(profile(version=True)))
case("profile.top", "backend = 'cuda'")(lambda: load(profile(backend="cuda")))
case("profile.top", "backend = 'tensorrt' (never used by optimize)")(lambda: load(profile(backend="tensorrt")))
case("profile.top", "description = 3")(lambda: load(profile(description=3)))
case("profile.top", "unknown key speed")(lambda: load(profile(speed=3)))
case("profile.top", "passes = 'taylor_forecast'")(lambda: load(profile("taylor_forecast")))
case("profile.top", "passes = [3]")(lambda: load(profile([3])))
case("profile.top", "passes = [{}] (no name)")(lambda: load(profile([{}])))
case("profile.top", "passes = [{name = 3}]")(lambda: load(profile([{"name": 3}])))
case("profile.top", "unknown pass")(lambda: load(profile([{"name": "no_such_pass"}])))
case("profile.top", "passes = [] (identity)", "accept")(lambda: load(profile([])))
case("profile.top", "duplicate pass, same config")(lambda: load(profile([{"name": "conditioning_memo"}, {"name": "conditioning_memo"}])))
case("profile.top", "two caching passes")(lambda: load(profile([{"name": "taylor_forecast"}, {"name": "residual_cache"}])))
case("profile.top", "attention pass twice on disjoint blocks", "accept")(lambda: load(profile([
    {"name": "neighborhood_attention", "blocks": [0], "radius": 1}, {"name": "neighborhood_attention", "blocks": [1], "radius": 2}])))
case("profile.top", "pass order violated (after=)", "either")(lambda: load(profile([{"name": "patch_layout"}, {"name": "calibrated_schedule"}])))
case("profile.api", "load_profile(3)")(lambda: ditopt.load_profile(3))
case("profile.api", "load_profile(None)")(lambda: ditopt.load_profile(None))
case("profile.api", "load_profile(['identity'])")(lambda: ditopt.load_profile(["identity"]))
case("profile.api", "load_profile('')")(lambda: ditopt.load_profile(""))

_bad_pass("taylor_forecast", "interval = true", interval=True)
_bad_pass("taylor_forecast", "interval = 2.7", interval=2.7)
_bad_pass("taylor_forecast", "interval = 2.0", interval=2.0)
_bad_pass("taylor_forecast", "interval = '3'", interval="3")
_bad_pass("taylor_forecast", "interval = 0", interval=0)
_bad_pass("taylor_forecast", "order = 3", order=3)
_bad_pass("taylor_forecast", "order = -1", order=-1)
_bad_pass("taylor_forecast", "order = true", order=True)
_bad_pass("taylor_forecast", "warmup = 0", warmup=0)
_bad_pass("taylor_forecast", "target = 'foo'", target="foo")
_bad_pass("taylor_forecast", "unknown key ordr", ordr=1)
_bad_pass("taylor_forecast", "order = 1 (valid)", expect="accept", order=1)
_bad_pass("residual_cache", "start = -1", start=-1)
_bad_pass("residual_cache", "end = 0", end=0)
_bad_pass("residual_cache", "start = 3, end = 2", start=3, end=2)
_bad_pass("residual_cache", "phase_boundary = 1.0", phase_boundary=1.0)
_bad_pass("residual_cache", "phase = 'mid'", phase="mid")
_bad_pass("residual_cache", "order = 1.5", order=1.5)
_bad_pass("residual_cache", "interval = false", interval=False)
_bad_pass("delta_cache", "split = 0", split=0)
_bad_pass("delta_cache", "boundary = 0", boundary=0)
_bad_pass("delta_cache", "interval = true", interval=True)
_bad_pass("delta_cache", "warmup = 1.0", warmup=1.0)
_bad_pass("calibrated_schedule", "history = 0", history=0)
_bad_pass("calibrated_schedule", "history = 5", history=5)
_bad_pass("calibrated_schedule", "order = 3", order=3)
_bad_pass("calibrated_schedule", "order = -1", order=-1)
_bad_pass("calibrated_schedule", "order = '2'", order="2")
_bad_pass("calibrated_schedule", "order = true", order=True)
_bad_pass("calibrated_schedule", "warmup = 0", warmup=0)
_bad_pass("calibrated_schedule", "warmup = true", warmup=True)
_bad_pass("calibrated_schedule", "alpha = -1", alpha=-1)
_bad_pass("calibrated_schedule", "alpha = nan", alpha=math.nan)
_bad_pass("calibrated_schedule", "alpha = true", alpha=True)
_bad_pass("calibrated_schedule", "computed_steps = 0", computed_steps=0)
_bad_pass("calibrated_schedule", "compute_steps = [-1, 0]", order=1, forecast="taylor", compute_steps=[-1, 0])
_bad_pass("calibrated_schedule", "compute_steps = []", order=1, forecast="taylor", compute_steps=[])
_bad_pass("calibrated_schedule", "compute_steps = [1, 0] (no step 0 first / unsorted)", order=1, forecast="taylor", compute_steps=[1, 0])
_bad_pass("calibrated_schedule", "compute_steps = [0, 0, 2]", order=1, forecast="taylor", compute_steps=[0, 0, 2])
_bad_pass("calibrated_schedule", "compute_steps = [0, 1.5]", order=1, forecast="taylor", compute_steps=[0, 1.5])
_bad_pass("calibrated_schedule", "compute_steps = [0, true]", order=1, forecast="taylor", compute_steps=[0, True])
_bad_pass("calibrated_schedule", "cond_only_steps = [-1]", cond_only_steps=[-1])
_bad_pass("calibrated_schedule", "margin_db = -1", margin_db=-1)
_bad_pass("calibrated_schedule", "cond_only_cost = 0", cond_only_cost=0)
_bad_pass("calibrated_schedule", "cond_only_cost = 2", cond_only_cost=2)
_bad_pass("calibrated_schedule", "cfg_delta_order = 2", cfg_delta_order=2)
_bad_pass("calibrated_schedule", "per_channel = 'no'", per_channel="no")
_bad_pass("calibrated_schedule", "per_channel = 1", per_channel=1)
_bad_pass("calibrated_schedule", "forecast = 'linear'", forecast="linear")
_bad_pass("calibrated_schedule", "on_mismatch = 'ignore'", on_mismatch="ignore")
_bad_pass("calibrated_schedule", "span_starts without span_compute_steps", span_starts=[1])
_bad_pass("calibrated_schedule", "span_starts = [0]", order=1, forecast="taylor", target="residual", span_starts=[0], span_compute_steps=[[0], [0]])
_bad_pass("calibrated_schedule", "span_starts = [2, 1] (not rising)", order=1, forecast="taylor", span_starts=[2, 1], span_compute_steps=[[0], [0], [0]])
_bad_pass("calibrated_schedule", "order = 'auto' (valid)", expect="accept", order="auto")
_bad_pass("probe_cache", "threshold = -0.1", threshold=-0.1)
_bad_pass("probe_cache", "threshold = nan", threshold=math.nan)
_bad_pass("probe_cache", "threshold = inf", threshold=math.inf)
_bad_pass("probe_cache", "threshold = true", threshold=True)
_bad_pass("probe_cache", "probe_blocks = 0", probe_blocks=0)
_bad_pass("probe_cache", "max_cached = 0", max_cached=0)
_bad_pass("probe_cache", "margin_db = nan", margin_db=math.nan)
_bad_pass("confidence_forecast", "threshold = -1", threshold=-1)
_bad_pass("confidence_forecast", "order = 0", order=0)
_bad_pass("confidence_forecast", "order = 3", order=3)
_bad_pass("neighborhood_attention", "radius = -1", radius=-1)
_bad_pass("neighborhood_attention", "radius = true", radius=True)
_bad_pass("neighborhood_attention", "radius = 1.5", radius=1.5)
_bad_pass("neighborhood_attention", "radius = '1'", radius="1")
_bad_pass("neighborhood_attention", "tile = 0", tile=0)
_bad_pass("neighborhood_attention", "tile = -4", tile=-4)
_bad_pass("neighborhood_attention", "tile = true", tile=True)
_bad_pass("neighborhood_attention", "min_mass = 1.5", min_mass=1.5)
_bad_pass("neighborhood_attention", "min_mass = nan", min_mass=math.nan)
_bad_pass("neighborhood_attention", "max_cost = 0", max_cost=0)
_bad_pass("neighborhood_attention", "max_cost = nan", max_cost=math.nan)
_bad_pass("neighborhood_attention", "dense_steps = -1", dense_steps=-1)
_bad_pass("neighborhood_attention", "dense_steps = true", dense_steps=True)
_bad_pass("neighborhood_attention", "blocks = [-1]", blocks=[-1])
_bad_pass("neighborhood_attention", "blocks = [0, 0]", blocks=[0, 0])
_bad_pass("neighborhood_attention", "blocks = []", blocks=[])
_bad_pass("neighborhood_attention", "reorder = 'twice'", reorder="twice")
_bad_pass("neighborhood_attention", "radius = 0 (not calibrated: every layer would stay dense)", radius=0)
_bad_pass("neighborhood_attention", "radius = 4 (not calibrated)", radius=4)
_bad_pass("neighborhood_attention", "tile = 3 (not calibrated)", tile=3)
_bad_pass("neighborhood_attention", "radius = 2, min_mass = 1 (valid)", expect="accept", radius=2, min_mass=1)
_bad_pass("block_sparse_attention", "rho = 1.5", rho=1.5)
_bad_pass("block_sparse_attention", "rho = 0", rho=0)
_bad_pass("block_sparse_attention", "rho = -0.1", rho=-0.1)
_bad_pass("block_sparse_attention", "rho = nan", rho=math.nan)
_bad_pass("block_sparse_attention", "rho = true", rho=True)
_bad_pass("block_sparse_attention", "rho = '0.5'", rho="0.5")
_bad_pass("block_sparse_attention", "compensate = 'yes'", compensate="yes")
_bad_pass("block_sparse_attention", "compensate = 1", compensate=1)
_bad_pass("block_sparse_attention", "tile = 0", tile=0)
_bad_pass("block_sparse_attention", "max_cost = -1", max_cost=-1)
_bad_pass("block_sparse_attention", "rho = 1 (keeps every block; not calibrated)", rho=1)
_bad_pass("block_sparse_attention", "rho = 0.3 (not calibrated)", rho=0.3)
_bad_pass("block_sparse_attention", "rho = 0.25, tile = 4 (valid)", expect="accept", rho=0.25, tile=4)
_bad_pass("conditioning_memo", "min_ops = true", min_ops=True)
_bad_pass("conditioning_memo", "max_entries = 0", max_entries=0)
_bad_pass("conditioning_memo", "max_key_numel = 2.0", max_key_numel=2.0)
_bad_pass("conditioning_memo", "max_bytes = '1MB'", max_bytes="1MB")
_bad_pass("patch_layout", "unknown key tile", tile=8)


# ---------------------------------------------------------------------------------------------
# profiles: files
# ---------------------------------------------------------------------------------------------
TMP = Path(tempfile.mkdtemp(prefix="ditopt-probe-"))


def _file(name: str, data: bytes) -> Path:
    path = TMP / name
    path.write_bytes(data)
    return path


case("profile.file", "not UTF-8 (latin-1 description)")(lambda: ditopt.load_profile(_file("latin1.toml", 'name = "p"\ndescription = "caf\xe9"\n'.encode("latin-1"))))
case("profile.file", "not UTF-8, no .toml suffix")(lambda: ditopt.load_profile(_file("latin1.prof", b'name = "\xff"\n')))
case("profile.file", "invalid TOML")(lambda: ditopt.load_profile(_file("bad.toml", b'name = "p\n[[passes]\n')))
case("profile.file", "empty file")(lambda: ditopt.load_profile(_file("empty.toml", b"")))
case("profile.file", "a directory")(lambda: ditopt.load_profile(TMP))
case("profile.file", "a directory named x.toml")(lambda: ditopt.load_profile((TMP / "dir.toml").mkdir(exist_ok=True) or TMP / "dir.toml"))
case("profile.file", "missing x.toml")(lambda: ditopt.load_profile(TMP / "missing.toml"))
case("profile.file", "missing, other suffix")(lambda: ditopt.load_profile(str(TMP / "missing.yaml")))
case("profile.file", "JSON file")(lambda: ditopt.load_profile(_file("p.json", b'{"name": "p"}')))
case("profile.file", "TOML datetime for a number")(lambda: ditopt.load_profile(_file("dt.toml", b'name = "p"\n[budget]\nmin_psnr_db = 1979-05-27\n')))
case("profile.file", "interval = true in a file")(lambda: ditopt.load_profile(_file("bool.toml", b'name = "p"\n[[passes]]\nname = "taylor_forecast"\ninterval = true\n')))
case("profile.file", "UTF-8 BOM", "either")(lambda: ditopt.load_profile(_file("bom.toml", b'\xef\xbb\xbfname = "p"\n')))
case("profile.file", "valid file with min_psnr_db = 30", "accept")(lambda: ditopt.load_profile(_file("ok.toml", b'name = "p"\n[budget]\nmin_psnr_db = 30\n')))


# ---------------------------------------------------------------------------------------------
# model specs (resolve_model) and the zoo
# ---------------------------------------------------------------------------------------------
def factory_raises():
    raise RuntimeError("boom from the user's factory")


def factory_returns_str():
    return "not a model"


def factory_bad_pair():
    return tiny_dit(), "not a dict of inputs"


not_callable = 3


def _resolve(spec: str):
    from ditopt.cli.models import resolve_model

    return resolve_model(spec)


for _spec in ["no-such-model", "", "nosuchpkg.mod:factory", "os:nosuch", ":factory", "os:", "os.path:join",
              "__main__:factory_raises", "__main__:factory_returns_str", "__main__:not_callable", "a..b:c", "json:loads"]:
    case("model.spec", f"resolve_model({_spec!r})")(lambda s=_spec: _resolve(s))
case("model.spec", "factory returning (model, 'not a dict')")(lambda: ditopt.optimize(_resolve("__main__:factory_bad_pair").model, "identity",
                                                                                       example_inputs=_resolve("__main__:factory_bad_pair").example_inputs))
case("model.zoo", "zoo.load('nope')")(lambda: __import__("ditopt.zoo", fromlist=["load"]).load("nope"))
case("model.zoo", "zoo.load(3)")(lambda: __import__("ditopt.zoo", fromlist=["load"]).load(3))


# ---------------------------------------------------------------------------------------------
# zoo sampling: labels, seeds, steps
# ---------------------------------------------------------------------------------------------
def _sample(**kw):
    kw.setdefault("steps", 2)
    kw.setdefault("classes", [1])
    kw.setdefault("seeds", [0])
    out = bundle().sample(**kw)
    if not torch.isfinite(out).all():
        raise Wrong("samples are not finite")
    return out


case("zoo.sample", "classes=[10] on a 10-class model")(lambda: _sample(classes=[10]))
case("zoo.sample", "classes=[-1]")(lambda: _sample(classes=[-1]))
case("zoo.sample", "classes=[1.5]")(lambda: _sample(classes=[1.5]))
case("zoo.sample", "classes='3'")(lambda: _sample(classes="3"))
case("zoo.sample", "classes=[True]")(lambda: _sample(classes=[True]))
case("zoo.sample", "2 classes, 1 seed")(lambda: _sample(classes=[1, 2], seeds=[0]))
case("zoo.sample", "seeds=[1.5]")(lambda: _sample(seeds=[1.5]))
case("zoo.sample", "steps=0")(lambda: _sample(steps=0))
case("zoo.sample", "steps=-1")(lambda: _sample(steps=-1))
case("zoo.sample", "steps=2.5")(lambda: _sample(steps=2.5))
case("zoo.sample", "guidance_scale=nan")(lambda: _sample(guidance_scale=math.nan))
case("zoo.sample", "batch_size=-1")(lambda: _sample(batch_size=-1))
case("zoo.sample", "eta=-1")(lambda: _sample(eta=-1.0))
case("zoo.sample", "model='dit-digits' (a string)")(lambda: _sample(model="dit-digits"))
case("zoo.sample", "classes=[9], 2 steps (valid)", "accept")(lambda: _sample(classes=[9]))
case("zoo.sample", "classes=torch.tensor([3]) (valid)", "accept")(lambda: _sample(classes=torch.tensor([3])))
case("zoo.sample", "make_inputs(batch_size=0)")(lambda: bundle().make_inputs(0))


# ---------------------------------------------------------------------------------------------
# optimize(): arguments
# ---------------------------------------------------------------------------------------------
case("optimize.args", "model=None")(lambda: ditopt.optimize(None, "identity"))
case("optimize.args", "model='tiny-dit' (a string)")(lambda: ditopt.optimize("tiny-dit", "identity"))
case("optimize.args", "model=a function")(lambda: ditopt.optimize(lambda x: x, "identity", example_inputs={"x": torch.ones(1)}))
case("optimize.args", "profile=3")(lambda: ditopt.optimize(tiny_dit(), 3))
case("optimize.args", "profile=None")(lambda: ditopt.optimize(tiny_dit(), None))
case("optimize.args", "example_inputs as a tensor")(lambda: ditopt.optimize(tiny_dit(), "identity", example_inputs=torch.randn(1, 4, 8, 8)))
case("optimize.args", "example_inputs as a list")(lambda: ditopt.optimize(tiny_dit(), "identity", example_inputs=[torch.randn(1, 4, 8, 8)]))
case("optimize.args", "example_inputs={}")(lambda: ditopt.optimize(tiny_dit(), "identity", example_inputs={}))
case("optimize.args", "example_inputs unknown keyword")(lambda: ditopt.optimize(tiny_dit(), "identity", example_inputs={**dit_inputs(), "foo": 1}))
case("optimize.args", "example_inputs hidden_states with 3 channels")(lambda: ditopt.optimize(tiny_dit(), "identity", example_inputs=dit_inputs(hidden_states=torch.randn(1, 3, 8, 8))))
case("optimize.args", "example_inputs hidden_states rank 3")(lambda: ditopt.optimize(tiny_dit(), "identity", example_inputs=dit_inputs(hidden_states=torch.randn(1, 4, 64))))
case("optimize.args", "example_inputs float64 latents", "either")(lambda: ditopt.optimize(tiny_dit(), "identity", example_inputs=dit_inputs(hidden_states=torch.randn(1, 4, 8, 8, dtype=torch.float64))))
case("optimize.args", "example_inputs NaN latents")(lambda: ditopt.optimize(tiny_dit(), "identity", example_inputs=dit_inputs(hidden_states=torch.full((1, 4, 8, 8), math.nan))))
case("optimize.args", "example_inputs class_labels=11 (beyond the table)")(lambda: ditopt.optimize(tiny_dit(), "identity", example_inputs=dit_inputs(class_labels=torch.tensor([11]))))
case("optimize.args", "example_inputs class_labels float")(lambda: ditopt.optimize(tiny_dit(), "identity", example_inputs=dit_inputs(class_labels=torch.tensor([1.0]))))
case("optimize.args", "example_inputs batch 0")(lambda: ditopt.optimize(tiny_dit(), "identity", example_inputs=dit_inputs(batch=0)))
case("optimize.args", "max_retries=-1")(lambda: ditopt.optimize(toy(), {"name": "p", "budget": {"min_psnr_db": 20}, "passes": [{"name": "taylor_forecast", "interval": 2}]},
                                                                 example_inputs=toy_inputs(), calibration=toy_sampler(), max_retries=-1))
case("optimize.args", "max_retries='2'")(lambda: ditopt.optimize(tiny_dit(), "identity", max_retries="2"))
case("optimize.args", "on_gate_miss='ignore'")(lambda: ditopt.optimize(tiny_dit(), "identity", on_gate_miss="ignore"))
case("optimize.args", "num_steps=0")(lambda: ditopt.optimize(toy(), {"name": "p", "passes": [{"name": "taylor_forecast"}]}, example_inputs=toy_inputs(), num_steps=0))
case("optimize.args", "num_steps=-3")(lambda: ditopt.optimize(toy(), {"name": "p", "passes": [{"name": "taylor_forecast"}]}, example_inputs=toy_inputs(), num_steps=-3))
case("optimize.args", "stats='x'")(lambda: ditopt.optimize(tiny_dit(), "identity", stats="x"))
case("optimize.args", "calibration not callable")(lambda: ditopt.optimize(toy(), {"name": "p", "passes": [{"name": "calibrated_schedule"}], "budget": {"min_psnr_db": 20}},
                                                                          example_inputs=toy_inputs(), calibration="samples"))
case("optimize.args", "calibration returns None")(lambda: ditopt.optimize(toy(), {"name": "p", "passes": [{"name": "calibrated_schedule"}], "budget": {"min_psnr_db": 20}},
                                                                          example_inputs=toy_inputs(), calibration=lambda m: (toy_sampler()(m), None)[1]))
case("optimize.args", "calibration returns a list")(lambda: ditopt.optimize(toy(), {"name": "p", "passes": [{"name": "calibrated_schedule"}], "budget": {"min_psnr_db": 20}},
                                                                            example_inputs=toy_inputs(), calibration=lambda m: [toy_sampler()(m)]))
case("optimize.args", "calibration returns NaN")(lambda: ditopt.optimize(toy(), {"name": "p", "passes": [{"name": "calibrated_schedule"}], "budget": {"min_psnr_db": 20}},
                                                                         example_inputs=toy_inputs(), calibration=lambda m: toy_sampler()(m) * math.nan))
case("optimize.args", "calibration never calls the model")(lambda: ditopt.optimize(toy(), {"name": "p", "passes": [{"name": "calibrated_schedule"}], "budget": {"min_psnr_db": 20}},
                                                                                   example_inputs=toy_inputs(), calibration=lambda m: torch.ones(4, 4, 8)))
case("optimize.args", "validation ignores its model")(lambda: ditopt.optimize(toy(), {"name": "p", "passes": [{"name": "calibrated_schedule"}], "budget": {"min_psnr_db": 20}},
                                                                              example_inputs=toy_inputs(), calibration=toy_sampler(),
                                                                              validation=lambda m, ref=toy_sampler(): ref(toy())))
@case("optimize.args", "model in train mode", "either")
def _train_mode():
    """The issue's case: a model left in train mode was reported as a per-call mismatch of
    `identity`. A warning (and an exact result) or an error naming train mode is right."""
    try:
        ditopt.optimize(fresh_dit().train(), "identity")
    except ditopt.QualityGateError as exc:
        raise Wrong(f"reported as a quality gate miss: {str(exc)[:120]}") from None
case("optimize.args", "budget + step pass, no calibration/validation")(lambda: ditopt.optimize(toy(), {"name": "p", "budget": {"min_psnr_db": 30}, "passes": [{"name": "taylor_forecast"}]},
                                                                                              example_inputs=toy_inputs(), num_steps=6))


@case("optimize.args", "user model unchanged after .half() on the optimized module", "accept")
def _half_writes_through():
    model = fresh_dit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = ditopt.optimize(model, "identity")
    opt.half()
    changed = [k for k, v in model.state_dict().items() if v.dtype != before[k].dtype or not torch.equal(v, before[k])]
    if changed:
        raise Wrong(f"the user's model changed ({len(changed)} tensors, e.g. {changed[0]})")


# ---------------------------------------------------------------------------------------------
# calls on an optimized model
# ---------------------------------------------------------------------------------------------
case("runtime", "batch 2 (captured at 1)", "accept")(lambda: parity(dit_inputs(batch=2)))
case("runtime", "batch 3 (odd)", "accept")(lambda: parity(dit_inputs(batch=3)))
case("runtime", "resolution 16 (captured at 8)", "either")(lambda: parity(dit_inputs(hidden_states=torch.randn(1, 4, 16, 16))))
case("runtime", "positional call opt(x, t, labels)", "accept")(lambda: _positional())
case("runtime", "class_labels=10 (null class, in the table)", "accept")(lambda: parity(dit_inputs(class_labels=torch.tensor([10]))))
case("runtime", "class_labels=11 (beyond the table)")(lambda: parity(dit_inputs(class_labels=torch.tensor([11]))))
case("runtime", "class_labels=-1")(lambda: parity(dit_inputs(class_labels=torch.tensor([-1]))))
case("runtime", "class_labels float")(lambda: parity(dit_inputs(class_labels=torch.tensor([1.0]))))
case("runtime", "class_labels batch 2 for latents batch 1")(lambda: parity(dit_inputs(class_labels=torch.tensor([1, 2]))))
case("runtime", "hidden_states with 3 channels")(lambda: parity(dit_inputs(hidden_states=torch.randn(1, 3, 8, 8))))
case("runtime", "hidden_states rank 3")(lambda: parity(dit_inputs(hidden_states=torch.randn(1, 4, 64))))
case("runtime", "missing timestep")(lambda: parity({k: v for k, v in dit_inputs().items() if k != "timestep"}))
case("runtime", "unknown keyword")(lambda: parity({**dit_inputs(), "foo": torch.ones(1)}))
case("runtime", "NaN latents (the original gives NaN too)", "either")(lambda: parity(dit_inputs(hidden_states=torch.full((1, 4, 8, 8), math.nan))))
case("runtime", "timestep as a python int", "either")(lambda: parity(dit_inputs(timestep=500)))
case("runtime", "float64 latents", "either")(lambda: parity(dit_inputs(hidden_states=torch.randn(1, 4, 8, 8, dtype=torch.float64))))


def _positional():
    kw = dit_inputs()
    with torch.no_grad():
        ref = first(tiny_dit()(**kw, return_dict=False))
        out = first(optimized_dit()(kw["hidden_states"], kw["timestep"], kw["class_labels"], return_dict=False))
    if not close(out, ref):
        raise Wrong("positional call differs from the original")


@case("runtime", "zoo optimized model, class_labels=11")
def _zoo_label():
    b = bundle()
    opt = once("opt_zoo", lambda: ditopt.optimize(b.model, "identity", example_inputs=b.make_inputs(1)))
    kw = b.make_inputs(1)
    kw["class_labels"] = torch.tensor([11, 3])
    with torch.no_grad():
        opt(**kw)


def _scheduled(on_mismatch: str, steps: int, calib_steps: int = 6):
    prof = {"name": "p", "budget": {"min_psnr_db": 10}, "passes": [{"name": "calibrated_schedule", "computed_steps": 4, "order": 1,
                                                                 "forecast": "taylor", "on_mismatch": on_mismatch}]}
    key = f"sched-{on_mismatch}"
    model = once(f"toy-{on_mismatch}", toy)
    opt = once(key, lambda: ditopt.optimize(model, prof, example_inputs=toy_inputs(), calibration=toy_sampler(calib_steps), max_retries=0, on_gate_miss="return"))
    opt.reset()
    with torch.no_grad():
        out = toy_sampler(steps)(opt)
        ref = toy_sampler(steps)(model)
    if not torch.isfinite(out).all():
        raise Wrong("non-finite samples")
    db = 10 * math.log10(float(ref.abs().max()) ** 2 / max(float((out - ref).pow(2).mean()), 1e-30))
    if db < 10:
        raise Wrong(f"{steps}-step samples at {db:.1f} dB")


case("runtime", "12 steps on a 6-step calibration (rederive)", "accept")(lambda: _scheduled("rederive", 12))
case("runtime", "12 steps on a 6-step calibration (on_mismatch=error)")(lambda: _scheduled("error", 12))
case("runtime", "3 steps on a 6-step calibration (rederive)", "accept")(lambda: _scheduled("rederive", 3))


@case("runtime", "taylor_forecast num_steps=4, sampled with 8 steps", "either")
def _taylor_more_steps():
    model = toy()
    opt = ditopt.optimize(model, {"name": "p", "passes": [{"name": "taylor_forecast", "interval": 2, "warmup": 1}]},
                          example_inputs=toy_inputs(), num_steps=4)
    with torch.no_grad():
        out, ref = toy_sampler(8)(opt), toy_sampler(8)(model)
    if not close(out, ref, 0.2):
        raise Wrong("8-step samples far from the original")


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def cli(*args: str, patch: dict[str, Any] | None = None):
    """Run the CLI; exit 2 (or a usage error) with a message is a named error, another
    exception escaping is raw, exit 0 is an accepted input. `patch` replaces attributes (dotted
    paths) with functions raising Reached: a command that gets there accepted its inputs."""
    from typer.testing import CliRunner

    from ditopt.cli import app

    undo = []
    for dotted, _ in (patch or {}).items():
        mod_name, _, attr = dotted.rpartition(".")
        mod = sys.modules.get(mod_name) or __import__(mod_name, fromlist=[attr])
        undo.append((mod, attr, getattr(mod, attr)))

        def reached(*a, _d=dotted, **k):
            raise Reached(_d)

        setattr(mod, attr, reached)
    try:
        result = CliRunner().invoke(app, list(args))
    finally:
        for mod, attr, old in undo:
            setattr(mod, attr, old)
    if isinstance(result.exception, Reached):
        return "accepted (got to " + str(result.exception) + ")"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    if result.exit_code == 0:
        return "exit 0"
    message = " ".join(result.output.split())[-300:]
    raise CliError(f"exit {result.exit_code}: {message}")


class CliError(DitoptError):
    """The CLI refused with an exit code and a message (counted as a named error)."""


case("cli", "inspect no-such-model")(lambda: cli("inspect", "no-such-model"))
case("cli", "inspect ':factory'")(lambda: cli("inspect", ":factory"))
case("cli", "inspect os.path:join (factory needs arguments)")(lambda: cli("inspect", "os.path:join"))
case("cli", "inspect __main__:factory_raises")(lambda: cli("inspect", "__main__:factory_raises"))
case("cli", "optimize -p latin-1 file")(lambda: cli("optimize", "tiny-dit", "-p", str(_file("cli-latin1.toml", 'name = "caf\xe9"\n'.encode("latin-1")))))
case("cli", "optimize -p a directory")(lambda: cli("optimize", "tiny-dit", "-p", str(TMP)))
case("cli", "optimize -p invalid TOML")(lambda: cli("optimize", "tiny-dit", "-p", str(_file("cli-bad.toml", b"name = ["))))
case("cli", "optimize -p interval = true")(lambda: cli("optimize", "tiny-dit", "-p", str(_file("cli-bool.toml", b'name = "p"\n[[passes]]\nname = "taylor_forecast"\ninterval = true\n'))))
case("cli", "optimize --report into a missing folder", "either")(lambda: cli("optimize", "tiny-dit", "--report", str(TMP / "no" / "such" / "r.json")))
case("cli", "export to a path that is a file")(lambda: cli("export", "tiny-dit", str(_file("a-file", b"x")), "--no-verify"))
case("cli", "bench attention --tile 0")(lambda: cli("bench", "attention", "--tile", "0", "--grid", "8", "8"))
case("cli", "bench attention --radius -1")(lambda: cli("bench", "attention", "--radius", "-1", "--grid", "8", "8"))
case("cli", "bench attention --grid 0 0")(lambda: cli("bench", "attention", "--grid", "0", "0"))
case("cli", "bench attention --heads 0")(lambda: cli("bench", "attention", "--heads", "0", "--grid", "8", "8"))
case("cli", "demo --model nope")(lambda: cli("demo", "--model", "nope"))
case("cli", "demo --threads 0")(lambda: cli("demo", "--threads", "0", patch={"ditopt.optimize": None}))
case("cli", "demo --repeats 0")(lambda: cli("demo", "--repeats", "0", "--out", str(TMP / "demo"), patch={"ditopt.optimize": None}))
case("cli", "demo -p latin-1 file")(lambda: cli("demo", "-p", str(TMP / "cli-latin1.toml"), "--out", str(TMP / "demo")))
case("cli", "bench models --samples 0")(lambda: cli("bench", "models", "--samples", "0", "--out", str(TMP / "b"), patch={"ditopt.bench.run_models": None}))
case("cli", "bench models --batch 0")(lambda: cli("bench", "models", "--batch", "0", "--out", str(TMP / "b"), patch={"ditopt.bench.run_models": None}))
case("cli", "bench models --model nope")(lambda: cli("bench", "models", "--model", "nope", "--out", str(TMP / "b"), patch={"ditopt.bench.run_models": None}))
case("cli", "bench models --threads 0")(lambda: cli("bench", "models", "--threads", "0", "--out", str(TMP / "b"), patch={"ditopt.bench.run_models": None}))


# ---------------------------------------------------------------------------------------------
# runner
# ---------------------------------------------------------------------------------------------
def _ours(filename: str) -> bool:
    path = os.path.abspath(filename)
    return any(path.startswith(r) for r in CODE_ROOTS) and "/.venv/" not in path and not path.startswith(str(Path(__file__).parent))


def _where(exc: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if _ours(f.filename)]
    frame = frames[-1] if frames else (traceback.extract_tb(exc.__traceback__) or [None])[-1]
    if frame is None:
        return ""
    base = next((r for r in CODE_ROOTS if os.path.abspath(frame.filename).startswith(r)), str(ROOT))
    return f" [{os.path.relpath(frame.filename, base)}:{frame.lineno}]"


def run_case(c: Case) -> dict[str, Any]:
    start = time.perf_counter()
    sink = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(sink):
        warnings.simplefilter("always")
        try:
            note = c.fn()
            error = None
        except Wrong as exc:
            error, outcome, detail = exc, "silent_wrong", str(exc)
        except DitoptError as exc:
            error, outcome, detail = exc, "named_error", f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # noqa: BLE001 -- the point of the probe
            error, outcome, detail = exc, "raw_exception", f"{type(exc).__name__}: {str(exc)[:300]}{_where(exc)}"
    ours = [w for w in caught if issubclass(w.category, DitoptWarning) or _ours(w.filename)]
    if error is None:
        if ours:
            outcome, detail = "warning", f"{ours[0].category.__name__}: {ours[0].message}"
        else:
            outcome = "silent_accept" if c.expect == "reject" else "ok"
            detail = str(note) if note is not None else ""
            if isinstance(note, str) and note.startswith("the original refuses"):
                outcome = "silent_accept"
    if outcome == "named_error" and c.expect == "accept":
        outcome = "rejected_valid"
    if outcome == "warning" and c.expect == "accept":
        outcome = "ok"
    return {"group": c.group, "case": c.name, "expect": c.expect, "outcome": outcome,
            "detail": " ".join(detail.split())[:400], "seconds": round(time.perf_counter() - start, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "probes" / "bad_inputs.json")
    parser.add_argument("--only", default=None, help="run only the groups starting with this")
    parser.add_argument("--label", default="", help="stored in the JSON (e.g. 'before' / 'after')")
    args = parser.parse_args()
    cases = [c for c in CASES if args.only is None or c.group.startswith(args.only)]
    results = []
    width = max(len(f"{c.group}: {c.name}") for c in cases)
    for c in cases:
        r = run_case(c)
        results.append(r)
        flag = "BUG " if r["outcome"] in BUGS else "    "
        print(f"{flag}{(r['group'] + ': ' + r['case']).ljust(width)}  {r['outcome']:<14} {r['detail'][:160]}", flush=True)
    counts = {o: sum(r["outcome"] == o for r in results) for o in OUTCOMES}
    counts["total"] = len(results)
    counts["bugs"] = sum(counts[o] for o in BUGS)
    print("\ncounts: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"label": args.label, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                                     "torch": torch.__version__, "counts": counts, "cases": results}, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
