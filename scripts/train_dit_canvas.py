"""Fine-tune dit-digits on 64x64 canvases of 4x4 digits (1024 tokens) into the zoo's dit-canvas:
the model whose attention is local (seeded per step, fixed iteration count, resumable with
--resume). Starts from the shipped dit-digits weights; see ditopt/zoo/train.py."""
import sys

from ditopt.zoo.train import WEIGHTS_DIR, main

if __name__ == "__main__":
    # later flags override these defaults (argparse keeps the last value)
    main(["dit-canvas", "--init", str(WEIGHTS_DIR / "dit-digits.safetensors"), "--batch", "16",
          "--lr", "5e-4", "--warmup", "50", "--ckpt-every", "50", *sys.argv[1:]])
