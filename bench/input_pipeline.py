r"""Input pipeline throughput (images/s) for the paper's Listing-1 pp strings.

  python -m bench.input_pipeline [--res 512] [--batches 20] [--dataset toy_scenes/small] \
      [--data_dir DIR]

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

from bench import common
from configs import panoptic_stage1
from pp.builder import get_preprocess_fn
from uvim import input_pipeline as ip
from uvim.datasets import coco_folder


def images_per_second(builder, pp: str, batches: int, batch_size: int) -> tuple[int, float]:
  """(images, seconds) of `batches` training batches of `pp` after 3 warm-up ones."""
  ds = ip.make_for_train(builder, "train", get_preprocess_fn(pp), batch_size,
                         shuffle_buffer_size=1000, seed=0, process_index=0, process_count=1)
  stream = ds.as_numpy_iterator()
  for _ in range(3):
    next(stream)
  start = time.perf_counter()
  for _ in range(batches):
    next(stream)
  return batches * batch_size, time.perf_counter() - start


def measure(res: int = 512, *, batches: int = 20, batch_size: int = 32,
            dataset: str = "toy_scenes/small", data_dir: str | None = None) -> list[dict]:
  """One record per (source, pp): the toy scenes from tfds and from a COCO-format folder of
  them (train split exported as JPEG + PNG). Generating the data is timed apart (`setup`)."""
  tmp = tempfile.mkdtemp()
  start = time.perf_counter()
  toy = ip.get_builder(dataset, data_dir or tmp)
  root = f"{tmp}/coco"
  coco_folder.export_coco_panoptic(tfds.as_numpy(toy.as_dataset(split="train")), root, "train",
                                   coco_folder.categories_of(toy))
  folder = tfds.builder("coco_panoptic_folder", data_dir=f"{tmp}/folder_tfds")
  folder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=root))
  setup = time.perf_counter() - start
  config = panoptic_stage1.get_config(f"res={res}")
  records = []
  for source, builder in ((dataset, toy), ("coco_panoptic_folder", folder)):
    for pp in ("pp_train", "pp_eval"):
      images, seconds = images_per_second(builder, config[pp], batches, batch_size)
      records.append(common.record(
          "input_pipeline", f"{source}, Listing 1 {pp} at {res} px, batch {batch_size}",
          images / seconds, "images/s", f"{os.cpu_count()} cores", source=source,
          pp=pp, res=res, images=images, seconds=seconds, setup_seconds=setup))
  return records


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  for r in measure(f.res, batches=f.batches, dataset=f.dataset, data_dir=f.data_dir):
    print(json.dumps(r), flush=True)


if __name__ == "__main__":
  flags.DEFINE_integer("res", 512, "Image and label resolution of the pp strings.")
  flags.DEFINE_integer("batches", 20, "Batches of 32 to time (after 3 warm-up ones).")
  flags.DEFINE_string("dataset", "toy_scenes/small", "The toy scenes variant to read.")
  flags.DEFINE_string("data_dir", None, "tfds data dir of the toy scenes (default: temporary).")
  app.run(main)
