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


def location_reference(instances: np.ndarray, num_slots: int) -> np.ndarray:
  """The rule of `panoptic.location_ids`, one image, as a loop over instances and cells."""
  side = int(np.sqrt(num_slots - 1))
  while (side + 1) ** 2 <= num_slots - 1:
    side += 1
  h, w = instances.shape
  cells = [((i + 0.5) / side, (j + 0.5) / side) for i in range(side) for j in range(side)]
  present = [i for i in np.unique(instances) if 0 < i < num_slots]
  area = {i: int(np.sum(instances == i)) for i in present}
  centre = {i: ((np.argwhere(instances == i) + 0.5) / (h, w)).mean(0) for i in present}
  taken, new = set(), {}
  for i in sorted(present, key=lambda i: (-area[i], i)):
    free = [c for c in range(len(cells)) if c not in taken]
    if not free:
      new[i] = num_slots
      continue
    c = min(free, key=lambda c: np.sum((centre[i] - cells[c]) ** 2) + panoptic.TIE_BIAS * c)
    taken.add(c)
    new[i] = c + 1
  out = instances.copy()
  for i in present:
    out[instances == i] = new[i]
  out[instances >= num_slots] = num_slots
  return out


def random_instances(rng: np.random.Generator, shape=(12, 16), n=7) -> np.ndarray:
  """Rectangles of ids 1..n drawn over each other, with void and unlabelled pixels."""
  ids = np.zeros(shape, np.int32)
  for k in rng.permutation(np.arange(1, n + 1)):
    y, x = rng.integers(0, shape[0] - 2), rng.integers(0, shape[1] - 2)
    ids[y:y + rng.integers(2, 7), x:x + rng.integers(2, 9)] = k
  ids[rng.uniform(size=shape) < 0.03] = -1
  return ids


@pytest.mark.parametrize("num_slots", [5, 12, 17, 65])
def test_location_ids_equal_a_loop_over_instances_and_cells(num_slots):
  rng = np.random.default_rng(num_slots)
  batch = np.stack([random_instances(rng, n=int(rng.integers(1, 12))) for _ in range(6)])
  batch[0, 0, 0] = num_slots + 3  # an id the slots cannot hold
  got = np.asarray(panoptic.location_ids(batch, num_slots))
  for image, ids in zip(batch, got, strict=True):
    np.testing.assert_array_equal(ids, location_reference(image, num_slots))
  assert got[0, 0, 0] == num_slots
  overflow = (got == num_slots) & (batch < num_slots)
  assert overflow.any() == (num_slots == 12)  # 9 cells for up to 11 instances


def test_location_ids_depend_on_where_instances_are_not_on_their_numbering():
  rng = np.random.default_rng(0)
  for _ in range(10):
    ids = random_instances(rng, n=6)
    permutation = np.r_[0, rng.permutation(np.arange(1, 7))]
    renamed = np.where(ids > 0, permutation[np.maximum(ids, 0)], ids)
    areas = np.bincount(ids[ids > 0])
    if len(set(areas[areas > 0])) < len(areas[areas > 0]):
      continue  # equal areas: the tie is broken by the input id
    np.testing.assert_array_equal(panoptic.location_ids(renamed[None], 65),
                                  panoptic.location_ids(ids[None], 65))
  # An instance added at the top renumbers every raster id below it, no location id far away.
  scene = np.zeros((16, 16), np.int32)
  scene[10:14, 2:6], scene[10:14, 10:14] = 1, 2
  crowded = scene.copy()
  crowded[0:2, 0:2] = 3
  before, after = (np.asarray(panoptic.location_ids(s[None], 65))[0] for s in (scene, crowded))
  np.testing.assert_array_equal(after[scene > 0], before[scene > 0])


def export_tiny(toy_data_dir, root):
  builder = tfds.builder("toy_scenes/tiny", data_dir=toy_data_dir)
  json_path = coco_folder.export_coco_panoptic(
      tfds.as_numpy(builder.as_dataset(split="train")), root, "train",
      coco_folder.categories_of(builder), "png")
  return builder, json.loads(json_path.read_text())


def segments_of(semantics: np.ndarray, instances: np.ndarray) -> dict[tuple, frozenset]:
  """(class, id) -> the set of its pixels."""
  return {(int(s), int(i)): frozenset(np.flatnonzero((semantics == s) & (instances == i)))
          for s, i in set(zip(semantics.ravel(), instances.ravel(), strict=True)) if s > 0}


