"""Checkpoints: big_vision npz files (flat '/'-joined names) for released models and exports."""

import io
from pathlib import Path
from typing import Any

import jax
import numpy as np


def unflatten(flat: dict[str, np.ndarray]) -> dict[str, Any]:
  """{'a/b': x} -> {'a': {'b': x}}."""
  tree: dict[str, Any] = {}
  for name, value in flat.items():
    *parents, leaf = name.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def flatten(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
  """{'a': {'b': x}} -> {'a/b': np.asarray(x)}."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    flat[f"{prefix}{name}"] = np.asarray(jax.device_get(leaf))
  return flat


def load_npz(path: str | Path) -> dict[str, Any]:
  """A big_vision npz checkpoint as a nested dict of numpy arrays."""
  with open(path, "rb") as f:
    data = np.load(io.BytesIO(f.read()), allow_pickle=False)
    return unflatten({k: data[k] for k in data.files})


def save_npz(path: str | Path, tree: Any) -> None:
  """Writes a nested dict of arrays as a big_vision npz (atomically: temp file, then rename)."""
  path = Path(path)
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "wb") as f:
    np.savez(f, **flatten(tree))
  tmp.replace(path)
