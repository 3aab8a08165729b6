"""Inference: text generation from trained checkpoints, with the tables in any memory backend."""

from engram_jax.infer.generate import Generator

__all__ = ["Generator"]
