"""Property-based trust checks (hypothesis), derandomized so that CI sees the same examples.

* Any profile, however wrong (random pass names from the registry, random keys, values of every
  type and range, files of random bytes), loads as a valid Profile or raises InvalidProfileError;
  never another exception, and a valid one round-trips and holds no value coerced from another type.
* Small random DiT / PixArt configs with exact profiles and random inputs: `optimize` raises a
  ditopt error or returns a model that matches the original (relative error <= 1e-4), and the
  user's model's state_dict is bitwise unchanged, after optimize and after calls on the result.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, note, settings
from hypothesis import strategies as st

import ditopt
from ditopt.errors import DitoptError, InvalidProfileError, ProfileWarning
from ditopt.profiles import Budget, Profile, VerifySettings
from ditopt.registry import available_passes

PASSES = available_passes()
PASS_NAMES = sorted(PASSES)

PROFILE_SETTINGS = settings(max_examples=400, deadline=None, derandomize=True, database=None,
                            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

# -- random profiles --------------------------------------------------------------------------------
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 70),
    st.sampled_from([0.0, 0.125, 0.25, 0.5, 1.0, 1.5, -0.1, 2.0, 30.0, 1e-4, math.nan, math.inf, -math.inf]),
    st.floats(-10, 100, allow_nan=False),
    st.sampled_from(["auto", "3", "0.5", "true", "", "features", "residual", "taylor", "once", "x"]),
)
values = st.one_of(
    scalars,
    st.lists(st.one_of(st.integers(-2, 9), st.booleans(), st.sampled_from([1.5, 2.0])), max_size=5),
    st.lists(st.lists(st.integers(0, 8), max_size=4), max_size=3),
    st.dictionaries(st.sampled_from(["a", "name"]), st.integers(0, 3), max_size=2),
)


def near(default):
    """Values a user plausibly writes for a field with this default: it, its neighbours, 'auto'."""
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, int):
        return st.sampled_from([default, default + 1, max(default - 1, 0), 2 * default])
    if isinstance(default, float):
        return st.sampled_from([default, default / 2, min(default * 2, 1.0), 0.5])
    if isinstance(default, str):
        return st.sampled_from([default, "auto"])
    return st.just(default)


@st.composite
def field_value(draw, model, key):
    """Mostly near the field's default (so that valid profiles come up), else anything."""
    field = model.model_fields.get(key)
    if field is not None and draw(st.integers(0, 4)):
        return draw(near(field.default))
    return draw(values)


@st.composite
def pass_entries(draw):
    if draw(st.integers(0, 29)) == 0:  # now and then: not a pass table at all, or a bad name
        return draw(st.one_of(st.integers(), st.text(max_size=3), st.fixed_dictionaries({"name": st.sampled_from(["nope", 3, None])})))
    name = draw(st.sampled_from(PASS_NAMES))
    config = PASSES[name].config
    fields = sorted(config.model_fields)
    keys = draw(st.lists(st.sampled_from(fields + ["bogus"]) if fields else st.just("bogus"), max_size=3, unique=True))
    if draw(st.integers(0, 3)):
        keys = [k for k in keys if k != "bogus"]
    return {"name": name, **{k: draw(field_value(config, k)) for k in keys}}


@st.composite
def section(draw, model):
    keys = draw(st.lists(st.sampled_from(sorted(model.model_fields)), max_size=3, unique=True))
    if draw(st.integers(0, 9)) == 0:
        keys.append("bogus")
    return {k: draw(field_value(model, k)) for k in keys}


@st.composite
def profiles(draw):
    data = draw(st.fixed_dictionaries(
        {"passes": st.lists(pass_entries(), max_size=2)},
        optional={
            "name": st.sampled_from(["p"] * 7 + [3]),
            "budget": section(Budget),
            "verify": section(VerifySettings),
            "backend": st.sampled_from(["pytorch"] * 8 + ["onnxruntime", "tensorrt", "cuda", 1]),
            "version": st.sampled_from([1] * 8 + [2, "1", True, 1.0]),
        },
    ))
    data.setdefault("name", "p")
    if draw(st.integers(0, 7)) == 0:  # rarely: a key no profile has, or a section that is not a table
        data[draw(st.sampled_from(["bogus", "budget", "verify", "passes"]))] = draw(values)
    return data


def _given_bools_stay_bools(data: dict, profile: Profile) -> None:
    """No value of a valid profile was coerced from a boolean, a string or a fractional float."""
    for entry, raw in zip(profile.passes, data["passes"]):
        for key, raw_value in raw.items():
            if key == "name":
                continue
            got = getattr(entry.config, key)
            if isinstance(raw_value, bool):
                assert isinstance(got, bool), (entry.name, key, raw_value, got)
            if isinstance(raw_value, str):
                assert isinstance(got, str), (entry.name, key, raw_value, got)
            if isinstance(raw_value, float):
                assert isinstance(got, float) or got is None, (entry.name, key, raw_value, got)


