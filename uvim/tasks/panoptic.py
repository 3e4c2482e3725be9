"""Panoptic segmentation: labels (B, H, W, 2) = (semantic class + 1, canonical instance id).

Stage I sees both channels one-hot ("semantics": void + classes, "instances": slots, numbered
by the model's `instance_ids` rule, INSTANCE_IDS), is trained with softmax cross-entropy on
both, and predicts an instance map (argmax) with one class per instance (argmax of the semantic
logits summed over the instance's pixels), since panopticapi splits a segment whose pixels
disagree. Predictions are written in COCO panoptic format.
"""

import json
import math
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from uvim import files, visualize
from uvim.panoptic_format import id_to_rgb, panoptic_from_two_channels, resize_nearest
from uvim.tasks import Scoring, common

NAME = "panoptic_segmentation"
LABELS = (2, "int32")  # (semantic class + 1, instance id) per pixel
DEFAULT_TEMPERATURE = 0.0
EVALUATOR, METRIC, HIGHER_IS_BETTER = "coco_panoptic", "PQ", True
TRUTH = "examples"  # PQ is scored at each image's own resolution, from the tfds example
MULTITASK = dict(evaluator="panoptic_val", name="panoptic", config="configs.panoptic_stage2",
                 labels='coco_panoptic|concat(["semantics","instances"], "labels_panoptic")|',
                 finish='make_canonical(key="labels_panoptic")|', eval_labels="",
                 eval_keep='"image/id"')
# How the oracle numbers the instances (the model's `instance_ids`). "raster": the labels' own
# canonical ids (1..N by centre of mass, top to bottom, as in the original), so an id depends on
# every instance above it, which a left-to-right decoder reads off its prefix and an any-order
# decoder cannot count. "location": each thing instance is named by the patch of its centre,
# and each pixel is labelled with where that patch lies from its own patch (an offset within a
# window), so a patch's labels, and its code word, describe its surroundings alone; stuff
# (classes after the `thing_classes` things) is named by its class. Ids are only names:
# predictions are instance maps under either rule, and PQ does not depend on it.
INSTANCE_IDS = ("raster", "location")
TIE_BIAS = 1e-6  # far above float32 error on distances < 2, far below a patch's squared side


def input_pp(batch: dict, model_config) -> tuple[dict, dict]:
  """Class and instance ids per patch, and counts of pixels whose ids do not fit the model."""
  labels = batch["labels"]
  num_classes = model_config.inputs["semantics"][0]
  num_slots = model_config.inputs["instances"][0]
  semantics, instances = labels[..., 0], labels[..., 1]
  if instance_rule(model_config) == "location":
    instances = location_offsets(location_cells(semantics, instances, model_config),
                                 model_config)
  inputs = {
      "semantics": common.class_patches(semantics, model_config.patch_size),
      "instances": common.class_patches(instances, model_config.patch_size),
  }
  stats = {"pixels_class_out_of_range": jnp.sum((semantics < 0) | (semantics >= num_classes)),
           "pixels_instance_out_of_range": jnp.sum(instances >= num_slots)}
  return inputs, stats


def instance_rule(model_config) -> str:
  """The model's `instance_ids`, checked against what the rule needs."""
  rule = model_config.get("instance_ids", "raster")
  if rule not in INSTANCE_IDS:
    raise ValueError(f"config.model.instance_ids must be one of {INSTANCE_IDS}, got {rule!r}")
  if rule == "location":
    if not model_config.get("thing_classes"):
      raise ValueError("config.model.instance_ids='location' needs config.model.thing_classes "
                       "(classes 0..thing_classes-1 are things, as in COCO)")
    offset_window(model_config)
  return rule


def offset_window(model_config) -> int:
  """R: location labels are offsets in [-R, R]^2 patches, one slot each after void, so the
  `instances` input has (2R + 1)^2 + 1 slots."""
  num_slots = model_config.inputs["instances"][0]
  window = (math.isqrt(num_slots - 1) - 1) // 2
  if (2 * window + 1) ** 2 + 1 != num_slots:
    raise ValueError(f"config.model.inputs.instances has {num_slots} slots: location ids need "
                     "(2R + 1)^2 + 1 (an offset window of R patches each way, and void), e.g. "
                     "50 for R = 3")
  return window