@pytest.mark.parametrize("num_slots", [10, 17, 65])
def test_round_trip_labels_ids_segments_keeps_every_coco_segment(toy_data_dir, tmp_path,
                                                                 num_slots):
  """Every segment of the COCO PNG/JSON comes back as one (class, id) pair of its own, for
  grids where instances collide (9 cells for up to 9 segments) and where they rarely do."""
  from pp import builder as pp_builder

  builder, annotations = export_tiny(toy_data_dir, tmp_path / "coco")
  pp = pp_builder.get_preprocess_fn(
      'decode|coco_panoptic|concat(["semantics","instances"], "labels")|make_canonical|'
      'keep("labels", "image/id")',
      modules=["ops_general", "ops_image", "proj.uvim.pp_ops"])
  label_of_category = {c["id"]: k for k, c in enumerate(coco_folder.categories_of(builder))}
  by_file = {a["file_name"]: a for a in annotations["annotations"]}
  skip = tfds.decode.SkipDecoding()
  examples = builder.as_dataset(split="train",
                                decoders={"image": skip, "panoptic_image": skip})
  checked = 0
  for example in tfds.as_numpy(examples.map(pp)):
    labels = example["labels"]
    ids = np.asarray(panoptic.location_ids(labels[None, ..., 1], num_slots))[0]
    ours = segments_of(labels[..., 0], ids)
    annotation = by_file[f"{int(example['image/id']):012d}.png"]
    png = panoptic_format.rgb_to_id(np.asarray(Image.open(
        tmp_path / "coco/panoptic_train2017" / annotation["file_name"])))
    coco = {frozenset(np.flatnonzero(png == s["id"])): label_of_category[s["category_id"]] + 1
            for s in annotation["segments_info"]}
    assert sorted(coco.items(), key=str) == sorted(
        ((pixels, c) for (c, _), pixels in ours.items()), key=str)
    checked += 1
  assert checked == 64


def test_crowded_scenes_keep_their_segments_or_count_what_does_not_fit():
  """Scenes of up to 18 segments on 16 cells: segments that fit keep their pixels and class;
  the others are out of range, which `input_pp` counts (never merged silently)."""
  rng = np.random.default_rng(1)
  config = mlc.ConfigDict(dict(input_size=(96, 128), patch_size=(8, 8), instance_ids="location",
                               inputs={"semantics": (9, 64), "instances": (17, 64)}))
  overflowed = 0
  for _ in range(20):
    scene = toy_scenes.render_scene(rng, 96, 128, max_things=15)
    semantics = np.where(scene["segments"] > 0, scene["labels"][scene["segments"] - 1] + 1, 0)
    labels = np.stack([semantics, scene["segments"]], -1)[None].astype(np.int32)
    ids = np.asarray(panoptic.location_ids(labels[..., 1], 17))[0]
    _, stats = panoptic.input_pp({"labels": jnp.asarray(labels)}, config)
    fits = ids < 17
    assert int(stats["pixels_instance_out_of_range"]) == int(np.sum(~fits))
    for segment in np.unique(scene["segments"][fits & (scene["segments"] > 0)]):
      pixels = scene["segments"] == segment
      assert len(np.unique(ids[pixels])) == 1 and np.all(fits[pixels])
      assert not np.any(ids[~pixels] == ids[pixels][0])
    overflowed += int((~fits).any())
  assert overflowed > 0


def test_oracle_round_trip_of_location_ids_scores_the_same_pq(toy_data_dir):
  """The panoptic evaluator (equal to panopticapi) gives labels renumbered by location the PQ
  of the labels themselves: the rule loses no segment."""
  from configs import panoptic_stage1
  from evaluators import panoptic as panoptic_eval
  from uvim import sharding

  config = panoptic_stage1.get_config("smoke,ids=location")
  config.dataset, config.data_dir = "toy_scenes/tiny", str(toy_data_dir)
  mesh = sharding.make_mesh([("data", -1)])
  options = dict(split="validation", pp=config.panoptic_val.pp, batch_size=8)
  scores = []
  for rename in (lambda ids: ids, lambda ids: panoptic.location_ids(ids, 65),
                 lambda ids: jnp.where(ids > 1, 1, ids)):  # the last merges instances: lower
    fns = {"predict": lambda state, batch, rename=rename: {
        "semantics": batch["labels"][..., 0], "instances": rename(batch["labels"][..., 1])}}
    evaluator = panoptic_eval.CocoPanoptic("panoptic_val", config, options, mesh=mesh, fns=fns)
    scores.append(evaluator.run(variables=None))
  assert scores[1] == scores[0]
  assert scores[2]["PQ_things"] < scores[0]["PQ_things"] - 5
