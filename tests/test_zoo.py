"""ditopt.zoo: offline loading, deterministic sampling, the model= hook, classifier, errors."""

import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from ditopt import zoo
from ditopt.zoo import models as zm

STEPS = 3  # few scheduler steps keep the tests fast


@pytest.fixture(scope="module", params=["dit-digits", "flux-digits", "dit-digits-p1", "dit-canvas"])
def bundle(request):
    torch.set_num_threads(2)
    return zoo.load(request.param)


class CountingWrapper(nn.Module):
    """Forwards to the wrapped model, recording every call's keyword inputs."""

    def __init__(self, inner, zero_output=False):
        super().__init__()
        self.inner = inner
        self.calls = []
        self.zero_output = zero_output

    def forward(self, **kwargs):
        assert kwargs.pop("return_dict") is False
        self.calls.append({k: v.clone() for k, v in kwargs.items()})
        out = self.inner(**kwargs, return_dict=False)
        if self.zero_output:
            return (torch.zeros_like(out[0]),)
        return out


def test_available_and_unknown_name():
    assert zoo.available() == ["dit-canvas", "dit-digits", "dit-digits-p1", "flux-digits"]
    with pytest.raises(zoo.UnknownModelError) as ei:
        zoo.load("sdxl")
    assert isinstance(ei.value, ValueError)
    assert "dit-digits" in str(ei.value) and "flux-digits" in str(ei.value)


def test_load_offline_exact_weights(bundle):
    from diffusers import DiTTransformer2DModel, FluxTransformer2DModel

    cls = DiTTransformer2DModel if bundle.kind == "dit" else FluxTransformer2DModel
    assert isinstance(bundle.model, cls)
    assert not bundle.model.training
    assert all(p.dtype == torch.float32 for p in bundle.model.parameters())
    shipped = load_file(str(zoo.WEIGHTS_DIR / f"{bundle.name}.safetensors"))
    sd = bundle.model.state_dict()
    for k, v in sd.items():
        assert torch.equal(v, shipped["model." + k]), k
    meta = json.loads((zoo.WEIGHTS_DIR / f"{bundle.name}.json").read_text())
    assert meta["training"]["iters_done"] >= 100  # really trained, not a fresh init
    assert bundle.num_classes == 10
    if bundle.kind == "dit":
        assert bundle.model.config.num_layers >= 8
        assert bundle.model.config.patch_size == (1 if bundle.name == "dit-digits-p1" else 2)
        assert bundle.embedder is None and bundle.default_steps == 50
        assert bundle.default_eta == 0.0  # deterministic DDIM
        assert bundle.default_guidance_scale == pytest.approx(1.5)
    else:
        assert bundle.model.config.num_layers == 2 and bundle.model.config.num_single_layers == 4
        assert bundle.embedder.tokens.weight.shape[0] == 11  # 10 classes + learned null
        assert torch.equal(bundle.embedder.tokens.weight, shipped["embedder.tokens.weight"])
        assert bundle.default_steps == 28
        assert bundle.default_guidance_scale == pytest.approx(4.0)


def test_sample_deterministic_and_batching_independent(bundle):
    classes, seeds = [3, 7, 3], [0, 1, 2]
    a = bundle.sample(classes, seeds, steps=STEPS)
    b = bundle.sample(classes, seeds, steps=STEPS)
    size = 64 if bundle.name == "dit-canvas" else 32
    assert bundle.image_size == size
    assert a.shape == (3, 1, size, size) and a.dtype == torch.float32
    assert a.min() >= 0.0 and a.max() <= 1.0
    assert torch.equal(a, b)  # same call -> bitwise identical
    # one sample per batch: same images up to GEMM blocking round-off
    c = bundle.sample(classes, seeds, steps=STEPS, batch_size=1)
    torch.testing.assert_close(c, a, atol=1e-4, rtol=0)
    # sample 0 and 2 share the class but not the seed -> different images
    assert (a[0] - a[2]).abs().max() > 0.05
    # a sample does not depend on its batch neighbours
    d = bundle.sample([3], [2], steps=STEPS)
    torch.testing.assert_close(d[0], a[2], atol=1e-4, rtol=0)