def location_cells(semantics_BxHxW: jnp.ndarray, instances_BxHxW: jnp.ndarray,
                   model_config) -> jnp.ndarray:
  """Each thing pixel's instance named by a patch: 1 + the index (raster order) of the patch
  nearest the instance's centre of mass among those still free (ties: the lower patch), larger
  instances choosing first (ties: the lower input id). Stuff and void pixels get 0,
  unlabelled ones (< 0) stay; things beyond the number of patches get patches + 1."""
  grid = common.grid_of(model_config)
  num_cells = grid[0] * grid[1]
  _, height, width = instances_BxHxW.shape
  rows, cols = jnp.meshgrid((jnp.arange(height) + 0.5) / height, (jnp.arange(width) + 0.5) / width,
                            indexing="ij")
  pixel_yx = jnp.stack([rows.ravel(), cols.ravel()], -1)  # (HW, 2) in [0, 1)
  cell_yx = jnp.stack(jnp.meshgrid((jnp.arange(grid[0]) + 0.5) / grid[0],
                                   (jnp.arange(grid[1]) + 0.5) / grid[1], indexing="ij"),
                      -1).reshape(-1, 2)  # (cells, 2)
  overflow = num_cells + 1

  def one(semantics, ids):
    semantics, ids = semantics.ravel(), ids.ravel()
    thing = (semantics >= 1) & (semantics <= model_config.thing_classes) & (ids > 0)
    index = jnp.where(thing & (ids <= num_cells), ids, 0)  # segment 0 collects the rest
    area = jax.ops.segment_sum(jnp.ones_like(pixel_yx[:, 0]), index, overflow)
    centre = jax.ops.segment_sum(pixel_yx, index, overflow) / jnp.maximum(area, 1)[:, None]
    # Squared distances (segments, cells); TIE_BIAS x cell index settles ties (symmetric
    # layouts are common) the same way on every platform, whatever the float rounding.
    dist = (jnp.sum((centre[:, None] - cell_yx[None]) ** 2, -1)
            + TIE_BIAS * jnp.arange(num_cells))
    area = area.at[0].set(0)
    order = jnp.argsort(-area, stable=True)

    def choose(k, state):
      taken, cell_of = state
      s = order[k]
      c = jnp.argmin(jnp.where(taken, jnp.inf, dist[s]))
      fits = (area[s] > 0) & ~taken[c]
      return taken.at[c].set(taken[c] | fits), cell_of.at[s].set(jnp.where(fits, c + 1, overflow))

    init = (jnp.zeros(num_cells, bool), jnp.full(overflow, overflow, ids.dtype))
    _, cell_of = jax.lax.fori_loop(0, overflow, choose, init)
    cells = jnp.where(thing, jnp.where(ids > num_cells, overflow, cell_of[index]), 0)
    return jnp.where(ids < 0, ids, cells)

  cells = jax.vmap(one)(jnp.asarray(semantics_BxHxW), jnp.asarray(instances_BxHxW))
  return cells.reshape(instances_BxHxW.shape)


def _pixel_cells(shape: tuple[int, int], model_config) -> tuple[jnp.ndarray, jnp.ndarray]:
  """The (row, column) of the patch each pixel of an (H, W) map lies in."""
  p, q = model_config.patch_size
  return jnp.arange(shape[0])[:, None] // p, jnp.arange(shape[1])[None, :] // q


def location_offsets(cells_BxHxW: jnp.ndarray, model_config) -> jnp.ndarray:
  """Patch names (`location_cells`) -> slots: 1 + the offset, within the window, of the named
  patch from the pixel's own; 0 and < 0 stay; offsets beyond the window, and things that got
  no patch, become the slot count (out of range)."""
  window, grid = offset_window(model_config), common.grid_of(model_config)
  span, num_slots = 2 * window + 1, model_config.inputs["instances"][0]
  row, col = _pixel_cells(cells_BxHxW.shape[1:], model_config)
  named = cells_BxHxW > 0
  dy = (cells_BxHxW - 1) // grid[1] - row
  dx = (cells_BxHxW - 1) % grid[1] - col
  inside = (jnp.abs(dy) <= window) & (jnp.abs(dx) <= window) & (cells_BxHxW <= grid[0] * grid[1])
  slots = jnp.where(inside, 1 + (dy + window) * span + (dx + window), num_slots)
  return jnp.where(named, slots, cells_BxHxW)


