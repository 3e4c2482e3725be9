"""Initialises the stage II image encoder from a big_vision / AugReg ViT checkpoint (.npz).

The original UViM starts stage II from an ImageNet-21k ViT (`model_init={'encoder':
'howto-i21k-L/16'}`): the ViT's `Transformer` becomes `encoder`, `embedding` becomes
`EmbedPatches` and `pos_embedding` becomes `pos_embedding_encoder` (without the [cls] entry and
bilinearly resampled to the model's patch grid); `cls`, `head` and the decoder are not loaded.
Vanity names ('howto-i21k-L/16') are downloaded once from the public `vit_models` bucket into a
cache folder (`$UVIM_CHECKPOINT_DIR`, else `~/.cache/uvim`).
"""

import difflib
import math
import os
import re
import tempfile
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from uvim import checkpoint

GS_PREFIX = "gs://vit_models/augreg/"
# Public https mirror of GS_PREFIX; a module constant so tests can point it elsewhere.
URL_PREFIX = "https://storage.googleapis.com/vit_models/augreg/"
CACHE_ENV = "UVIM_CHECKPOINT_DIR"

# Recommended ImageNet-21k checkpoints of "How to train your ViT?" (arXiv:2106.10270), under the
# names big_vision's models/vit.py gives them.
VANITY_NAMES: dict[str, str] = {
    "howto-i21k-Ti/16": GS_PREFIX + "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0.npz",
    "howto-i21k-S/32": GS_PREFIX + "S_32-i21k-300ep-lr_0.001-aug_none-wd_0.1-do_0.0-sd_0.0.npz",
    "howto-i21k-S/16": GS_PREFIX + "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0.npz",
    "howto-i21k-B/32": GS_PREFIX + "B_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0.npz",
    "howto-i21k-B/16": GS_PREFIX + "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz",
    "howto-i21k-B/8": GS_PREFIX + "B_8-i21k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0.npz",
    "howto-i21k-L/16": GS_PREFIX + "L_16-i21k-300ep-lr_0.001-aug_strong1-wd_0.1-do_0.0-sd_0.0.npz",
}

_CHUNK = 1 << 20


def default_cache_dir() -> Path:
  """Where vanity-name checkpoints are kept: `$UVIM_CHECKPOINT_DIR`, else `~/.cache/uvim`."""
  return Path(os.environ.get(CACHE_ENV) or "~/.cache/uvim").expanduser()


def resolve(name_or_path: str, cache_dir: str | None = None) -> str:
  """A vanity name or a path -> an existing local .npz file (downloading a vanity name once)."""
  if name_or_path in VANITY_NAMES:
    gs_path = VANITY_NAMES[name_or_path]
    basename = gs_path.rsplit("/", 1)[-1]
    target = (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) / basename
    if target.is_file():
      return str(target)
    _download(name_or_path, URL_PREFIX + basename, gs_path, target)
    return str(target)
  if os.path.isfile(name_or_path):
    return name_or_path
  known = ", ".join(VANITY_NAMES)
  if name_or_path.startswith("howto-"):
    close = difflib.get_close_matches(name_or_path, VANITY_NAMES, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise FileNotFoundError(f"Unknown ViT vanity name {name_or_path!r}.{hint} Known: {known}.")
  raise FileNotFoundError(f"ViT checkpoint {name_or_path!r} does not exist (neither a file nor "
                          f"a vanity name). Vanity names: {known}.")


def _download(name: str, url: str, gs_path: str, target: Path) -> None:
  """Fetches `url` to `target` via a temp file in the same folder, then an atomic rename."""
  tmp = None
  try:
    target.parent.mkdir(parents=True, exist_ok=True)
    logging.info("ViT init: downloading %s from %s to %s", name, url, target)
    with urllib.request.urlopen(url, timeout=60) as response:
      total = int(response.headers.get("Content-Length") or 0)
      fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".part")
      done, next_report = 0, 0.1
      with os.fdopen(fd, "wb") as f:
        while chunk := response.read(_CHUNK):
          f.write(chunk)
          done += len(chunk)
          if total and done / total >= next_report:
            logging.info("ViT init: %s: %d/%d MiB (%.0f%%)", name, done >> 20, total >> 20,
                         100 * done / total)
            next_report += 0.1
    if total and done != total:
      raise OSError(f"incomplete download: {done} of {total} bytes")
    os.replace(tmp, target)
    tmp = None
    logging.info("ViT init: saved %s (%d MiB)", target, done >> 20)
  except Exception as e:  # Any failure (network, HTTP, disk) ends in the same actionable message.
    raise FileNotFoundError(
        f"Could not download ViT checkpoint {name!r} from {url} ({type(e).__name__}: {e}). "
        f"Place the file at {target} yourself, e.g. `gsutil cp {gs_path} {target}`, or set "
        f"${CACHE_ENV} to a folder that holds {target.name}.") from e
  finally:
    if tmp is not None and os.path.exists(tmp):
      os.remove(tmp)


