"""The COCO panoptic format, shared by the panoptic task, its evaluator, predict.py and the
datasets: segment ids <-> PNG colours, segments, two-channel (class, instance) predictions ->
segments, nearest-neighbour resizing of label maps, and a dataset's categories."""

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

VOID = 0


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
  """COCO panoptic PNG colours (uint8, ..., 3; extra channels ignored) -> uint32 segment ids:
  R + 256 G + 256^2 B."""
  flat = np.ascontiguousarray(np.asarray(rgb)[..., :3], np.uint8).reshape(-1)
  ids = np.empty(np.shape(rgb)[:-1], np.uint32)
  out = ids.reshape(-1)
  if out.size:
    # Each pixel's bytes and the next pixel's red as one little-endian word, less that red.
    words = np.ndarray((out.size - 1,), "<u4", flat, strides=(3,))
    np.bitwise_and(words, 0xFFFFFF, out=out[:-1])
    out[-1] = int.from_bytes(flat[-3:].tobytes(), "little")
  return ids


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
  """Segment ids -> COCO panoptic PNG colours (uint8, ..., 3)."""
  return np.stack([ids % 256, ids // 256 % 256, ids // 256**2], -1).astype(np.uint8)


@dataclasses.dataclass
class Segments:
  """The segments of one image: ids, COCO category ids, crowd flags, areas (ground truth)."""
  ids: np.ndarray
  category_ids: np.ndarray
  iscrowd: np.ndarray | None = None
  areas: np.ndarray | None = None

  @classmethod
  def from_coco(cls, segments_info: Sequence[Mapping]) -> "Segments":
    return cls(ids=np.array([s["id"] for s in segments_info], np.int64),
               category_ids=np.array([s["category_id"] for s in segments_info], np.int64),
               iscrowd=np.array([s.get("iscrowd", 0) for s in segments_info], bool),
               areas=np.array([s.get("area", 0) for s in segments_info], np.int64))


def panoptic_from_two_channels(semantics: np.ndarray, instances: np.ndarray,
                               category_ids: np.ndarray) -> tuple[np.ndarray, Segments]:
  """A (class + 1, instance) prediction -> segment-id map and segments; class 0 is void.

  Each distinct (class, instance) pair with class > 0 becomes one segment, as panopticapi's
  two-channel converter does.
  """
  key = semantics.astype(np.int64) * (int(instances.max(initial=0)) + 1) + instances
  pairs, inverse = np.unique(key, return_inverse=True)
  pair_class = pairs // (int(instances.max(initial=0)) + 1)
  ids = np.arange(1, len(pairs) + 1)
  segment_ids = np.where(pair_class > 0, ids, VOID)[inverse.reshape(key.shape)]
  keep = pair_class > 0
  return segment_ids, Segments(ids=ids[keep], category_ids=category_ids[pair_class[keep] - 1])


def resize_nearest(x: np.ndarray, shape: Sequence[int]) -> np.ndarray:
  """Nearest-neighbour resize of a 2-D map with half-pixel centres (as tf.image.resize)."""
  h, w = x.shape[:2]
  rows = np.minimum(((np.arange(shape[0]) + 0.5) * h / shape[0]).astype(int), h - 1)
  cols = np.minimum(((np.arange(shape[1]) + 0.5) * w / shape[1]).astype(int), w - 1)
  return x[rows][:, cols]


def panoptic_categories(builder) -> list[dict]:
  """COCO categories of a panoptic tfds dataset (label k is the k-th by id).

  Local builders keep them in their metadata; for the catalog `coco/2017_panoptic` (labels
  sorted by category id, the 80 things first) the ids are stand-ins, which PQ does not depend
  on; write predictions for official scoring from a `coco_panoptic_folder` dataset instead.
  """
  metadata = builder.info.metadata or {}
  if "categories" in metadata:
    return sorted(metadata["categories"], key=lambda c: c["id"])
  names = builder.info.features["panoptic_objects"]["label"].names
  return [{"id": k + 1, "name": n, "isthing": int(k < 80)} for k, n in enumerate(names)]