def location_instances(slots_BxHxW: jnp.ndarray, model_config) -> jnp.ndarray:
  """The inverse of `location_offsets`: each pixel's named patch (1 + index), 0 for slot 0 and
  for offsets that point outside the image."""
  window, grid = offset_window(model_config), common.grid_of(model_config)
  span = 2 * window + 1
  row, col = _pixel_cells(slots_BxHxW.shape[1:], model_config)
  y = row + (slots_BxHxW - 1) // span - window
  x = col + (slots_BxHxW - 1) % span - window
  inside = (slots_BxHxW > 0) & (y >= 0) & (y < grid[0]) & (x >= 0) & (x < grid[1])
  return jnp.where(inside, 1 + y * grid[1] + x, 0)


def loss_fn(logits: dict, batch: dict, model_config,
            inputs: dict | None = None) -> tuple[jnp.ndarray, dict]:
  """Per-example loss: mean cross-entropy of semantics plus that of instances."""
  inputs = inputs or input_pp(batch, model_config)[0]
  losses = {f"loss_{k}": jnp.mean(common.softmax_xent(logits[k], inputs[k]), axis=(1, 2))
            for k in ("semantics", "instances")}
  return losses["loss_semantics"] + losses["loss_instances"], losses


def predict_outputs(logits: dict, model_config) -> dict:
  """{'semantics', 'instances'}: (B, H, W) int32 maps, one class per instance (location ids:
  instances are named by patch, 1 + its index, and stuff by its class with instance 0)."""
  grid = common.grid_of(model_config)
  semantic = common.unpatchify(logits["semantics"], model_config.patch_size, grid)
  instance = common.unpatchify(logits["instances"], model_config.patch_size, grid)
  instances = jnp.argmax(instance, axis=-1)
  location = instance_rule(model_config) == "location"
  num_instances = instance.shape[-1]
  if location:
    instances, num_instances = location_instances(instances, model_config), math.prod(grid) + 1
  flat = instances.reshape(len(instances), -1)
  class_logits = jax.vmap(lambda s, i: jax.ops.segment_sum(s, i, num_instances))(
      semantic.reshape(*flat.shape, -1), flat)  # summed over each instance's pixels
  class_of_instance = jnp.argmax(class_logits, axis=-1)  # (B, instances)
  semantics = jnp.take_along_axis(class_of_instance, flat, 1).reshape(instances.shape)
  if location:  # stuff (instance 0): each pixel's own class
    semantics = jnp.where(instances > 0, semantics, jnp.argmax(semantic, axis=-1))
  return {"semantics": semantics.astype(jnp.int32), "instances": instances.astype(jnp.int32)}


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


def categories(dataset_categories: Callable[[], list[dict] | None],
               model_config) -> list[dict]:
  """What `save` writes the segments with: the dataset's COCO categories (read by
  `dataset_categories`) when it has them, else ids 1..N for the N classes."""
  known = dataset_categories()
  if known:
    return known
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
  visualize.save_png(visualize.beside(stem, ".png"), id_to_rgb(ids))
  isthing = {c["id"]: int(c.get("isthing", 1)) for c in categories}
  info = [{"id": int(i), "category_id": int(c), "isthing": isthing[int(c)],
           "area": int(np.sum(ids == i))}
          for i, c in zip(segments.ids, segments.category_ids, strict=True)]
  files.write_text(visualize.beside(stem, ".json"), json.dumps(
      {"file_name": visualize.beside(stem, ".png").name, "segments_info": info}, indent=1))
  visualize.save_png(visualize.beside(stem, "_overlay.png"),  # already at the image's size
                     render({"semantics": semantics, "instances": instances}, image))


def scoring(categories: list[dict]) -> Scoring:
  """PQ: the state of an image is its PQ sums (true/false positives, misses, IoU per class);
  diversity: the fraction of pixels whose class differs."""
  from evaluators import panoptic

  category_ids = np.array([c["id"] for c in categories])

  def states(outputs, truth):
    gt_ids, gt_segments = panoptic.ground_truth_segments(truth, category_ids)
    rows = []
    for semantics, instances in zip(outputs["semantics"], outputs["instances"], strict=True):
      accumulator = panoptic.PQAccumulator(categories)
      accumulator.add(gt_ids, gt_segments, *panoptic.predicted_segments(
          semantics, instances, gt_ids.shape, category_ids))
      rows.append(accumulator.state().ravel())
    return np.stack(rows)

  def value(state):
    accumulator = panoptic.PQAccumulator(categories)
    accumulator.load_state(state.reshape(4, -1))
    return 100 * accumulator.results()["All"]["pq"]

  return Scoring(states, value, lambda a, b: float(np.mean(a["semantics"] != b["semantics"])),
                 "fraction of pixels whose class differs")
