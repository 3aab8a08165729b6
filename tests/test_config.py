"""Tests for engram_jax/config.py: validation and the paper-size memory presets."""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import pytest

from engram_jax import config as cfg_lib
from engram_jax import presets
from engram_jax.hashing import table_sizes_for_layers
from engram_jax.layers.engram import Engram
from engram_jax.memory.table import TableLayout


@pytest.mark.parametrize(
  ("changes", "field"),
  [
    ({"table_bases": (1009,)}, "table_bases"),
    ({"max_ngram_size": 1, "table_bases": ()}, "max_ngram_size"),
    ({"heads_per_ngram": 0}, "heads_per_ngram"),
    ({"embed_per_ngram": 33}, "embed_per_ngram"),
    ({"layer_ids": (0, -1)}, "layer_ids"),
    ({"layer_ids": (2, 2)}, "layer_ids"),
    ({"layer_ids": ()}, "layer_ids"),
    ({"table_bases": (1009, 1)}, "table_bases"),
    ({"kernel_size": 0}, "kernel_size"),
  ],
)
def test_invalid_config_names_field(changes, field):
  with pytest.raises(ValueError, match=field):
    dataclasses.replace(presets.tiny().model.engram, **changes)


def test_derived_widths():
  c = cfg_lib.engram_27b_memory()
  assert (c.num_heads, c.head_dim, c.memory_dim) == (16, 80, 1280)


@pytest.mark.parametrize(
  ("preset", "expected"),
  [(cfg_lib.engram_27b_memory, 5.792e9), (cfg_lib.engram_40b_memory, 18.534e9)],
)
def test_paper_table_parameter_counts(preset, expected):
  c = preset()
  sizes = table_sizes_for_layers(c.table_bases, c.heads_per_ngram, c.layer_ids)
  total = 0
  for layer in c.layer_ids:
    layout = TableLayout.from_sizes(sizes[layer], c.head_dim)
    shape = jax.eval_shape(layout.init, jax.random.key(0))  # no allocation
    assert shape.shape == (layout.num_rows, 80)
    total += shape.shape[0] * shape.shape[1]
  assert abs(total - expected) / expected < 1e-3


def test_paper_engram_layer_builds_without_allocating():
  c = cfg_lib.engram_27b_memory()
  hidden = jax.ShapeDtypeStruct((1, 8, 4, 2560), jnp.float32)
  rows = jax.ShapeDtypeStruct((1, 8, c.num_heads, c.head_dim), jnp.float32)
  layer = Engram(max_ngram_size=c.max_ngram_size, kernel_size=c.kernel_size)
  variables = jax.eval_shape(layer.init, jax.random.key(0), hidden, rows)
  kernel = variables["params"]["kv_kernel"].value
  assert kernel.shape == (1280, 5, 2560)


@pytest.mark.parametrize(
  ("overrides", "message"),
  [
    ({"train.seq_len": 2}, "seq_len: expected at least the n-gram order"),
    ({"train.steps": 0}, "steps: expected an int >= 1"),
    ({"memory.kind": "sharded"}, "'sharded' with several devices on the mesh's table axes"),
    ({"memory.kind": "host", "mesh.data": 2}, "one device (no --mesh) for 'host'"),
    ({"memory.kind": "disk"}, "memory: expected one of"),
    ({"mesh.data": 3}, "batch_size: expected a multiple of the mesh's 3 batch shards"),
    ({"optim.lr": -1.0}, "lr: expected a positive learning rate"),
    ({"train.spike_factor": 0.5}, "spike_factor: expected 0 (off) or a multiple > 1"),
    ({"memory.lookup_impl": "triton"}, "lookup_impl: expected one of"),
    ({"train.stepz": 5}, "train.stepz: expected a field of train"),
    ({"model": 5}, "override: expected '<section>.<field>'"),
  ],
)
def test_overrides_are_validated(overrides, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    cfg_lib.override(presets.tiny(), overrides)


def test_overrides_replace_fields_and_round_trip_through_json():
  exp = cfg_lib.override(
    presets.tiny(), {"train.steps": 9, "memory.kind": "tiered", "optim.lr": 1e-3}
  )
  assert (exp.train.steps, exp.memory.kind, exp.optim.lr) == (9, "tiered", 1e-3)
  assert exp.model == presets.tiny().model
  data = json.loads(json.dumps(dataclasses.asdict(exp)))
  assert cfg_lib.experiment_from_dict(data) == exp
  with pytest.raises(ValueError, match="expected only the fields"):
    cfg_lib.experiment_from_dict(data | {"extra": 1})
  with pytest.raises(ValueError, match="preset: expected one of"):
    presets.get("nope")
