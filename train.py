r"""Trains a UViM model (stage I or stage II, chosen by the config's model).

  python train.py --config configs/panoptic_stage1.py:smoke --workdir runs/panoptic_stage1 \
      --config.lr=3e-4
"""

from absl import app, flags

from uvim import cli

_CONFIG = cli.define_config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and config.")
flags.mark_flag_as_required("workdir")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  task = config.get("task") or config.oracle.task
  print(f"Config OK: task={task!r} model={config.model_name!r} dataset={config.dataset!r} "
        f"batch_size={config.batch_size} -> {_WORKDIR.value}")
  print("NOT YET: this version has the config system and preprocessing only; the trainer "
        "comes with the stage I issue. Nothing was trained.")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
