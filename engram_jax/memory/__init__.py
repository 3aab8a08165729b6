"""Where Engram rows live and how they are fetched."""

from engram_jax.memory import device
from engram_jax.memory.table import TableLayout

__all__ = ["TableLayout", "device"]
