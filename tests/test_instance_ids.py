"""The panoptic instance-id rules: location ids against a loop, their independence of the input
numbering, and the round trip labels -> ids -> segments against the COCO PNG/JSON."""

import json

import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from uvim import panoptic_format
from uvim.datasets import coco_folder, toy_scenes
from uvim.tasks import panoptic

THINGS = 3  # classes 0..2 (semantics 1..3) are things in the hand-made maps


def location_config(size=(12, 16), patch=4, window=3, things=THINGS, classes=6) -> mlc.ConfigDict:
  return mlc.ConfigDict(dict(
      input_size=size, patch_size=(patch, patch), instance_ids="location", thing_classes=things,
      inputs={"semantics": (classes, patch**2), "instances": ((2 * window + 1) ** 2 + 1,
                                                              patch**2)}))


def cells_reference(semantics: np.ndarray, instances: np.ndarray, config) -> np.ndarray:
  """The rule of `panoptic.location_cells`, one image, as a loop over instances and patches."""
  h, w = instances.shape
  p, q = config.patch_size
  rows, cols = h // p, w // q
  centres = [((i + 0.5) / rows, (j + 0.5) / cols) for i in range(rows) for j in range(cols)]
  thing = (semantics >= 1) & (semantics <= config.thing_classes) & (instances > 0)
  present = [i for i in np.unique(instances[thing]) if i <= rows * cols]
  area = {i: int(np.sum(thing & (instances == i))) for i in present}
  centre = {i: ((np.argwhere(thing & (instances == i)) + 0.5) / (h, w)).mean(0)
            for i in present}
  taken, name = set(), {}
  for i in sorted(present, key=lambda i: (-area[i], i)):
    free = [c for c in range(len(centres)) if c not in taken]
    if not free:
      name[i] = rows * cols + 1
      continue
    c = min(free, key=lambda c: np.sum((centre[i] - centres[c]) ** 2) + panoptic.TIE_BIAS * c)
    taken.add(c)
    name[i] = c + 1
  out = np.where(instances < 0, instances, 0)
  for i in np.unique(instances[thing]):
    out[thing & (instances == i)] = name.get(i, rows * cols + 1)
  return out


def random_labels(rng: np.random.Generator, shape=(12, 16), n=7) -> np.ndarray:
  """(H, W, 2) labels: rectangles of instances 1..n with random classes (things and stuff)
  drawn over each other, with void and unlabelled pixels."""
  semantics, instances = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
  for k in rng.permutation(np.arange(1, n + 1)):
    y, x = rng.integers(0, shape[0] - 2), rng.integers(0, shape[1] - 2)
    window = np.s_[y:y + rng.integers(2, 7), x:x + rng.integers(2, 9)]
    semantics[window], instances[window] = rng.integers(1, 6), k
  instances[rng.uniform(size=shape) < 0.03] = -1
  return np.stack([semantics, instances], -1)


