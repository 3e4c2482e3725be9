"""Semantic segmentation: labels (B, H, W, 1) = semantic class + 1 per pixel (0 = void).

Stage I sees the classes one-hot ("semantics"), is trained with softmax cross-entropy (void
pixels included: the model also learns where nothing is labelled), and predicts each pixel's
most likely class. Scored by mean IoU over the classes (the `miou` evaluator below: per-class
intersections and unions summed over the split, void ground truth ignored), as 4M's tutorial
scores its chains. Everything about the task is in this module, its evaluator included.
"""

from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from evaluators.common import Evaluator, register
from uvim import visualize
from uvim.panoptic_format import resize_nearest
from uvim.tasks import Scoring, common

NAME = "semantic_segmentation"
LABELS = (1, "int32")  # semantic class + 1 per pixel, 0 = void
DEFAULT_TEMPERATURE = 0.0
EVALUATOR, METRIC, HIGHER_IS_BETTER = "miou", "miou", True
TRUTH = "batch"
MULTITASK = dict(name="semantic", config="configs.semantic_stage2", evaluator="semantic_val",
                 labels='coco_panoptic|copy("semantics", "labels_semantic")|', finish="",
                 eval_labels="", eval_keep='"labels_semantic"')


def input_pp(batch: dict, model_config) -> tuple[dict, dict]:
  """Class ids per patch, and the count of pixels whose class the model has no slot for."""
  semantics = batch["labels"][..., 0]
  num_classes = model_config.inputs["semantics"][0]
  return ({"semantics": common.class_patches(semantics, model_config.patch_size)},
          {"pixels_class_out_of_range": jnp.sum((semantics < 0) | (semantics >= num_classes))})


def loss_fn(logits: dict, batch: dict, model_config,
            inputs: dict | None = None) -> tuple[jnp.ndarray, dict]:
  """Per-example mean cross-entropy of the classes."""
  inputs = inputs or input_pp(batch, model_config)[0]
  loss = jnp.mean(common.softmax_xent(logits["semantics"], inputs["semantics"]), axis=(1, 2))
  return loss, {"loss_semantics": loss}


def predict_outputs(logits: dict, model_config) -> dict:
  """{'semantics': (B, H, W) int32}, class + 1 (0: void)."""
  probs = common.unpatchify(logits["semantics"], model_config.patch_size,
                            common.grid_of(model_config))
  return {"semantics": jnp.argmax(probs, axis=-1).astype(jnp.int32)}


