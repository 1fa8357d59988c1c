"""Evaluate the zoo models: class accuracy of generated digits and feature-space Fréchet distances.

For each model, generates ``n_per_class`` samples of every class (seeds 0..N-1, default steps and
guidance), classifies them with the shipped digit classifier and computes the Fréchet distance of
the classifier's penultimate features between generated and held-out real digits. The real-vs-real
reference (train split vs held-out split) gives the scale. Writes JSON (default
``ditopt/zoo/weights/eval.json``) and a sample grid per model (``docs/images/<name>-samples.png``).

    python scripts/eval_zoo.py                      # both models, 20 per class = 200 samples each
    python scripts/eval_zoo.py --models dit-digits --n-per-class 5 --no-grid
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ditopt import metrics, zoo

ROOT = Path(__file__).resolve().parents[1]


def save_grid(images: torch.Tensor, classes: list[int], path: Path, per_class: int = 8,
              scale: int = 3) -> None:
    """Rows = classes 0..9, columns = the first ``per_class`` samples of that class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cls = torch.tensor(classes)
    rows = []
    for c in range(10):
        idx = (cls == c).nonzero().flatten()[:per_class]
        tiles = [np.pad(images[i, 0].numpy(), 1, constant_values=0.5) for i in idx]
        rows.append(np.concatenate(tiles, 1))
    grid = np.concatenate(rows, 0)
    grid = np.kron(grid, np.ones((scale, scale)))
    path.parent.mkdir(parents=True, exist_ok=True)
    plt.imsave(path, grid, cmap="gray", vmin=0.0, vmax=1.0)


def _heldout_cells() -> torch.Tensor:
    """The held-out digits at the canvas's cell size, brought to 32x32 as classifier_view does."""
    from ditopt.zoo import data as zdata

    cells, _ = zdata.load_split("heldout", zdata.CELL_SIZE)
    return torch.nn.functional.interpolate(cells, size=(32, 32), mode="bilinear", align_corners=False)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", nargs="*", default=zoo.available())
    p.add_argument("--n-per-class", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "ditopt" / "zoo" / "weights" / "eval.json"))
    p.add_argument("--no-grid", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    clf = zoo.load_classifier()
    x_ho, y_ho = zoo.heldout_digits()
    x_tr, _ = zoo.train_digits()
    result = {
        "classifier_heldout_accuracy": metrics.class_accuracy(x_ho, y_ho, clf),
        "heldout_size": int(x_ho.shape[0]),
        "fd_real_train_vs_heldout": metrics.feature_frechet_distance(x_tr, x_ho, clf),
        "fd_noise_vs_heldout": metrics.feature_frechet_distance(
            torch.rand(x_ho.shape, generator=torch.Generator().manual_seed(0)), x_ho, clf),
        "models": {},
    }
    print(json.dumps({k: v for k, v in result.items() if k != "models"}, indent=2), flush=True)
    n = 10 * a.n_per_class
    classes = [i % 10 for i in range(n)]
    seeds = list(range(n))
    for name in a.models:
        b = zoo.load(name)
        t0 = time.time()
        imgs = b.sample(classes, seeds, batch_size=a.batch_size, progress=True)
        dt = time.time() - t0
        # dit-canvas: each canvas's 16 cells are the digits the classifier reads (upscaled to
        # 32x32), and the real digits they are compared with go through the same 16-pixel route.
        digits, digit_classes = zoo.classifier_view(imgs, classes)
        real = x_ho if digits is imgs else _heldout_cells()
        with torch.no_grad():
            preds = clf(digits).argmax(1)
        lab = torch.tensor(digit_classes)
        per_class = {str(c): float((preds[lab == c] == c).float().mean()) for c in range(10)}
        r = {
            "samples": n,
            "steps": b.default_steps,
            "guidance_scale": b.default_guidance_scale,
            "digits_classified": len(digit_classes),
            "class_accuracy": metrics.class_accuracy(digits, digit_classes, clf),
            "per_class_accuracy": per_class,
            "fd_generated_vs_heldout": metrics.feature_frechet_distance(digits, real, clf),
            **({} if digits is imgs else {"fd_real_cells_vs_heldout_32": metrics.feature_frechet_distance(real, x_ho, clf)}),
            "sampling_seconds": round(dt, 1),
            "threads": a.threads,
            "train_iters_done": b.meta.get("training", {}).get("iters_done"),
            "train_final_loss_avg100": b.meta.get("training", {}).get("final_loss_avg100"),
        }
        result["models"][name] = r
        print(name, json.dumps(r, indent=2), flush=True)
        if not a.no_grid:
            save_grid(imgs, classes, ROOT / "docs" / "images" / f"{name}-samples.png")
    out = Path(a.out)
    if out.exists():  # keep results of models not evaluated in this run
        old = json.loads(out.read_text()).get("models", {})
        result["models"] = {**{k: v for k, v in old.items() if k not in result["models"]},
                            **result["models"]}
    from ditopt.io import atomic_write_text

    atomic_write_text(out, json.dumps(result, indent=2) + "\n")  # never a half-written eval.json
    return result


if __name__ == "__main__":
    main()
