"""Your own DiT: a plain `nn.Module` (no diffusers class), optimized with a hand-written profile.

    python examples/custom_dit.py            # 256 wide, 6 blocks, 16 samples per check
    python examples/custom_dit.py --small    # (or DITOPT_EXAMPLE_SMALL=1) 64 wide, 2 blocks

What ditopt needs from a model it does not know: `example_inputs` (the keyword arguments of one
forward call, at the batch you will run), a sampling loop `fn(model) -> samples` for calibration
and another on other seeds for validation, and a profile with a budget (examples/custom_dit.toml).
ditopt finds the blocks from the captured graph, not from attribute names. Random weights are
used here, so only per-call passes (quantization) are meaningful: caching needs a trained model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import torch
from torch import nn

import ditopt

PROFILE = Path(__file__).with_name("custom_dit.toml")


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Linear(4 * width, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x, c):
        s1, g1, a1, s2, g2, a2 = self.ada(c).chunk(6, dim=-1)
        b, n, d = x.shape
        q, k, v = self.qkv(modulate(self.norm1(x), s1, g1)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + a1.unsqueeze(1) * self.proj(attn)
        return x + a2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), s2, g2))


class MyDiT(nn.Module):
    """Patchify, timestep + class conditioning (adaLN), blocks, final adaLN layer, unpatchify."""

    def __init__(self, width=256, depth=6, heads=4, patch=2, channels=4, size=16, classes=10) -> None:
        super().__init__()
        self.patch, self.channels, self.width = patch, channels, width
        self.embed = nn.Conv2d(channels, width, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, (size // patch) ** 2, width) * 0.02)
        self.t_mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.labels = nn.Embedding(classes + 1, width)  # the last row: the null class for CFG
        self.blocks = nn.ModuleList([Block(width, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, patch * patch * channels)

    def timestep_features(self, t):
        half = self.width // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, x, t, y):
        h, w = x.shape[-2] // self.patch, x.shape[-1] // self.patch
        tokens = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        c = self.t_mlp(self.timestep_features(t)) + self.labels(y)
        for block in self.blocks:
            tokens = block(tokens, c)
        shift, scale = self.final_ada(c).chunk(2, dim=-1)
        out = self.out(modulate(self.norm(tokens), shift, scale))
        p, ch = self.patch, self.channels
        out = out.reshape(x.shape[0], h, w, p, p, ch).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(x.shape[0], ch, h * p, w * p)


def euler_sampler(batch: int, samples: int, steps: int, seed: int, size: int, channels: int = 4):
    """`fn(model) -> [samples, C, H, W]`: your sampling loop, `batch` samples at a time, fixed seeds."""
    def run(model):
        g = torch.Generator().manual_seed(seed)
        out = []
        with torch.no_grad():
            for start in range(0, samples, batch):
                x = torch.randn(batch, channels, size, size, generator=g)
                y = torch.arange(start, start + batch) % 10
                for i in range(steps):
                    t = torch.full((batch,), 1000.0 * (1 - i / steps))
                    x = x - (1.0 / steps) * model(x=x, t=t, y=y)
                out.append(x)
        return torch.cat(out)
    return run


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", default=os.environ.get("DITOPT_EXAMPLE_SMALL") == "1")
    parser.add_argument("--profile", type=Path, default=PROFILE)
    args = parser.parse_args(argv)
    width, depth, samples, steps = (64, 2, 8, 6) if args.small else (256, 6, 16, 10)
    size, batch = 16, 2

    torch.manual_seed(0)
    model = MyDiT(width=width, depth=depth, size=size).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    example_inputs = {"x": torch.randn(batch, 4, size, size), "t": torch.full((batch,), 500.0), "y": torch.arange(batch)}

    profile = ditopt.load_profile(args.profile)  # unknown keys and bad values are errors, named
    optimized = ditopt.optimize(model, profile, example_inputs=example_inputs,
                                calibration=euler_sampler(batch, samples, steps, seed=1, size=size),
                                validation=euler_sampler(batch, samples, steps, seed=2, size=size),
                                on_gate_miss="warn")
    report = optimized.report.to_dict()
    blocks = ditopt.capture(model, example_inputs).summary()["blocks"]
    end_to_end = next(v for v in report["verification"] if v["kind"] == "end-to-end")
    with torch.no_grad():
        out = optimized(**example_inputs)
    result = {
        "blocks_found": len(blocks),
        "profile": report["profile"]["name"],
        "budget_min_psnr_db": report["profile"]["budget"]["min_psnr_db"],
        "passed": report["passed"],
        "held_out_psnr_db": end_to_end["psnr_db"],
        "held_out_psnr_lower_db": end_to_end["psnr_lower_db"],
        "passes": [{"name": p["name"], "applied": p["applied"], "modified": p["modified"]} for p in report["passes"]],
        "output_shape": list(out.shape),
        "model_unchanged": all(torch.equal(before[k], v) for k, v in model.state_dict().items()),
    }
    print(json.dumps(result, default=str))
    return result


if __name__ == "__main__":
    main()
