"""engram-jax: Engram conditional memory (arXiv 2601.07372) in JAX/Flax.

The public API: configs and presets, tokenizer compression, n-gram hashing, the Engram layer and
the language model, the memory backends, and the demo interop.
"""

from engram_jax.config import (
  EngramConfig,
  ExperimentConfig,
  ModelConfig,
  MoEConfig,
  OptimConfig,
  TrainConfig,
)
from engram_jax.hashing import EngramHashing, NgramHasher
from engram_jax.interop import ReferenceEngram
from engram_jax.layers.engram import Engram
from engram_jax.model import EngramLM
from engram_jax.tokenization import TokenizerCompressor

__all__ = [
  "Engram",
  "EngramConfig",
  "EngramHashing",
  "EngramLM",
  "ExperimentConfig",
  "MoEConfig",
  "ModelConfig",
  "NgramHasher",
  "OptimConfig",
  "ReferenceEngram",
  "TokenizerCompressor",
  "TrainConfig",
]
