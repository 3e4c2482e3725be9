"""The paper's Listing-1 pp strings end to end on a COCO-style example built here.

The example has rectangular segments of distinct categories, each painted in its own colour,
so every output pixel can be checked: its label must name the segment whose colour the image
shows there, whatever flip and crop were drawn.
"""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from test_pp_ops import canonical_reference

from configs import panoptic_stage1, panoptic_stage2
from pp.builder import get_preprocess_fn

H, W, RES = 96, 128, 64
# (rows, cols, COCO panoptic segment id, tfds category label, colour)
SEGMENTS = [
    ((slice(0, 30), slice(0, 128)), 5263440, 100, (90, 160, 250)),   # sky (stuff)
    ((slice(30, 96), slice(0, 128)), 3355443, 120, (120, 90, 40)),   # ground (stuff)
    ((slice(40, 80), slice(10, 50)), 16711680, 0, (250, 20, 20)),    # person (thing A)
    ((slice(50, 90), slice(70, 120)), 65280, 2, (20, 250, 20)),      # car (thing B)
    ((slice(10, 25), slice(90, 115)), 255, 4, (240, 240, 0)),        # plane (thing C)
]
VOID = ((slice(85, 96), slice(0, 20)), (0, 0, 0))
THING_A, THING_B = 0 + 1, 2 + 1  # their semantics (label + 1)


def coco_example() -> dict:
  """One example as tfds `coco/2017_panoptic` yields it with image decoding skipped."""
  ids = np.zeros((H, W), np.int64)
  image = np.zeros((H, W, 3), np.uint8)
  for (rows, cols), segment_id, _, colour in SEGMENTS:
    ids[rows, cols] = segment_id
    image[rows, cols] = colour
  ids[VOID[0]] = 0
  image[VOID[0]] = VOID[1]
  panoptic = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  objects = {
      "id": np.array([s[1] for s in SEGMENTS], np.int64),
      "label": np.array([s[2] for s in SEGMENTS], np.int64),
      "is_crowd": np.zeros(len(SEGMENTS), bool),
      "area": np.array([(ids == s[1]).sum() for s in SEGMENTS], np.int64),
      "bbox": np.zeros((len(SEGMENTS), 4), np.float32),
  }
  return {"image": buf.getvalue(), "panoptic_image": panoptic, "panoptic_objects": objects,
          "image/id": np.int64(42)}


def colour_of_semantics() -> dict[int, np.ndarray]:
  colours = {label + 1: np.array(colour) for _, _, label, colour in SEGMENTS}
  colours[0] = np.array(VOID[1])
  return colours


def uniform_neighbourhood(labels: np.ndarray, radius: int) -> np.ndarray:
  """Mask of pixels whose (2r+1)^2 neighbourhood has a single label."""
  h, w = labels.shape
  padded = np.pad(labels, radius, mode="edge")
  same = np.ones((h, w), bool)
  for dy in range(2 * radius + 1):
    for dx in range(2 * radius + 1):
      same &= padded[dy:dy + h, dx:dx + w] == labels
  return same


def check_output(out: dict) -> None:
  """Image and labels aligned; instances canonical and one class each."""
  image, labels = out["image"], out["labels"]
  assert image.shape == (RES, RES, 3) and image.dtype == np.float32
  assert labels.shape == (RES, RES, 2) and labels.dtype == np.int32
  assert image.min() >= -1 and image.max() <= 1
  semantics, instances = labels[..., 0], labels[..., 1]
  # Alignment: away from boundaries, the colour is the colour of the labelled segment.
  inside = uniform_neighbourhood(semantics, radius=3)
  assert inside.sum() > 200
  colours = colour_of_semantics()
  expected = np.stack([colours[s] for s in semantics[inside]])
  np.testing.assert_allclose((image[inside] + 1) * 127.5, expected, atol=1e-3)
  # One class per instance and one instance per class (every segment has its own category).
  for i in np.unique(instances[instances > 0]):
    assert len(np.unique(semantics[instances == i])) == 1
  assert ((instances == 0) == (semantics == 0)).all()
  # Canonical: ids are 1..K in raster order of the centres of mass.
  k = len(np.unique(instances[instances > 0]))
  assert set(np.unique(instances)) - {0} == set(range(1, k + 1))
  np.testing.assert_array_equal(instances, canonical_reference(instances, major=0))


