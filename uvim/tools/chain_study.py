r"""Scores chained generation of a multi-task stage II (the README's chain table).

  python -m uvim.tools.chain_study --workdir runs/multitask_stage2 --input "validation[:256]" \
      --output runs/chains [--singles runs/panoptic_stage2_masked,runs/depth_stage2_masked]

For each task T of the model it scores, with T's evaluator of the run (PQ, depth RMSE): T from
the image alone; T after each other task O decoded first (image -> O -> T); T given the
oracle's code of O's ground-truth labels (image + O's code -> T); and with three tasks or more,
the chains through two others (decoded, given, or one of each). Every step decodes with the
sampling flags (default: --scheme maskgit, 8 steps, each task's temperature; --guidance and
--unconditional for guided chains). `--singles` adds single-task stage II runs of the same
tasks, scored the same way (their own scheme if causal). Writes `chains.md` and `chains.csv`.
"""

import itertools
import sys
import time
from collections.abc import Callable
from pathlib import Path

from absl import app, flags

from uvim import api, cli
from uvim.errors import UserError
from uvim.tools import common


def define_flags() -> Callable[[], dict]:
  flags.DEFINE_string("workdir", None, "A multi-task stage II workdir.", required=True)
  flags.DEFINE_string("input", None, "A split of the run's dataset, or `dataset:split`.",
                      required=True)
  flags.DEFINE_string("output", None, "Directory for the table.", required=True)
  flags.DEFINE_list("singles", [], "Single-task stage II workdirs to score alongside.")
  flags.DEFINE_list("targets", [], "The tasks whose chains to score (default: every task).")
  return cli.define_sampling_flags()  # the sampler's options, for every chain step


def chains(names: tuple[str, ...]) -> list[tuple[str, dict]]:
  """(row label, predict options) of every chain the study scores, target by target: from the
  image alone; through each other task, and each ordered pair of them, decoded first; given
  the true codes of each other task, and of each pair; one decoded, one given."""
  rows = []
  for target in names:
    others = [n for n in names if n != target]
    rows.append((f"image -> {target}", {"chain": (target,)}))
    for other in others:
      rows.append((f"image -> {other} -> {target}", {"chain": (other, target)}))
      rows.append((f"image + true {other} code -> {target}",
                   {"chain": (target,), "given": (other,)}))
    for a, b in itertools.permutations(others, 2):
      rows.append((f"image -> {a} -> {b} -> {target}", {"chain": (a, b, target)}))
      rows.append((f"image + true {a} code -> {b} -> {target}",
                   {"chain": (b, target), "given": (a,)}))
    for a, b in itertools.combinations(others, 2):
      rows.append((f"image + true {a} and {b} codes -> {target}",
                   {"chain": (target,), "given": (a, b)}))
  return rows


def run(workdir: str, source: str, output: Path, *, singles: list[str],
        sampling: dict, targets: list[str] = ()) -> list[Path]:
  """Scores every chain of the multi-task run, then the single-task runs, with the sampler's
  `sampling` options (`decoding.Sampling`'s fields; temperature: each task's default); the
  files written. `targets` limits the chains to those ending in these tasks."""
  config = api.load_config(workdir)
  if "oracles" not in config:
    raise UserError(f"--workdir {workdir}: not a multi-task stage II run (no config.oracles)")
  unknown = sorted(set(targets) - set(config.oracles))
  if unknown:
    raise UserError(f"--targets: unknown task(s) {unknown}; the run's tasks are "
                    f"{sorted(config.oracles)}")
  split = common.input_split(config, source)
  for single in singles:  # each a single-task stage II run of one of the tasks
    single_config = api.load_config(single)
    if single_config.model_name != "proj.uvim.lm" or "oracles" in single_config:
      raise UserError(f"--singles {single}: not a single-task stage II run (model_name "
                      f"{single_config.model_name!r})")
    if single_config.oracle.task not in {o.task for o in config.oracles.values()}:
      raise UserError(f"--singles {single}: a {single_config.oracle.task} run; the multi-task "
                      f"run's tasks are {sorted(o.task for o in config.oracles.values())}")
    common.input_split(single_config, source)
  common.prepare_output(output)
  multitask = api.load(workdir)
  rows, start = [], time.perf_counter()
  plan = [(label, options) for label, options in chains(multitask.stage.names)
          if not targets or options["chain"][-1] in targets]
  for i, (label, options) in enumerate(plan):
    target = options["chain"][-1]
    metrics = multitask.evaluate(split, **sampling, **options)
    rows.append({"run": Path(workdir).name, "target": target, "chain": label, **metrics})
    print(f"{i + 1}/{len(plan)} {label}: {_headline(multitask.tasks[target], metrics)} "
          f"({time.perf_counter() - start:.0f}s)", file=sys.stderr, flush=True)
  for single in singles:
    model = api.load(single)
    target = next((n for n, t in multitask.tasks.items() if t is model.task), model.task.NAME)
    options = sampling if model.stage.model.masked else {
        k: v for k, v in sampling.items() if k in ("temperature", "seed")}
    metrics = model.evaluate(common.split_of(model.config, source), **options)
    rows.append({"run": Path(single).name, "target": target,
                 "chain": f"image -> {target} (single-task)", **metrics})
  return write_results(rows, multitask.tasks, output, f"{Path(workdir).name} on {source}")


def _headline(task, metrics: dict) -> str:
  return f"{task.METRIC} {metrics[task.METRIC]:.4g}"


def write_results(rows: list[dict], tasks: dict, output: Path, title: str) -> list[Path]:
  """chains.csv (every metric) and chains.md (each target's headline metric)."""
  common.write_csv(rows, output / "chains.csv")
  lines = [f"# Chained generation: {title}", "", "| run | chain | metric | value |",
           "|---|---|---|---|"]
  for row in rows:
    metric = tasks[row["target"]].METRIC
    lines.append(f"| {row['run']} | {row['chain']} | {metric} | {row[metric]:.4g} |")
  (output / "chains.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))
  return [output / "chains.csv", output / "chains.md"]


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.quiet_library_logs()
  f = flags.FLAGS
  common.report_written(lambda: run(f.workdir, f.input, Path(f.output), singles=f.singles,
                                    sampling=SAMPLING(), targets=f.targets))


if __name__ == "__main__":
  SAMPLING = define_flags()
  app.run(main)
