r"""Runs a benchmark suite: one JSON line per figure on stdout, optionally a markdown table.

  python -m bench --suite cpu|gpu|quick [--markdown FILE] [--only GROUP,...] [--dry_run]

The groups of each suite are in `bench/suites.py`. A group that fails prints a line with its
`error` and the run goes on; the exit status is then 1. `--dry_run` only builds the suite's
training configs and their abstract parameters (no compiling, no timing).
"""

import json
import sys
import time
import traceback

import jax
import tensorflow_datasets as tfds
from absl import app, flags

from bench import common, suites

_SUITE = flags.DEFINE_enum("suite", "cpu", list(suites.SUITES), "Which figures to measure.")
_MARKDOWN = flags.DEFINE_string("markdown", None, "Also write the figures as a markdown table.")
_ONLY = flags.DEFINE_list("only", [], "Run only these groups (default: all of the suite's).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Build the configs only; measure nothing.")

PEAK = {"cpu": (2048, "float32"), "quick": (256, "float32"), "gpu": (8192, "bfloat16")}


def _value_and_unit(r: dict) -> list[str]:
  """The headline as ['144', 'GFLOP/s']: three significant digits under an SI prefix."""
  if "error" in r:
    return ["-", "-"]
  number, _, unit = common.si(r["value"], r["unit"]).partition(" ")
  return [number, unit]


def markdown(records: list[dict], header: dict, seconds: float, command: str) -> str:
  """The figures as a markdown table (one row each) under a line naming the machine."""
  lines = [f"Measured with `{command}` in {seconds:.0f} s on {header['cpu']} "
           f"({header['cores']} cores), {header['devices']} x {header['device']}, "
           f"jax {header['jax']}.", "",
           "| figure | configuration | value | unit | notes |", "| --- | --- | --- | --- | --- |"]
  for r in records:
    notes = r.get("error") or r.get("notes", "")
    cells = [r["figure"], r.get("config", ""), *_value_and_unit(r), notes]
    lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
  return "\n".join(lines) + "\n"


def dry_run(groups: list[suites.Group]) -> None:
  """Builds every config of the groups and its stage's abstract parameters; prints them."""
  from uvim import stages

  for group in groups:
    for spec in group.specs:
      config = spec.build()
      stage = stages.get_stage(config)
      batch = stage.abstract_batch(config.batch_size)
      params = jax.eval_shape(stage.init_variables, jax.random.key(0), batch)["params"]
      count = sum(x.size for x in jax.tree.leaves(params))
      print(json.dumps({"group": group.name, "flags": spec.flags(), "parameters": count,
                        "frozen": bool(stage.frozen_shapes())}), flush=True)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  tfds.disable_progress_bar()
  groups = suites.SUITES[_SUITE.value]()
  unknown = set(_ONLY.value) - {g.name for g in groups}
  if unknown:
    raise app.UsageError(f"--only: no group {sorted(unknown)} in suite {_SUITE.value!r}; "
                         f"it has {[g.name for g in groups]}")
  groups = [g for g in groups if not _ONLY.value or g.name in _ONLY.value]
  if _DRY_RUN.value:
    dry_run(groups)
    return
  start = time.perf_counter()
  ctx = suites.Context(*PEAK[_SUITE.value])
  records, failed = [], False
  for group in groups:
    try:
      new = group.run(ctx)
    except Exception as e:  # one broken group should not cost the others' figures
      traceback.print_exc()
      new, failed = [common.record(group.name, "", float("nan"), "", error=repr(e))], True
    for r in new:
      print(json.dumps(r), flush=True)
    records += new
  if _MARKDOWN.value:
    command = "python -m bench " + " ".join(sys.argv[1:])
    with open(_MARKDOWN.value, "w") as f:
      f.write(markdown(records, common.machine(), time.perf_counter() - start, command))
  if failed:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
