"""Names of pytree leaves: the '/'-joined paths big_vision's checkpoints, the sharding rules and
the learning-rate multipliers all match against."""

from typing import Any

import jax


def path_name(path: tuple) -> str:
  """A key path (dict keys, dataclass fields, sequence indices) as 'a/b/0'."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def leaves_by_name(tree: Any) -> dict[str, Any]:
  """{'a/b': leaf} in the tree's leaf order, leaves untouched."""
  return {path_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
