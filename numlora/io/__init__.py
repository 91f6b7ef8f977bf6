"""File formats and file safety (atomic writes). Nothing here imports numba."""

from .atomic import write_text_atomic

__all__ = ["write_text_atomic"]
