r"""Trains a UViM model (stage I or stage II, chosen by the config's model).

  python train.py --config configs/panoptic_stage1.py:smoke --workdir runs/panoptic_stage1 \
      --config.lr=3e-4
"""

from absl import app, flags

from uvim import cli, trainer

_CONFIG = cli.define_config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and config.")
flags.mark_flag_as_required("workdir")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  cli.quiet_library_logs()
  trainer.train_and_evaluate(config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
