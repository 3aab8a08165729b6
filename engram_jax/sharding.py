"""The device mesh and the shardings every layer of the code shares (no memory kind here).

The mesh has the axes `config.MESH_AXES` = (data, fsdp, tensor, expert) with the sizes of a
`MeshConfig`. The layers name their parameters' axes logically (`nn.with_logical_partitioning`:
"embed", "mlp", "heads", "expert", ...); `MeshConfig.rules`, the one table of the mapping,
turns those names into mesh axes here (`logical_spec`), so no layer names a mesh axis. A batch
is split over (data, fsdp) on its leading axis; a 'sharded' Engram table over `DATA_AXIS`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import jax
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from engram_jax.config import MESH_AXES, MeshConfig, parse_rules

DATA_AXIS = "data"
BATCH_AXES = ("data", "fsdp")


def make_mesh(cfg: MeshConfig | int) -> Mesh | None:
  """The mesh of `cfg` over the first `cfg.devices` devices (None for one device); an int n is
  n data-parallel devices.

  Raises:
    ValueError: more devices than jax sees.
  """
  cfg = cfg if isinstance(cfg, MeshConfig) else MeshConfig(data=cfg)
  n, available = cfg.devices, jax.device_count()
  if n > available:
    raise ValueError(
      f"mesh: expected 1..{available} devices (jax.device_count()), got {n} ({cfg.shape})"
    )
  if n == 1:
    return None
  return jax.make_mesh(
    tuple(cfg.shape.values()),
    MESH_AXES,
    axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
    devices=jax.devices()[:n],
  )


def shards(mesh: Mesh | None) -> int:
  """How many parts a batch is split into (1 without a mesh)."""
  return 1 if mesh is None else math.prod(mesh.shape.get(a, 1) for a in BATCH_AXES)


def replicated(mesh: Mesh | None):
  """Sharding of scalars and of whatever no rule splits: the first device, or every device of
  the mesh."""
  if mesh is None:
    return SingleDeviceSharding(jax.devices()[0])
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh | None):
  """Sharding of a batch's arrays: split over (data, fsdp) on their leading dimension."""
  if mesh is None:
    return SingleDeviceSharding(jax.devices()[0])
  return NamedSharding(mesh, P(tuple(a for a in BATCH_AXES if a in mesh.axis_names)))


def logical_spec(names, shape, mesh: Mesh, rules: tuple[str, ...]) -> P:
  """The PartitionSpec of an array whose axes have the logical `names` (None: unnamed).

  Each dimension takes the mesh axes its name maps to, keeping only axes of size > 1 that no
  earlier dimension took, and dropping axes from the end of its list until their product
  divides the dimension (a dimension too small to split stays whole).
  """
  table = parse_rules(rules)
  used: set[str] = set()
  out = []
  for name, dim in zip(tuple(names) + (None,) * (len(shape) - len(names)), shape, strict=True):
    axes = [a for a in table.get(name, ()) if mesh.shape.get(a, 1) > 1 and a not in used]
    while axes and dim % math.prod(mesh.shape[a] for a in axes):
      axes.pop()
    used |= set(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  return P(*out)


def logical_shardings(names_tree, shapes_tree, mesh: Mesh | None, rules: tuple[str, ...]):
  """NamedShardings of a pytree of arrays (or shape structs) from a same-structured tree of
  logical-name PartitionSpecs (`flax.linen.get_partition_spec` of the boxed variables)."""
  if mesh is None:
    return jax.tree.map(lambda _: replicated(None), shapes_tree)
  return jax.tree.map(
    lambda names, x: NamedSharding(mesh, logical_spec(tuple(names), x.shape, mesh, rules)),
    names_tree,
    shapes_tree,
    is_leaf=lambda x: isinstance(x, P),
  )


def _names(path) -> tuple:
  return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)


def follow_params(tree, params, param_shardings, mesh: Mesh | None):
  """Shardings of an optimizer state: a leaf whose path ends with a parameter's path and has
  its shape (a moment of it) is sharded like it; any other leaf (counts, scalars) replicated."""
  by_path = {}
  for (path, p), (_, s) in zip(
    jax.tree_util.tree_flatten_with_path(params)[0],
    jax.tree_util.tree_flatten_with_path(param_shardings)[0],
    strict=True,
  ):
    by_path[_names(path)] = (p.shape, s)
  depth = max((len(k) for k in by_path), default=0)

  def sharding(path, x):
    names = _names(path)
    for k in range(min(depth, len(names)), 0, -1):
      hit = by_path.get(names[-k:])
      if hit is not None and hit[0] == x.shape:
        return hit[1]
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(sharding, tree)


# The mesh and rules a model is traced under (`model_mesh`), for layers that split their own
# work (the MoE's expert parallelism); None outside.
_MODEL_MESH: contextvars.ContextVar[tuple[Mesh, tuple[str, ...]] | None] = contextvars.ContextVar(
  "engram_model_mesh", default=None
)


@contextlib.contextmanager
def model_mesh(mesh: Mesh | None, rules: tuple[str, ...]):
  """While a model is traced inside it, `current_mesh` gives its layers `mesh` and `rules`."""
  token = _MODEL_MESH.set(None if mesh is None else (mesh, tuple(rules)))
  try:
    yield
  finally:
    _MODEL_MESH.reset(token)


def current_mesh() -> tuple[Mesh, tuple[str, ...]] | None:
  """(mesh, rules) of the enclosing `model_mesh`, or None."""
  return _MODEL_MESH.get()
