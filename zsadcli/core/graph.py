"""Graph capture: whether a method's forward is being recorded into a static graph (``zsad export``).

A few steps of some methods run outside torch in eager mode (scipy's Gaussian filter, whose
output the official code produces) or use per-image Python loops; while a graph is captured
they run as equivalent tensor operations instead, so the exported graph holds the whole
method for any batch size. Values that depend only on weights (text features, resized
position embeddings) are computed once before capture and enter the graph as constants.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

_DEPTH = 0


def capturing() -> bool:
    """True while ``zsad export`` records a method's forward."""
    return _DEPTH > 0


@contextmanager
def graph_capture() -> Iterator[None]:
    global _DEPTH
    _DEPTH += 1
    try:
        yield
    finally:
        _DEPTH -= 1
