r"""Panoptic quality (PQ, SQ, RQ) with panopticapi's exact rules, vectorised.

Rules (panopticapi `pq_compute`): a predicted and a ground-truth segment of the same category
match when IoU > 0.5, where the union leaves out the prediction's pixels on ground-truth void;
crowd ground truth is never matched; an unmatched prediction is not a false positive when more
than half of it lies on void or on the (last listed) crowd region of its category. PQ, SQ and
RQ are computed per category and averaged over the categories that occur, for All, Things and
Stuff. Ground-truth areas come from the annotations, predicted areas from the pixels.

Per image, all (ground truth, prediction) intersections come from the runs of equal id pairs
along the flattened maps; the matching rules then work on arrays of segments, and the
per-category sums add across images and hosts.

Score a COCO-format prediction folder:

  python -m evaluators.panoptic --gt_json F --gt_folder D --pred_json F --pred_folder D
"""

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import numpy as np
from PIL import Image

from evaluators.common import Evaluator, register
from uvim import input_pipeline
from uvim.panoptic_format import (
  VOID,
  Segments,
  id_to_rgb,
  panoptic_categories,
  panoptic_from_two_channels,
  resize_nearest,
  rgb_to_id,
)


class PQAccumulator:
  """Per-category true/false positives, false negatives and IoU sums over images."""

  def __init__(self, categories: Sequence[Mapping]):
    """`categories`: COCO category dicts with `id` and `isthing`."""
    self.categories = sorted(categories, key=lambda c: c["id"])
    self.category_ids = np.array([c["id"] for c in self.categories], np.int64)
    self.isthing = np.array([bool(c["isthing"]) for c in self.categories])
    n = len(self.categories)
    self.tp, self.fp, self.fn = (np.zeros(n, np.int64) for _ in range(3))
    self.iou = np.zeros(n, np.float64)

  def _category_index(self, category_ids: np.ndarray, image: str) -> np.ndarray:
    index = np.searchsorted(self.category_ids, category_ids)
    index = np.minimum(index, len(self.category_ids) - 1)
    bad = self.category_ids[index] != category_ids
    if bad.any():
      raise KeyError(f"{image}: unknown category ids {_ints(category_ids[bad])}")
    return index

  def add(self, gt_ids: np.ndarray, gt: Segments, pred_ids: np.ndarray, pred: Segments,
          image: str = "image") -> None:
    """Adds one image: segment-id maps of equal shape and their segments."""
    if gt_ids.shape != pred_ids.shape:
      raise ValueError(f"{image}: prediction {pred_ids.shape} and ground truth {gt_ids.shape} "
                       "differ in size")
    # Runs of equal (ground truth, prediction) id pairs in the flattened maps, their segment
    # indices, then the pixel counts of every pair of segments.
    run_gt, run_pred, lengths = _runs(gt_ids.ravel(), pred_ids.ravel())
    gt_index = _index_of(run_gt, gt.ids, void=len(gt.ids), unknown=len(gt.ids) + 1)
    pred_index = _index_of(run_pred, pred.ids, void=len(pred.ids), unknown=-1)
    if (pred_index < 0).any():
      raise KeyError(f"{image}: segment ids {_ints(run_pred[pred_index < 0])} are in the "
                     "prediction PNG but not in its segments_info")
    inter = np.zeros((len(gt.ids) + 2, len(pred.ids) + 1), np.int64)
    np.add.at(inter, (gt_index, pred_index), lengths)
    pred_area = inter.sum(0)[:-1]
    if (pred_area == 0).any():
      raise KeyError(f"{image}: segments {_ints(pred.ids[pred_area == 0])} are in "
                     "segments_info but not in the prediction PNG")
    gt_cat = self._category_index(gt.category_ids, image)
    pred_cat = self._category_index(pred.category_ids, image)
    void_inter = inter[len(gt.ids), :-1]
    inter = inter[:len(gt.ids), :-1]  # real segments only

    # Matches: IoU > 0.5 between non-crowd ground truth and predictions of its category.
    union = pred_area[None, :] + gt.areas[:, None] - inter - void_inter[None, :]
    candidate = ((inter > 0) & ~gt.iscrowd[:, None] & (gt_cat[:, None] == pred_cat[None, :]))
    iou = np.where(candidate, inter / np.where(union > 0, union, 1), 0.0)
    matched = candidate & (iou > 0.5)
    g, p = np.nonzero(matched)
    np.add.at(self.tp, gt_cat[g], 1)
    np.add.at(self.iou, gt_cat[g], iou[g, p])
    gt_matched, pred_matched = matched.any(1), matched.any(0)
    np.add.at(self.fn, gt_cat[~gt_matched & ~gt.iscrowd], 1)

    # Unmatched predictions mostly on void or on their category's crowd region are ignored.
    crowd_of_category = np.full(len(self.categories), -1)
    crowd = np.nonzero(gt.iscrowd)[0]
    crowd_of_category[gt_cat[crowd]] = crowd  # the last listed crowd segment wins, as there
    crowd_index = crowd_of_category[pred_cat]
    crowd_inter = np.where(crowd_index >= 0,
                           inter[np.maximum(crowd_index, 0), np.arange(len(pred.ids))], 0)
    ignored = (void_inter + crowd_inter) / pred_area > 0.5
    np.add.at(self.fp, pred_cat[~pred_matched & ~ignored], 1)

  def state(self) -> np.ndarray:
    """The sums as one float64 array (tp, fp, fn, iou), for gathering across hosts."""
    return np.stack([self.tp, self.fp, self.fn, self.iou]).astype(np.float64)

  def load_state(self, sums: np.ndarray) -> None:
    self.tp, self.fp, self.fn = (sums[i].astype(np.int64) for i in range(3))
    self.iou = sums[3].astype(np.float64)

  def results(self) -> dict:
    """{'All'|'Things'|'Stuff': {'pq', 'sq', 'rq', 'n'}, 'per_class': {id: {'pq','sq','rq'}}}."""
    present = (self.tp + self.fp + self.fn) > 0
    denominator = np.where(present, self.tp + 0.5 * self.fp + 0.5 * self.fn, 1.0)
    pq = np.where(present, self.iou / denominator, 0.0)
    sq = np.where(self.tp > 0, self.iou / np.maximum(self.tp, 1), 0.0)
    rq = np.where(present, self.tp / denominator, 0.0)
    out = {}
    for name, select in (("All", np.ones_like(present)), ("Things", self.isthing),
                         ("Stuff", ~self.isthing)):
      use = present & select
      n = int(use.sum())
      out[name] = {"pq": float(pq[use].sum() / n) if n else 0.0,
                   "sq": float(sq[use].sum() / n) if n else 0.0,
                   "rq": float(rq[use].sum() / n) if n else 0.0, "n": n}
    out["per_class"] = {int(c): {"pq": float(a), "sq": float(b), "rq": float(r)}
                        for c, a, b, r in zip(self.category_ids, pq, sq, rq, strict=True)}
    return out


