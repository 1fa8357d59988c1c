"""Export an optimized model to an artifact, then serve it from a fresh process with onnxruntime.

    python examples/export_and_serve.py OUT_DIR            # dit-digits: sample digits from the artifact
    python examples/export_and_serve.py OUT_DIR --small    # (or DITOPT_EXAMPLE_SMALL=1) a tiny random DiT

The serving process imports no model code: `ditopt.export.load_artifact(dir)` checks the manifest
and every file's digest, opens one onnxruntime session per segment and runs the plan's host
schedule between them. It is the same drop-in forward as the PyTorch module. The parent prints
the artifact's size and contents, and compares what the child sampled with the PyTorch runtime.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

SEEDS, CLASSES = [4242, 4243], [3, 8]  # dit-digits: the artifact's batch (2 samples, CFG 4 rows)


def serve(artifact: Path, inputs: Path | None, out: Path) -> None:
    """The fresh process: load the artifact and sample from it, no PyTorch model built."""
    from safetensors.torch import load_file, save_file

    from ditopt.export import load_artifact

    runner = load_artifact(artifact)
    if inputs is not None:  # a tiny model: one call with the inputs the parent saved
        kwargs = load_file(inputs)
        result = runner(**kwargs, return_dict=False)[0]
    else:  # dit-digits: a whole generation through the zoo's sampling loop, the artifact as the model
        from ditopt import zoo

        result = zoo.load("dit-digits").sample(CLASSES, SEEDS, model=runner)
    save_file({"samples": result.contiguous()}, str(out))
    print(json.dumps({"served": str(artifact), "pid": os.getpid(), "shape": list(result.shape)}))


def contents(artifact: Path) -> dict:
    manifest = json.loads((artifact / "manifest.json").read_text())
    files = {path: entry["size"] for path, entry in manifest["files"].items()}
    files["manifest.json"] = (artifact / "manifest.json").stat().st_size
    return {"bytes": sum(files.values()), "files": files,
            "segments": [s["name"] for s in manifest["segments"]], "plan": [p.get("kind", p.get("name")) for p in manifest["plan"]],
            "versions": manifest["versions"]}


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="artifact directory to create (must not exist)")
    parser.add_argument("--small", action="store_true", default=os.environ.get("DITOPT_EXAMPLE_SMALL") == "1")
    parser.add_argument("--profile", default="identity", help="preset name or TOML file (default: identity)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--inputs", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.out, args.inputs, args.result)
        return None

    import ditopt
    from ditopt.export import export_artifact
    from safetensors.torch import load_file, save_file

    if args.small:
        from diffusers import DiTTransformer2DModel

        torch.manual_seed(0)
        model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                      num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                                      norm_num_groups=1).eval()
        example = {"hidden_states": torch.randn(2, 4, 8, 8), "timestep": torch.tensor([500, 500]),
                   "class_labels": torch.tensor([10, 3])}
        optimized = ditopt.optimize(model, args.profile, example_inputs=example)
        with torch.no_grad():
            expected = optimized(**example, return_dict=False)[0]
        run = lambda m: m(**example, return_dict=False)[0]  # noqa: E731
    else:
        from ditopt import zoo

        bundle = zoo.load("dit-digits")
        example = bundle.make_inputs(len(SEEDS))
        optimized = ditopt.optimize(bundle.model, args.profile, example_inputs=example,
                                    calibration=bundle.calibration_fn(), validation=bundle.validation_fn())
        run = lambda m: bundle.sample(CLASSES, SEEDS, model=m)  # noqa: E731
        expected = run(optimized)
        optimized.reset()
    # verify_with: the artifact runs beside the PyTorch runtime before it is moved into place.
    export_artifact(optimized, args.out, example_inputs=example, verify_with=run)

    work = args.out.parent / f".{args.out.name}.serve"
    work.mkdir(exist_ok=True)
    command = [sys.executable, __file__, str(args.out), "--serve", "--result", str(work / "samples.safetensors")]
    if args.small:
        save_file({k: v.contiguous() for k, v in example.items()}, str(work / "inputs.safetensors"))
        command += ["--inputs", str(work / "inputs.safetensors")]
    child = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if child.returncode != 0:
        raise SystemExit(f"serving {args.out} failed in the fresh process:\n{child.stderr[-2000:]}")
    served = load_file(str(work / "samples.safetensors"))["samples"]
    for path in work.iterdir():
        path.unlink()
    work.rmdir()

    info = contents(args.out)
    err = float((served.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30))
    print(f"artifact {args.out}: {info['bytes'] / 1e6:.2f} MB in {len(info['files'])} files")
    for path, size in sorted(info["files"].items()):
        print(f"  {size:>10,}  {path}")
    result = {"artifact": str(args.out), "bytes": info["bytes"], "files": len(info["files"]),
              "segments": info["segments"], "served_shape": list(served.shape),
              "served_vs_pytorch_rel_err": err,
              "served_by_pid": json.loads(child.stdout.strip().splitlines()[-1])["pid"], "pid": os.getpid()}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
