r"""COCO-panoptic-format folders: a tfds builder that reads them, and a writer that makes them.

The standard layout (what cocodataset.org ships, and what `export_coco_panoptic` writes):

  <root>/annotations/panoptic_<split>2017.json    images, segments_info, categories
  <root>/<split>2017/*.jpg                         images
  <root>/panoptic_<split>2017/*.png                segment ids as R + 256 G + 256^2 B

`coco_panoptic_folder` yields the same features as the catalog `coco/2017_panoptic` (labels are
category indices in id order, as there); folder split `val` becomes tfds split `validation`.
The categories (COCO ids, names, isthing) are kept in the dataset's metadata. Build it with

  tfds.builder("coco_panoptic_folder", data_dir=DATA).download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=ROOT))

and export any panoptic tfds split (e.g. the toy scenes, as ground truth for PQ) with

  python -m uvim.datasets.export_coco --dataset toy_scenes --split validation --out ROOT
"""

import io
import json
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

from uvim.panoptic_format import rgb_to_id

FOLDER_TO_TFDS_SPLIT = {"val": "validation"}
TFDS_TO_FOLDER_SPLIT = {v: k for k, v in FOLDER_TO_TFDS_SPLIT.items()}
ANNOTATION_RE = re.compile(r"panoptic_(?P<split>[a-z]+)(?P<year>\d*)\.json")


def panoptic_features(label: tfds.features.ClassLabel, image_format: str | None = None,
                      **extra: tfds.features.FeatureConnector) -> tfds.features.FeaturesDict:
  """The features of tfds `coco/2017_panoptic`, plus `extra` ones."""
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3), encoding_format=image_format),
      "image/filename": tfds.features.Text(),
      "image/id": np.int64,
      "panoptic_image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
      "panoptic_image/filename": tfds.features.Text(),
      "panoptic_objects": tfds.features.Sequence({
          "area": np.int64,
          "bbox": tfds.features.BBoxFeature(),
          "id": np.int64,
          "is_crowd": np.bool_,
          "label": label,
      }),
      **extra,
  })


