"""Depth: labels (B, H, W, 1) in metres, quantised into uniform bins over [min, max].

Stage I sees the bins one-hot ("depth"), is trained with cross-entropy masked where depth is
missing (<= min), and predicts the centre of the most likely bin.
"""

from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from uvim import visualize
from uvim.panoptic_format import resize_nearest
from uvim.tasks import Scoring, common, mean_scoring

MIN_DEPTH, MAX_DEPTH = 1e-3, 10.0


NAME = "depth"
LABELS = (1, "float32")  # metres per pixel
DEFAULT_TEMPERATURE = 0.0
EVALUATOR, METRIC, HIGHER_IS_BETTER = "nyu_depth", "rmse", False
TRUTH = "batch"
MULTITASK = dict(evaluator="nyu_depth_val", name="depth", config="configs.depth_stage2",
                 labels='nyu_depth(outkey="labels_depth")|', finish="",
                 eval_labels='copy("labels_depth", "ground_truth")|', eval_keep='"ground_truth"')


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


def loss_fn(logits: dict, batch: dict, model_config,
            inputs: dict | None = None) -> tuple[jnp.ndarray, dict]:
  """Per-example cross-entropy over the bins, averaged over pixels with a depth."""
  inputs = inputs or input_pp(batch, model_config)[0]
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


def categories(dataset_categories: Callable[[], list[dict] | None], model_config) -> None:
  """What `save` needs of the dataset: nothing."""


def save(outputs: dict, image: np.ndarray, stem: Path, categories=None) -> None:
  """`<stem>.png`: 16-bit depth in millimetres at the image's size; `<stem>_preview.png`."""
  depth = _depth_at(outputs, image.shape[:2])  # resized once
  visualize.save_png(visualize.beside(stem, ".png"), visualize.depth_to_png16(depth))
  visualize.save_png(visualize.beside(stem, "_preview.png"), render({"depth": depth}, image))


def _rmse(outputs: dict, truth: dict) -> np.ndarray:
  """Per-sample RMSE (N,) against `ground_truth`, as the nyu_depth evaluator scores it."""
  import jax

  from evaluators.depth import depth_metrics

  gt = truth["ground_truth"][..., 0]
  pred = jax.image.resize(jnp.asarray(outputs["depth"]), (len(outputs["depth"]), *gt.shape),
                          method="nearest")
  return np.asarray(depth_metrics(pred, jnp.broadcast_to(gt, pred.shape))["rmse"])


def scoring(categories=None) -> Scoring:
  """RMSE per image; diversity: mean |depth difference| (m)."""
  return mean_scoring(_rmse, lambda a, b: float(np.mean(np.abs(a["depth"] - b["depth"]))),
                      "mean |depth difference| (m)")
