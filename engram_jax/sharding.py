"""The device mesh and the shardings every layer of the code shares (no memory kind here).

The mesh is one data-parallel axis, `DATA_AXIS`, over `MeshConfig.data` devices (all hosts):
the batch and a 'sharded' Engram table are split over it, the backbone is replicated.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from engram_jax.config import MeshConfig

DATA_AXIS = "data"


def make_mesh(cfg: MeshConfig | int) -> Mesh | None:
  """A 1-D data-parallel mesh over the first `cfg.data` devices (None for one device).

  Raises:
    ValueError: more devices than jax sees.
  """
  n = cfg.data if isinstance(cfg, MeshConfig) else cfg
  available = jax.device_count()
  if n < 1 or n > available:
    raise ValueError(f"mesh: expected 1..{available} devices (jax.device_count()), got {n}")
  if n == 1:
    return None
  return jax.make_mesh(
    (n,), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:n]
  )


def shards(mesh: Mesh | None) -> int:
  """Devices on the data axis (1 without a mesh)."""
  return 1 if mesh is None else mesh.shape[DATA_AXIS]


def replicated(mesh: Mesh | None):
  """Sharding of the backbone's parameters and of scalars: the first device, or every device
  of the mesh."""
  if mesh is None:
    return SingleDeviceSharding(jax.devices()[0])
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh | None):
  """Sharding of a batch's arrays: split over the data axis on their leading dimension."""
  if mesh is None:
    return SingleDeviceSharding(jax.devices()[0])
  return NamedSharding(mesh, P(DATA_AXIS))
