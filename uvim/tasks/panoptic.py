"""Panoptic segmentation: labels (B, H, W, 2) = (semantic class + 1, canonical instance id).

Stage I sees both channels one-hot ("semantics": void + classes, "instances": slots, numbered
by the model's `instance_ids` rule, INSTANCE_IDS), is trained with softmax cross-entropy on
both, and predicts an instance map (argmax) with one class per instance (argmax of the semantic
logits summed over the instance's pixels), since panopticapi splits a segment whose pixels
disagree. Predictions are written in COCO panoptic format.
"""

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from uvim import visualize
from uvim.panoptic_format import id_to_rgb, panoptic_from_two_channels, resize_nearest
from uvim.tasks import common

LABELS = (2, "int32")  # (semantic class + 1, instance id) per pixel
DEFAULT_TEMPERATURE = 0.0
# How the oracle numbers the instances (the model's `instance_ids`): "raster", the labels' own
# canonical ids (1..N by centre of mass, top to bottom, as in the original); "location", the
# cell of a square grid over the image that holds the instance's centre, so that an id depends
# on where its instance is, not on every instance above it (which an any-order decoder cannot
# count). Ids are only names: PQ, predictions and outputs do not depend on the rule.
INSTANCE_IDS = ("raster", "location")


def input_pp(batch: dict, model_config) -> tuple[dict, dict]:
  """Class and instance ids per patch, and counts of pixels whose ids do not fit the model."""
  labels = batch["labels"]
  num_classes = model_config.inputs["semantics"][0]
  num_slots = model_config.inputs["instances"][0]
  semantics, instances = labels[..., 0], labels[..., 1]
  rule = model_config.get("instance_ids", "raster")
  if rule not in INSTANCE_IDS:
    raise ValueError(f"instance_ids must be one of {INSTANCE_IDS}, got {rule!r}")
  if rule == "location":
    instances = location_ids(instances, num_slots)
  inputs = {
      "semantics": common.class_patches(semantics, model_config.patch_size),
      "instances": common.class_patches(instances, model_config.patch_size),
  }
  stats = {"pixels_class_out_of_range": jnp.sum((semantics < 0) | (semantics >= num_classes)),
           "pixels_instance_out_of_range": jnp.sum(instances >= num_slots)}
  return inputs, stats


TIE_BIAS = 1e-6  # far above float32 error on distances < 2, far below a cell's squared side


def location_side(num_slots: int) -> int:
  """Cells per side of the location-id grid: the largest square that fits the slots after
  void (slot 0)."""
  return math.isqrt(num_slots - 1)


def location_ids(instances_BxHxW: jnp.ndarray, num_slots: int) -> jnp.ndarray:
  """Renumbers instances by location: id 1 + c for the cell c (raster order on a
  `location_side` grid) nearest the instance's centre of mass among those still free (ties:
  the lower cell), larger instances choosing first (ties: the lower input id). Ids 0 (void)
  and < 0 (unlabelled) stay; input ids >= num_slots, and instances beyond the number of
  cells, become num_slots (out of range: an all-zero input, no loss, counted by
  `input_pp`)."""
  _, height, width = instances_BxHxW.shape
  side = location_side(num_slots)
  rows, cols = jnp.meshgrid((jnp.arange(height) + 0.5) / height, (jnp.arange(width) + 0.5) / width,
                            indexing="ij")
  pixel_yx = jnp.stack([rows.ravel(), cols.ravel()], -1)  # (HW, 2) in [0, 1)
  cell = (jnp.arange(side) + 0.5) / side
  cell_yx = jnp.stack(jnp.meshgrid(cell, cell, indexing="ij"), -1).reshape(-1, 2)  # (C, 2)

  def one(ids_HxW):
    ids = ids_HxW.ravel()
    index = jnp.where((ids > 0) & (ids < num_slots), ids, 0)  # segment 0 collects the rest
    area = jax.ops.segment_sum(jnp.ones_like(pixel_yx[:, 0]), index, num_slots)
    centre = jax.ops.segment_sum(pixel_yx, index, num_slots) / jnp.maximum(area, 1)[:, None]
    # Squared distances (slots, C); TIE_BIAS x cell index settles ties (symmetric layouts are
    # common) the same way on every platform, whatever the float rounding.
    dist = jnp.sum((centre[:, None] - cell_yx[None]) ** 2, -1) + TIE_BIAS * jnp.arange(len(cell_yx))
    area = area.at[0].set(0)
    order = jnp.argsort(-area, stable=True)

    def choose(k, state):
      taken, new = state
      s = order[k]
      free = jnp.where(taken, jnp.inf, dist[s])
      c = jnp.argmin(free)
      fits = (area[s] > 0) & ~taken[c]
      new = new.at[s].set(jnp.where(fits, c + 1, num_slots))
      return taken.at[c].set(taken[c] | fits), new

    init = (jnp.zeros(len(cell_yx), bool), jnp.full(num_slots, num_slots, ids.dtype))
    _, new = jax.lax.fori_loop(0, num_slots, choose, init)
    renumbered = jnp.where(ids >= num_slots, num_slots, new[index])
    return jnp.where(ids > 0, renumbered, ids).reshape(ids_HxW.shape)

  return jax.vmap(one)(jnp.asarray(instances_BxHxW))


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