class CocoPanopticFolder(tfds.core.GeneratorBasedBuilder):
  """A COCO-panoptic-format folder (manual_dir) as a dataset like `coco/2017_panoptic`."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Pass the folder as manual_dir: tfds.builder('coco_panoptic_folder', data_dir=DATA)"
      ".download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=ROOT)), "
      "where ROOT holds annotations/panoptic_<split>2017.json, <split>2017/ and "
      "panoptic_<split>2017/ (the layout of COCO's panoptic annotations).")

  def __init__(self, *, skip_corrupt: bool = False, **kwargs):
    """`skip_corrupt`: skip (and count) unreadable images instead of failing the build."""
    self._skip_corrupt = skip_corrupt
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="A COCO-panoptic-format folder, with the features of coco/2017_panoptic.",
        features=panoptic_features(tfds.features.ClassLabel()),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    root = Path(dl_manager.manual_dir)
    annotations = sorted((root / "annotations").glob("panoptic_*.json"))
    splits = [(m, p) for p in annotations if (m := ANNOTATION_RE.fullmatch(p.name))]
    if not splits:
      raise FileNotFoundError(f"No annotations/panoptic_<split>2017.json in {root}. "
                              f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    categories = None
    generators = {}
    for match, json_path in splits:
      split_categories = sorted(json.loads(json_path.read_text())["categories"],
                                key=lambda c: c["id"])
      if categories is not None and split_categories != categories:
        raise ValueError(f"{json_path}: categories differ from the other splits'")
      categories = split_categories
      folder = match["split"] + match["year"]
      tfds_split = FOLDER_TO_TFDS_SPLIT.get(match["split"], match["split"])
      generators[tfds_split] = self._generate_examples(
          json_path, root / folder, root / f"panoptic_{folder}")
    self.info.features["panoptic_objects"]["label"].names = [c["name"] for c in categories]
    self.info.metadata["categories"] = categories
    return generators

  def _generate_examples(self, json_path: Path, image_dir: Path, png_dir: Path):
    data = json.loads(json_path.read_text())
    label_of = {c["id"]: i for i, c in enumerate(sorted(data["categories"], key=lambda c: c["id"]))}
    images = {im["id"]: im for im in data["images"]}
    skipped = 0
    for ann in data["annotations"]:
      info = images[ann["image_id"]]
      image_path = inside(image_dir, info["file_name"], json_path)
      png_path = inside(png_dir, ann["file_name"], json_path)
      try:
        with Image.open(image_path) as im:
          im.load()
      except (OSError, SyntaxError) as e:
        if not self._skip_corrupt:
          raise ValueError(f"{image_path}: unreadable image ({e}); pass skip_corrupt=True to "
                           "skip unreadable images") from e
        logging.warning("Skipping unreadable image %s: %s", image_path, e)
        skipped += 1
        continue
      yield ann["image_id"], {
          "image": image_path,
          "image/filename": info["file_name"],
          "image/id": ann["image_id"],
          "panoptic_image": png_path,
          "panoptic_image/filename": ann["file_name"],
          "panoptic_objects": _objects(ann, info, png_path, json_path, label_of),
      }
    if skipped:
      logging.warning("Skipped %d unreadable images of %s", skipped, json_path)


def inside(folder: Path, name: str, json_path: Path) -> Path:
  """`folder / name`, refused (naming `json_path`) unless it stays in `folder`: an absolute or
  `..` file_name would read files from outside the dataset."""
  path = folder / name
  if Path(name).is_absolute() or not path.resolve().is_relative_to(folder.resolve()):
    raise ValueError(f"{json_path}: file_name {name!r} points outside {folder}; a dataset's "
                     "files are named relative to its folders")
  return path


def _objects(ann: dict, info: dict, png_path: Path, json_path: Path, label_of: dict) -> dict:
  """The tfds `panoptic_objects` of one annotation, checked against its PNG."""
  with Image.open(png_path) as png:
    png_ids = set(np.unique(rgb_to_id(np.asarray(png.convert("RGB"))))) - {0}
  segments = ann["segments_info"]
  listed = {s["id"] for s in segments}
  if png_ids != listed:
    raise ValueError(
        f"{png_path}: segment ids do not match {json_path.name}: in the PNG only "
        f"{sorted(png_ids - listed)}, in the JSON only {sorted(listed - png_ids)}")
  h, w = info["height"], info["width"]
  unknown = {s["category_id"] for s in segments} - set(label_of)
  if unknown:
    raise ValueError(f"{json_path}: image {ann['image_id']} uses unknown categories {unknown}")
  return {
      "area": [s["area"] for s in segments],
      "bbox": [tfds.features.BBox(ymin=s["bbox"][1] / h, xmin=s["bbox"][0] / w,
                                  ymax=(s["bbox"][1] + s["bbox"][3]) / h,
                                  xmax=(s["bbox"][0] + s["bbox"][2]) / w) for s in segments],
      "id": [s["id"] for s in segments],
      "is_crowd": [bool(s["iscrowd"]) for s in segments],
      "label": [label_of[s["category_id"]] for s in segments],
  }


def folder_split(split: str) -> str:
  """The COCO folder name of a tfds split, its slice dropped ('validation[:4]' -> 'val'): what
  this builder reads back (`panoptic_<letters><year>.json`)."""
  base = re.match(r"[a-z]+", split)
  if base is None or split[base.end():][:1] not in ("", "["):
    raise ValueError(f"split {split!r}: export one named split (letters, optionally sliced: "
                     "'validation', 'train[:100]')")
  return TFDS_TO_FOLDER_SPLIT.get(base[0], base[0])


def export_coco_panoptic(examples: Iterable[dict], root: str | Path, split: str,
                         categories: list[dict], image_format: str = "jpg",
                         year: str = "2017") -> Path:
  """Writes panoptic examples (tfds `coco/2017_panoptic` features, as numpy) in COCO's layout.

  `categories` are COCO category dicts (`id`, `name`, `isthing`) sorted by id: label k is
  `categories[k]`. `image_format` 'png' keeps images lossless. Returns the annotation JSON path.
  """
  if image_format not in ("jpg", "png"):
    raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
  root, folder = Path(root), folder_split(split) + year
  (root / folder).mkdir(parents=True, exist_ok=True)
  (root / f"panoptic_{folder}").mkdir(parents=True, exist_ok=True)
  (root / "annotations").mkdir(parents=True, exist_ok=True)
  images, annotations = [], []
  for ex in examples:
    image_id = int(ex["image/id"])
    image, panoptic = _as_image(ex["image"]), _as_image(ex["panoptic_image"])
    h, w = image.shape[:2]
    image_name, png_name = f"{image_id:012d}.{image_format}", f"{image_id:012d}.png"
    Image.fromarray(image).save(root / folder / image_name, quality=95)
    Image.fromarray(panoptic).save(root / f"panoptic_{folder}" / png_name)
    objects = ex["panoptic_objects"]
    segments = []
    for k in range(len(objects["id"])):
      ymin, xmin, ymax, xmax = np.asarray(objects["bbox"][k], np.float64)
      x, y = round(xmin * w), round(ymin * h)
      segments.append({"id": int(objects["id"][k]),
                       "category_id": categories[int(objects["label"][k])]["id"],
                       "iscrowd": int(objects["is_crowd"][k]), "area": int(objects["area"][k]),
                       "bbox": [x, y, round(xmax * w) - x, round(ymax * h) - y]})
    images.append({"id": image_id, "file_name": image_name, "height": h, "width": w})
    annotations.append({"image_id": image_id, "file_name": png_name, "segments_info": segments})
  json_path = root / "annotations" / f"panoptic_{folder}.json"
  json_path.write_text(json.dumps(
      {"images": images, "annotations": annotations, "categories": categories}))
  return json_path


def _as_image(x) -> np.ndarray:
  """A uint8 image from an array or encoded bytes."""
  if isinstance(x, bytes | np.bytes_):
    with Image.open(io.BytesIO(x)) as im:
      return np.asarray(im.convert("RGB"))
  return np.asarray(x, np.uint8)


def categories_of(builder: tfds.core.DatasetBuilder) -> list[dict]:
  """COCO categories (sorted by id) of a panoptic builder that keeps them in its metadata."""
  metadata = builder.info.metadata or {}
  if "categories" not in metadata:
    raise ValueError(f"{builder.name}: its metadata has no COCO categories; pass them explicitly")
  return metadata["categories"]
