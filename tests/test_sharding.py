"""Tests of engram_jax/sharding.py on 8 simulated devices: the mesh axes, the rules table from
logical names to mesh axes, and training sharded by it (FSDP, tensor and expert axes) like one
device, with checkpoints that move between mesh shapes."""

import dataclasses
import json
import shutil
import signal

import chex
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from engram_jax import memory, presets, sharding
from engram_jax.config import LOGICAL_RULES, MemoryConfig, MeshConfig
from engram_jax.memory.table import TableLayout
from engram_jax.model import unstack_blocks
from engram_jax.run import folder
from engram_jax.train import loop
from engram_jax.train.step import Trainer

MESHES = {
  "fsdp": MeshConfig(fsdp=4),
  "tensor": MeshConfig(tensor=2),
  "expert": MeshConfig(expert=4),
  "data+fsdp+expert": MeshConfig(data=2, fsdp=2, expert=2),
}

# Steps of the synthetic runs. Warm-up (2 steps) makes step 1's update a no-op on the
# parameters, so the loss of step 3 is the first to see an update, one that used the optimizer
# state carried over from step 1.
STEPS = 3


def test_mesh_parsing_and_errors():
  assert MeshConfig.parse("8") == MeshConfig(data=8)
  mesh = MeshConfig.parse("data=2, fsdp=2,expert=2")
  assert mesh.shape == {"data": 2, "fsdp": 2, "tensor": 1, "expert": 2}
  assert (mesh.devices, mesh.batch_shards) == (8, 4)
  for bad, why in (
    ("data=2,model=2", "axis=size pairs"),
    ("fsdp=two", "axis=size pairs"),
    ("fsdp=2,fsdp=2", "each axis once"),
    ("fsdp=0", "an int >= 1"),
  ):
    with pytest.raises(ValueError, match=why):
      MeshConfig.parse(bad)
  with pytest.raises(ValueError, match=r"mesh\.rules"):
    MeshConfig(rules=("embed=model",))
  with pytest.raises(ValueError, match="devices"):
    sharding.make_mesh(MeshConfig(fsdp=4, tensor=4))  # 16 > the 8 devices jax sees


def test_logical_spec_follows_the_rules_and_divisibility():
  mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  spec = lambda names, shape: sharding.logical_spec(names, shape, mesh, LOGICAL_RULES)
  assert spec(("embed", "mlp"), (64, 128)) == P("fsdp", "tensor")
  assert spec(("expert", "embed", "mlp"), (4, 64, 128)) == P(None, "fsdp", "tensor")  # expert=1
  assert spec(("embed", "mlp"), (63, 128)) == P(None, "tensor")  # 63 does not split in two
  assert spec(("batch", None), (8, 5)) == P(("data", "fsdp"), None)
  assert spec(("batch", None), (6, 5)) == P("data", None)  # 6 splits over data, not data x fsdp
  assert spec(("norm",), (64,)) == P(None)  # a name no rule lists: replicated
  assert spec((), (3, 3)) == P(None, None)


def _tiny(mesh=None, steps=8):
  exp = presets.tiny()
  mesh = mesh or MeshConfig()
  train = dataclasses.replace(exp.train, steps=steps, batch_size=4)
  return dataclasses.replace(exp, train=train, mesh=mesh)


def _losses(workdir):
  rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _norm(spec) -> tuple:
  """A PartitionSpec without its trailing unsplit dimensions."""
  out = tuple(spec)
  while out and out[-1] is None:
    out = out[:-1]
  return out


def _run(mesh_cfg, steps=STEPS, b=4, t=16, kind="device", **model_changes):
  """Losses of `steps` train steps of the tiny model on synthetic batches, the parameters'
  shardings as built, and the state."""
  exp = _tiny(mesh_cfg)
  model = dataclasses.replace(exp.model, vocab_size=101, **model_changes)
  layouts = {
    layer: TableLayout.from_sizes([211, 223, 227, 229], model.engram.head_dim, 0.02)
    for layer in model.engram.layer_ids
  }
  mesh = sharding.make_mesh(mesh_cfg)
  backend = memory.backend(MemoryConfig(kind=kind), mesh, table_axes=mesh_cfg.table_axes)
  trainer = Trainer(model, exp.optim, steps, layouts, backend, mesh_cfg.rules)
  state = trainer.create_state(jax.random.key(0), b, t)
  step, _ = trainer.jitted(b, t)  # explicit in/out shardings on a mesh
  specs = [getattr(x.sharding, "spec", P()) for x in jax.tree.leaves(state.params)]
  rng = np.random.default_rng(0)
  losses = []
  for _ in range(steps):
    tok = rng.integers(0, 101, size=(b, t + 1)).astype(np.int32)
    hash_ids = {layer: rng.integers(0, 211, size=(b, t, 4)).astype(np.int32) for layer in layouts}
    batch = {"tokens": tok[:, :-1], "targets": tok[:, 1:], "hash_ids": hash_ids}
    state, metrics = step(state, trainer.shard_batch(batch))
    losses.append(float(metrics["loss"]))
  return losses, specs, state


