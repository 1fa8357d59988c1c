"""Pruning: remove work on every step (blocks, later heads and FFN neurons), chosen from
measured importance on calibration activations and searched against the budget."""

from ditopt.passes.pruning import collector  # noqa: F401  (registers "block_inputs")
from ditopt.passes.pruning import layer_prune  # noqa: F401
