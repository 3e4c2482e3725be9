"""COCO-panoptic folders: export the toy scenes, build them back, and reject bad folders."""

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from uvim import panoptic_format
from uvim.datasets import coco_folder, toy_scenes


def export(toy_data_dir, root, image_format="png"):
  builder = tfds.builder("toy_scenes/tiny", data_dir=toy_data_dir)
  for split in ("train", "validation"):
    coco_folder.export_coco_panoptic(tfds.as_numpy(builder.as_dataset(split=split)), root,
                                     split, coco_folder.categories_of(builder), image_format)
  return builder


def build(root, data_dir, **kwargs):
  builder = tfds.builder("coco_panoptic_folder", data_dir=data_dir, **kwargs)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=root))
  return builder


def by_id(builder, split):
  return {int(ex["image/id"]): ex for ex in tfds.as_numpy(builder.as_dataset(split=split))}


@pytest.mark.parametrize("image_format", ["png", "jpg"])
def test_round_trip_toy_export_build_gives_identical_examples(toy_data_dir, tmp_path,
                                                              image_format):
  toy = export(toy_data_dir, tmp_path / "coco", image_format)
  assert (tmp_path / "coco/annotations/panoptic_val2017.json").is_file()
  assert (tmp_path / "coco/panoptic_train2017").is_dir()
  folder = build(tmp_path / "coco", tmp_path / "tfds")
  assert folder.info.metadata["categories"] == toy_scenes.CATEGORIES
  assert folder.info.features["panoptic_objects"]["label"].names == list(toy_scenes.CLASSES)
  for split in ("train", "validation"):
    original, rebuilt = by_id(toy, split), by_id(folder, split)
    assert sorted(original) == sorted(rebuilt)
    for image_id, a in original.items():
      b = rebuilt[image_id]
      np.testing.assert_array_equal(a["panoptic_image"], b["panoptic_image"])
      if image_format == "png":
        np.testing.assert_array_equal(a["image"], b["image"])
      else:
        assert np.abs(a["image"].astype(int) - b["image"]).mean() < 6  # JPEG q95 on noise
      for key in ("id", "label", "area", "is_crowd"):
        np.testing.assert_array_equal(a["panoptic_objects"][key], b["panoptic_objects"][key])
      np.testing.assert_allclose(a["panoptic_objects"]["bbox"], b["panoptic_objects"]["bbox"],
                                 atol=1e-6)


def test_corrupt_image_fails_or_is_skipped(toy_data_dir, tmp_path):
  export(toy_data_dir, tmp_path / "coco")
  bad = sorted((tmp_path / "coco/val2017").iterdir())[3]
  bad.write_bytes(b"not an image")
  with pytest.raises(ValueError, match=f"{bad.name}: unreadable image"):
    build(tmp_path / "coco", tmp_path / "tfds1")
  builder = build(tmp_path / "coco", tmp_path / "tfds2", skip_corrupt=True)
  assert builder.info.splits["validation"].num_examples == 16 - 1
  assert builder.info.splits["train"].num_examples == 64


def test_png_whose_ids_do_not_match_the_json_fails_with_its_name(toy_data_dir, tmp_path):
  export(toy_data_dir, tmp_path / "coco")
  annotations = json.loads((tmp_path / "coco/annotations/panoptic_val2017.json").read_text())
  ann = annotations["annotations"][2]
  ann["segments_info"] = ann["segments_info"][1:]  # drop one listed segment
  (tmp_path / "coco/annotations/panoptic_val2017.json").write_text(json.dumps(annotations))
  with pytest.raises(ValueError, match=f"{ann['file_name']}: segment ids do not match"):
    build(tmp_path / "coco", tmp_path / "tfds")


def test_folder_without_annotations_says_what_layout_it_expects(tmp_path):
  (tmp_path / "wrong" / "images").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match=r"annotations/panoptic_<split>2017\.json"):
    build(tmp_path / "wrong", tmp_path / "tfds")


def test_export_command_writes_the_layout(toy_data_dir, tmp_path):
  import subprocess
  import sys
  result = subprocess.run(
      [sys.executable, "-m", "uvim.datasets.export_coco", "--dataset", "toy_scenes/tiny",
       f"--data_dir={toy_data_dir}", "--split", "validation", f"--out={tmp_path}"],
      capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  data = json.loads((tmp_path / "annotations/panoptic_val2017.json").read_text())
  assert len(data["images"]) == len(data["annotations"]) == 16
  assert data["categories"] == toy_scenes.CATEGORIES
  assert len(list((tmp_path / "val2017").glob("*.jpg"))) == 16


@pytest.mark.parametrize("shape", [(7, 5), (1, 1), (0, 4), (2, 3, 4)])
def test_rgb_to_id_is_the_formula_on_any_layout(shape):
  rng = np.random.default_rng(len(shape))
  rgb = rng.integers(0, 256, (*shape, 3)).astype(np.uint8)
  rgb[..., :1, :] = 255
  wide = rgb.astype(np.int64)
  expected = wide[..., 0] + 256 * wide[..., 1] + 256**2 * wide[..., 2]
  read_only = rgb.copy()
  read_only.flags.writeable = False
  rgba = np.concatenate([rgb, rgb[..., :1]], -1)
  for x in (rgb, np.asfortranarray(rgb), rgb[..., ::-1, :][..., ::-1, :], read_only, rgba, wide):
    ids = panoptic_format.rgb_to_id(x)
    assert ids.dtype == np.uint32 and ids.shape == shape
    np.testing.assert_array_equal(ids, expected)


def test_id_to_rgb_round_trips():
  ids = np.random.default_rng(0).integers(0, 256**3, (9, 11))
  ids[0, :3] = 0, 256**3 - 1, 255
  rgb = panoptic_format.id_to_rgb(ids)
  assert rgb.dtype == np.uint8 and rgb.shape == (9, 11, 3)
  np.testing.assert_array_equal(panoptic_format.rgb_to_id(rgb), ids)
