"""How an experiment runs: optimizers, training, where the tables live, the device mesh, and
the experiment that holds them all (with dotted overrides and JSON round trips).

Every config is a frozen dataclass that checks its invariants in `__post_init__` and raises
`ValueError` naming the offending field.
"""

from __future__ import annotations

import dataclasses
import math
import typing

from engram_jax.config.checks import check as _check
from engram_jax.config.model import ModelConfig


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Optimizers (paper Table 5): Muon for matrices, AdamW for the rest, sparse Adam for tables.

  Attributes:
    lr: peak learning rate of the backbone.
    warmup_steps: linear warm-up.
    decay_points: fractions of training after which the rate is multiplied by `decay_factor`
      (DeepSeek's step decay: x0.316 at 80% and again at 90%).
    decay_factor: the step-decay factor.
    weight_decay: decoupled weight decay of the backbone's matrices.
    adam_b1, adam_b2, adam_eps: Adam moments (backbone AdamW and the tables' sparse Adam).
    use_muon: Muon for 2-D matrices (and stacked expert matrices); AdamW everywhere if False.
    muon_lr_scale: Muon's learning rate relative to `lr`.
    engram_lr_mult: the tables' learning rate relative to `lr` (5x in the paper).
    grad_clip: global-norm clip of the backbone's gradients (0 disables).
  """

  lr: float = 3e-3
  warmup_steps: int = 50
  decay_points: tuple[float, ...] = (0.8, 0.9)
  decay_factor: float = 0.316
  weight_decay: float = 0.1
  adam_b1: float = 0.9
  adam_b2: float = 0.95
  adam_eps: float = 1e-8
  use_muon: bool = True
  muon_lr_scale: float = 1.0
  engram_lr_mult: float = 5.0
  grad_clip: float = 1.0

  def __post_init__(self):
    object.__setattr__(self, "decay_points", tuple(self.decay_points))
    _check(self.lr > 0, "lr", "a positive learning rate", self.lr)
    _check(self.warmup_steps >= 0, "warmup_steps", "an int >= 0", self.warmup_steps)
    _check(
      all(0 < p < 1 for p in self.decay_points),
      "decay_points",
      "fractions in (0, 1)",
      self.decay_points,
    )
    _check(self.engram_lr_mult > 0, "engram_lr_mult", "a positive multiplier", self.engram_lr_mult)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Steps, batch and bookkeeping of one training run.

  Attributes:
    steps: total optimizer steps.
    batch_size: B.
    seq_len: T.
    seed: seeds the parameters, the tables and the data order.
    eval_every: steps between validation passes.
    eval_batches: validation batches per pass.
    log_every: steps between metric records.
    checkpoint_every: steps between checkpoints.
    val_fraction: share of the corpus held out for validation.
    spike_factor: training stops (`TrainingDiverged`) when a step's loss exceeds this multiple
      of the median of the last `spike_window` losses (after warm-up); 0 disables the check
      (NaN and inf always stop training).
    spike_window: steps in that running median.
  """

  steps: int = 300
  batch_size: int = 16
  seq_len: int = 128
  seed: int = 0
  eval_every: int = 100
  eval_batches: int = 8
  log_every: int = 10
  checkpoint_every: int = 100
  val_fraction: float = 0.02
  spike_factor: float = 4.0
  spike_window: int = 50

  def __post_init__(self):
    for name in (
      "steps",
      "batch_size",
      "seq_len",
      "eval_every",
      "eval_batches",
      "log_every",
      "checkpoint_every",
      "spike_window",
    ):
      value = getattr(self, name)
      _check(isinstance(value, int) and value >= 1, name, "an int >= 1", value)
    _check(0 < self.val_fraction < 1, "val_fraction", "a fraction in (0, 1)", self.val_fraction)
    _check(
      self.spike_factor == 0 or self.spike_factor > 1,
      "spike_factor",
      "0 (off) or a multiple > 1 of the running median loss",
      self.spike_factor,
    )


MEMORY_KINDS = ("device", "host", "sharded", "tiered")
STORAGE_TYPES = ("float32", "bfloat16", "int8", "mxfp8")
LOOKUP_IMPLS = ("auto", "pallas", "xla")


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
  """Where the Engram tables live and how rows are read (docs/memory.md).

  Attributes:
    kind: 'device' (one device's memory), 'host' (pinned host memory), 'sharded' (rows split
      over the mesh's data axis) or 'tiered' (host memory under a device cache of hot rows).
    cache_fraction: the share of rows a 'tiered' cache holds.
    storage: how serving tables store rows: 'float32', 'bfloat16' or 'int8' (training keeps
      float32).
    lookup_impl: the device gather: 'pallas' (the fused kernel), 'xla' or 'auto' (Pallas on
      GPU, XLA elsewhere).
  """

  kind: str = "device"
  cache_fraction: float = 0.05
  storage: str = "float32"
  lookup_impl: str = "auto"

  def __post_init__(self):
    _check(self.kind in MEMORY_KINDS, "memory", f"one of {MEMORY_KINDS}", self.kind)
    _check(
      0 < self.cache_fraction <= 1, "cache_fraction", "a fraction in (0, 1]", self.cache_fraction
    )
    _check(self.storage in STORAGE_TYPES, "storage", f"one of {STORAGE_TYPES}", self.storage)
    _check(
      self.lookup_impl in LOOKUP_IMPLS, "lookup_impl", f"one of {LOOKUP_IMPLS}", self.lookup_impl
    )


# The mesh's axes, in mesh order: batch replicas, fully sharded data parallelism (parameters
# and optimizer state split, gathered per use), tensor parallelism, expert parallelism.
MESH_AXES = ("data", "fsdp", "tensor", "expert")
# Logical axis name (the layers' names of parameter and activation axes) -> mesh axes, as
# "name=axis+axis". A dimension is split over the listed axes of size > 1 that divide it (and
# that no earlier dimension of the same array uses); a name not listed stays replicated.
LOGICAL_RULES = (
  "batch=data+fsdp",
  "embed=fsdp",
  "vocab=tensor",
  "heads=tensor",
  "kv_heads=tensor",
  "mlp=tensor",
  "expert=expert",
)


def parse_rules(rules: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
  """{logical name: mesh axes} of rules "name=axis+axis" (an empty right side: replicated).

  Raises:
    ValueError: a malformed rule, an axis that is not a mesh axis, or a name given twice.
  """
  out = {}
  for rule in rules:
    name, sep, axes = str(rule).partition("=")
    parts = tuple(a for a in axes.split("+") if a)
    _check(bool(sep and name), "mesh.rules", "'name=axis+axis' entries", rule)
    _check(set(parts) <= set(MESH_AXES), "mesh.rules", f"axes of {MESH_AXES}", rule)
    _check(name not in out, "mesh.rules", "each logical name once", name)
    out[name] = parts
  return out


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """The device mesh: sizes of the axes `MESH_AXES` (all 1: no mesh, one device) and the rules
  that map the layers' logical axis names onto them.

  Attributes:
    data: batch replicas (the batch and a 'sharded' Engram table are split over it).
    fsdp: fully sharded data parallelism: the batch is split over it too, and every parameter
      and optimizer moment with an "embed" axis is split over it.
    tensor: tensor parallelism of attention heads, MLP widths and the vocabulary.
    expert: expert parallelism of the routed experts' weights.
    rules: logical name -> mesh axes (`LOGICAL_RULES`, the one table of them).
    table_axes: the axes a 'sharded' Engram table's rows are split over (default: all, so
      every device holds 1 / devices of each table).
  """

  data: int = 1
  fsdp: int = 1
  tensor: int = 1
  expert: int = 1
  rules: tuple[str, ...] = LOGICAL_RULES
  table_axes: tuple[str, ...] = MESH_AXES

  def __post_init__(self):
    for axis in MESH_AXES:
      size = getattr(self, axis)
      _check(isinstance(size, int) and size >= 1, f"mesh {axis}", "an int >= 1", size)
    object.__setattr__(self, "rules", tuple(self.rules))
    parse_rules(self.rules)
    object.__setattr__(self, "table_axes", tuple(self.table_axes))
    _check(
      bool(self.table_axes) and set(self.table_axes) <= set(MESH_AXES),
      "mesh.table_axes",
      f"some of {MESH_AXES}",
      self.table_axes,
    )

  @property
  def shape(self) -> dict[str, int]:
    """{axis: size} in mesh order."""
    return {axis: getattr(self, axis) for axis in MESH_AXES}

  @property
  def devices(self) -> int:
    return math.prod(self.shape.values())

  @property
  def table_shards(self) -> int:
    """How many parts a 'sharded' table is split into."""
    return math.prod(getattr(self, a) for a in self.table_axes)

  @property
  def batch_shards(self) -> int:
    """How many parts a batch is split into: data x fsdp."""
    return self.data * self.fsdp

  @classmethod
  def parse(cls, text: str | int) -> MeshConfig:
    """A mesh from "8" (8 data-parallel devices) or "data=2,fsdp=2,expert=2" (axis=size).

    Raises:
      ValueError: naming what was expected.
    """
    text = str(text).strip()
    if text.isdigit():
      return cls(data=int(text))
    sizes = {}
    for item in text.split(","):
      axis, sep, size = item.strip().partition("=")
      _check(
        bool(sep) and axis in MESH_AXES and size.strip().isdigit(),
        "mesh",
        f"a device count or axis=size pairs of {MESH_AXES}, e.g. 'data=2,fsdp=2'",
        text,
      )
      _check(axis not in sizes, "mesh", "each axis once", text)
      sizes[axis] = int(size)
    return cls(**sizes)


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """A named model + optimizer + training setup, and where it runs (memory kind and mesh)."""

  name: str
  model: ModelConfig
  optim: OptimConfig = OptimConfig()
  train: TrainConfig = TrainConfig()
  memory: MemoryConfig = MemoryConfig()
  mesh: MeshConfig = MeshConfig()

  def __post_init__(self):
    engram = self.model.engram
    if engram is not None:
      _check(
        self.train.seq_len >= engram.max_ngram_size,
        "seq_len",
        f"at least the n-gram order max_ngram_size={engram.max_ngram_size}",
        self.train.seq_len,
      )
    split = self.mesh.batch_shards
    _check(
      self.train.batch_size % split == 0,
      "batch_size",
      f"a multiple of the mesh's {split} batch shards (data x fsdp)",
      self.train.batch_size,
    )
    kind = self.memory.kind
    tables = self.mesh.table_shards
    _check(
      kind != "sharded" or tables > 1,
      "memory",
      "'sharded' with several devices on the mesh's table axes (--mesh > 1)",
      kind,
    )
    _check(
      kind != "sharded" or (self.train.batch_size * self.train.seq_len) % tables == 0,
      "batch_size x seq_len",
      f"a multiple of the {tables} shards of a 'sharded' table",
      self.train.batch_size * self.train.seq_len,
    )
    _check(
      kind not in ("host", "tiered") or self.mesh.devices == 1,
      "memory",
      f"one device (no --mesh) for {kind!r}; 'sharded' spreads a table over several devices",
      kind,
    )


def experiment_from_dict(data: dict) -> ExperimentConfig:
  """The experiment of `dataclasses.asdict(exp)` read back from JSON (lists become tuples).

  Raises:
    ValueError: a field that is not part of the config, or a value its validation rejects.
  """
  return _from_dict(ExperimentConfig, data)


def _from_dict(cls, data: dict):
  hints = typing.get_type_hints(cls)
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(data) - names)
  _check(not unknown, cls.__name__, f"only the fields {sorted(names)}", unknown)
  values = {}
  for name, value in data.items():
    if isinstance(value, dict):
      types = (hints[name], *typing.get_args(hints[name]))
      sub = next(t for t in types if dataclasses.is_dataclass(t))
      value = _from_dict(sub, value)
    elif isinstance(value, list):
      value = tuple(value)
    values[name] = value
  return cls(**values)


def override(exp: ExperimentConfig, overrides: dict) -> ExperimentConfig:
  """A copy of `exp` with fields replaced by dotted name, e.g. {"train.steps": 5, "memory.kind":
  "host", "mesh.data": 2} (how command-line flags reach a config); every section is validated
  again.

  Raises:
    ValueError: an unknown section or field, or a value a section's validation rejects.
  """
  sections: dict[str, dict] = {}
  for key, value in overrides.items():
    section, _, name = key.partition(".")
    fields = {f.name for f in dataclasses.fields(ExperimentConfig)} - {"name"}
    _check(
      section in fields and name,
      "override",
      f"'<section>.<field>' with a section of {sorted(fields)}",
      key,
    )
    known = {f.name for f in dataclasses.fields(getattr(exp, section))}
    _check(name in known, key, f"a field of {section}: {sorted(known)}", name)
    sections.setdefault(section, {})[name] = value
  changes = {s: dataclasses.replace(getattr(exp, s), **f) for s, f in sections.items()}
  return dataclasses.replace(exp, **changes)
