"""Depth: labels (B, H, W, 1) in metres, quantised into uniform bins over [min, max].

Stage I sees the bins one-hot ("depth"), is trained with cross-entropy masked where depth is
missing (<= min), and predicts the centre of the most likely bin.
"""

from pathlib import Path

import jax.numpy as jnp
import numpy as np

from uvim import visualize
from uvim.panoptic_format import resize_nearest
from uvim.tasks import common

MIN_DEPTH, MAX_DEPTH = 1e-3, 10.0


LABELS = (1, "float32")  # metres per pixel
DEFAULT_TEMPERATURE = 0.0

def depth_to_bins(depth: jnp.ndarray, num_bins: int) -> jnp.ndarray:
  """floor((d - min) / (max - min) * bins), clipped to [0, bins - 1]."""
  bins = jnp.floor((depth - MIN_DEPTH) / (MAX_DEPTH - MIN_DEPTH) * num_bins)
  return jnp.clip(bins, 0, num_bins - 1).astype(jnp.int32)


def bins_to_depth(bins: jnp.ndarray, num_bins: int) -> jnp.ndarray:
  """Centre of each bin, in metres."""
  return (bins + 0.5) / num_bins * (MAX_DEPTH - MIN_DEPTH) + MIN_DEPTH


def input_pp(batch: dict, model_config) -> tuple[dict, dict]:
  num_bins = model_config.inputs["depth"][0]
  bins = depth_to_bins(batch["labels"][..., 0], num_bins)
  return {"depth": common.class_patches(bins, model_config.patch_size)}, {}


def loss_fn(logits: dict, batch: dict, model_config) -> tuple[jnp.ndarray, dict]:
  """Per-example cross-entropy over the bins, averaged over pixels with a depth."""
  inputs, _ = input_pp(batch, model_config)
  valid = common.patchify(batch["labels"], model_config.patch_size)[:, :, 0] > MIN_DEPTH
  xent = common.softmax_xent(logits["depth"], inputs["depth"])
  loss = jnp.sum(xent * valid, axis=(1, 2)) / jnp.maximum(jnp.sum(valid, axis=(1, 2)), 1)
  return loss, {"loss_depth": loss}


def predict_outputs(logits: dict, model_config) -> dict:
  """{'depth': (B, H, W)} in metres."""
  probs = common.unpatchify(logits["depth"], model_config.patch_size,
                            common.grid_of(model_config))
  return {"depth": bins_to_depth(jnp.argmax(probs, axis=-1), probs.shape[-1])}


def _depth_at(outputs: dict, shape) -> np.ndarray:
  return resize_nearest(np.asarray(outputs["depth"]), shape)


def render(outputs: dict, image: np.ndarray) -> np.ndarray:
  """A colour-mapped preview of the predicted depth, at the image's size."""
  return visualize.colorize_depth(_depth_at(outputs, image.shape[:2]), MIN_DEPTH, MAX_DEPTH)


def render_labels(labels: np.ndarray, image: np.ndarray) -> np.ndarray:
  return render({"depth": labels[..., 0]}, image)


ERROR_SCALE = 1.0  # metres of absolute error drawn at full intensity


def error_map(outputs: dict, labels: np.ndarray) -> np.ndarray:
  """(H, W) in [0, 1]: |predicted - true depth| / ERROR_SCALE, 0 where depth is missing."""
  truth = labels[..., 0]
  error = np.abs(_depth_at(outputs, truth.shape) - truth) / ERROR_SCALE
  return np.where(truth > MIN_DEPTH, np.minimum(error, 1.0), 0.0).astype(np.float32)


def categories(config, model_config) -> list:
  """What `save` needs of the dataset: nothing."""
  return []


def save(outputs: dict, image: np.ndarray, stem: Path, categories=None) -> None:
  """`<stem>.png`: 16-bit depth in millimetres at the image's size; `<stem>_preview.png`."""
  visualize.save_png(visualize.beside(stem, ".png"),
                     visualize.depth_to_png16(_depth_at(outputs, image.shape[:2])))
  visualize.save_png(visualize.beside(stem, "_preview.png"), render(outputs, image))
