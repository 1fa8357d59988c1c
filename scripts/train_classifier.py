"""Train the zoo's classifier model (seeded, fixed iteration count, 1 CPU thread). See ditopt/zoo/train.py."""
import sys

from ditopt.zoo.train import main

if __name__ == "__main__":
    main(["classifier", *sys.argv[1:]])