@PROFILE_SETTINGS
@given(profiles())
def test_any_profile_dict_loads_or_is_an_invalid_profile_error(data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProfileWarning)
        try:
            profile = ditopt.load_profile(data)
        except InvalidProfileError as exc:
            assert str(exc)  # and never an empty message
            note(str(exc))
            event("InvalidProfileError")
            return
    event(f"valid, {len(profile.passes)} passes")
    assert isinstance(profile, Profile)
    _given_bools_stay_bools(data, profile)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProfileWarning)
        assert Profile.model_validate(profile.dump()) == profile


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(st.one_of(
    st.binary(max_size=80),
    st.text(max_size=60).map(lambda t: t.encode("utf-8")),
    st.sampled_from([b'name = "p"\n', b'name = "p"\n[[passes]]\nname = "taylor_forecast"\ninterval = true\n',
                     b'name = "caf\xe9"\n', b"\xef\xbb\xbfname = 1\n", b'name = "p"\n[budget]\nmin_psnr_db = nan\n',
                     b'name = "p"\n[budget]\nmin_psnr_db = 1979-05-27\n', b"[[passes]]\n[[passes]]\n"]),
))
def test_any_profile_file_loads_or_is_an_invalid_profile_error_naming_it(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("profiles") / "profile.toml"
    path.write_bytes(raw)
    try:
        ditopt.load_profile(path)
    except InvalidProfileError as exc:
        assert str(path) in str(exc)


# -- random small DiTs, exact profiles, random inputs --------------------------------------------------
EXACT = [
    {"name": "identity", "budget": {"max_rel_err": 1e-4}},
    {"name": "memo", "budget": {"max_rel_err": 1e-4}, "passes": [{"name": "conditioning_memo"}]},
    {"name": "layout", "budget": {"max_rel_err": 1e-4}, "passes": [{"name": "patch_layout"}]},
    {"name": "both", "budget": {"max_rel_err": 1e-4}, "passes": [{"name": "conditioning_memo"}, {"name": "patch_layout"}]},
]


@st.composite
def tiny_models(draw):
    from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel

    heads, head_dim = draw(st.integers(1, 2)), draw(st.sampled_from([4, 8]))
    layers, side, channels = draw(st.integers(1, 2)), draw(st.sampled_from([4, 6, 8])), draw(st.integers(1, 4))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    if draw(st.booleans()):
        classes = draw(st.integers(2, 12))
        model = DiTTransformer2DModel(
            num_attention_heads=heads, attention_head_dim=head_dim, in_channels=channels, out_channels=2 * channels,
            num_layers=layers, sample_size=side, patch_size=2, num_embeds_ada_norm=classes, norm_num_groups=1,
        )
    else:
        model = PixArtTransformer2DModel(
            num_attention_heads=heads, attention_head_dim=head_dim, in_channels=channels, out_channels=2 * channels,
            num_layers=layers, cross_attention_dim=heads * head_dim, sample_size=side, patch_size=2,
            caption_channels=draw(st.integers(2, 12)), norm_num_groups=1, interpolation_scale=1,
        )
    return model.eval()


def _inputs(model, batch: int, seed: int, timestep: int, labels: list[int] | None):
    from ditopt.inputs import synthesize_inputs

    kwargs = synthesize_inputs(model, batch_size=batch, seed=seed)
    kwargs["timestep"] = torch.full((batch,), timestep, dtype=torch.long)
    if "class_labels" in kwargs and labels is not None:
        kwargs["class_labels"] = torch.tensor(labels[:batch], dtype=torch.long)
    return kwargs


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@settings(max_examples=14, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(model=tiny_models(), profile=st.sampled_from(EXACT), batch=st.integers(1, 2), seeds=st.lists(st.integers(0, 999), min_size=3, max_size=3),
       timesteps=st.lists(st.integers(0, 999), min_size=3, max_size=3), labels=st.lists(st.integers(0, 20), min_size=2, max_size=2))
def test_exact_profiles_on_random_dits_match_the_original_and_leave_it_untouched(model, profile, batch, seeds, timesteps, labels):
    classes = model.config.get("num_embeds_ada_norm")  # DiT: classes + the null class row
    labels = [label % (int(classes) + 1) for label in labels] if classes else None
    before = {k: v.clone() for k, v in model.state_dict().items()}
    example = _inputs(model, batch, seeds[0], timesteps[0], labels)
    try:
        optimized = ditopt.optimize(model, profile, example_inputs=example)
    except DitoptError as exc:  # allowed by the property, but say which
        note(f"{type(exc).__name__}: {exc}")
        event(type(exc).__name__)
        optimized = None
    event(f"{type(model).__name__} {profile['name']}" if optimized is not None else "raised")
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before), "optimize changed the user's model"
    assume(optimized is not None)
    for seed, timestep in zip(seeds[1:], timesteps[1:]):  # fresh values, same shapes: the captured program runs
        kwargs = _inputs(model, batch, seed, timestep, labels[::-1] if labels else None)
        with torch.no_grad():
            want = model(**kwargs, return_dict=False)[0]
            got = optimized(**kwargs, return_dict=False)[0]
        assert got.shape == want.shape
        assert _rel(got, want) <= 1e-4, (profile["name"], _rel(got, want))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a call on the optimized model changed the user's model"


@pytest.mark.parametrize("name", PASS_NAMES)
def test_every_registered_pass_loads_with_its_defaults(name):
    """The generator above draws from these: each pass's defaults are a valid profile entry."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProfileWarning)
        assert ditopt.load_profile({"name": "p", "passes": [{"name": name}]}).passes[0].name == name