@pytest.mark.parametrize("patch, n", [(4, 5), (4, 12), (2, 20), (6, 9)])
def test_location_cells_equal_a_loop_over_instances_and_patches(patch, n):
  """(6, 9): 2 x 2 patches for up to 9 things, so some get no patch."""
  rng = np.random.default_rng(patch * 100 + n)
  config = location_config(patch=patch)
  labels = np.stack([random_labels(rng, n=n) for _ in range(6)])
  got = np.asarray(panoptic.location_cells(labels[..., 0], labels[..., 1], config))
  for image, cells in zip(labels, got, strict=True):
    np.testing.assert_array_equal(cells, cells_reference(image[..., 0], image[..., 1], config))
  num_patches = (12 // patch) * (16 // patch)
  assert (got == num_patches + 1).any() == (patch == 6)  # the out-of-range name


def test_offsets_point_at_the_named_patch_and_back():
  config = location_config(window=2)
  rng = np.random.default_rng(0)
  cells = rng.integers(-1, 13, size=(4, 12, 16)).astype(np.int32)
  slots = np.asarray(panoptic.location_offsets(cells, config))
  back = np.asarray(panoptic.location_instances(jnp.asarray(slots), config))
  rows, cols = np.meshgrid(np.arange(12) // 4, np.arange(16) // 4, indexing="ij")
  dy, dx = (cells - 1) // 4 - rows, (cells - 1) % 4 - cols
  near = (cells > 0) & (np.abs(dy) <= 2) & (np.abs(dx) <= 2)
  np.testing.assert_array_equal(back[near], cells[near])
  assert np.all(slots[(cells > 0) & ~near] == 26) and np.any((cells > 0) & ~near)
  np.testing.assert_array_equal(slots[cells <= 0], cells[cells <= 0])
  # A slot pointing outside the image names no instance.
  assert panoptic.location_instances(jnp.ones((1, 12, 16), jnp.int32), config)[0, 0, 0] == 0


def test_location_ids_depend_on_where_instances_are_not_on_their_numbering():
  config = location_config()
  rng = np.random.default_rng(0)
  for _ in range(10):
    labels = random_labels(rng, n=6)
    permutation = np.r_[0, rng.permutation(np.arange(1, 7))]
    renamed = labels.copy()
    renamed[..., 1] = np.where(labels[..., 1] > 0, permutation[np.maximum(labels[..., 1], 0)],
                               labels[..., 1])
    inputs = [panoptic.input_pp({"labels": x[None]}, config)[0]["instances"]
              for x in (labels, renamed)]
    areas = np.bincount(labels[..., 1][labels[..., 1] > 0])
    if len(set(areas[areas > 0])) == len(areas[areas > 0]):  # equal areas: the input id decides
      np.testing.assert_array_equal(*inputs)
  # A thing added at the top renumbers every raster id below it, and no location label far away.
  scene = np.zeros((16, 16, 2), np.int32)
  scene[10:14, 2:6], scene[10:14, 10:14] = (1, 1), (2, 2)
  crowded = scene.copy()
  crowded[0:2, 0:2] = (1, 3)
  config = location_config(size=(16, 16))
  before, after = (np.asarray(panoptic.input_pp({"labels": x[None]}, config)[0]["instances"])
                   for x in (scene, crowded))
  untouched = np.asarray(panoptic.common.class_patches(scene[None, ..., 1], (4, 4))) > 0
  np.testing.assert_array_equal(after[untouched], before[untouched])


def export_tiny(toy_data_dir, root):
  builder = tfds.builder("toy_scenes/tiny", data_dir=toy_data_dir)
  json_path = coco_folder.export_coco_panoptic(
      tfds.as_numpy(builder.as_dataset(split="train")), root, "train",
      coco_folder.categories_of(builder), "png")
  return builder, json.loads(json_path.read_text())


def segments_of(semantics: np.ndarray, instances: np.ndarray) -> list[tuple[int, frozenset]]:
  """Sorted (class, pixels) of each (class, instance) pair of a prediction."""
  pairs = set(zip(semantics.ravel(), instances.ravel(), strict=True))
  return sorted(((int(c), frozenset(np.flatnonzero((semantics == c) & (instances == i))))
                 for c, i in pairs if c > 0), key=str)


def round_trip(labels: np.ndarray, config) -> dict:
  """Labels -> the oracle's inputs -> predictions from logits that are sure of them."""
  inputs, stats = panoptic.input_pp({"labels": jnp.asarray(labels)}, config)
  logits = {k: 50.0 * (v[:, :, None, :] == jnp.arange(config.inputs[k][0])[:, None])
            for k, v in inputs.items()}
  return {**{k: np.asarray(v) for k, v in panoptic.predict_outputs(logits, config).items()},
          **{k: int(v) for k, v in stats.items()}}


@pytest.mark.parametrize("patch", [8, 32])
def test_round_trip_labels_ids_segments_keeps_every_coco_segment(toy_data_dir, tmp_path, patch):
  """Every segment of the COCO PNG/JSON comes back with its class, at the toy recipe's 8 px
  patches and at 32 px, where things share the 12 patches."""
  from pp import builder as pp_builder

  builder, annotations = export_tiny(toy_data_dir, tmp_path / "coco")
  pp = pp_builder.get_preprocess_fn(
      'decode|coco_panoptic|concat(["semantics","instances"], "labels")|make_canonical|'
      'keep("labels", "image/id")', modules=["ops_general", "ops_image", "proj.uvim.pp_ops"])
  config = location_config(size=(96, 128), patch=patch, things=len(toy_scenes.THING_CLASSES),
                           classes=len(toy_scenes.CLASSES) + 1)
  label_of_category = {c["id"]: k for k, c in enumerate(coco_folder.categories_of(builder))}
  by_file = {a["file_name"]: a for a in annotations["annotations"]}
  skip = tfds.decode.SkipDecoding()
  examples = builder.as_dataset(split="train", decoders={"image": skip, "panoptic_image": skip})
  examples = list(tfds.as_numpy(examples.map(pp)))
  predicted = round_trip(np.stack([ex["labels"] for ex in examples]), config)
  assert predicted["pixels_instance_out_of_range"] == 0
  for b, example in enumerate(examples):
    annotation = by_file[f"{int(example['image/id']):012d}.png"]
    png = panoptic_format.rgb_to_id(np.asarray(Image.open(
        tmp_path / "coco/panoptic_train2017" / annotation["file_name"])))
    coco = sorted(((label_of_category[s["category_id"]] + 1,
                    frozenset(np.flatnonzero(png == s["id"])))
                   for s in annotation["segments_info"]), key=str)
    assert segments_of(predicted["semantics"][b], predicted["instances"][b]) == coco
  checked = len(examples)
  assert checked == 64


def test_crowded_scenes_keep_their_segments_or_count_what_does_not_fit():
  """Scenes of up to 24 things on 12 patches: things that got a patch keep their pixels and
  class; the others are out of range, which `input_pp` counts (never merged silently)."""
  rng = np.random.default_rng(1)
  config = location_config(size=(96, 128), patch=32, things=len(toy_scenes.THING_CLASSES),
                           classes=len(toy_scenes.CLASSES) + 1)
  overflowed = 0
  for _ in range(20):
    scene = toy_scenes.render_scene(rng, 96, 128, max_things=24)
    segments = scene["segments"]
    semantics = np.where(segments > 0, scene["labels"][segments - 1] + 1, 0)
    labels = np.stack([semantics, segments], -1)[None].astype(np.int32)
    cells = np.asarray(panoptic.location_cells(labels[..., 0], labels[..., 1], config))[0]
    predicted = round_trip(labels, config)
    lost = cells == 13  # 12 patches: the out-of-range name
    assert predicted["pixels_instance_out_of_range"] == int(lost.sum())
    kept = [(c, px) for c, px in segments_of(semantics, segments)
            if not lost.ravel()[list(px)].any()]
    assert set(kept) <= set(segments_of(predicted["semantics"][0], predicted["instances"][0]))
    overflowed += int(lost.any())
  assert overflowed > 0


def test_oracle_round_trip_of_location_ids_scores_the_pq_of_the_labels(toy_data_dir):
  """The panoptic evaluator (equal to panopticapi) scores the location round trip as it scores
  the labels themselves; a round trip that merges things scores lower (the test can tell)."""
  from configs import panoptic_stage1
  from evaluators import panoptic as panoptic_eval
  from uvim import sharding

  config = panoptic_stage1.get_config("smoke,ids=location")
  config.dataset, config.data_dir = "toy_scenes/tiny", str(toy_data_dir)
  mesh = sharding.make_mesh([("data", -1)])
  options = dict(split="validation", pp=config.panoptic_val.pp, batch_size=8)

  def trip(merge):
    def predict(state, batch):
      inputs, _ = panoptic.input_pp(batch, config.model)
      logits = {k: 50.0 * (v[:, :, None, :] == jnp.arange(config.model.inputs[k][0])[:, None])
                for k, v in inputs.items()}
      out = panoptic.predict_outputs(logits, config.model)
      if merge:  # one instance per image: all things of a class become one segment
        out["instances"] = jnp.minimum(out["instances"], 1)
      return out
    return predict

  def labels(state, batch):
    return {"semantics": batch["labels"][..., 0], "instances": batch["labels"][..., 1]}

  scores = [panoptic_eval.CocoPanoptic("panoptic_val", config, options, mesh=mesh,
                                       fns={"predict": fn}).run(variables=None)
            for fn in (labels, trip(False), trip(True))]
  assert scores[1] == scores[0]
  assert scores[2]["PQ_things"] < scores[0]["PQ_things"] - 5