def run_in_dataset(fn, examples):
  ds = tf.data.Dataset.from_tensor_slices(
      tf.nest.map_structure(lambda *xs: np.stack(xs), *examples)).map(fn)
  return [tf.nest.map_structure(lambda t: t.numpy(), x) for x in ds]


@pytest.fixture(scope="module")
def stage1():
  return panoptic_stage1.get_config(f"res={RES}")


def test_listing1_train_pp_flips_crops_and_stays_aligned(stage1):
  fn = get_preprocess_fn(stage1.pp_train)
  example = coco_example()
  outs = run_in_dataset(fn, [{**example, "_rng": np.array([s, 1])} for s in range(24)])
  orders, sky_fractions = set(), []
  for out in outs:
    assert sorted(out) == ["image", "labels"]
    check_output(out)
    semantics = out["labels"][..., 0]
    a, b = np.argwhere(semantics == THING_A), np.argwhere(semantics == THING_B)
    if len(a) and len(b):
      orders.add(a[:, 1].mean() < b[:, 1].mean())
    sky_fractions.append((semantics == 100 + 1).mean())
  assert orders == {True, False}, "expected both flipped and unflipped outputs"
  assert np.ptp(sky_fractions) > 0.2, "expected crops that change the visible content"
  # Eagerly, the same per-example seed gives the same output.
  eager = fn({**example, "_rng": np.array([3, 1])})
  np.testing.assert_array_equal(eager["labels"].numpy(), outs[3]["labels"])


def test_listing1_eval_pp_is_deterministic_and_exact(stage1):
  fn = get_preprocess_fn(stage1.pp_eval)
  out = run_in_dataset(fn, [coco_example()])[0]
  check_output(out)
  # Labels are a nearest-neighbour resize (half-pixel centres) of the full label map.
  rows = np.floor((np.arange(RES) + 0.5) * H / RES).astype(int)
  cols = np.floor((np.arange(RES) + 0.5) * W / RES).astype(int)
  semantics = np.zeros((H, W), np.int32)
  for (r, c), _, label, _ in SEGMENTS:
    semantics[r, c] = label + 1
  semantics[VOID[0]] = 0
  np.testing.assert_array_equal(out["labels"][..., 0], semantics[rows][:, cols])
  assert len(np.unique(out["labels"][..., 1])) == len(SEGMENTS) + 1  # every segment and void


def test_eval_pp_of_the_evaluators_skips_decode(stage1):
  """The evaluators' pp drops `decode`: they hand in decoded images."""
  example = coco_example()
  example["image"] = tf.io.decode_png(example["image"]).numpy()
  out = get_preprocess_fn(stage1.panoptic_val.pp)(example)
  check_output(tf.nest.map_structure(lambda t: t.numpy(), out))


def test_listing2_pps_give_an_aligned_context_image():
  config = panoptic_stage2.get_config(f"res={RES}")
  out = run_in_dataset(get_preprocess_fn(config.pp_eval), [coco_example()])[0]
  assert sorted(out) == ["image", "image_ctx", "labels"]
  np.testing.assert_array_equal(out["image_ctx"], out["image"])
  check_output(out)
  train = run_in_dataset(get_preprocess_fn(config.pp_train),
                         [{**coco_example(), "_rng": np.array([s, 2])} for s in range(4)])
  for out in train:
    np.testing.assert_array_equal(out["image_ctx"], out["image"])
    check_output(out)
  example = coco_example()
  example["image"] = tf.io.decode_png(example["image"]).numpy()
  predict = config.panoptic_val.pp
  out = get_preprocess_fn(predict)(example)
  assert sorted(out) == ["image", "image/id", "image_ctx"] and int(out["image/id"]) == 42
