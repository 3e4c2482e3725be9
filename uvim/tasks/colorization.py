"""Colorization: labels are the RGB image in [-1, 1]; the context is its grayscale version.

Stage I sees the raw colours per patch ("color"), is trained with squared error, and predicts
RGB clipped to [-1, 1].
"""

from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from PIL import Image

from uvim import visualize
from uvim.tasks import Scoring, common, mean_scoring

NAME = "colorization"
LABELS = (3, "float32")  # RGB in [-1, 1]
DEFAULT_TEMPERATURE = 1.0  # T = 0 gives washed-out colours (the paper's colabs sample)
EVALUATOR, METRIC, HIGHER_IS_BETTER = "psnr", "psnr", True
TRUTH = "batch"
# In a multi-task model the colours are the image, which the model then reads in grayscale
# (else colour would be read off its input); its oracle decodes with that grayscale image.
MULTITASK = dict(name="colorization", config="configs.colorization_stage2",
                 evaluator="colorization_val",
                 labels='copy("image", "labels_colorization")|',
                 finish='copy("labels_colorization", "labels")|', eval_labels="",
                 eval_keep='"labels"', resize="bilinear", gray_input=True, context="image")


def input_pp(batch: dict, model_config) -> tuple[dict, dict]:
  return {"color": common.patchify(batch["labels"], model_config.patch_size)}, {}


def loss_fn(logits: dict, batch: dict, model_config,
            inputs: dict | None = None) -> tuple[jnp.ndarray, dict]:
  """Per-example mean squared error of the colours."""
  target = (inputs or input_pp(batch, model_config)[0])["color"]
  loss = jnp.mean((logits["color"] - target) ** 2, axis=(1, 2, 3))
  return loss, {"loss_color": loss}


def predict_outputs(logits: dict, model_config) -> dict:
  """{'color': (B, H, W, 3)} in [-1, 1]."""
  rgb = common.unpatchify(logits["color"], model_config.patch_size, common.grid_of(model_config))
  return {"color": jnp.clip(rgb, -1, 1)}


def render(outputs: dict, image: np.ndarray) -> np.ndarray:
  """The predicted colours as uint8, resized (bilinear) to the image's size."""
  rgb = np.round((np.asarray(outputs["color"]) + 1) * 127.5).clip(0, 255).astype(np.uint8)
  height, width = image.shape[:2]
  return np.asarray(Image.fromarray(rgb).resize((width, height), Image.BILINEAR))


def render_labels(labels: np.ndarray, image: np.ndarray) -> np.ndarray:
  return render({"color": labels}, image)


def error_map(outputs: dict, labels: np.ndarray) -> np.ndarray:
  """(H, W) in [0, 1]: the RGB error's root mean square over channels, over its range (2)."""
  error = np.asarray(outputs["color"]) - labels
  return (np.sqrt(np.mean(error**2, axis=-1)) / 2).astype(np.float32)


def categories(dataset_categories: Callable[[], list[dict] | None], model_config) -> None:
  """What `save` needs of the dataset: nothing."""


def save(outputs: dict, image: np.ndarray, stem: Path, categories=None) -> None:
  """`<stem>.jpg`: the colorized image at the input's size."""
  visualize.save_jpeg(visualize.beside(stem, ".jpg"), render(outputs, image))


def _psnr(outputs: dict, truth: dict) -> np.ndarray:
  """Per-sample PSNR (N,) against `labels`, as the psnr evaluator scores it."""
  from evaluators.colorization import psnr

  colors = jnp.asarray(outputs["color"])
  return np.asarray(psnr(colors, jnp.broadcast_to(truth["labels"], colors.shape)))


def colourfulness(images: np.ndarray) -> np.ndarray:
  """Hasler & Suesstrunk's colourfulness of images (..., H, W, 3) in [-1, 1], on 8-bit levels:
  std_rgyb + 0.3 mean_rgyb of the opponent channels rg = R - G, yb = (R + G) / 2 - B."""
  rgb = (np.asarray(images, np.float64) + 1) * 127.5
  rg = rgb[..., 0] - rgb[..., 1]
  yb = (rgb[..., 0] + rgb[..., 1]) / 2 - rgb[..., 2]
  axes = (-2, -1)
  return (np.sqrt(rg.std(axes) ** 2 + yb.std(axes) ** 2)
          + 0.3 * np.sqrt(rg.mean(axes) ** 2 + yb.mean(axes) ** 2))


def scoring(categories=None) -> Scoring:
  """PSNR per image; diversity: mean |colour difference| in 8-bit levels; extra: the samples'
  colourfulness over the ground truth's (below 1: washed out, T = 0's trouble)."""
  return mean_scoring(
      _psnr, lambda a, b: float(np.mean(np.abs(a["color"] - b["color"])) * 127.5),
      "mean |colour difference| (8-bit levels)",
      extras=lambda outputs, truth: {"colourfulness": float(
          np.mean(colourfulness(outputs["color"])) / max(colourfulness(truth["labels"]), 1e-6))})
