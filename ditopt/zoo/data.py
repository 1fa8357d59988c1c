"""The digits data set every zoo model is trained and evaluated on.

scikit-learn's handwritten digits (1,797 images, 8x8, 17 grey levels, 10 classes) are shipped with
the package, so no download is needed. Each image is upscaled to 32x32 with bicubic interpolation,
clamped and scaled to [0, 1] (``images01``) or [-1, 1] (the models' training space). A fixed,
stratified 20% split (seed 0) is held out for evaluation and is never seen in training.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 32
NUM_CLASSES = 10
HELDOUT_FRACTION = 0.2
SPLIT_SEED = 0


# dit-canvas: a 64x64 canvas of 4x4 cells, each a 16x16 digit of the sample's class. The cells are
# independent given the class, so a denoiser gains little from looking beyond a token's own cell:
# the zoo's model whose attention is local (1024 tokens at patch 2, a cell is 8x8 tokens).
CANVAS_SIZE = 64
CANVAS_GRID = 4
CELL_SIZE = CANVAS_SIZE // CANVAS_GRID


def _upscale(images8: np.ndarray, size: int = IMAGE_SIZE) -> torch.Tensor:
    """[N, 8, 8] values in 0..16 -> [N, 1, size, size] float32 in [0, 1] (bicubic, clamped)."""
    x = torch.from_numpy(images8.astype(np.float32) / 16.0).unsqueeze(1)
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    return x.clamp_(0.0, 1.0).contiguous()


def load_split(split: str = "train", size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images [N,1,size,size] in [0,1], labels [N] int64) for ``split`` in {"train", "heldout"}.

    The split is deterministic (stratified, seed 0, 20% held out): 1,437 train / 360 held-out.
    """
    from ditopt.errors import require_extra

    require_extra("sklearn", "zoo", "the zoo's digit data (training, the classifier and Frechet metrics)")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    d = load_digits()
    idx = np.arange(len(d.target))
    tr, ho = train_test_split(
        idx, test_size=HELDOUT_FRACTION, random_state=SPLIT_SEED, stratify=d.target
    )
    sel = np.sort(tr if split == "train" else ho)
    images = _upscale(d.images[sel], size)
    labels = torch.from_numpy(d.target[sel].astype(np.int64))
    return images, labels


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by an integer offset in [-max_shift, max_shift] (zero/background fill).

    Works on images in any range: the fill value is the image minimum of the batch's background
    convention, taken as ``x.amin()`` (0 for [0,1] data, -1 for [-1,1] data).
    """
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    fill = float(x.amin())
    pad = F.pad(x, (max_shift,) * 4, value=fill)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    out = torch.empty_like(x)
    for i in range(n):
        out[i] = pad[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
    return out


def compose_canvas(classes: torch.Tensor, cells: torch.Tensor, cell_labels: torch.Tensor,
                   generator: torch.Generator) -> torch.Tensor:
    """One canvas per class in ``classes``: [B, C, G*s, G*s] whose G x G cells are digits of that
    class drawn at random (with replacement) from ``cells`` [N, C, s, s] with labels ``cell_labels``."""
    g = CANVAS_GRID
    b, (c, s) = classes.shape[0], cells.shape[1:3]
    out = torch.empty(b, c, g * s, g * s, dtype=cells.dtype)
    for i, cls in enumerate(classes.tolist()):
        pool = torch.nonzero(cell_labels == cls).flatten()
        pick = pool[torch.randint(0, pool.numel(), (g * g,), generator=generator)]
        grid = cells[pick].view(g, g, c, s, s).permute(2, 0, 3, 1, 4)  # [C, row, y, col, x]
        out[i] = grid.reshape(c, g * s, g * s)
    return out