def _ints(x: np.ndarray) -> list[int]:
  return sorted({int(v) for v in np.ravel(x)})


def _runs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The maximal runs of equal (a, b) pairs in two 1-D arrays: each run's values and length."""
  start = np.ones(a.size, bool)
  np.not_equal(a[1:], a[:-1], out=start[1:])
  start[1:] |= b[1:] != b[:-1]
  starts = np.flatnonzero(start)
  return a[starts], b[starts], np.diff(starts, append=a.size)


def _index_of(id_map: np.ndarray, ids: np.ndarray, void: int, unknown: int) -> np.ndarray:
  """Per pixel, the position of its id in `ids`; `void` for id 0, `unknown` for others."""
  order = np.argsort(ids)
  sorted_ids = ids[order]
  pos = np.minimum(np.searchsorted(sorted_ids, id_map), max(len(ids) - 1, 0))
  found = (sorted_ids[pos] == id_map) if len(ids) else np.zeros(id_map.shape, bool)
  index = np.where(found, order[pos] if len(ids) else 0, unknown)
  return np.where(id_map == VOID, void, index)


def ground_truth_segments(example: dict, category_ids: np.ndarray) -> tuple[np.ndarray, Segments]:
  """The segment-id map and segments of a raw tfds example's panoptic ground truth."""
  objects = example["panoptic_objects"]
  return rgb_to_id(example["panoptic_image"]), Segments(
      objects["id"], category_ids[objects["label"]], objects["is_crowd"].astype(bool),
      objects["area"])


def predicted_segments(semantics: np.ndarray, instances: np.ndarray, shape: tuple[int, int],
                       category_ids: np.ndarray) -> tuple[np.ndarray, Segments]:
  """The segment-id map and segments of a two-channel prediction, resized (nearest) to
  `shape`, the ground truth's."""
  return panoptic_from_two_channels(resize_nearest(semantics, shape),
                                    resize_nearest(instances, shape), category_ids)


