"""Fine-tune dit-digits at patch size 1 (1024 tokens) into the zoo's dit-digits-p1 (seeded, fixed
iteration count). Starts from the shipped dit-digits weights; see ditopt/zoo/train.py."""
import sys

from ditopt.zoo.train import WEIGHTS_DIR, main

if __name__ == "__main__":
    # later flags override these defaults (argparse keeps the last value)
    main(["dit-p1", "--init", str(WEIGHTS_DIR / "dit-digits.safetensors"), "--batch", "32",
          "--lr", "5e-4", "--warmup", "50", *sys.argv[1:]])
