"""Pruning: remove work on every step (blocks, later heads and FFN neurons), chosen from
measured importance on calibration activations and searched against the budget."""

import ditopt.calibration.block_inputs  # noqa: F401  (registers "block_inputs")
from ditopt.passes.pruning import layer_prune  # noqa: F401
from ditopt.passes.pruning import width_prune  # noqa: F401