def test_model_argument_is_used(bundle):
    w = CountingWrapper(bundle.model)
    classes, seeds = [1, 5], [10, 11]
    out = bundle.sample(classes, seeds, steps=STEPS, model=w)
    ref = bundle.sample(classes, seeds, steps=STEPS)
    assert torch.equal(out, ref)
    assert len(w.calls) == STEPS
    for call in w.calls:
        assert call["hidden_states"].shape[0] == 4  # CFG batched: 2N
        assert call["timestep"].shape == (4,)
        if bundle.kind == "dit":
            assert call["class_labels"].tolist() == [10, 10, 1, 5]  # null first, then classes
        else:
            emb_tok, emb_pool = bundle.embedder(torch.tensor([10, 10, 1, 5]))
            assert torch.equal(call["encoder_hidden_states"], emb_tok)
            assert torch.equal(call["pooled_projections"], emb_pool)
            assert call["img_ids"].shape == (256, 3) and call["txt_ids"].dim() == 2
    timesteps = [float(c["timestep"][0]) for c in w.calls]
    assert timesteps == sorted(timesteps, reverse=True) and len(set(timesteps)) == STEPS
    # a wrapper that changes the prediction changes the images
    z = bundle.sample(classes, seeds, steps=STEPS, model=CountingWrapper(bundle.model, zero_output=True))
    assert (z - ref).abs().max() > 0.05


def test_make_inputs_match_sample(bundle):
    inp = bundle.make_inputs(3)
    out = bundle.model(**inp, return_dict=False)[0]
    w = CountingWrapper(bundle.model)
    bundle.sample([0, 1, 2], [0, 1, 2], steps=1, model=w)
    call = w.calls[0]
    assert set(inp) == set(call)
    for k in inp:
        assert inp[k].shape == call[k].shape and inp[k].dtype == call[k].dtype, k
    assert out.shape == inp["hidden_states"].shape


def test_dit_eta_zero_is_deterministic_ode():
    b = zoo.load("dit-digits")
    a = b.sample([2, 6], [5, 6], steps=STEPS, eta=0.0)
    c = b.sample([2, 6], [5, 6], steps=STEPS, eta=1.0)
    assert (a - c).abs().max() > 1e-3  # eta changes the sampler
    torch.testing.assert_close(b.sample([6], [6], steps=STEPS, eta=1.0)[0], c[1], atol=1e-4, rtol=0)


def test_guidance_changes_output(bundle):
    a = bundle.sample([4], [0], steps=STEPS, guidance_scale=1.0)
    b = bundle.sample([4], [0], steps=STEPS, guidance_scale=4.0)
    assert (a - b).abs().max() > 1e-3


def test_pack_unpack_roundtrip():
    x = torch.randn(2, 1, 32, 32)
    p = zm.pack_latents(x)
    assert p.shape == (2, 256, 4)
    assert torch.equal(zm.unpack_latents(p), x)
    # token (i, j) holds the 2x2 patch at rows 2i..2i+1, cols 2j..2j+1
    assert torch.equal(p[0, 16 * 3 + 5], x[0, 0, 6:8, 10:12].reshape(4))
    ids = zm.flux_img_ids()
    assert ids[16 * 3 + 5].tolist() == [0.0, 3.0, 5.0]


def test_heldout_split_and_classifier():
    x, y = zoo.heldout_digits()
    xt, yt = zoo.train_digits()
    assert x.shape == (360, 1, 32, 32) and xt.shape == (1437, 1, 32, 32)
    assert x.min() >= 0 and x.max() <= 1
    assert torch.bincount(y).min() >= 35  # stratified: every class present
    # held-out and train images are disjoint
    flat_t = {tuple(v) for v in (xt.flatten(1) * 16).round().to(torch.int16).tolist()[:50]}
    flat_h = {tuple(v) for v in (x.flatten(1) * 16).round().to(torch.int16).tolist()}
    assert not flat_t & flat_h
    clf = zoo.load_classifier()
    with torch.no_grad():
        logits = clf(x)
        feats = clf.features(x)
    assert logits.shape == (360, 10) and feats.shape == (360, 128)
    assert float((logits.argmax(1) == y).float().mean()) >= 0.95


