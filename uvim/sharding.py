"""Device mesh and partitioning: `config.mesh` names axis sizes, parameters follow FSDP rules.

Axes: `data` (batch), `fsdp` (batch too, and every parameter / optimizer array sharded over it)
and any others a user adds. A mesh size of -1 means "the remaining devices". Batches are split
over (`data`, `fsdp`) by the input pipeline; XLA propagates that to the activations.
"""

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

FSDP_AXIS = "fsdp"


def make_mesh(axes: Sequence[tuple[str, int]], devices=None) -> Mesh:
  """A mesh over `devices` (default: all) with the named axis sizes; one size may be -1."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  names = [name for name, _ in axes]
  sizes = [size for _, size in axes]
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {list(axes)}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if devices.size % known:
    raise ValueError(f"config.mesh {list(axes)} does not divide {devices.size} devices")
  sizes = [devices.size // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != devices.size:
    raise ValueError(f"config.mesh {list(axes)} uses {int(np.prod(sizes))} devices, "
                     f"but there are {devices.size}")
  return Mesh(devices.reshape(sizes), names)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def fsdp_spec(shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
  """Shards the largest dimension that the `fsdp` axis divides; replicates the rest (and every
  array when there is no such dimension or no `fsdp` axis)."""
  n = dict(mesh.shape).get(FSDP_AXIS, 1)
  if n > 1:
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
      if shape[dim] >= n and shape[dim] % n == 0:
        return PartitionSpec(*([None] * dim + [FSDP_AXIS]))
  return PartitionSpec()


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
  """NamedShardings for every array of `tree` (arrays or shapes) by the FSDP rule."""
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), mesh)), tree)


def bytes_per_device(tree: Any) -> int:
  """The largest number of bytes of `tree` any one device holds."""
  per_device: dict[Any, int] = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
  return max(per_device.values(), default=0)
