"""Limits on option values that the command line checks before any weights load (no torch here:
the CLI imports this at start-up)."""
from __future__ import annotations

# The largest input side accepted: 100 x 100 patches of 14 px. The attention of a ViT grows with
# the fourth power of the side; beyond this a single image no longer fits common GPU memory.
MAX_IMAGE_SIZE = 1400