@pytest.mark.parametrize("kind", ["dit", "flux", "dit-p1"])
def test_training_script_is_reproducible(kind, tmp_path):
    # The shipped weights come from seeded runs of ditopt.zoo.train; two short runs with the same
    # seed must write bit-identical checkpoints (and a different seed must not).
    from ditopt.zoo.train import train_diffusion

    def run(seed, sub):
        out = tmp_path / sub
        train_diffusion(kind, iters=50, batch=4, seed=seed, stop_at=2, ckpt_every=100, out_dir=str(out), threads=1)
        files = list(out.glob("*.safetensors"))
        assert len(files) == 1
        meta = json.loads(next(out.glob("*.json")).read_text())
        assert meta["training"]["iters_done"] == 2 and "--stop-at 2" in meta["training"]["reproduce"]
        return load_file(str(files[0]))

    threads = torch.get_num_threads()  # training sets the thread count; later tests keep theirs
    try:
        a, b, c = run(0, "a"), run(0, "b"), run(1, "c")
    finally:
        torch.set_num_threads(threads)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_patch1_model_starts_from_the_patch2_weights():
    # dit-digits-p1 is fine-tuned from dit-digits: blocks carry over, a pixel token embeds like a
    # flat 2x2 patch of its value did, and the output head predicts the 2x2 patch's mean.
    torch.manual_seed(0)
    p2 = zm.build_dit().eval()
    state = zm.patch1_from_patch2(p2.state_dict())
    p1 = zm.build_dit(zm.DIT_P1_CONFIG).eval()
    p1.load_state_dict(state, strict=True)
    assert torch.equal(p1.transformer_blocks[3].attn1.to_q.weight, p2.transformer_blocks[3].attn1.to_q.weight)
    flat = torch.randn(1, 1, 16, 16).repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # 2x2-flat image
    with torch.no_grad():
        e2 = p2.pos_embed.proj(flat)                    # [1, 128, 16, 16]
        e1 = p1.pos_embed.proj(flat)                    # [1, 128, 32, 32]
        torch.testing.assert_close(e1[..., ::2, ::2], e2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(e1[..., 1::2, 1::2], e2, rtol=1e-5, atol=1e-5)
        h = torch.randn(5, 128)
        torch.testing.assert_close(p1.proj_out_2(h)[:, 0], p2.proj_out_2(h).mean(1), rtol=1e-5, atol=1e-5)


def test_canvas_training_resumes_exactly(tmp_path):
    # dit-canvas draws its batches from per-step generators and saves its optimizer state with
    # each checkpoint, so training that stops and resumes writes the weights of a run that never stopped.
    from ditopt.zoo.train import train_diffusion

    def run(sub, stop_at, resume=False):
        train_diffusion("dit-canvas", iters=50, batch=2, stop_at=stop_at, ckpt_every=1, out_dir=str(tmp_path / sub),
                        threads=1, resume=resume)
        return load_file(str(tmp_path / sub / "dit-canvas.safetensors"))

    threads = torch.get_num_threads()
    try:
        run("a", 1)
        resumed = run("a", 2, resume=True)
        straight = run("b", 2)
        with pytest.raises(ValueError, match="batch"):
            train_diffusion("dit-canvas", iters=50, batch=3, stop_at=3, out_dir=str(tmp_path / "a"), threads=1, resume=True)
        with pytest.raises(ValueError, match="per-step"):
            train_diffusion("dit", iters=50, batch=2, stop_at=1, out_dir=str(tmp_path / "c"), threads=1, resume=True)
    finally:
        torch.set_num_threads(threads)
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in resumed)


def test_canvas_cells_share_the_class_and_read_as_digits():
    from ditopt.zoo import data as zdata

    cells, labels = zdata.load_split("train", zdata.CELL_SIZE)
    assert cells.shape[-2:] == (16, 16)
    g = torch.Generator().manual_seed(0)
    canvas = zdata.compose_canvas(torch.tensor([3, 8]), cells, labels, g)
    assert canvas.shape == (2, 1, 64, 64)
    view, view_labels = zoo.classifier_view(canvas, [3, 8])
    assert view.shape == (32, 1, 32, 32) and view_labels == [3] * 16 + [8] * 16
    pool = {tuple(c.flatten().tolist()) for c in cells[labels == 3]}
    assert all(tuple(canvas[0, 0, 16 * r:16 * r + 16, 16 * c:16 * c + 16].flatten().tolist()) in pool
               for r in range(4) for c in range(4))  # every cell is a training digit of the canvas's class
    clf = zoo.load_classifier()
    with torch.no_grad():
        accuracy = float((clf(view).argmax(1) == torch.tensor(view_labels)).float().mean())
    assert accuracy >= 0.8  # the classifier still reads 16-pixel digits brought back to 32x32
