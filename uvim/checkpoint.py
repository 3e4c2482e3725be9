"""Checkpoints: big_vision npz files (flat '/'-joined names) for released models and exports."""

import io
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


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


def flatten_json(tree: Any, prefix: str = "") -> dict[str, Any]:
  """Nested JSON-like dicts -> {'a.b': leaf}."""
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(flatten_json(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def load_params_from_workdir(workdir: str | Path) -> dict[str, Any]:
  """{'params', 'state'} of the latest checkpoint in one of our training workdirs."""
  directory = Path(workdir).absolute() / "checkpoints"
  manager = ocp.CheckpointManager(directory, item_names=("state",))
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"No checkpoint in {directory} (expected a training workdir or a "
                            "big_vision .npz file)")
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  state = restored["state"]
  return {"params": state["params"], "state": state["model_state"]}


def _leaves_by_name(tree: Any) -> dict[str, Any]:
  """{'a/b': leaf}, leaves untouched (arrays or jax.ShapeDtypeStruct)."""
  return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def merge_into(init: Any, loaded: Any, source: str) -> Any:
  """`loaded` in the structure and dtypes of `init` (arrays or shapes); names missing or
  mismatched keys."""
  want, have = _leaves_by_name(init), flatten(loaded)
  missing, extra = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
  wrong = sorted(k for k in want.keys() & have.keys() if want[k].shape != have[k].shape)
  if missing or extra or wrong:
    raise ValueError(
        f"{source} does not fit the model: missing {missing[:10]}, unexpected {extra[:10]}, "
        f"shape mismatch {[(k, have[k].shape, want[k].shape) for k in wrong[:10]]}")
  leaves = [have[k].astype(want[k].dtype) for k in want]
  return jax.tree.unflatten(jax.tree.structure(init), leaves)