@register("coco_panoptic")
class CocoPanoptic(Evaluator):
  """PQ of the model's panoptic predictions, scored at each image's original resolution.

  `pp` makes the model inputs (evaluators hand in decoded images); `write_predictions` names
  a folder to write COCO-format PNGs and JSON into.
  """

  OPTIONS = Evaluator.OPTIONS | {"write_predictions"}

  def __init__(self, name: str, config, options: dict, *, mesh, fns):
    super().__init__(name, config, options, mesh=mesh, fns=fns)
    self.write_to = options.get("write_predictions")
    self._predict = jax.jit(self.fns["predict"])

  def run(self, variables) -> dict[str, float]:
    builder = input_pipeline.get_builder(self.config.dataset, self.config.data_dir)
    categories = panoptic_categories(builder)
    category_ids = np.array([c["id"] for c in categories])
    accumulator, writer = PQAccumulator(categories), None
    if self.write_to:
      writer = PredictionWriter(Path(self.write_to), categories)
    ground_truth = input_pipeline.host_examples(builder, self.split)
    for batch in self.batches():
      pred = jax.tree.map(input_pipeline.local_rows, self._predict(variables, batch))
      mask = input_pipeline.local_rows(batch[input_pipeline.MASK_KEY])
      for i in np.nonzero(mask)[0]:
        gt = next(ground_truth)
        gt_ids, gt_segments = ground_truth_segments(gt, category_ids)
        pred_ids, pred_segments = predicted_segments(pred["semantics"][i], pred["instances"][i],
                                                     gt_ids.shape, category_ids)
        image = f"image {int(gt['image/id'])}"
        accumulator.add(gt_ids, gt_segments, pred_ids, pred_segments, image=image)
        if writer:
          writer.add(int(gt["image/id"]), pred_ids, pred_segments)
    if writer:
      writer.close()
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      accumulator.load_state(multihost_utils.process_allgather(accumulator.state()).sum(0))
    results = accumulator.results()
    return {f"{metric}{suffix}": 100 * results[group][metric.lower()]
            for group, suffix in (("All", ""), ("Things", "_things"), ("Stuff", "_stuff"))
            for metric in ("PQ", "SQ", "RQ")}


class PredictionWriter:
  """Writes predictions in COCO panoptic format: <dir>/panoptic_pred/*.png and a JSON."""

  def __init__(self, directory: Path, categories: list[dict]):
    self.directory, self.categories = directory, categories
    (directory / "panoptic_pred").mkdir(parents=True, exist_ok=True)
    self.annotations = []

  def add(self, image_id: int, ids: np.ndarray, segments: Segments) -> None:
    name = f"{image_id:012d}.png"
    Image.fromarray(id_to_rgb(ids)).save(self.directory / "panoptic_pred" / name)
    self.annotations.append({"image_id": image_id, "file_name": name, "segments_info": [
        {"id": int(i), "category_id": int(c)}
        for i, c in zip(segments.ids, segments.category_ids, strict=True)]})

  def close(self) -> None:
    suffix = f".{jax.process_index()}" if jax.process_count() > 1 else ""
    path = self.directory / f"panoptic_pred{suffix}.json"
    path.write_text(json.dumps({"annotations": self.annotations,
                                "categories": self.categories}))


def score_folders(gt_json: str, gt_folder: str, pred_json: str, pred_folder: str) -> dict:
  """PQ of a COCO-format prediction folder against a ground-truth folder."""
  gt_data = json.loads(Path(gt_json).read_text())
  pred_data = json.loads(Path(pred_json).read_text())
  predictions = {a["image_id"]: a for a in pred_data["annotations"]}
  accumulator = PQAccumulator(gt_data["categories"])
  for gt_ann in gt_data["annotations"]:
    image_id = gt_ann["image_id"]
    if image_id not in predictions:
      raise KeyError(f"{pred_json}: no prediction for image {image_id}")
    pred_ann = predictions[image_id]
    gt_ids = rgb_to_id(np.asarray(Image.open(Path(gt_folder) / gt_ann["file_name"])))
    pred_ids = rgb_to_id(np.asarray(Image.open(Path(pred_folder) / pred_ann["file_name"])))
    accumulator.add(gt_ids, Segments.from_coco(gt_ann["segments_info"]), pred_ids,
                    Segments.from_coco(pred_ann["segments_info"]),
                    image=f"image {image_id} ({pred_ann['file_name']})")
  return accumulator.results()


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  results = score_folders(f.gt_json, f.gt_folder, f.pred_json, f.pred_folder)
  print(json.dumps({k: v for k, v in results.items() if k != "per_class"}, indent=2))


if __name__ == "__main__":
  from absl import app, flags

  flags.DEFINE_string("gt_json", None, "Ground-truth panoptic JSON.", required=True)
  flags.DEFINE_string("gt_folder", None, "Ground-truth PNG folder.", required=True)
  flags.DEFINE_string("pred_json", None, "Prediction panoptic JSON.", required=True)
  flags.DEFINE_string("pred_folder", None, "Prediction PNG folder.", required=True)
  app.run(main)
