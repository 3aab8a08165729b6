"""Configuration dataclasses: the model's (`config.model`) and how an experiment runs
(`config.experiment`: optimizers, training, memory, mesh, the experiment itself).

Every config is a frozen dataclass that checks its invariants in `__post_init__` and raises
`ValueError` naming the offending field. Presets are plain functions returning a config
(`engram_jax.presets`).
"""

from engram_jax.config.experiment import (
  LOGICAL_RULES,
  LOOKUP_IMPLS,
  MEMORY_KINDS,
  MESH_AXES,
  STORAGE_TYPES,
  ExperimentConfig,
  MemoryConfig,
  MeshConfig,
  OptimConfig,
  TrainConfig,
  experiment_from_dict,
  override,
  parse_rules,
)
from engram_jax.config.model import (
  ENGRAM_FORMS,
  ENGRAM_GATINGS,
  MOE_DISPATCHES,
  REMAT_POLICIES,
  EngramConfig,
  ModelConfig,
  MoEConfig,
  check_engram_args,
  engram_27b_memory,
  engram_40b_memory,
)

__all__ = [
  "ENGRAM_FORMS",
  "ENGRAM_GATINGS",
  "LOGICAL_RULES",
  "LOOKUP_IMPLS",
  "MEMORY_KINDS",
  "MESH_AXES",
  "MOE_DISPATCHES",
  "REMAT_POLICIES",
  "STORAGE_TYPES",
  "EngramConfig",
  "ExperimentConfig",
  "MemoryConfig",
  "MeshConfig",
  "MoEConfig",
  "ModelConfig",
  "OptimConfig",
  "TrainConfig",
  "check_engram_args",
  "engram_27b_memory",
  "engram_40b_memory",
  "experiment_from_dict",
  "override",
  "parse_rules",
]
