"""agevlm-edge: SAM-guided cross-attention VLMs from training data to edge devices.

This module imports nothing heavy: the on-device runtime imports the package without torch.
"""

__version__ = "0.1.0"
