"""The results/ tree: how alphas, seeds and variants are spelled in paths and JSON keys."""

from __future__ import annotations


def alpha_key(alpha: float) -> str:
    """How an alpha is written in a path or a JSON key: Python's shortest repr, e.g. '0.9995', '1.0'."""
    return repr(float(alpha))
