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

from uvim import optim
from uvim.errors import UserError
from uvim.tree import leaves_by_name, path_name

FSDP_AXIS = "fsdp"
TENSOR_AXIS = "tensor"
# (parameter path regex, the dimension the `tensor` axis splits, counted from the end so that
# scanned layers' leading depth axis does not matter): heads of the attention projections
# (flax's (E, H, D) / out (H, D, E)) and the hidden units of the MLP ((E, M), (M,), (M, E)).
# The names are big_vision's parameter names, which its checkpoints fix: a ViT block's MLP
# (`MlpBlock_0` in stage I and the stage II encoder, `MLP` in the stage II decoder) holds its
# layers as Flax numbers them, `Dense_0` (E -> M) then `Dense_1` (M -> E). A config states
# other rules as `config.tensor_rules` (same form); the first rule that matches applies.
TENSOR_RULES = (
    (r"(^|/)(query|key|value)/(kernel|bias)$", -2),
    (r"(^|/)out/kernel$", -3),
    (r"(^|/)(MlpBlock_0|MLP)/Dense_0/(kernel|bias)$", -1),
    (r"(^|/)(MlpBlock_0|MLP)/Dense_1/kernel$", -2),
)
Rules = Sequence[tuple[str, int]]


def config_rules(config: Any) -> Rules:
  """`config.tensor_rules` (default `TENSOR_RULES`), checked: (regex, negative int) pairs."""
  rules = config.get("tensor_rules") or TENSOR_RULES
  for rule in rules:
    ok = (isinstance(rule, list | tuple) and len(rule) == 2 and isinstance(rule[0], str)
          and isinstance(rule[1], int) and not isinstance(rule[1], bool) and rule[1] < 0)
    try:
      ok = ok and re.compile(rule[0]) is not None
    except re.error as e:
      raise UserError(f"config.tensor_rules: {rule[0]!r} is not a regex ({e})") from None
    if not ok:
      raise UserError(f"config.tensor_rules holds (parameter path regex, dimension counted "
                      f"from the end, e.g. -1) pairs, got {rule!r}")
  return tuple((str(p), int(d)) for p, d in rules)


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


def tensor_dim(path: str, shape: Sequence[int], mesh: Mesh,
               rules: Rules = TENSOR_RULES) -> int | None:
  """The dimension of the array at `path` that the `tensor` axis splits, if any rule names one
  and the axis divides it."""
  if dict(mesh.shape).get(TENSOR_AXIS, 1) == 1:
    return None
  for pattern, dim in rules:
    if re.search(pattern, path) and len(shape) >= -dim:
      return _divisible(len(shape) + dim, shape, mesh)
  return None


def _divisible(dim: int | None, shape: Sequence[int], mesh: Mesh) -> int | None:
  """`dim` if the `tensor` axis divides it, else None."""
  n = dict(mesh.shape).get(TENSOR_AXIS, 1)
  return dim if dim is not None and shape[dim] % n == 0 else None


def fsdp_spec(shape: Sequence[int], mesh: Mesh, path: str = "",
              rules: Rules = TENSOR_RULES) -> PartitionSpec:
  """The array's sharding: its `tensor` dimension (see `TENSOR_RULES`), then the largest other
  dimension that the `fsdp` axis divides; the rest replicated (every dimension when no axis
  applies)."""
  return _spec(shape, mesh, tensor_dim(path, shape, mesh, rules))


def _spec(shape: Sequence[int], mesh: Mesh, tensor: int | None) -> PartitionSpec:
  spec: list[str | None] = [None] * len(shape)
  if tensor is not None:
    spec[tensor] = TENSOR_AXIS
  n = dict(mesh.shape).get(FSDP_AXIS, 1)
  if n > 1:
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
      if spec[dim] is None and shape[dim] >= n and shape[dim] % n == 0:
        spec[dim] = FSDP_AXIS
        break
  while spec and spec[-1] is None:
    spec.pop()
  return PartitionSpec(*spec)


def tree_shardings(tree: Any, mesh: Mesh, rules: Rules = TENSOR_RULES,
                   params: Any = None) -> Any:
  """NamedShardings for every array of `tree` (arrays or shapes) by the tensor `rules` and FSDP.
  Optimizer states follow the parameter (of `params`) whose path their path ends with: its
  tensor dimension where they have its shape; where Adafactor factored a dimension away
  (`optim.factored_away`) the same dimension of what is left, none if that one went."""
  shapes = {} if params is None else {k: np.shape(v) for k, v in leaves_by_name(params).items()}

  def one(path, x):
    name, shape = path_name(path), np.shape(x)
    parts = name.split("/")
    param = next(("/".join(parts[i:]) for i in range(len(parts))
                  if "/".join(parts[i:]) in shapes), None)
    if param is None or shapes[param] == shape:
      return NamedSharding(mesh, fsdp_spec(shape, mesh, name, rules))
    away = optim.factored_away(shapes[param], parts[:len(parts) - len(param.split("/"))])
    dim = tensor_dim(param, shapes[param], mesh, rules)
    factored = away is not None and list(np.delete(shapes[param], away)) == list(shape)
    kept = factored and dim is not None and dim != away
    return NamedSharding(mesh, _spec(shape, mesh, _divisible(dim - (dim > away), shape, mesh)
                                     if kept else None))

  return jax.tree_util.tree_map_with_path(one, tree)


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
