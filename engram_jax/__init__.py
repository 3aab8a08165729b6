"""engram-jax: Engram conditional memory in JAX/Flax."""

from engram_jax.config import EngramConfig

__all__ = ["EngramConfig"]