def confusion(pred_BxHxW: jnp.ndarray, truth_BxHxW: jnp.ndarray,
              num_classes: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Per image and class 1..num_classes - 1: (intersections, unions) (B, classes - 1) in
  pixels, over the pixels whose true class is not void (0)."""
  classes = jnp.arange(1, num_classes)[:, None, None, None]  # (C, 1, 1, 1)
  labelled = truth_BxHxW > 0
  pred, truth = (pred_BxHxW == classes) & labelled, truth_BxHxW == classes
  inter = jnp.sum(pred & truth, axis=(2, 3)).T
  union = jnp.sum(pred | truth, axis=(2, 3)).T
  return inter.astype(jnp.float32), union.astype(jnp.float32)


def miou(inter: np.ndarray, union: np.ndarray) -> float:
  """100 x the mean IoU over the classes that occur (in truth or prediction)."""
  present = union > 0
  return float(100 * np.mean(inter[present] / union[present])) if present.any() else 0.0


@register(EVALUATOR)
class MeanIoU(Evaluator):
  """`miou`: 100 x the mean over classes of intersection / union, each summed over the split
  (void ground truth ignored), and `pixel_accuracy` (%), the predictions resized (nearest) to
  the labels of the run's semantic oracle (`labels`, or `labels_<name>` in a multi-task run)."""

  def __init__(self, name: str, config, options: dict, *, mesh, fns):
    super().__init__(name, config, options, mesh=mesh, fns=fns)
    key, section = labels_of(config)
    num_classes = section.model.inputs["semantics"][0]

    def sums(variables, batch):
      truth = batch[key][..., 0]
      pred = jax.image.resize(self.fns["predict"](variables, batch)["semantics"], truth.shape,
                              method="nearest")
      inter, union = confusion(pred, truth, num_classes)
      mask = batch["_mask"]
      labelled = (truth > 0) & mask[:, None, None]
      return (jnp.sum(inter * mask[:, None], 0), jnp.sum(union * mask[:, None], 0),
              jnp.sum((pred == truth) & labelled), jnp.sum(labelled))

    self._sums = jax.jit(sums)

  def run(self, variables) -> dict[str, float]:
    totals = None
    for batch in self.batches():
      sums = self._sums(variables, batch)
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    inter, union, correct, labelled = jax.device_get(totals)
    return {"miou": miou(inter, union),
            "pixel_accuracy": float(100 * correct / max(labelled, 1))}


def labels_of(config) -> tuple[str, object]:
  """(the batch key of the semantic labels, the model section of the semantic oracle) of a run."""
  if config.model_name == "proj.uvim.vit":
    return "labels", config
  if "oracle" in config:
    return "labels", config.oracle
  name = next(n for n, o in config.oracles.items() if o.task == NAME)
  return f"labels_{name}", config.oracles[name]


def render(outputs: dict, image: np.ndarray) -> np.ndarray:
  """The classes drawn over `image` (uint8, at the image's size), one colour per class."""
  semantics = resize_nearest(np.asarray(outputs["semantics"]), image.shape[:2])
  return visualize.panoptic_overlay(image, semantics, np.zeros_like(semantics))


def render_labels(labels: np.ndarray, image: np.ndarray) -> np.ndarray:
  return render({"semantics": labels[..., 0]}, image)


def error_map(outputs: dict, labels: np.ndarray) -> np.ndarray:
  """(H, W) in {0, 1}: 1 where a labelled pixel's class is wrong."""
  truth = labels[..., 0]
  wrong = resize_nearest(np.asarray(outputs["semantics"]), truth.shape) != truth
  return (wrong & (truth > 0)).astype(np.float32)


def categories(dataset_categories: Callable[[], list[dict] | None], model_config) -> None:
  """What `save` needs of the dataset: nothing (it writes class indices)."""


def save(outputs: dict, image: np.ndarray, stem: Path, categories=None) -> None:
  """`<stem>.png`: class + 1 per pixel (0 void; 8-bit, 16-bit past 255 classes) at the image's
  size; `<stem>_overlay.png`."""
  semantics = resize_nearest(np.asarray(outputs["semantics"]), image.shape[:2])
  dtype = np.uint8 if semantics.max(initial=0) < 256 else np.uint16
  visualize.save_png(visualize.beside(stem, ".png"), semantics.astype(dtype))
  visualize.save_png(visualize.beside(stem, "_overlay.png"),  # already at the image's size
                     render({"semantics": semantics}, image))


def scoring(categories=None) -> Scoring:
  """mIoU: the state of an image is its per-class intersections and unions (in pixels) at the
  labels' resolution; diversity: the fraction of pixels whose class differs."""

  def states(outputs, truth):
    labels = truth["labels"][..., 0]
    pred = np.stack([resize_nearest(np.asarray(p), labels.shape) for p in outputs["semantics"]])
    num_classes = int(max(pred.max(), labels.max())) + 1
    inter, union = confusion(jnp.asarray(pred), jnp.broadcast_to(labels, pred.shape),
                             max(num_classes, 2))
    width = 256  # a fixed number of classes per state, so that states of images sum
    pad = lambda x: np.pad(np.asarray(x), ((0, 0), (0, width - x.shape[1])))
    return np.concatenate([pad(inter), pad(union)], axis=1)

  def value(state):
    inter, union = np.split(np.asarray(state), 2)
    return miou(inter, union)

  return Scoring(states, value, lambda a, b: float(np.mean(a["semantics"] != b["semantics"])),
                 "fraction of pixels whose class differs")
