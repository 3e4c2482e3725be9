r"""Predicts panoptic segmentation, depth or colour for images with a trained UViM model.

  python predict.py --config configs/panoptic_stage2.py --workdir runs/panoptic_stage2 \
      --input photo.jpg --output predictions/
"""

from absl import app, flags

from uvim import cli

_CONFIG = cli.define_config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Training directory holding the checkpoint.")
_INPUT = flags.DEFINE_string("input", None, "An image file, a folder of images or a tfds split.")
_OUTPUT = flags.DEFINE_string("output", None, "Directory to write predictions to.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  task = config.get("task") or config.oracle.task
  print(f"Config OK: task={task!r} model={config.model_name!r}")
  print("NOT YET: prediction comes with the stage II issue. Nothing was predicted.")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
