"""ditopt: capture, calibrate, rewrite, verify and export Diffusion Transformers."""

__version__ = "0.1.0"
