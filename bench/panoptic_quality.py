r"""PQ evaluation throughput (images/s): our vectorised accumulator vs the official panopticapi.

  python -m bench.panoptic_quality [--images 50] [--height 480] [--width 640]

Both score the same COCO-format folders of random images (~30 segments each, with void and
crowd) on one core; prints one JSON line per implementation, with the PQ each found.
"""

import contextlib
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import app, flags
from PIL import Image

from bench import common
from evaluators import panoptic
from uvim.panoptic_format import id_to_rgb

CATEGORIES = [{"id": i, "name": str(i), "isthing": int(i <= 90)} for i in range(1, 134)]


def random_map(rng, h, w, ids):
  out = np.zeros((h, w), np.int64)
  for sid in ids:
    y, x = rng.integers(0, h), rng.integers(0, w)
    out[y:y + rng.integers(10, h // 2), x:x + rng.integers(10, w // 2)] = sid
  return out


def write_folders(root: Path, n: int, h: int, w: int) -> None:
  rng = np.random.default_rng(0)
  anns = {"gt": [], "pred": []}
  for side in anns:
    (root / side).mkdir()
  for image_id in range(n):
    gt = random_map(rng, h, w, rng.choice(np.arange(1, 10**6), 30, replace=False))
    pred = np.where(random_map(rng, h, w, [1]) > 0, 0, gt)  # a hole
    for side, ids in (("gt", gt), ("pred", pred)):
      name = f"{image_id}.png"
      Image.fromarray(id_to_rgb(ids)).save(root / side / name)
      segments = [{"id": int(s), "category_id": int(s % 133) + 1, "iscrowd": int(s % 17 == 0),
                   "area": int((ids == s).sum())} for s in np.unique(ids[ids > 0])]
      anns[side].append({"image_id": image_id, "file_name": name, "segments_info": segments})
  for side, a in anns.items():
    (root / f"{side}.json").write_text(json.dumps(
        {"annotations": a, "categories": CATEGORIES,
         "images": [{"id": i, "file_name": f"{i}.png"} for i in range(n)]}))


def measure(images: int = 50, height: int = 480, width: int = 640, repeats: int = 3) -> list[dict]:
  """One record per implementation: images/s scoring the same random folders (best of
  `repeats`, the two taking turns so that both see the same machine load), and the PQ each
  found (they must agree)."""
  from panopticapi import evaluation

  root = Path(tempfile.mkdtemp())
  write_folders(root, images, height, width)
  gt, pred = (json.loads((root / f"{side}.json").read_text()) for side in ("gt", "pred"))
  pairs = list(zip(gt["annotations"], pred["annotations"], strict=True))
  categories = {c["id"]: c for c in CATEGORIES}

  def ours() -> float:
    return panoptic.score_folders(str(root / "gt.json"), str(root / "gt"),
                                  str(root / "pred.json"), str(root / "pred"))["All"]["pq"]

  def theirs() -> float:
    with contextlib.redirect_stdout(io.StringIO()):
      stat = evaluation.pq_compute_single_core(0, pairs, str(root / "gt"), str(root / "pred"),
                                               categories)
    return stat.pq_average(categories, isthing=None)[0]["pq"]

  seconds, pq = {"uvim": float("inf"), "panopticapi": float("inf")}, {}
  for _ in range(repeats):
    for name, fn in (("uvim", ours), ("panopticapi", theirs)):
      start = time.perf_counter()
      pq[name] = fn()
      seconds[name] = min(seconds[name], time.perf_counter() - start)
  return [common.record("panoptic_quality", f"{name}, {images} images of {height}x{width}, "
                        "~30 segments", images / seconds[name], "images/s",
                        f"one core, PNG decoding included; best of {repeats}", implementation=name,
                        images=images, seconds=seconds[name], pq=pq[name])
          for name in ("uvim", "panopticapi")]


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  for r in measure(f.images, f.height, f.width):
    print(json.dumps(r), flush=True)


if __name__ == "__main__":
  flags.DEFINE_integer("images", 50, "Images to score.")
  flags.DEFINE_integer("height", 480, "Image height.")
  flags.DEFINE_integer("width", 640, "Image width.")
  app.run(main)
