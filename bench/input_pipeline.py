r"""Input pipeline throughput (images/s) for the paper's Listing-1 pp strings.

  python -m bench.input_pipeline [--res 512] [--batches 20] [--data_dir DIR]

Measures toy scenes read from tfds and the same scenes exported to a COCO-format folder and
built with `coco_panoptic_folder` (JPEG images, as COCO ships them). Prints one JSON line per
(source, pp) pair.
"""

import json
import os
import tempfile
import time

import tensorflow_datasets as tfds
from absl import app, flags

from configs import panoptic_stage1
from pp.builder import get_preprocess_fn
from uvim import input_pipeline as ip
from uvim.datasets import coco_folder

_RES = flags.DEFINE_integer("res", 512, "Image and label resolution of the pp strings.")
_BATCHES = flags.DEFINE_integer("batches", 20, "Batches of 32 to time (after 3 warm-up ones).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tfds data dir (default: a temporary one).")


def images_per_second(builder, pp: str, batch_size: int = 32) -> float:
  ds = ip.make_for_train(builder, "train", get_preprocess_fn(pp), batch_size,
                         shuffle_buffer_size=1000, seed=0, process_index=0, process_count=1)
  batches = ds.as_numpy_iterator()
  for _ in range(3):
    next(batches)
  start = time.perf_counter()
  for _ in range(_BATCHES.value):
    next(batches)
  return _BATCHES.value * batch_size / (time.perf_counter() - start)


def main(argv: list[str]) -> None:
  del argv
  tmp = tempfile.mkdtemp()
  data_dir = _DATA_DIR.value or tmp
  toy = ip.get_builder("toy_scenes", data_dir)
  root = f"{tmp}/coco"
  for split in ("train", "validation"):
    coco_folder.export_coco_panoptic(tfds.as_numpy(toy.as_dataset(split=split)), root, split,
                                     coco_folder.categories_of(toy))
  folder = tfds.builder("coco_panoptic_folder", data_dir=f"{tmp}/folder_tfds")
  folder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=root))
  config = panoptic_stage1.get_config(f"res={_RES.value}")
  for source, builder in (("toy_scenes", toy), ("coco_panoptic_folder", folder)):
    for name in ("pp_train", "pp_eval"):
      print(json.dumps({
          "figure": "input_pipeline_images_per_second", "source": source, "pp": name,
          "res": _RES.value, "value": round(images_per_second(builder, config[name]), 1),
          "cpus": os.cpu_count()}))


if __name__ == "__main__":
  app.run(main)
