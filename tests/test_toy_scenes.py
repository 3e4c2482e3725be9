"""The toy scenes: deterministic, internally consistent labels, depth that follows geometry."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from uvim.datasets import toy_scenes
from uvim.panoptic_format import rgb_to_id


@pytest.fixture(scope="module")
def examples(toy_data_dir):
  ds = tfds.load("toy_scenes/tiny", split="train+validation", data_dir=toy_data_dir)
  return list(tfds.as_numpy(ds))


def test_generation_is_deterministic(tmp_path, examples):
  again = tfds.load("toy_scenes/tiny", split="train+validation", data_dir=tmp_path,
                    download=True)
  for a, b in zip(examples, tfds.as_numpy(again), strict=True):
    assert a["image/id"] == b["image/id"]
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["panoptic_image"], b["panoptic_image"])
    np.testing.assert_array_equal(a["depth"], b["depth"])


def test_features_match_the_catalog_layout(toy_data_dir):
  info = tfds.builder("toy_scenes/tiny", data_dir=toy_data_dir).info
  assert info.splits["train"].num_examples == 64 and info.splits["validation"].num_examples == 16
  objects = info.features["panoptic_objects"].feature
  assert set(objects.keys()) == {"id", "label", "is_crowd", "area", "bbox"}
  assert objects["label"].num_classes == len(toy_scenes.CLASSES)
  assert info.features["depth"].dtype == np.float32
  assert info.metadata["categories"] == toy_scenes.CATEGORIES


def test_every_visible_segment_is_listed_with_its_area_and_bbox(examples):
  for ex in examples:
    ids = rgb_to_id(ex["panoptic_image"])
    h, w = ids.shape
    objects = ex["panoptic_objects"]
    assert set(np.unique(ids)) - {0} == set(objects["id"])
    for k, segment_id in enumerate(objects["id"]):
      rows, cols = np.nonzero(ids == segment_id)
      assert objects["area"][k] == len(rows) >= toy_scenes.MIN_VISIBLE_AREA
      expected = [rows.min() / h, cols.min() / w, (rows.max() + 1) / h, (cols.max() + 1) / w]
      np.testing.assert_allclose(objects["bbox"][k], expected, atol=1e-6)
    labels = objects["label"]
    assert {toy_scenes.CLASSES.index("sky"), toy_scenes.CLASSES.index("ground")} <= set(labels)
    assert any(lab < len(toy_scenes.THING_CLASSES) for lab in labels) or len(labels) <= 3


def test_touching_segments_look_different(examples):
  """Labels are a function of the image: adjacent segments differ clearly in colour."""
  for ex in examples[:20]:
    ids, image = rgb_to_id(ex["panoptic_image"]), ex["image"].astype(float)
    mean = {i: image[ids == i].mean(0) for i in np.unique(ids) if i}
    pairs = {(a, b) for a, b in zip(ids[:, :-1].ravel(), ids[:, 1:].ravel(), strict=True)
             if a != b and a and b}
    for a, b in pairs:
      assert np.abs(mean[a] - mean[b]).sum() > 30, (ex["image/id"], a, b)


def test_depth_follows_the_scene_geometry(examples):
  sky = toy_scenes.CLASSES.index("sky")
  ground = toy_scenes.CLASSES.index("ground")
  for ex in examples:
    depth, ids = ex["depth"], rgb_to_id(ex["panoptic_image"])
    assert depth.shape == ids.shape
    assert (depth > 1e-3).all() and (depth < 10).all()
    objects = ex["panoptic_objects"]
    for segment_id, label in zip(objects["id"], objects["label"], strict=True):
      d = depth[ids == segment_id]
      if label == sky:
        assert (d == toy_scenes.SKY_DEPTH).all()
      elif label < len(toy_scenes.THING_CLASSES):
        assert np.ptp(d) == 0  # things face the camera
      elif label == ground:  # the ground plane comes nearer towards the bottom of the image
        rows = np.nonzero(ids == segment_id)[0]
        per_row = [depth[r][ids[r] == segment_id].max() for r in np.unique(rows)]
        assert np.all(np.diff(per_row) <= 1e-6)


def test_a_things_hue_tells_its_class(examples):
  """Each thing's mean colour has the hue of its class's band, nearer to it than to any other."""
  import colorsys

  bands = np.array(toy_scenes.CLASS_HUES)
  checked = 0
  for ex in examples:
    ids, image = rgb_to_id(ex["panoptic_image"]), ex["image"].astype(float) / 255
    objects = ex["panoptic_objects"]
    for segment_id, label in zip(objects["id"], objects["label"], strict=True):
      if label >= len(toy_scenes.THING_CLASSES):
        continue
      hue = colorsys.rgb_to_hsv(*image[ids == segment_id].mean(0))[0]
      distance = np.abs((hue - bands + 0.5) % 1.0 - 0.5)
      assert distance.argmin() == label and distance[label] < 0.05, (ex["image/id"], label, hue)
      checked += 1
  assert checked > 50
