"""Checkpoints: a run's orbax checkpoints (saved asynchronously, restored from the newest intact
one) and big_vision npz files (flat '/'-joined names) for released models and exports."""

import contextlib
import io
import json
import logging as pylogging
import re
import shutil
import sys
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from uvim import files, sharding
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
  """A big_vision npz checkpoint as a nested dict of numpy arrays; a cut or damaged file is a
  UserError naming it."""
  try:
    with open(path, "rb") as f:
      data = np.load(io.BytesIO(f.read()), allow_pickle=False)
      return unflatten({k: data[k] for k in data.files})
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise UserError(f"{path}: not a readable .npz checkpoint, damaged or cut short "
                    f"({type(e).__name__}: {_first_line(e)})") from None


def save_npz(path: str | Path, tree: Any) -> None:
  """Writes a nested dict of arrays as a big_vision npz (atomically: temp file, then rename)."""
  with files.atomic_path(path) as tmp, open(tmp, "wb") as f:
    np.savez(f, **flatten(tree))


def flatten_json(tree: Any, prefix: str = "") -> dict[str, Any]:
  """Nested JSON-like dicts -> {'a.b': leaf}."""
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(flatten_json(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def load_params_from_workdir(workdir: str | Path) -> dict[str, Any]:
  """{'params', 'state'} of the latest intact checkpoint in one of our training workdirs: one
  that does not restore (a half-deleted or cut checkpoint) is skipped with a warning saying why,
  as train.py does, but left where it is (readers do not move a run's files)."""
  checkpoints = manager(workdir)
  steps = sorted(checkpoints.all_steps(), reverse=True)
  if not steps:
    raise UserError(f"No checkpoint in {checkpoints.directory} (expected a training workdir or "
                    "a big_vision .npz file)")
  for step in steps:
    try:
      state = checkpoints.restore(step, args=ocp.args.Composite(
          state=_model_only(checkpoints.directory / str(step) / "state")))["state"]
      return {"params": state["params"], "state": state.get("model_state", {})}
    except Exception as e:  # orbax and tensorstore raise many types for damaged files
      logging.warning("Skipping the checkpoint of step %d in %s: it does not restore (%s: %s); "
                      "trying the previous one.", step, checkpoints.directory,
                      type(e).__name__, _first_line(e))
      with contextlib.suppress(Exception):
        checkpoints.close()
      checkpoints = manager(workdir)
  raise UserError(f"{checkpoints.directory}: none of the checkpoints {steps} restores (damaged); "
                  "see the warnings above")


def _model_only(state_dir: Path) -> ocp.args.PyTreeRestore:
  """Restores the parameters and model state of a saved TrainState alone (not the optimizer's
  state, twice their size), on the first local device, in the layout they were saved in."""
  saved = ocp.PyTreeCheckpointer().metadata(state_dir).item_metadata.tree
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  wanted = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        {k: saved[k] for k in ("params", "model_state") if saved.get(k)})
  return ocp.args.PyTreeRestore(
      wanted, restore_args=ocp.checkpoint_utils.construct_restore_args(wanted),
      partial_restore=True)


def load_variables(path: str | Path) -> dict[str, Any]:
  """{'params', 'state'} from a big_vision npz file or one of our training workdirs."""
  if str(path).endswith(".npz"):
    if not Path(path).exists():
      raise UserError(f"Checkpoint file {path} does not exist")
    return load_npz(path)
  return load_params_from_workdir(path)


def recorded_config(path: str | Path) -> tuple[dict, Path] | None:
  """The config a checkpoint was trained with, and its file: `<workdir>/config.json`, or the
  one next to a `params.npz` that a run exported; None for a bare (e.g. released) npz."""
  path = Path(path)
  config_file = path.with_name("config.json") if path.suffix == ".npz" else path / "config.json"
  if (path.suffix == ".npz" and path.name != "params.npz") or not config_file.exists():
    return None
  return read_config_json(config_file), config_file


def read_config_json(config_file: Path) -> dict:
  """A run's recorded config; a cut, empty or unreadable file is a UserError naming it."""
  try:
    saved = json.loads(config_file.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UserError(f"{config_file}: damaged, not the JSON a run records ({e}); restore it from "
                    "a copy (each run also keeps config.step_<N>.json when its config changed)"
                    ) from None
  if not isinstance(saved, dict):
    raise UserError(f"{config_file}: damaged, it holds no config (a JSON object)")
  return saved


def check_recorded_model(path: str, model: Any, *, model_name: str, key: str,
                         task: str | None = None, implied: dict | None = None) -> None:
  """Refuses to load `path` into `model` (the `model_name` model of config section `key`, for
  `task`) when the config `path` records was another kind of model, task, or had other
  settings that act at inference: parameters of equal shapes cannot show those (a masked
  decoder run as a causal one, another code_len...). `implied` fills settings the recorded
  config left to be derived (stage II's seq_len...). A bare npz records nothing: a warning
  says so."""
  from uvim import models

  if not Path(path).exists():
    raise UserError(f"{key}.model_init={path}: no such file or folder (a relative path is read "
                    f"from {Path.cwd()})")
  recorded = recorded_config(path)
  if recorded is None:
    logging.warning("%s.model_init=%s records no config: settings its parameters do not show "
                    "are taken from %s.model unverified.", key, path, key)
    return
  saved, config_file = recorded
  if saved.get("model_name") != model_name:
    kinds = {"proj.uvim.vit": "stage I", "proj.uvim.lm": "stage II"}
    raise UserError(f"{key}.model_init={path} is a {kinds.get(saved.get('model_name'), '')} "
                    f"{saved.get('model_name')!r} run ({config_file}), not the "
                    f"{kinds.get(model_name, '')} {model_name!r} model {key} describes")
  if task is not None and saved.get("task", task) != task:
    raise UserError(f"{key}.task is {task!r}, but {path} was trained for {saved.get('task')!r} "
                    f"({config_file})")
  theirs_config = {**{k: v for k, v in (implied or {}).items() if k not in saved["model"]},
                   **saved["model"]}
  ours = models.inference_settings(model)
  theirs = models.inference_settings(models.get_model(model_name, theirs_config))
  differ = [f"{k} {ours[k]} here, {theirs[k]} there" for k in ours if ours[k] != theirs[k]]
  if differ:
    raise UserError(f"{key}.model differs from the config {path} was trained with "
                    f"({config_file}): {'; '.join(differ)}. Set --{key}.model.<key> to its "
                    "values.")


def merge_into(init: Any, loaded: Any, source: str) -> Any:
  """`loaded` in the structure and dtypes of `init` (arrays or shapes); names missing or
  mismatched keys."""
  check_same_model(init, loaded, source)
  want, have = leaves_by_name(init), flatten(loaded)
  missing, extra = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
  wrong = sorted(k for k in want.keys() & have.keys() if want[k].shape != have[k].shape)
  if missing or extra or wrong:
    raise UserError(
        f"{source} does not fit the model: missing {missing[:10]}, unexpected {extra[:10]}, "
        f"shape mismatch {[(k, have[k].shape, want[k].shape) for k in wrong[:10]]}")
  leaves = [have[k].astype(want[k].dtype) for k in want]
  return jax.tree.unflatten(jax.tree.structure(init), leaves)


def check_same_model(init: Any, loaded: Any, source: str) -> None:
  """One line when `loaded` holds under half of the parameter names of `init`: the checkpoint
  of another model (a stage I given for a stage II, or the reverse), not a near miss."""
  want, have = set(leaves_by_name(init)), set(flatten(loaded))
  if len(want & have) * 2 < len(want):
    raise UserError(f"{source} is not a checkpoint of this model: it holds {len(want & have)} "
                    f"of its {len(want)} parameters (and {len(have - want)} others, e.g. "
                    f"{sorted(have - want)[:2]}); a stage I checkpoint given for stage II, or "
                    "the reverse?")


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


def manager(workdir: str | Path, keep_period: int | None = None) -> ocp.CheckpointManager:
  """Asynchronous orbax checkpoints of a run's whole state in `<workdir>/checkpoints`: the
  latest, and every `keep_period`-th step."""
  _drop_orbax_abandoned_work_noise()
  return ocp.CheckpointManager(
      (Path(workdir) / "checkpoints").absolute(), item_names=("state",),
      options=ocp.CheckpointManagerOptions(max_to_keep=1, keep_period=keep_period,
                                           enable_async_checkpointing=True))


def restore_latest_intact(
    make_manager: Callable[[], ocp.CheckpointManager], abstract_state: Any,
    state_sharding: Any) -> tuple[ocp.CheckpointManager, Any, int | None]:
  """A checkpoint manager, the newest checkpoint that restores and its step, or (manager, None,
  None) when there is none.

  A checkpoint that fails to restore (a truncated file, missing metadata, an empty folder) is
  moved to `<workdir>/checkpoints_damaged/<step>` with a warning saying why, and the previous
  one is tried with a fresh manager (the failed one holds orbax's abandoned reads).
  """
  target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        abstract_state, state_sharding)
  manager = make_manager()
  directory = Path(manager.directory)
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target)))
      return manager, restored["state"], step
    except Exception as e:  # orbax and tensorstore raise many types for damaged files
      with contextlib.suppress(Exception):
        manager.close()
      damaged = directory.parent / "checkpoints_damaged" / str(step)
      logging.warning("Skipping the checkpoint of step %d in %s: it does not restore (%s: %s). "
                      "Moved to %s; trying the previous one.", step, directory,
                      type(e).__name__, _first_line(e), damaged)
      if jax.process_index() == 0:
        damaged.parent.mkdir(exist_ok=True)
        if damaged.exists():
          shutil.rmtree(damaged)
        shutil.move(directory / str(step), damaged)
      sharding.sync_hosts(f"set aside checkpoint {step}")
      manager = make_manager()
  return manager, None, None


