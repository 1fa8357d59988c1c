"""Seeded training of the zoo models (dit-digits, flux-digits) and the digit classifier.

Run through the thin scripts ``scripts/train_dit_digits.py``, ``scripts/train_flux_digits.py`` and
``scripts/train_classifier.py``. Everything is seeded and uses a fixed iteration count, one CPU
thread per run (so the two diffusion models train side by side on 2 cores). The forward/backward
runs under CPU bfloat16 autocast (about 1.8x faster than fp32 on AVX512-BF16 CPUs); master weights,
optimizer state and the shipped EMA weights are fp32.

Weights are written to ``ditopt/zoo/weights/<name>.safetensors`` with a ``<name>.json`` next to
them (architecture config, training hyper-parameters, iterations done, loss history). They are
rewritten at every checkpoint, so a partially trained model can always be loaded and evaluated.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from . import data as zdata
from . import models as zm

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def _seed_all(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    return g


def _lr_at(step: int, base_lr: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    if step < warmup:
        return base_lr * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, step: int, max_decay: float) -> None:
    decay = min(max_decay, (1 + step) / (10 + step))
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1 - decay)


def _state(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: v.detach().float().contiguous().clone() for k, v in module.state_dict().items()}


def _write(name: str, tensors: dict[str, torch.Tensor], meta: dict, out_dir: Path | None = None) -> None:
    d = Path(out_dir) if out_dir else WEIGHTS_DIR
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{name}.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"name": name})
    tmp.replace(d / f"{name}.safetensors")
    tmpj = d / f".{name}.json.tmp"
    tmpj.write_text(json.dumps(meta, indent=2) + "\n")
    tmpj.replace(d / f"{name}.json")


def _batches(n: int, batch: int, g: torch.Generator):
    while True:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - batch + 1, batch):
            yield perm[i : i + batch]


# ------------------------------------------------------------------------------------------
# Diffusion models
# ------------------------------------------------------------------------------------------
def train_diffusion(kind: str, iters: int, batch: int = 64, lr: float = 1e-3, warmup: int = 100,
                    ema_decay: float = 0.998, seed: int = 0, ckpt_every: int = 100,
                    label_dropout: float = 0.1, bf16: bool = True, threads: int = 1,
                    max_shift: int = 0, stop_at: int | None = None, init: str | None = None,
                    out_dir: str | None = None, dit_internal_dropout: bool = False,
                    snr_gamma: float | None = None, resume: bool = False) -> None:
    """Train ``kind`` ("dit", "dit-p1", "dit-canvas" or "flux") with a learning-rate schedule planned for ``iters`` steps.

    ``stop_at`` ends the run early (after that many steps, with a checkpoint) without changing the
    planned schedule, so ``--iters N --stop-at K`` reproduces exactly the checkpoint written at
    step K of a full N-step run. ``init`` starts from the weights of a zoo safetensors file
    (continued training); ``out_dir`` writes checkpoints there instead of the package.

    DiT label dropout: diffusers' ``DiTTransformer2DModel`` gives *every block* its own
    ``LabelEmbedding`` with ``class_dropout_prob=0.1``, so in train mode each block drops the label
    independently and the all-blocks-null input used for CFG is (almost) never seen. Unless
    ``dit_internal_dropout`` is set, that internal dropout is switched off and the label is dropped
    to the null class (10) once per sample, consistently for all blocks.

    ``resume`` (dit-canvas): continue from the training state written beside the weights at the
    last checkpoint (model, EMA, optimizer, losses). Its random draws are seeded per step, so a
    run resumed at step K gives the same weights as one that never stopped.
    """
    torch.set_num_threads(threads)
    g = _seed_all(seed)
    images, labels = zdata.load_split("train")
    x_all = images * 2.0 - 1.0  # [-1, 1]
    n = x_all.shape[0]

    if kind == "dit-canvas":
        cells, cell_labels = zdata.load_split("train", zdata.CELL_SIZE)
        cells = cells * 2.0 - 1.0
    if kind in ("dit", "dit-p1", "dit-canvas"):
        name = {"dit": "dit-digits", "dit-p1": "dit-digits-p1", "dit-canvas": "dit-canvas"}[kind]
        config = dict({"dit": zm.DIT_CONFIG, "dit-p1": zm.DIT_P1_CONFIG, "dit-canvas": zm.DIT_CANVAS_CONFIG}[kind])
        model = zm.build_dit(config)
        embedder = None
        from diffusers import DDPMScheduler

        sched = DDPMScheduler(num_train_timesteps=1000)
        alphas_cumprod = sched.alphas_cumprod.float()
        modules = nn.ModuleDict({"model": model})
        if not dit_internal_dropout:
            from diffusers.models.embeddings import LabelEmbedding

            for m in model.modules():
                if isinstance(m, LabelEmbedding):
                    m.dropout_prob = 0.0  # table keeps its null row (built with p=0.1)
    elif kind == "flux":
        name = "flux-digits"
        model = zm.build_flux()
        config = dict(zm.FLUX_CONFIG)
        config["axes_dims_rope"] = list(config["axes_dims_rope"])
        embedder = zm.ClassEmbedder(num_tokens=zm.FLUX_TEXT_TOKENS,
                                    token_dim=config["joint_attention_dim"],
                                    pooled_dim=config["pooled_projection_dim"])
        img_ids, txt_ids = zm.flux_img_ids(), zm.flux_txt_ids()
        modules = nn.ModuleDict({"model": model, "embedder": embedder})
    else:
        raise ValueError(kind)

    if init is not None:
        from safetensors.torch import load_file

        tensors = load_file(init)
        state = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        if kind == "dit-p1" and state["pos_embed.proj.weight"].shape[-1] == 2:
            state = zm.patch1_from_patch2(state)  # fine-tuning dit-digits at patch size 1
        model.load_state_dict(state)
        if embedder is not None:
            embedder.load_state_dict({k[9:]: v for k, v in tensors.items() if k.startswith("embedder.")})
    modules.train()
    ema = copy.deepcopy(modules).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(modules.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    step_seeded = kind == "dit-canvas"  # per-step generators: resumable exactly
    if resume and not step_seeded:
        raise ValueError(f"--resume needs per-step seeding, which only dit-canvas uses (not {kind})")

    meta = {
        "name": name,
        "architecture": "DiTTransformer2DModel" if kind != "flux" else "FluxTransformer2DModel",
        "config": config,
        "training": {
            "data": ("sklearn load_digits, bicubic 8x8->32x32, [-1,1], stratified 80% train (seed 0)" if kind != "dit-canvas"
                     else "64x64 canvases of 4x4 cells, each a random training digit (bicubic 8x8->16x16, [-1,1], "
                          "stratified 80% train, seed 0) of the canvas's class"),
            "objective": "DDPM epsilon prediction (1000 steps, linear betas)" if kind != "flux"
            else "rectified flow, x_t=(1-t)x0+t*noise, predict noise-x0, logit-normal t",
            "iters_planned": iters, "batch": batch, "lr": lr, "warmup": warmup,
            "schedule": "linear warmup then cosine to 0.1*lr", "optimizer": "AdamW(0.9,0.99), wd 0",
            "ema_decay": ema_decay, "seed": seed, "label_dropout": label_dropout,
            "autocast": "cpu bfloat16" if bf16 else "none", "threads": threads, "max_shift": max_shift,
            "init": init and Path(init).name, "snr_gamma": snr_gamma, "dit_label_dropout": ("diffusers per-block (independent)" if dit_internal_dropout
                                                else "consistent, once per sample") if kind != "flux" else None,
        },
        "weights": "EMA",
    }
    if kind == "flux":
        meta["text_tokens"] = zm.FLUX_TEXT_TOKENS
    losses: list[float] = []
    history: list[dict] = []
    batches = _batches(n, batch, g)
    t_start = time.time()
    run_loss = 0.0
    last = iters if stop_at is None else min(iters, stop_at)
    first, elapsed_before = 0, 0.0
    state_path = (Path(out_dir) if out_dir else WEIGHTS_DIR) / f".{name}.train-state.safetensors"
    if resume:
        first, losses, history, elapsed_before = _load_train_state(state_path, modules, ema, opt, meta)
        print(f"[{name}] resumed at step {first}", flush=True)
    t_start -= elapsed_before
    for step in range(first, last):
        weight = None  # per-sample loss weights (Min-SNR); None: plain mean
        if step_seeded:
            g = torch.Generator().manual_seed(seed * 1_000_003 + step)
            idx = torch.randint(0, n, (batch,), generator=g)
        else:
            idx = next(batches)
        y = labels[idx]
        if kind == "dit-canvas":
            x0 = zdata.compose_canvas(y, cells, cell_labels, g)
        else:
            x0 = zdata.random_shift(x_all[idx], max_shift, g) if max_shift else x_all[idx]
        noise = torch.randn(x0.shape, generator=g)
        for pg in opt.param_groups:
            pg["lr"] = _lr_at(step, lr, warmup, iters)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if kind != "flux":
                if not dit_internal_dropout:
                    drop = torch.rand(batch, generator=g) < label_dropout
                    y = torch.where(drop, torch.full_like(y, zm.NULL_CLASS), y)
                t = torch.randint(0, 1000, (batch,), generator=g)
                a = alphas_cumprod[t].view(-1, 1, 1, 1)
                xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
                pred = model(xt, timestep=t, class_labels=y, return_dict=False)[0]
                target = noise
                if snr_gamma is not None:
                    snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
                    weight = torch.clamp(snr, max=snr_gamma) / snr
            else:
                drop = torch.rand(batch, generator=g) < label_dropout
                y_in = torch.where(drop, torch.full_like(y, zm.NULL_CLASS), y)
                t = torch.sigmoid(torch.randn(batch, generator=g))
                tt = t.view(-1, 1, 1, 1)
                xt = (1 - tt) * x0 + tt * noise
                tok, pooled = embedder(y_in)
                out = model(hidden_states=zm.pack_latents(xt), encoder_hidden_states=tok,
                            pooled_projections=pooled, timestep=t, img_ids=img_ids,
                            txt_ids=txt_ids, return_dict=False)[0]
                pred = zm.unpack_latents(out)
                target = noise - x0
        if weight is not None:
            per_sample = F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3))
            loss = (per_sample * weight).mean()
        else:
            loss = F.mse_loss(pred.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
        opt.step()
        _ema_update(ema, modules, step, ema_decay)
        losses.append(float(loss.detach()))
        run_loss += float(loss.detach())
        if (step + 1) % 20 == 0:
            el = time.time() - t_start
            print(f"[{name}] step {step + 1}/{iters} loss(avg20) {run_loss / 20:.4f} "
                  f"lr {opt.param_groups[0]['lr']:.2e} {el / (step + 1):.2f}s/it elapsed {el:.0f}s",
                  flush=True)
            history.append({"step": step + 1, "loss_avg20": run_loss / 20, "elapsed_s": round(el, 1)})
            run_loss = 0.0
        if (step + 1) % ckpt_every == 0 or step + 1 == last:
            tensors = _state(ema["model"], "model.")
            if embedder is not None:
                tensors.update(_state(ema["embedder"], "embedder."))
            meta["training"]["iters_done"] = step + 1
            meta["training"]["reproduce"] = (f"python scripts/train_{name.replace('-', '_')}.py "
                                             f"--iters {iters} --threads {threads} --stop-at {step + 1}")
            meta["training"]["elapsed_s"] = round(time.time() - t_start, 1)
            meta["training"]["final_loss_avg100"] = sum(losses[-100:]) / len(losses[-100:])
            meta["training"]["loss_history"] = history
            _write(name, tensors, meta, out_dir)
            if step_seeded:
                _save_train_state(state_path, modules, ema, opt, meta, losses, history)
            print(f"[{name}] checkpoint at step {step + 1}", flush=True)


def _save_train_state(path: Path, modules: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer,
                      meta: dict, losses: list[float], history: list[dict]) -> None:
    """Everything a resumed run needs, in safetensors (no pickle): weights, EMA, Adam moments."""
    tensors = _state(modules, "train.")
    tensors.update(_state(ema, "ema."))
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            tensors[f"opt.{i}.{k}"] = torch.as_tensor(v, dtype=torch.float32).reshape(-1).clone() if k == "step" else v.detach().clone()
    tensors["losses"] = torch.tensor(losses, dtype=torch.float64)
    info = {"training": {k: v for k, v in meta["training"].items() if k != "loss_history"}, "history": history}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"meta": json.dumps(info)})
    tmp.replace(path)


def _load_train_state(path: Path, modules: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer,
                      meta: dict) -> tuple[int, list[float], list[dict], float]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.exists():
        raise FileNotFoundError(f"no training state to resume at {path}: run without --resume first")
    with safe_open(str(path), "pt") as f:
        info = json.loads(f.metadata()["meta"])
    saved = info["training"]
    for key in ("iters_planned", "batch", "lr", "warmup", "seed", "ema_decay", "label_dropout", "snr_gamma"):
        if saved.get(key) != meta["training"].get(key):
            raise ValueError(f"--resume: {key} was {saved.get(key)!r} in the saved run, {meta['training'].get(key)!r} now; "
                             "resume with the same settings")
    tensors = load_file(str(path))
    modules.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("train.")})
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    st = opt.state_dict()
    n_params = len(st["param_groups"][0]["params"])
    st["state"] = {i: {"step": tensors[f"opt.{i}.step"].reshape(()), "exp_avg": tensors[f"opt.{i}.exp_avg"],
                       "exp_avg_sq": tensors[f"opt.{i}.exp_avg_sq"]} for i in range(n_params)}
    opt.load_state_dict(st)
    return int(saved["iters_done"]), tensors["losses"].tolist(), info["history"], float(saved["elapsed_s"])


# ------------------------------------------------------------------------------------------
# Classifier
# ------------------------------------------------------------------------------------------
def train_classifier(epochs: int = 30, batch: int = 64, lr: float = 2e-3, seed: int = 0,
                     threads: int = 1, max_shift: int = 2) -> dict:
    torch.set_num_threads(threads)
    g = _seed_all(seed)
    x, y = zdata.load_split("train")
    xh, yh = zdata.load_split("heldout")
    net = zm.DigitClassifier()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = x.shape[0] // batch
    total = epochs * steps_per_epoch
    step = 0
    t0 = time.time()
    for ep in range(epochs):
        net.train()
        perm = torch.randperm(x.shape[0], generator=g)
        tot = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * batch : (i + 1) * batch]
            xb = zdata.random_shift(x[idx], max_shift, g)
            for pg in opt.param_groups:
                pg["lr"] = _lr_at(step, lr, 50, total, 0.0)
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot += float(loss)
            step += 1
        net.eval()
        with torch.no_grad():
            acc = float((net(xh).argmax(1) == yh).float().mean())
        print(f"[classifier] epoch {ep + 1}/{epochs} loss {tot / steps_per_epoch:.4f} heldout acc {acc:.4f}",
              flush=True)
    with torch.no_grad():
        train_acc = float((net(x).argmax(1) == y).float().mean())
    meta = {
        "name": "digit-classifier",
        "architecture": "ditopt.zoo.models.DigitClassifier (3x conv-relu-maxpool, fc 1024->128->10)",
        "input": "[N,1,32,32] in [0,1]",
        "training": {"epochs": epochs, "batch": batch, "lr": lr, "seed": seed, "max_shift": max_shift,
                     "elapsed_s": round(time.time() - t0, 1)},
        "heldout_accuracy": acc,
        "train_accuracy": train_acc,
        "heldout_size": int(yh.shape[0]),
    }
    _write("digit-classifier", _state(net), meta)
    return meta


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("kind", choices=["dit", "dit-p1", "dit-canvas", "flux", "classifier"])
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--init", default=None, help="start from this zoo safetensors file")
    p.add_argument("--out-dir", default=None, help="write checkpoints here (default: the package)")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--dit-internal-dropout", action="store_true",
                   help="keep diffusers' per-block label dropout (stage 1 of dit-digits used it)")
    p.add_argument("--snr-gamma", type=float, default=None,
                   help="Min-SNR-gamma loss weighting for dit (default 5; 0 turns it off)")
    p.add_argument("--stop-at", type=int, default=None,
                   help="stop after this many steps (schedule still planned for --iters)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the last checkpoint's training state (dit-canvas)")
    a = p.parse_args(argv)
    if a.kind == "classifier":
        print(json.dumps(train_classifier(epochs=a.epochs, seed=a.seed, threads=a.threads), indent=2))
    else:
        train_diffusion(a.kind, iters=a.iters or DEFAULT_ITERS[a.kind], batch=a.batch,
                        lr=a.lr or 1e-3, seed=a.seed, threads=a.threads, ckpt_every=a.ckpt_every, stop_at=a.stop_at,
                        init=a.init, out_dir=a.out_dir, warmup=a.warmup,
                        dit_internal_dropout=a.dit_internal_dropout,
                        snr_gamma=(None if a.snr_gamma == 0 else (a.snr_gamma or DEFAULT_SNR_GAMMA.get(a.kind))),
                        resume=a.resume)


DEFAULT_ITERS = {"dit": 2600, "dit-p1": 600, "dit-canvas": 1000, "flux": 1050}
DEFAULT_SNR_GAMMA = {"dit": 5.0, "dit-p1": 5.0, "dit-canvas": 5.0}

if __name__ == "__main__":
    main()
