"""`toy_scenes`: procedurally generated scenes carrying panoptic, depth and colour labels.

A scene is a ground plane under a sky, with an optional lake, seen by a camera: 'stuff' (sky,
ground, water) split by a random horizon, and 1..N 'things' (circles, squares, triangles,
diamonds, bars) standing on the ground. Things are sized by perspective and painted far to near,
so nearer things occlude farther ones, and depth follows the geometry. Every label is a function
of what is visible (a thing's class shows in its shape and in its hue, each class having its own
band of the colour wheel; things of one class differ in brightness), so a small model learns it in
minutes. Features match tfds `coco/2017_panoptic` plus `depth` as in
`nyu_depth_v2`, so the same pp strings run on both. Nothing is downloaded.
"""

import dataclasses
import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from uvim import panoptic_format
from uvim.datasets import coco_folder

THING_CLASSES = ("circle", "square", "triangle", "diamond", "bar")
STUFF_CLASSES = ("sky", "ground", "water")
CLASSES = THING_CLASSES + STUFF_CLASSES  # Label = index; things first, as in COCO.
# COCO-style categories (id = label + 1) for exporting to the COCO panoptic format.
CATEGORIES = [{"id": i + 1, "name": name, "isthing": int(name in THING_CLASSES),
               "supercategory": "thing" if name in THING_CLASSES else "stuff"}
              for i, name in enumerate(CLASSES)]

SKY_DEPTH = 9.5  # metres; beyond the farthest ground, inside NYU's valid range (< 10 m).
MAX_GROUND_DEPTH = 9.0
NEAREST_GROUND_DEPTH = 1.5  # depth of the ground at the bottom image row
MIN_VISIBLE_AREA = 12  # pixels; a thing seen less than this is labelled void (as COCO would)


@dataclasses.dataclass
class ToyScenesConfig(tfds.core.BuilderConfig):
  """Sizes of a toy scenes variant; the seed makes it reproducible."""
  train_size: int = 1024
  validation_size: int = 128
  height: int = 96
  width: int = 128
  max_things: int = 6
  seed: int = 0