def _drop_orbax_abandoned_work_noise() -> None:
  """Silences (once per process) what orbax's abandoned work prints after a failed save or
  restore, from threads still running when the failure is raised: hundreds of "Event loop is
  closed" errors (tensorstore completing writes and reads on the loop orbax closed), a
  never-finished coroutine per abandoned read, and "exception was never retrieved" for the
  reads that failed after the first. Everything else passes; the failure itself is raised."""
  if not getattr(sys.unraisablehook, "drops_orbax", False):
    sys.unraisablehook = _unraisable_hook_dropping_orbax(sys.unraisablehook)
  asyncio_log = pylogging.getLogger("asyncio")
  if _drop_orbax_never_retrieved not in asyncio_log.filters:
    asyncio_log.addFilter(_drop_orbax_never_retrieved)


def _unraisable_hook_dropping_orbax(previous: Callable) -> Callable:
  """`previous`, except for the closed-loop errors and orbax coroutines named above."""

  def hook(unraisable):
    code = getattr(unraisable.object, "cr_code", None)
    orbax_coroutine = code is not None and "/orbax/" in code.co_filename
    closed_loop = (unraisable.exc_type is RuntimeError and unraisable.object is None
                   and str(unraisable.exc_value) == "Event loop is closed")
    if not (orbax_coroutine or closed_loop):
      previous(unraisable)

  hook.drops_orbax = True
  return hook