@pytest.fixture(scope="module")
def one_device():
  return _run(MeshConfig())[0]


@pytest.mark.parametrize("name", sorted(MESHES))
def test_sharded_training_matches_one_device(name, one_device):
  losses, specs, state = _run(MESHES[name])
  # Built in place: the fresh state's parameters are split over every model axis of the mesh.
  axes = {a for s in specs for d in s if d for a in (d if isinstance(d, tuple) else (d,))}
  assert axes == {a for a, n in MESHES[name].shape.items() if n > 1} - {"data"}
  # After the steps, parameters keep their shardings and the moments are split like them.
  after = [x.sharding.spec for x in jax.tree.leaves(state.params)]
  assert [_norm(s) for s in after] == [_norm(s) for s in specs]
  opt_specs = {_norm(x.sharding.spec) for x in jax.tree.leaves(state.opt_state) if x.ndim >= 2}
  assert opt_specs & ({_norm(s) for s in specs} - {()})
  np.testing.assert_allclose(losses, one_device, rtol=2e-4)


def test_sharded_tables_spread_over_every_axis_by_default(one_device):
  losses, _, state = _run(MeshConfig(fsdp=2, expert=2), kind="sharded")
  table = state.tables["layer_1"].table
  assert _norm(table.sharding.spec) == (("fsdp", "expert"),)  # 1 / 4 of the rows per device
  assert table.addressable_shards[0].data.shape[0] == table.shape[0] // 4
  np.testing.assert_allclose(losses, one_device, rtol=2e-4)
  with pytest.raises(ValueError, match="table_axes"):
    MeshConfig(table_axes=("rows",))


def test_scanned_blocks_train_like_unscanned():
  deep = {"num_layers": 4}  # blocks 2-3 repeat
  want, _, ref = _run(MeshConfig(), **deep)
  got, _, state = _run(MeshConfig(fsdp=2), scan_layers=True, **deep)
  # The trained state converts back to the unscanned form: parameters, moments and biases.
  cfg = dataclasses.replace(presets.tiny().model, scan_layers=True, **deep)
  back = unstack_blocks((state.params, state.opt_state, state.balance), cfg)
  unscanned = (ref.params, ref.opt_state, ref.balance)
  chex.assert_trees_all_equal_shapes_and_dtypes(back, unscanned)
  chex.assert_trees_all_close(back, unscanned, rtol=1e-2, atol=2e-3)  # Adam amplifies rounding
  w_q = state.params["blocks_2_4"]["attn"]["w_q"]
  assert w_q.shape[0] == 2 and _norm(w_q.sharding.spec) == (None, "fsdp")  # layers, embed
  assert state.balance["blocks_2_4"]["moe"]["expert_bias"].shape == (2, 4)
  np.testing.assert_allclose(got, want, rtol=2e-4)


def test_checkpoint_moves_between_mesh_shapes(finished_run, tmp_path):
  workdir, corpus, _ = finished_run  # a copy of the shared `tiny` run on one device
  want = _losses(workdir)
  shutil.move(workdir / "checkpoints" / "6", tmp_path / "moved-6")  # its newest: step 3

  def stop_at(n):
    def hook(step):
      if step == n:
        signal.raise_signal(signal.SIGTERM)

    return hook

  kw = dict(corpus_files=(corpus,), progress=False)
  exp = presets.tiny()
  with pytest.raises(loop.Interrupted):  # step 4 on a 2 x 2 x 2 mesh of
    mesh = MeshConfig(fsdp=2, tensor=2, expert=2)  # every model axis
    loop.train(dataclasses.replace(exp, mesh=mesh), workdir, resume=True, on_step=stop_at(4), **kw)
  # And back onto one device for steps 5-6 (the shared run's programs again).
  loop.train(exp, workdir, resume=True, **kw)
  # One device's checkpoint went onto the mesh, and the mesh's back onto one device.
  resumes = json.loads((workdir / folder.RUN_FILE).read_text())["resumes"]
  assert [(r["from_step"], r["mesh"]["fsdp"]) for r in resumes] == [(3, 2), (4, 1)]
  got = _losses(workdir)
  assert sorted(got) == sorted(want)
  np.testing.assert_allclose(
    [got[s] for s in sorted(got)], [want[s] for s in sorted(got)], rtol=2e-4
  )
