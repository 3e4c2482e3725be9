r"""Exports a panoptic tfds split to a COCO-panoptic-format folder (e.g. as PQ ground truth).

  python -m uvim.datasets.export_coco --dataset toy_scenes --split validation --out ROOT
"""

import tensorflow_datasets as tfds
from absl import app, flags

from uvim import input_pipeline
from uvim.datasets import coco_folder

_DATASET = flags.DEFINE_string("dataset", "toy_scenes", "tfds name of a panoptic dataset.")
_SPLIT = flags.DEFINE_string("split", "validation", "Split to export.")
_OUT = flags.DEFINE_string("out", None, "Root folder to write the COCO layout into.",
                           required=True)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tfds data dir (default: $TFDS_DATA_DIR).")
_IMAGE_FORMAT = flags.DEFINE_enum("image_format", "jpg", ["jpg", "png"], "Image file format.")


def main(argv: list[str]) -> None:
  del argv
  builder = input_pipeline.get_builder(_DATASET.value, _DATA_DIR.value)
  examples = tfds.as_numpy(builder.as_dataset(split=_SPLIT.value))
  path = coco_folder.export_coco_panoptic(examples, _OUT.value, _SPLIT.value,
                                          coco_folder.categories_of(builder), _IMAGE_FORMAT.value)
  print(f"Wrote {path}")


if __name__ == "__main__":
  app.run(main)