_TENSORSTORE_ERROR = re.compile(r"exception=\w+\('[A-Z_]+: ")


def _drop_orbax_never_retrieved(record: pylogging.LogRecord) -> bool:
  """False for asyncio's report of an orbax task or tensorstore future whose error nobody read."""
  message = record.getMessage()
  return not ("exception was never retrieved" in message
              and ("/orbax/" in message or _TENSORSTORE_ERROR.search(message)))


def finish_saves(manager: ocp.CheckpointManager) -> None:
  """Waits for pending asynchronous saves; a failed one (e.g. a full disk) raises a one-line
  `CheckpointSaveError` with its cause."""
  try:
    manager.wait_until_finished()
    manager.check_for_errors()
  except Exception as e:
    with contextlib.suppress(Exception):
      manager.close()  # stops orbax's threads; the first error, raised here, is the one to report
    raise CheckpointSaveError(f"Saving a checkpoint to {manager.directory} failed: "
                              f"{_first_line(e)}") from e


class CheckpointSaveError(RuntimeError):
  """An (asynchronous) checkpoint save failed, e.g. on a full disk."""


def _first_line(error: BaseException) -> str:
  """The first non-empty line of an error message (tensorstore's run over many lines)."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return lines[0] if lines else type(error).__name__


def stage2_init(model_init: Any, params: Any, model: Any, implied: Mapping[str, Any]) -> Any:
  """Stage II parameters `params` (shapes) from `model_init`: a whole stage II model (npz or
  workdir; its recorded model, parameter shapes, position embeddings and condition dropout
  checked against `model`), or `{'encoder': ViT name or npz}` (the image encoder alone)."""
  if isinstance(model_init, str):
    check_recorded_model(model_init, model, model_name="proj.uvim.lm", key="config",
                         implied=implied)
    tree = load_variables(model_init)
    loaded = in_layout(tree["params"], model.scan_layers)
    check_same_model(params, loaded, model_init)
    learned = "pos_embedding_decoder" in tree["params"]
    if learned != (model.posemb_type == "learn"):
      raise UserError(f"{model_init} has {'learned' if learned else 'no learned'} position "
                      f"embeddings; set config.model.posemb_type to "
                      f"{'learn' if learned else 'sincos2d'!r} (it is {model.posemb_type!r}): "
                      "big_vision's models use 'learn'")
    guided = "null_image" in tree["params"]
    if guided != bool(model.cond_dropout):
      raise UserError(f"{model_init} was trained {'with' if guided else 'without'} condition "
                      "dropout (a learned no-image input); set config.model.cond_dropout "
                      f"{'> 0 (e.g. 0.1)' if guided else 'to 0'}")
    return merge_into(params, loaded, model_init)
  unknown = set(model_init) - {"encoder"}
  if unknown:
    raise UserError(f"config.model_init: unknown part(s) {sorted(unknown)}; stage II takes a "
                    "checkpoint path or {'encoder': <ViT name or .npz>}")
  if not model_init.get("encoder"):
    return params
  if model.posemb_type != "learn":
    raise UserError(f"config.model_init.encoder={model_init['encoder']} is a ViT with learned "
                    f"position embeddings; config.model.posemb_type={model.posemb_type!r} has "
                    "none: set it to 'learn'")
  from uvim.models import vit, vit_init

  grid = vit.patch_grid(model.input_size, model.patches["size"])
  logging.info("Stage II encoder from %s", model_init["encoder"])
  unscanned = in_layout(jax.device_get(params), scanned=False)
  return in_layout(vit_init.load_encoder(model_init["encoder"], unscanned, grid=grid),
                   model.scan_layers)
