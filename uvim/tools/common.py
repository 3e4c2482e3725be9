"""What the study tools share: the input split, the output folder, the config and checkpoint."""

import csv
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from uvim.errors import UserError


def split_of(config, source: str) -> str:
  """`--input` as a split of the config's dataset (a `dataset:` prefix replaces the dataset)."""
  head = source.split("[", 1)[0]
  if ":" in head:
    colon = head.rindex(":")
    config.dataset, source = source[:colon], source[colon + 1:]
  return source


def input_split(config, source: str, flag: str = "--input") -> str:
  """`split_of`, checked before any work: the dataset is prepared and the split exists and
  holds examples (errors name `flag`)."""
  from uvim import input_pipeline

  split = split_of(config, source)
  builder = input_pipeline.get_builder(config.dataset, config.data_dir, flag)
  input_pipeline.num_examples(builder, split, flag)
  return split


def prepare_output(output: Path, flag: str = "--output") -> Path:
  """Creates a tool's output folder before any work: an existing file there, or a folder that
  cannot be made, is a UserError naming `flag`."""
  if output.exists() and not output.is_dir():
    raise UserError(f"{flag} {output} is a file; give a folder for the results")
  try:
    output.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise UserError(f"{flag} {output}: {e.strerror}") from None
  return output


def to_uint8(image: np.ndarray) -> np.ndarray:
  """An image in [-1, 1] as uint8."""
  return np.round((np.asarray(image) + 1) * 127.5).clip(0, 255).astype(np.uint8)


def config_and_checkpoint(argv: list[str], model_name: str, why: str, what: str):
  """A tool's config (the run's recorded one where `--checkpoint`, else `--workdir`, records one,
  with the `--config.<key>` overrides; else `--config`: a `model_name` model, else a usage error
  saying `why`) and that checkpoint (a usage error naming `what` when none is given)."""
  from absl import app, flags

  from uvim import cli

  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.quiet_library_logs()
  config = flags.FLAGS.config
  if config.model_name != model_name:
    raise app.UsageError(f"--config: {why}")
  source = flags.FLAGS.checkpoint or flags.FLAGS.workdir
  if not source:
    raise app.UsageError(f"Give --workdir or --checkpoint (the trained {what}).")
  from uvim import api

  try:  # the run's recorded config holds, but for what the command line sets
    return api.run_config(config, source, cli.explicit_keys()), source
  except UserError as e:
    sys.exit(f"FATAL {e}")


def report_written(run: Callable[[], list[Path]]) -> None:
  """Runs a tool and lists the files it wrote; a UserError ends it with one line."""
  try:
    written = run()
  except UserError as e:
    sys.exit(f"FATAL {e}")
  print("wrote", *map(str, written), sep="\n  ")


def write_csv(rows: list[dict], path: Path) -> Path:
  """`rows` as a CSV table with every key any row has, in order of first appearance."""
  keys = list(dict.fromkeys(k for row in rows for k in row))
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, keys)
    writer.writeheader()
    writer.writerows(rows)
  return path
