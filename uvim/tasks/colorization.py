"""Colorization: labels are the RGB image in [-1, 1]; the context is its grayscale version.

Stage I sees the raw colours per patch ("color"), is trained with squared error, and predicts
RGB clipped to [-1, 1].
"""

from pathlib import Path

import jax.numpy as jnp
import numpy as np
from PIL import Image

from uvim import visualize
from uvim.tasks import common

LABELS = (3, "float32")  # RGB in [-1, 1]
DEFAULT_TEMPERATURE = 1.0  # T = 0 gives washed-out colours (the paper's colabs sample)

def input_pp(batch: dict, model_config) -> tuple[dict, dict]:
  return {"color": common.patchify(batch["labels"], model_config.patch_size)}, {}


def loss_fn(logits: dict, batch: dict, model_config) -> tuple[jnp.ndarray, dict]:
  """Per-example mean squared error of the colours."""
  target = common.patchify(batch["labels"], model_config.patch_size)
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


def categories(config, model_config) -> list:
  """What `save` needs of the dataset: nothing."""
  return []


def save(outputs: dict, image: np.ndarray, stem: Path, categories=None) -> None:
  """`<stem>.jpg`: the colorized image at the input's size."""
  visualize.save_jpeg(visualize.beside(stem, ".jpg"), render(outputs, image))
