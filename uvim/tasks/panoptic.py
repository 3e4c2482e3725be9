"""Panoptic segmentation: labels (B, H, W, 2) = (semantic class + 1, canonical instance id).

Stage I sees both channels one-hot ("semantics": void + classes, "instances": slots), is trained
with softmax cross-entropy on both, and predicts an instance map (argmax) with one class per
instance (argmax of the semantic logits summed over the instance's pixels), since panopticapi
splits a segment whose pixels disagree. Predictions are written in COCO panoptic format.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from uvim import visualize
from uvim.panoptic_format import id_to_rgb, panoptic_from_two_channels, resize_nearest
from uvim.tasks import common

LABELS = (2, "int32")  # (semantic class + 1, instance id) per pixel
DEFAULT_TEMPERATURE = 0.0

def input_pp(batch: dict, model_config) -> tuple[dict, dict]:
  """Class and instance ids per patch, and counts of pixels whose ids do not fit the model."""
  labels = batch["labels"]
  num_classes = model_config.inputs["semantics"][0]
  num_slots = model_config.inputs["instances"][0]
  semantics, instances = labels[..., 0], labels[..., 1]
  inputs = {
      "semantics": common.class_patches(semantics, model_config.patch_size),
      "instances": common.class_patches(instances, model_config.patch_size),
  }
  stats = {"pixels_class_out_of_range": jnp.sum((semantics < 0) | (semantics >= num_classes)),
           "pixels_instance_out_of_range": jnp.sum(instances >= num_slots)}
  return inputs, stats


def loss_fn(logits: dict, batch: dict, model_config) -> tuple[jnp.ndarray, dict]:
  """Per-example loss: mean cross-entropy of semantics plus that of instances."""
  inputs, _ = input_pp(batch, model_config)
  losses = {f"loss_{k}": jnp.mean(common.softmax_xent(logits[k], inputs[k]), axis=(1, 2))
            for k in ("semantics", "instances")}
  return losses["loss_semantics"] + losses["loss_instances"], losses


def predict_outputs(logits: dict, model_config) -> dict:
  """{'semantics', 'instances'}: (B, H, W) int32 maps, one class per instance."""
  grid = common.grid_of(model_config)
  semantic = common.unpatchify(logits["semantics"], model_config.patch_size, grid)
  instance = common.unpatchify(logits["instances"], model_config.patch_size, grid)
  instances = jnp.argmax(instance, axis=-1)
  membership = jax.nn.one_hot(instances, instance.shape[-1], dtype=semantic.dtype)
  class_logits = jnp.einsum("bhwn,bhwc->bnc", membership, semantic)
  class_of_instance = jnp.argmax(class_logits, axis=-1)  # (B, slots)
  semantics = jnp.take_along_axis(class_of_instance, instances.reshape(len(instances), -1), 1)
  return {"semantics": semantics.reshape(instances.shape).astype(jnp.int32),
          "instances": instances.astype(jnp.int32)}


def render(outputs: dict, image: np.ndarray) -> np.ndarray:
  """A colour overlay of one prediction on `image` (uint8, at the image's size)."""
  shape = image.shape[:2]
  return visualize.panoptic_overlay(image, resize_nearest(outputs["semantics"], shape),
                                    resize_nearest(outputs["instances"], shape))


def render_labels(labels: np.ndarray, image: np.ndarray) -> np.ndarray:
  """The ground-truth labels (H, W, 2) drawn like a prediction."""
  return render({"semantics": labels[..., 0], "instances": labels[..., 1]}, image)


def error_map(outputs: dict, labels: np.ndarray) -> np.ndarray:
  """(H, W) in {0, 1}: 1 where a pixel's class is wrong, or where its predicted segment is not
  the ground-truth segment that segment overlaps most (merged, split or misplaced segments)."""
  pred = np.asarray(outputs["semantics"]) * 1000 + np.asarray(outputs["instances"])
  truth = labels[..., 0].astype(np.int64) * 1000 + labels[..., 1]
  pairs, counts = np.unique(np.stack([pred.ravel(), truth.ravel()]), axis=1, return_counts=True)
  best: dict[int, tuple[int, int]] = {}
  for (p, t), n in zip(pairs.T, counts, strict=True):
    if n > best.get(p, (0, -1))[1]:
      best[p] = (t, n)
  ids, inverse = np.unique(pred, return_inverse=True)
  matched = np.array([best[i][0] for i in ids])[inverse].reshape(pred.shape)
  wrong_class = np.asarray(outputs["semantics"]) != labels[..., 0]
  return ((matched != truth) | wrong_class).astype(np.float32)


def categories(config, model_config) -> list[dict]:
  """What `save` writes the segments with: the dataset's COCO categories when known, else ids
  1..N for the N classes."""
  from absl import logging

  from uvim import input_pipeline
  from uvim.panoptic_format import panoptic_categories

  try:
    return panoptic_categories(input_pipeline.get_builder(config.dataset, config.data_dir))
  except Exception as e:  # any reason: fall back to class indices
    logging.warning("No categories from %s (%s); category_id = class index + 1", config.dataset,
                    e)
    num_classes = model_config.inputs["semantics"][0] - 1
    return [{"id": k + 1, "name": f"class {k + 1}", "isthing": 1} for k in range(num_classes)]


def save(outputs: dict, image: np.ndarray, stem: Path, categories: list[dict]) -> None:
  """COCO panoptic format at the image's size: `<stem>.png` (ids as RGB), `<stem>.json`
  (segments with COCO category ids), and `<stem>_overlay.png`."""
  shape = image.shape[:2]
  semantics = resize_nearest(outputs["semantics"], shape)
  instances = resize_nearest(outputs["instances"], shape)
  category_ids = np.array([c["id"] for c in categories])
  ids, segments = panoptic_from_two_channels(semantics, instances, category_ids)
  visualize.save_png(stem.with_suffix(".png"), id_to_rgb(ids))
  isthing = {c["id"]: int(c.get("isthing", 1)) for c in categories}
  info = [{"id": int(i), "category_id": int(c), "isthing": isthing[int(c)],
           "area": int(np.sum(ids == i))}
          for i, c in zip(segments.ids, segments.category_ids, strict=True)]
  stem.with_suffix(".json").write_text(json.dumps(
      {"file_name": stem.with_suffix(".png").name, "segments_info": info}, indent=1))
  visualize.save_png(stem.with_name(stem.name + "_overlay.png"), render(outputs, image))
