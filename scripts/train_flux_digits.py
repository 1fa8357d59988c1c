"""Train the zoo's flux model (seeded, fixed iteration count, 1 CPU thread). See ditopt/zoo/train.py."""
import sys

from ditopt.zoo.train import main

if __name__ == "__main__":
    main(["flux", *sys.argv[1:]])
