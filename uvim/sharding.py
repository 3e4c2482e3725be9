"""Device mesh and partitioning: `config.mesh` names axis sizes, parameters follow rules.

Axes: `data` (batch), `fsdp` (batch too, and every parameter / optimizer array sharded over it),
`tensor` (Megatron-style: attention heads and the MLP's hidden units of every transformer block
split over it; the batch is replicated along it) and any others a user adds. A mesh size of -1
means "the remaining devices". Batches are split over (`data`, `fsdp`) by the input pipeline; XLA
propagates the shardings to the activations and inserts the collectives.
"""

import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from uvim.tree import path_name

FSDP_AXIS = "fsdp"
TENSOR_AXIS = "tensor"
# Parameter path (ending) -> the dimension, counted from the end so that scanned layers' leading
# depth axis does not matter, that the `tensor` axis splits: heads of the attention projections
# (flax's (E, H, D) / out (H, D, E)) and the hidden units of the MLP ((E, M), (M,), (M, E)).
TENSOR_RULES = (
    (re.compile(r"(^|/)(query|key|value)/(kernel|bias)$"), -2),
    (re.compile(r"(^|/)out/kernel$"), -3),
    (re.compile(r"(^|/)(MlpBlock_0|MLP)/Dense_0/(kernel|bias)$"), -1),
    (re.compile(r"(^|/)(MlpBlock_0|MLP)/Dense_1/kernel$"), -2),
)


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


def tensor_dim(path: str, shape: Sequence[int], mesh: Mesh) -> int | None:
  """The dimension of the array at `path` that the `tensor` axis splits, if any rule names one
  and the axis divides it."""
  n = dict(mesh.shape).get(TENSOR_AXIS, 1)
  if n == 1:
    return None
  for pattern, dim in TENSOR_RULES:
    if pattern.search(path) and len(shape) >= -dim and shape[dim] % n == 0:
      return len(shape) + dim
  return None


def fsdp_spec(shape: Sequence[int], mesh: Mesh, path: str = "") -> PartitionSpec:
  """The array's sharding: its `tensor` dimension (see `TENSOR_RULES`), then the largest other
  dimension that the `fsdp` axis divides; the rest replicated (every dimension when no axis
  applies)."""
  spec: list[str | None] = [None] * len(shape)
  if (dim := tensor_dim(path, shape, mesh)) is not None:
    spec[dim] = TENSOR_AXIS
  n = dict(mesh.shape).get(FSDP_AXIS, 1)
  if n > 1:
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
      if spec[dim] is None and shape[dim] >= n and shape[dim] % n == 0:
        spec[dim] = FSDP_AXIS
        break
  while spec and spec[-1] is None:
    spec.pop()
  return PartitionSpec(*spec)


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
  """NamedShardings for every array of `tree` (arrays or shapes) by the tensor and FSDP rules
  (optimizer states follow their parameters' paths)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, fsdp_spec(np.shape(x), mesh, path_name(path))), tree)


def bytes_per_device(tree: Any) -> int:
  """The largest number of bytes of `tree` any one device holds."""
  per_device: dict[Any, int] = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
  return max(per_device.values(), default=0)


def sync_hosts(name: str) -> None:
  """Waits until every process reaches this point (no-op with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