def _interp_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) weights of corner-aligned linear interpolation (scipy zoom, order=1)."""
  pos = np.arange(n_out) * ((n_in - 1) / (n_out - 1) if n_out > 1 else 1.0)
  lo = np.clip(np.floor(pos).astype(int), 0, n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = pos - lo
  weights = np.zeros((n_out, n_in))
  np.add.at(weights, (np.arange(n_out), lo), 1 - frac)
  np.add.at(weights, (np.arange(n_out), hi), frac)
  return weights


def resample_posemb(posemb_1xNxE: np.ndarray, new_grid: tuple[int, int],
                    old_grid: tuple[int, int] | None = None) -> np.ndarray:
  """Bilinearly resamples a grid of position embeddings, as big_vision's `scipy.ndimage.zoom`.

  `old_grid` defaults to a square grid of N tokens; the result is (1, gh * gw, E) in the input's
  dtype.
  """
  posemb = np.asarray(posemb_1xNxE)
  if posemb.ndim != 3 or posemb.shape[0] != 1:
    raise ValueError(f"position embeddings must be (1, N, E), got {posemb.shape}")
  n, width = posemb.shape[1:]
  if old_grid is None:
    side = math.isqrt(n)
    if side * side != n:
      raise ValueError(f"{n} position embeddings are not a square grid; pass old_grid")
    old_grid = (side, side)
  h, w = old_grid
  gh, gw = new_grid
  if h * w != n:
    raise ValueError(f"old_grid {old_grid} does not hold the {n} position embeddings")
  if (h, w) == (gh, gw):
    return posemb.copy()
  grid = posemb.reshape(h, w, width).astype(np.float64)
  out = np.einsum("ah,bw,hwe->abe", _interp_matrix(h, gh), _interp_matrix(w, gw), grid)
  return out.reshape(1, gh * gw, width).astype(posemb.dtype)


def _renumber_pre_linen(tree: Any) -> Any:
  """Per-class submodule numbers (MlpBlock_3 -> MlpBlock_0), as flax's `convert_pre_linen`."""
  if not isinstance(tree, Mapping):
    return tree
  numbered: dict[str, list[tuple[int, str]]] = {}
  for key in tree:
    if match := re.fullmatch(r"(.*)_(\d+)", key):
      numbered.setdefault(match.group(1), []).append((int(match.group(2)), key))
  rename = {key: f"{prefix}_{i}" for prefix, keys in numbered.items()
            for i, (_, key) in enumerate(sorted(keys))}
  return {rename.get(k, k): _renumber_pre_linen(v) for k, v in tree.items()}