class ToyScenes(tfds.core.GeneratorBasedBuilder):
  """Procedural scenes with COCO-panoptic, NYU-depth and image features (no download)."""

  VERSION = tfds.core.Version("1.2.0")
  RELEASE_NOTES = {"1.0.0": "First version.",
                   "1.1.0": "Larger things (radius ~ depth^-1/2): most were too small to learn; "
                            "depth has a fixed shape.",
                   "1.2.0": "A thing's hue tells its class (as its shape does): from shape alone, "
                            "a CPU-sized stage II could not tell the classes apart."}
  BUILDER_CONFIGS = [
      ToyScenesConfig(name="small", description="1024 train / 128 validation, 96x128."),
      ToyScenesConfig(name="medium", train_size=8192, validation_size=512,
                      description="8192 train / 512 validation, 96x128."),
      ToyScenesConfig(name="tiny", train_size=64, validation_size=16,
                      description="64 train / 16 validation, 96x128, for tests."),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=coco_folder.panoptic_features(
            tfds.features.ClassLabel(names=CLASSES), image_format="png",
            # A fixed shape, as nyu_depth_v2's (480, 640): eval pps keep the depth at full size.
            depth=tfds.features.Tensor(
                shape=(self.builder_config.height, self.builder_config.width),
                dtype=np.float32, encoding=tfds.features.Encoding.ZLIB)),
        metadata=tfds.core.MetadataDict(categories=CATEGORIES),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is generated locally.
    c = self.builder_config
    return {"train": self._generate_examples(0, c.train_size),
            "validation": self._generate_examples(1, c.validation_size)}

  def _generate_examples(self, split_index: int, size: int):
    c = self.builder_config
    for i in range(size):
      rng = np.random.default_rng([c.seed, split_index, i])
      scene = render_scene(rng, c.height, c.width, c.max_things)
      image_id = split_index * 10_000_000 + i
      yield image_id, example_from_scene(scene, image_id)


def example_from_scene(scene: dict, image_id: int) -> dict:
  """The tfds example (COCO panoptic feature layout) of a rendered scene."""
  h, w = scene["segments"].shape
  ids, labels = scene["segment_ids"], scene["labels"]
  objects = {k: [] for k in ("area", "bbox", "id", "is_crowd", "label")}
  for index in range(len(ids)):
    mask = scene["segments"] == index + 1
    area = int(mask.sum())
    if area == 0:
      continue
    rows, cols = np.nonzero(mask)
    objects["area"].append(area)
    objects["bbox"].append(tfds.features.BBox(
        ymin=rows.min() / h, xmin=cols.min() / w, ymax=(rows.max() + 1) / h,
        xmax=(cols.max() + 1) / w))
    objects["id"].append(int(ids[index]))
    objects["is_crowd"].append(False)
    objects["label"].append(int(labels[index]))
  pixel_ids = np.where(scene["segments"] > 0, np.r_[0, ids][scene["segments"]], 0)
  return {
      "image": encode_png(scene["image"]),
      "image/filename": f"{image_id:012d}.png",
      "image/id": image_id,
      "panoptic_image": encode_png(panoptic_format.id_to_rgb(pixel_ids)),
      "panoptic_image/filename": f"{image_id:012d}.png",
      "panoptic_objects": objects,
      "depth": scene["depth"],
  }


def encode_png(image: np.ndarray) -> bytes:
  """PNG bytes of a uint8 image (PIL is ~10x faster than tfds' per-example TF encoding)."""
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG", compress_level=1)
  return buf.getvalue()


def render_scene(rng: np.random.Generator, height: int, width: int, max_things: int) -> dict:
  """Renders one scene.

  Returns `image` uint8 (H, W, 3), `depth` float32 metres (H, W), `segments` int (H, W) holding
  1 + the index of the visible segment (0: void), and per segment `labels` and COCO-style
  `segment_ids`.
  """
  y = np.arange(height, dtype=np.float32)[:, None]
  x = np.arange(width, dtype=np.float32)[None, :]
  horizon = rng.uniform(0.25, 0.55) * height
  ground_depth = np.minimum(
      NEAREST_GROUND_DEPTH * (height - horizon) / np.maximum(y - horizon, 1e-3),
      MAX_GROUND_DEPTH)
  below = np.broadcast_to(y > horizon, (height, width))

  labels = [CLASSES.index("sky"), CLASSES.index("ground")]
  segments = np.where(below, 2, 1)
  depth = np.where(below, ground_depth, SKY_DEPTH).astype(np.float32)
  image = _paint_stuff(rng, segments, y, x, horizon)
  if rng.uniform() < 0.6:  # A lake: the ground on one side of a slanted shoreline.
    x0, slope = rng.uniform(0.2, 0.8) * width, rng.uniform(-1.5, 1.5)
    side = rng.choice([-1, 1])
    lake = below & (side * (x - x0 - slope * (y - horizon)) > 0) & (y > horizon + 2)
    if lake.sum() > MIN_VISIBLE_AREA:
      labels.append(CLASSES.index("water"))
      segments = np.where(lake, len(labels), segments)
      image = np.where(lake[..., None], _water(rng, y, x, horizon, height, width), image)

  num_things = rng.integers(1, max_things + 1)
  things = [_sample_thing(rng, height, width, horizon) for _ in range(num_things)]
  _set_colours(rng, things)
  for thing in sorted(things, key=lambda t: -t["depth"]):
    mask = _thing_mask(thing, y, x)
    labels.append(thing["label"])
    segments = np.where(mask, len(labels), segments)
    depth = np.where(mask, thing["depth"], depth).astype(np.float32)
    image = np.where(mask[..., None], _thing_colour(rng, thing, y, x), image)

  segments = _drop_slivers(segments, len(labels))
  segment_ids = _unique_ids(rng, len(labels))
  return {"image": np.clip(np.round(image), 0, 255).astype(np.uint8), "depth": depth,
          "segments": segments, "labels": np.array(labels), "segment_ids": segment_ids}


def _paint_stuff(rng, segments, y, x, horizon):
  """Sky: a vertical blue gradient; ground: grass-brown noise that fades with distance."""
  h, w = segments.shape
  t = np.clip(y / max(horizon, 1.0), 0, 1)
  sky = np.stack(np.broadcast_arrays(60 + 90 * t, 120 + 80 * t, 235 + 0 * t), -1)
  noise = rng.normal(0, 10, (h, w, 1))
  grass = np.array([95, 140, 60]) + rng.uniform(-20, 20, 3)
  ground = grass + noise + 20 * np.sin(x / 3.0 + y)[..., None] * 0.3
  return np.where((segments == 2)[..., None], ground, np.broadcast_to(sky, (h, w, 3)))


def _water(rng, y, x, horizon, h, w):
  """Dark blue water with horizontal ripples."""
  ripples = 18 * np.sin((y - horizon) * 1.7 + rng.uniform(0, 6)) + rng.normal(0, 4, (h, w))
  return np.stack(np.broadcast_arrays(20 + 0.3 * ripples, 60 + 0.5 * ripples, 140 + ripples), -1)


def _sample_thing(rng, height, width, horizon):
  """A thing standing on the ground: class, base row, depth, size by perspective."""
  base = rng.uniform(horizon + 4, height + 0.2 * height)
  depth = float(min(NEAREST_GROUND_DEPTH * (height - horizon) / (base - horizon),
                    MAX_GROUND_DEPTH))
  # Perspective, damped (depth^-1/2 rather than depth^-1) so that far things stay visible.
  radius = max(rng.uniform(0.6, 1.0) * 0.22 * height * (NEAREST_GROUND_DEPTH / depth) ** 0.5, 3.0)
  return {"label": int(rng.integers(len(THING_CLASSES))), "depth": depth, "radius": radius,
          "cy": base - radius, "cx": rng.uniform(0, width)}


def _thing_mask(thing, y, x):
  dy, dx, r = y - thing["cy"], x - thing["cx"], thing["radius"]
  shape = THING_CLASSES[thing["label"]]
  inside_box = (np.abs(dx) <= r) & (np.abs(dy) <= r)
  if shape == "circle":
    return dx**2 + dy**2 <= r**2
  if shape == "square":
    return inside_box
  if shape == "triangle":  # apex at the top
    return inside_box & (np.abs(dx) <= (dy + r) / 2)
  if shape == "diamond":
    return np.abs(dx) + np.abs(dy) <= r
  return (np.abs(dx) <= 0.35 * r) & (np.abs(dy) <= r)  # bar


# Centre of each thing class's hue band (fraction of the colour wheel): red, amber, cyan,
# violet, magenta; away from the stuff's blues and greens.
CLASS_HUES = (0.0, 0.12, 0.5, 0.74, 0.88)


def _set_colours(rng, things):
  """Each thing's hue (its class's band, +-0.03) and brightness: things of one class get
  brightnesses spread over [0.5, 1] in random order, so touching ones still differ."""
  for label in {t["label"] for t in things}:
    same = [t for t in things if t["label"] == label]
    values = 1.0 - 0.5 * rng.permutation(len(same)) / max(len(same) - 1, 1)
    for thing, value in zip(same, values, strict=True):
      thing["hue"] = CLASS_HUES[label] + rng.uniform(-0.03, 0.03)
      thing["value"] = value


def _thing_colour(rng, thing, y, x):
  """A saturated colour of the thing's hue and brightness, lit from the top left, with a little
  noise."""
  rgb = 255 * np.clip(np.abs(((thing["hue"] * 6 + np.array([0, 4, 2])) % 6) - 3) - 1, 0, 1)
  rgb = thing["value"] * (0.25 * 128 + 0.75 * rgb)
  light = 1 + 0.15 * np.clip(((thing["cy"] - y) + (thing["cx"] - x)) / (2 * thing["radius"]),
                             -1, 1)
  return rgb * light[..., None] + rng.normal(0, 3, (*np.broadcast(y, x).shape, 3))


def _unique_ids(rng, n):
  """n distinct random COCO segment ids in [1, 256^3)."""
  ids = np.unique(rng.integers(1, 256**3, size=n))
  while len(ids) < n:
    ids = np.unique(np.r_[ids, rng.integers(1, 256**3, size=n - len(ids))])
  return rng.permutation(ids)


def _drop_slivers(segments, n):
  """Segments visible on fewer than MIN_VISIBLE_AREA pixels become void (0)."""
  counts = np.bincount(segments.ravel(), minlength=n + 1)
  keep = counts >= MIN_VISIBLE_AREA
  keep[0] = True
  return np.where(keep[segments], segments, 0)
