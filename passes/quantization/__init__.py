"""Quantization: low-bit linear layers (twin-log weights, rotations, W8A8 integer GEMMs), chosen per
layer from calibration sensitivity and searched against the budget."""

import ditopt.calibration.block_inputs  # noqa: F401  (registers "block_inputs")
from ditopt.passes.quantization import quantize  # noqa: F401
