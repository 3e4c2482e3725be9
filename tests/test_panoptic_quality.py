"""PQ against the official panopticapi on random cases: void, crowd, tiny and unmatched segments."""

import contextlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from evaluators import panoptic
from uvim.panoptic_format import id_to_rgb

CATEGORIES = [{"id": i, "name": f"c{i}", "isthing": int(i < 90)} for i in (1, 3, 7, 20, 92, 95)]


def random_segments(rng, h, w, n, ids):
  """A segment-id map of n random rectangles (later ones on top) over void."""
  out = np.zeros((h, w), np.int64)
  for k in range(n):
    y0, x0 = rng.integers(0, h), rng.integers(0, w)
    y1, x1 = y0 + rng.integers(1, h // 2 + 2), x0 + rng.integers(1, w // 2 + 2)
    out[y0:y1, x0:x1] = ids[k]
  return out


def write_case(rng, root, num_images=6, h=24, w=32):
  """GT and prediction folders in COCO format, with a mix of the hard cases."""
  for side in ("gt", "pred"):
    (root / side).mkdir(parents=True)
  cat_ids = [c["id"] for c in CATEGORIES]
  gt_anns, pred_anns, images = [], [], []
  for image_id in range(num_images):
    ids = rng.choice(np.arange(1, 5000), size=12, replace=False)
    gt = random_segments(rng, h, w, rng.integers(2, 9), ids)
    if rng.uniform() < 0.5:  # a void band
      gt[rng.integers(0, h):, : rng.integers(1, w)] = 0
    gt_segments = []
    for sid in np.unique(gt[gt > 0]):
      gt_segments.append({"id": int(sid), "category_id": int(rng.choice(cat_ids)),
                          "iscrowd": int(rng.uniform() < 0.15), "area": int((gt == sid).sum()),
                          "bbox": [0, 0, 1, 1]})
    # Prediction: the GT re-labelled, perturbed by random rectangles and tiny specks.
    pred = gt.copy()
    pred_ids = rng.choice(np.arange(5000, 9000), size=12, replace=False)
    pred = np.where(pred > 0, pred + 10_000, 0)
    pred = np.where(random_segments(rng, h, w, 4, pred_ids) > 0,
                    random_segments(rng, h, w, 4, pred_ids), pred)
    for _ in range(rng.integers(0, 4)):
      pred[rng.integers(0, h), rng.integers(0, w)] = rng.choice(pred_ids)
    gt_category = {s["id"] + 10_000: s["category_id"] for s in gt_segments}
    pred_segments = []
    for sid in np.unique(pred[pred > 0]):
      same = sid in gt_category and rng.uniform() < 0.8
      category = gt_category[sid] if same else int(rng.choice(cat_ids))
      pred_segments.append({"id": int(sid), "category_id": category})
    name = f"{image_id:06d}.png"
    Image.fromarray(id_to_rgb(gt)).save(root / "gt" / name)
    Image.fromarray(id_to_rgb(pred)).save(root / "pred" / name)
    images.append({"id": image_id, "file_name": name, "height": h, "width": w})
    gt_anns.append({"image_id": image_id, "file_name": name, "segments_info": gt_segments})
    pred_anns.append({"image_id": image_id, "file_name": name, "segments_info": pred_segments})
  for side, anns in (("gt", gt_anns), ("pred", pred_anns)):
    (root / f"{side}.json").write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": CATEGORIES}))


@pytest.mark.parametrize("seed", range(12))
def test_pq_equals_panopticapi(tmp_path, seed):
  from panopticapi.evaluation import pq_compute

  write_case(np.random.default_rng(seed), tmp_path)
  args = (str(tmp_path / "gt.json"), str(tmp_path / "pred.json"), str(tmp_path / "gt"),
          str(tmp_path / "pred"))
  with contextlib.redirect_stdout(io.StringIO()):
    expected = pq_compute(*args)
  ours = panoptic.score_folders(args[0], args[2], args[1], args[3])
  for name in ("All", "Things", "Stuff"):
    assert ours[name]["n"] == expected[name]["n"]
    for k in ("pq", "sq", "rq"):
      assert abs(ours[name][k] - expected[name][k]) < 1e-9, (name, k)
  for cat, values in expected["per_class"].items():
    for k in ("pq", "sq", "rq"):
      assert abs(ours["per_class"][cat][k] - values[k]) < 1e-9


def test_hand_made_case():
  """One thing predicted with IoU 2/3, one stuff exact, one false positive on void."""
  gt = np.zeros((4, 6), np.int64)
  gt[:, :3], gt[:, 3:] = 1, 2   # thing 1 (cat 1), stuff 2 (cat 92)
  gt[0, :] = 0                   # void top row
  pred = gt.copy()
  pred[1, :3] = 0                # thing predicted on 6 of 9 pixels
  pred[0, :2] = 3                # a prediction lying on void: ignored
  pred[3, 0] = 4                 # a one-pixel false positive of cat 1 inside the thing
  acc = panoptic.PQAccumulator(CATEGORIES)
  acc.add(gt, panoptic.Segments(np.array([1, 2]), np.array([1, 92]), np.array([False, False]),
                                np.array([9, 9])),
          pred, panoptic.Segments(np.array([1, 2, 3, 4]), np.array([1, 92, 1, 1])))
  r = acc.results()
  # Thing: intersection 5, union 5 + 9 - 5 - 0 = 9 -> IoU 5/9 > 0.5: tp; seg 4 is a fp.
  assert acc.tp.tolist() == [1, 0, 0, 0, 1, 0] and acc.fp.tolist() == [1, 0, 0, 0, 0, 0]
  np.testing.assert_allclose(r["per_class"][1]["pq"], (5 / 9) / 1.5)
  np.testing.assert_allclose(r["per_class"][92]["pq"], 1.0)
  assert r["All"]["n"] == 2 and r["Things"]["n"] == 1 and r["Stuff"]["n"] == 1


def test_mismatched_prediction_names_the_image():
  acc = panoptic.PQAccumulator(CATEGORIES)
  gt = np.ones((2, 2), np.int64)
  seg = panoptic.Segments(np.array([1]), np.array([1]), np.array([False]), np.array([4]))
  with pytest.raises(KeyError, match=r"image 7.*segment ids \[5\] are in the prediction PNG"):
    acc.add(gt, seg, np.full((2, 2), 5), panoptic.Segments(np.array([1]), np.array([1])),
            image="image 7")
  with pytest.raises(ValueError, match=r"image 8: prediction \(3, 2\)"):
    acc.add(gt, seg, np.ones((3, 2), np.int64), seg, image="image 8")


def test_two_channel_conversion():
  semantics = np.array([[0, 1, 1], [2, 2, 1]])
  instances = np.array([[5, 1, 2], [1, 1, 1]])
  ids, segments = panoptic.panoptic_from_two_channels(semantics, instances, np.array([10, 20]))
  assert ids[0, 0] == 0  # class 0 is void
  assert len(segments.ids) == 3  # (1,1), (1,2), (2,1)
  assert ids[0, 1] != ids[0, 2] and ids[1, 0] == ids[1, 1] != ids[1, 2]
  by_id = dict(zip(segments.ids, segments.category_ids, strict=True))
  assert by_id[ids[1, 0]] == 20 and by_id[ids[0, 1]] == 10


@pytest.mark.parametrize("size", [0, 1, 2, 500])
def test_runs_count_every_pair_as_unique_does(size):
  rng = np.random.default_rng(size)
  a, b = rng.integers(0, 3, size).repeat(3), rng.integers(0, 2**24, size).repeat(3) % 5
  run_a, run_b, lengths = panoptic._runs(a, b)
  np.testing.assert_array_equal(np.repeat(run_a, lengths), a)
  np.testing.assert_array_equal(np.repeat(run_b, lengths), b)
  assert ((run_a[1:] != run_a[:-1]) | (run_b[1:] != run_b[:-1])).all()  # maximal runs
  pairs, counts = np.unique(np.stack([a, b]), axis=1, return_counts=True)
  got = {}
  for x, y, n in zip(run_a, run_b, lengths, strict=True):
    got[x, y] = got.get((x, y), 0) + n
  assert got == {(x, y): n for x, y, n in zip(*pairs, counts, strict=True)}
