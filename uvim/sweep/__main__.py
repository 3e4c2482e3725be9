r"""Runs a hyper-parameter sweep of train.py, or reports on one.

  python -m uvim.sweep --config configs/colorization_stage1.py:smoke --workdir runs/sweep_code \
      --grid model.code_len=16,64,256 --grid model.dict_size=32,256 \
      --then configs/colorization_stage2.py:smoke [--parallel 2]
  python -m uvim.sweep report runs/sweep_code [--metric colorization/fid]

The runs are the config file's `get_sweep(add)` points (one run without it, or with
--ignore_get_sweep) crossed with each `--grid`; each trains in
`<workdir>/<config name>/<overrides>`. Rerunning the command resumes unfinished runs and skips
finished ones. `--then` trains the second config on each finished run
(its `oracle.model_init`, and `oracle.model.*` = the run's `model.*` overrides), with the fixed
overrides of `--then_set key=value`. `--emit
commands|slurm` writes the runs for a cluster instead of running them. Details: docs/sweeps.md.
"""

import argparse
import sys
from pathlib import Path

from uvim.errors import UserError
from uvim.sweep import emit, plan, report, runner


def run_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m uvim.sweep", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True, help="config file and variant, as train.py takes")
  p.add_argument("--workdir", required=True, type=Path, help="the sweep's directory")
  p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                 help="a config key and its values (repeat for a product)")
  p.add_argument("--ignore_get_sweep", action="store_true",
                 help="run the --grid alone, not crossed with the config's get_sweep")
  p.add_argument("--then", help="a config trained on each run (a stage II on each stage I)")
  p.add_argument("--then_set", action="append", default=[], metavar="KEY=VALUE",
                 help="a fixed override of every --then run, e.g. total_steps=200 (repeatable)")
  p.add_argument("--parallel", type=int, default=1, help="runs at a time on this machine")
  p.add_argument("--gpus_per_run", type=int, default=0,
                 help="give each parallel slot its own GPUs (CUDA_VISIBLE_DEVICES)")
  p.add_argument("--emit", choices=["commands", "slurm"],
                 help="write the runs for a cluster instead of running them")
  p.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                 help="an #SBATCH option for --emit slurm, e.g. '--gres=gpu:8' (repeatable)")
  return p


def report_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m uvim.sweep report",
                              description="Writes DIR/report/: report.md, report.csv and plots.")
  p.add_argument("dir", type=Path, help="the sweep's directory (its --workdir)")
  p.add_argument("--metric", action="append", default=[],
                 help="metric(s) to tabulate and plot (default: every evaluation metric)")
  return p


def prepare_data(runs: list[plan.Run]) -> None:
  """Generates the built-in toy data the runs read, once, before they start (parallel runs
  would race to), and stops on a dataset that is not prepared, before any run."""
  from uvim import input_pipeline

  for dataset, data_dir in plan.datasets(runs):
    input_pipeline.get_builder(dataset, data_dir)


def main(argv: list[str]) -> int:
  if argv[:1] == ["report"]:
    args = report_parser().parse_args(argv[1:])
    text, paths = report.write(args.dir, args.metric)
    print(text)
    print("wrote", *map(str, paths), sep="\n  ")
    return 0
  args = run_parser().parse_args(argv)
  runs = plan.plan(args.workdir, args.config, args.grid, args.then, not args.ignore_get_sweep,
                   args.then_set)
  print(f"[sweep] {len(runs)} runs in {args.workdir}:",
        *(f"{r.stage}/{r.name}" for r in runs), sep="\n  ")
  if args.emit:
    written = (emit.commands(runs, args.workdir) if args.emit == "commands"
               else emit.slurm(runs, args.workdir, args.sbatch))
    print("wrote", *map(str, written), sep="\n  ")
    return 0
  prepare_data(runs)
  counts = runner.run(runs, args.parallel, args.gpus_per_run)
  finished = counts["finished"] + counts["skipped"]
  print(f"[sweep] {finished}/{len(runs)} runs finished; results: "
        f"python -m uvim.sweep report {args.workdir}")
  if counts["interrupted"]:
    print("[sweep] stopped by a signal; rerun the same command to carry on", file=sys.stderr)
    return 128 + counts["interrupted"]
  return 1 if counts["failed"] or counts["not started"] else 0


if __name__ == "__main__":
  try:
    sys.exit(main(sys.argv[1:]))
  except UserError as e:
    sys.exit(f"FATAL {e}")