def _to_big_vision_layout(vit: dict[str, Any]) -> dict[str, Any]:
  """Older ViT layouts (AugReg/vit_jax, scanned blocks) -> today's big_vision names."""
  vit = dict(vit)
  transformer = dict(vit.get("Transformer", {}))
  if "posembed_input" in transformer:  # vit_jax / AugReg files.
    vit["pos_embedding"] = transformer.pop("posembed_input")["pos_embedding"]
  if "pos_embedding" in transformer:
    vit["pos_embedding"] = transformer.pop("pos_embedding")
  if "encoderblock" in transformer:  # Blocks saved by nn.scan: one leading depth axis.
    flat = checkpoint.flatten(transformer.pop("encoderblock"))
    depth = {v.shape[0] for v in flat.values()}
    if len(depth) != 1:
      raise ValueError(f"scanned Transformer/encoderblock has mixed depths {sorted(depth)}")
    for i in range(depth.pop()):
      transformer[f"encoderblock_{i}"] = checkpoint.unflatten({k: v[i] for k, v in flat.items()})
  if transformer:
    vit["Transformer"] = _renumber_pre_linen(transformer)
  return vit


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{'a': {'b': x}} -> {'a/b': x}, leaves untouched (no copy to host)."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flat(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _copy(tree: Any) -> Any:
  """A copy of the nested dicts; the leaves are shared."""
  return {k: _copy(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def _num_blocks(flat: Mapping[str, Any]) -> int:
  return len({k.split("/")[0] for k in flat if k.startswith("encoderblock_")})


def _summary(flat_encoder: Mapping[str, Any], kernel: Any, posemb: Any) -> str:
  """'width 768, depth 12, patch 16x16, 196 position embeddings' of one side."""
  tokens = posemb.shape[1] if np.ndim(posemb) == 3 else "?"
  return (f"width {kernel.shape[-1]}, depth {_num_blocks(flat_encoder)}, "
          f"patch {kernel.shape[0]}x{kernel.shape[1]}, {tokens} position embeddings")


def load_encoder(name_or_path: str, params: dict, *, grid: tuple[int, int] | None = None,
                 cache_dir: str | None = None) -> dict:
  """Stage II `params` with encoder, EmbedPatches and pos_embedding_encoder from a ViT .npz.

  `grid` is the model's patch grid (default: square, from `pos_embedding_encoder`). Raises
  ValueError naming every key whose shape or presence does not fit.
  """
  for key in ("encoder", "EmbedPatches", "pos_embedding_encoder"):
    if key not in params:
      raise ValueError(f"stage II params have no {key!r} (top-level keys: {sorted(params)}); "
                       "pass the model's 'params' collection")
  path = resolve(name_or_path, cache_dir)
  vit = _to_big_vision_layout(checkpoint.load_npz(path))
  source = f"ViT checkpoint {path}"
  flat_vit = _flat(vit)
  absent = [k for k in ("Transformer", "embedding/kernel", "embedding/bias", "pos_embedding")
            if k not in flat_vit and k not in vit]
  if absent:
    raise ValueError(f"{source} lacks {absent}; it has {sorted(flat_vit)[:20]}")

  # Position embeddings: drop a [cls] entry (square + 1 tokens), resample to the model's grid.
  posemb = np.asarray(vit["pos_embedding"])
  want_pe = params["pos_embedding_encoder"]
  n = posemb.shape[1] if posemb.ndim == 3 else 0
  if n > 1 and math.isqrt(n - 1) ** 2 == n - 1 and math.isqrt(n) ** 2 != n:
    logging.info("ViT init: dropping the [cls] entry of pos_embedding %s", posemb.shape)
    posemb = posemb[:, 1:]

  vit_encoder = checkpoint.flatten(vit["Transformer"])
  model_encoder = _flat(params["encoder"])
  model_summary = _summary(model_encoder, params["EmbedPatches"]["kernel"], want_pe)
  problems = []
  pairs = {f"encoder/{k}": (f"Transformer/{k}", v) for k, v in vit_encoder.items()}
  pairs["EmbedPatches/kernel"] = ("embedding/kernel", np.asarray(vit["embedding"]["kernel"]))
  pairs["EmbedPatches/bias"] = ("embedding/bias", np.asarray(vit["embedding"]["bias"]))
  wanted = {f"encoder/{k}": v for k, v in model_encoder.items()}
  wanted.update({f"EmbedPatches/{k}": v for k, v in _flat(params["EmbedPatches"]).items()})
  missing = sorted(wanted.keys() - pairs.keys())
  unexpected = sorted(pairs[k][0] for k in pairs.keys() - wanted.keys())
  if missing:
    problems.append(f"missing in the checkpoint ({len(missing)}): {missing[:8]}")
  if unexpected:
    problems.append(f"not in the model ({len(unexpected)}): {unexpected[:8]}")
  for key in sorted(wanted.keys() & pairs.keys()):
    name, value = pairs[key]
    if tuple(value.shape) != tuple(wanted[key].shape):
      problems.append(f"{key}: checkpoint {name} has shape {tuple(value.shape)}, the model "
                      f"expects {tuple(wanted[key].shape)}")
  if posemb.ndim != 3 or posemb.shape[2] != want_pe.shape[2]:
    problems.append(f"pos_embedding_encoder: checkpoint pos_embedding has shape "
                    f"{tuple(posemb.shape)}, the model expects (1, *, {want_pe.shape[2]})")
  if problems:
    vit_summary = _summary(vit_encoder, vit["embedding"]["kernel"], posemb)
    raise ValueError(f"{source} does not fit the stage II encoder (checkpoint: {vit_summary}; "
                     f"model: {model_summary}):\n  " + "\n  ".join(problems))

  if grid is None:
    side = math.isqrt(want_pe.shape[1])
    if side * side != want_pe.shape[1]:
      raise ValueError(f"pos_embedding_encoder {tuple(want_pe.shape)} is not a square grid; "
                       "pass grid=(rows, cols)")
    grid = (side, side)
  if grid[0] * grid[1] != want_pe.shape[1]:
    raise ValueError(f"grid {grid} does not hold pos_embedding_encoder {tuple(want_pe.shape)}")
  side = math.isqrt(posemb.shape[1])
  if side * side != posemb.shape[1]:
    raise ValueError(f"{source}: pos_embedding {tuple(posemb.shape)} is not a square grid "
                     "(with or without a [cls] entry)")
  if (side, side) != tuple(grid):
    logging.info("ViT init: resampling pos_embedding from a %dx%d to a %dx%d grid", side, side,
                 *grid)
    posemb = resample_posemb(posemb, tuple(grid), (side, side))

  out = _copy(params)
  loaded = {k: np.asarray(pairs[k][1], dtype=wanted[k].dtype) for k in wanted}
  out["encoder"] = checkpoint.unflatten(
      {k.removeprefix("encoder/"): v for k, v in loaded.items() if k.startswith("encoder/")})
  out["EmbedPatches"] = {k.removeprefix("EmbedPatches/"): v for k, v in loaded.items()
                         if k.startswith("EmbedPatches/")}
  out["pos_embedding_encoder"] = np.asarray(posemb, dtype=want_pe.dtype)
  skipped = sorted(k for k in vit if k not in ("Transformer", "embedding", "pos_embedding"))
  logging.info("ViT init: loaded %d arrays (%.1fM parameters) from %s into encoder, EmbedPatches "
               "and pos_embedding_encoder (%s); not loaded: %s", len(loaded) + 1,
               (sum(v.size for v in loaded.values()) + posemb.size) / 1e6, path, model_summary,
               skipped)
  return out
