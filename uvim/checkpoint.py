"""Checkpoints: big_vision npz files (flat '/'-joined names) for released models and exports."""

import io
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from uvim.errors import UserError
from uvim.tree import leaves_by_name


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
  return {f"{prefix}{name}": np.asarray(jax.device_get(leaf))
          for name, leaf in leaves_by_name(tree).items()}


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
    raise UserError(f"No checkpoint in {directory} (expected a training workdir or a "
                    "big_vision .npz file)")
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  state = restored["state"]
  return {"params": state["params"], "state": state["model_state"]}


def merge_into(init: Any, loaded: Any, source: str) -> Any:
  """`loaded` in the structure and dtypes of `init` (arrays or shapes); names missing or
  mismatched keys."""
  want, have = leaves_by_name(init), flatten(loaded)
  missing, extra = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
  wrong = sorted(k for k in want.keys() & have.keys() if want[k].shape != have[k].shape)
  if missing or extra or wrong:
    raise UserError(
        f"{source} does not fit the model: missing {missing[:10]}, unexpected {extra[:10]}, "
        f"shape mismatch {[(k, have[k].shape, want[k].shape) for k in wrong[:10]]}")
  leaves = [have[k].astype(want[k].dtype) for k in want]
  return jax.tree.unflatten(jax.tree.structure(init), leaves)



# Scanned block name (`scan_layers`: parameters stacked on a leading depth axis) -> the name of
# block i in big_vision's unscanned layout: `vit.Encoder`'s blocks and stage II's decoder blocks.
SCANNED_BLOCKS = {"encoderblock": "encoderblock_{}", "EncDecBlock": "EncDecBlock{}"}
_UNSCANNED_BLOCK = {name: re.compile(fmt.replace("{}", r"(\d+)"))
                    for name, fmt in SCANNED_BLOCKS.items()}


def scan_to_unscanned(params: Mapping[str, Any]) -> dict[str, Any]:
  """Every scanned block sub-tree (`encoderblock`, `EncDecBlock`: leaves with a leading depth
  axis), at any nesting -> blocks `encoderblock_<i>` / `EncDecBlock<i>` (big_vision's layout);
  other entries are kept."""
  out: dict[str, Any] = {}
  for key, value in params.items():
    if not isinstance(value, Mapping):
      out[key] = value
    elif key not in SCANNED_BLOCKS:
      out[key] = scan_to_unscanned(value)
    else:
      if any(_UNSCANNED_BLOCK[key].fullmatch(k) for k in params):
        raise ValueError(f"Both '{key}' and its unscanned blocks in one module: {sorted(params)}")
      depths = {np.shape(leaf)[:1] for leaf in jax.tree.leaves(value)}
      if len(depths) != 1 or () in depths:
        raise ValueError(f"'{key}' leaves have no common leading depth axis: {sorted(depths)}")
      (depth,) = depths.pop()
      for i in range(depth):
        out[SCANNED_BLOCKS[key].format(i)] = jax.tree.map(lambda leaf, i=i: leaf[i], dict(value))
  return out


def _unscanned_blocks(params: Mapping[str, Any], name: str) -> list[str]:
  """The keys of `params` that are unscanned blocks of family `name`, in order 0..N-1."""
  blocks = {int(m.group(1)): k for k in params
            if (m := _UNSCANNED_BLOCK[name].fullmatch(k)) and isinstance(params[k], Mapping)}
  if sorted(blocks) != list(range(len(blocks))):
    raise ValueError(f"'{SCANNED_BLOCKS[name].format('<i>')}' are not numbered "
                     f"0..{len(blocks) - 1}: {sorted(blocks.values())}")
  if blocks and name in params:
    raise ValueError(f"Both '{name}' and '{SCANNED_BLOCKS[name].format('<i>')}' in one module")
  return [blocks[i] for i in range(len(blocks))]


def unscanned_to_scan(params: Mapping[str, Any]) -> dict[str, Any]:
  """The unscanned blocks (`encoderblock_<i>`, `EncDecBlock<i>`) of every module, at any
  nesting -> one `encoderblock` / `EncDecBlock` with leaves stacked on a leading axis of N (the
  layout of `scan_layers`); the inverse of `scan_to_unscanned`. Numpy leaves stay numpy (on the
  host), others become jax arrays."""
  stacked, replaced = {}, set()
  for name in SCANNED_BLOCKS:
    keys = _unscanned_blocks(params, name)
    if not keys:
      continue
    trees = [dict(params[k]) for k in keys]
    if len({jax.tree.structure(t) for t in trees}) > 1:
      raise ValueError(f"'{SCANNED_BLOCKS[name].format('<i>')}' have different parameters")
    xp = np if all(isinstance(leaf, np.ndarray) for leaf in jax.tree.leaves(trees)) else jnp
    stacked[keys[0]] = (name, jax.tree.map(lambda *layers, xp=xp: xp.stack(layers), *trees))
    replaced.update(keys)
  out: dict[str, Any] = {}
  for key, value in params.items():
    if key in stacked:
      name, tree = stacked[key]
      out[name] = tree
    elif key not in replaced:
      out[key] = unscanned_to_scan(value) if isinstance(value, Mapping) else value
  return out


def in_layout(params: Mapping[str, Any], scanned: bool) -> dict[str, Any]:
  """`params` in either layout -> the scanned (`scan_layers`) or the unscanned one."""
  params = scan_to_unscanned(params)
  return unscanned_to_scan(params) if scanned else params
