"""zsad: zero-shot visual anomaly detection with CLIP."""

__version__ = "0.1.0"
