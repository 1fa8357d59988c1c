"""MoE split: the blocks' dense FFNs into routed experts, split and routed from calibration
statistics and searched against the budget."""

import ditopt.calibration.block_inputs  # noqa: F401  (registers "block_inputs")
from ditopt.passes.moe import moe_split  # noqa: F401
