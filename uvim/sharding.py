"""Device mesh from config: `config.mesh` lists (axis name, size), -1 meaning the rest."""

from collections.abc import Sequence

import jax
import numpy as np


def make_mesh(axes: Sequence[tuple[str, int]], devices=None) -> jax.sharding.Mesh:
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
  return jax.sharding.Mesh(devices.reshape(sizes), names)


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
