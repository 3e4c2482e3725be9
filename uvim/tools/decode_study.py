r"""Compares decoding schemes of trained stage II models: the end-task metric and the speed of
each scheme, step count and guidance scale (the README's decoding table).

  python -m uvim.tools.decode_study --runs runs/panoptic_stage2,runs/panoptic_stage2_masked \
      --input "validation[:256]" --output runs/decode_panoptic

Each run is a stage II workdir. A causal model is decoded with `ar`; a masked one with each of
--schemes at each of --steps. Every --guidance scale is tried on models trained with
cond_dropout (others: scale 1 only). The metric comes from the run's own end-task evaluator
(PQ, depth RMSE, PSNR) on --input; the speed is images/s of the whole compiled prediction
(image encoder, sampler, oracle decoder) on --speed_batch images, best of 3 after compiling.
Writes `decoding.md`, `decoding.csv` and `decoding.png` (metric and images/s against steps).
"""

import sys
import time
from pathlib import Path

import matplotlib
import numpy as np
from absl import app, flags
from matplotlib.figure import Figure

from uvim import api, cli, decoding
from uvim.errors import UserError
from uvim.tools import common


def define_flags() -> None:
  flags.DEFINE_list("runs", None, "Stage II workdirs to compare.", required=True)
  flags.DEFINE_string("input", None, "A split of the runs' dataset, or `dataset:split`.",
                      required=True)
  flags.DEFINE_string("output", None, "Directory for the table and plot.", required=True)
  flags.DEFINE_list("schemes", ["maskgit", "roar"], "Parallel schemes for masked models.")
  flags.DEFINE_list("steps", ["1", "2", "4", "8", "16"], "Step counts of parallel schemes.")
  flags.DEFINE_list("guidance", ["1"], "Guidance scales (models trained with cond_dropout).")
  flags.DEFINE_float("choice_temperature", decoding.Sampling.choice_temperature,
                     "maskgit's confidence noise (see predict.py).")
  flags.DEFINE_integer("speed_batch", 32, "Images per timed prediction (0: no timing).")


def settings(model: api.Model, schemes: list[str], steps: list[int], guidance: list[float],
             choice_temperature: float) -> list[dict]:
  """The sampler options to try on `model`: its schemes, steps and (if guidable) scales."""
  lm = model.stage.model
  scales = guidance if lm.cond_dropout else [1.0]
  if not lm.masked:
    return [dict(scheme="ar", guidance=s) for s in scales]
  code_len = model.stage.oracle().code_len
  wrong = [n for n in steps if not 1 <= n <= code_len]
  if wrong:
    raise UserError(f"--steps {wrong}: a masked model decodes its {code_len}-word code in 1 to "
                    f"{code_len} steps")
  return [dict(scheme=scheme, steps=n, guidance=s,
               **({"choice_temperature": choice_temperature} if scheme == "maskgit" else {}))
          for scheme in schemes for n in steps for s in scales]


def images_per_second(model: api.Model, batch_size: int, sampling: dict) -> float:
  """Throughput of the compiled prediction on a batch of random images: best of 3 runs after
  compiling."""
  rng = np.random.default_rng(0)
  sizes = {"image": model.stage.model.input_size,
           "image_ctx": model.stage.oracle().config.input_size}
  batch = {k: rng.uniform(-1, 1, (batch_size, *size, 3)).astype(np.float32)
           for k, size in sizes.items()}
  model.predict_batch(batch, **sampling)
  best = np.inf
  for _ in range(3):
    start = time.perf_counter()
    model.predict_batch(batch, **sampling)
    best = min(best, time.perf_counter() - start)
  return len(batch["image"]) / best


def run(runs: list[str], source: str, output: Path, *, schemes: list[str], steps: list[int],
        guidance: list[float], choice_temperature: float, speed_batch: int) -> list[Path]:
  """Scores and times every setting of every run (the tables rewritten after each); the files
  written."""

  if not runs:
    raise UserError("--runs: give at least one stage II workdir")
  if not (schemes and steps and guidance):
    raise UserError("--schemes, --steps and --guidance each need at least one value")
  common.prepare_output(output)
  for workdir in runs:
    common.input_split(api.load_config(workdir), source)
  models = {workdir: api.load(workdir) for workdir in runs}
  several = [w for w, m in models.items() if m.task is None]
  if several:
    raise UserError(f"--runs: {several[0]} is a multi-task run; compare its chains with "
                    "python -m uvim.tools.chain_study")
  kinds = {m.task.EVALUATOR for m in models.values()}
  if len(kinds) > 1:
    raise UserError(f"--runs: the runs are scored by different evaluators {sorted(kinds)}; "
                    "compare runs of one task")
  metric = next(iter(models.values())).task.METRIC
  plan = [(workdir, model, options) for workdir, model in models.items()
          for options in settings(model, schemes, steps, guidance, choice_temperature)]
  for _, model, options in plan:  # every setting checked before the first is scored
    model.options(**options)
  rows, start = [], time.perf_counter()
  for i, (workdir, model, options) in enumerate(plan):
    config = model.config
    split = common.split_of(config, source)
    metrics = model.evaluate(split, **options)  # at the task's temperature
    speed = images_per_second(model, speed_batch, options) if speed_batch else np.nan
    rows.append({"run": Path(workdir).name, **options,
                 "steps": options.get("steps", model.stage.model.seq_len),
                 "images_per_s": speed, **metrics})
    written = write_results(rows, metric, output, source)
    elapsed = time.perf_counter() - start
    print(f"{i + 1}/{len(plan)} {Path(workdir).name} {options}: {metric} "
          f"{metrics[metric]:.4g}, {speed:.1f} img/s; ETA "
          f"{elapsed / (i + 1) * (len(plan) - i - 1):.0f}s", file=sys.stderr, flush=True)
  return written


def write_results(rows: list[dict], metric: str, output: Path, title: str) -> list[Path]:
  """decoding.csv (every metric), decoding.md (the main one and speed), decoding.png."""
  common.write_csv(rows, output / "decoding.csv")
  lines = [f"# Decoding schemes: {title}", "",
           f"| run | scheme | steps | guidance | {metric} | images/s |", "|---" * 6 + "|"]
  for row in rows:
    lines.append(f"| {row['run']} | {row['scheme']} | {row['steps']} | {row['guidance']:g} | "
                 f"{row[metric]:.4g} | {row['images_per_s']:.1f} |")
  (output / "decoding.md").write_text("\n".join(lines) + "\n")
  return [output / "decoding.csv", output / "decoding.md", plot(rows, metric, output, title)]


def plot(rows: list[dict], metric: str, output: Path, title: str) -> Path:
  """The metric (and images/s, when timed) against steps: a line per run, scheme and guidance;
  `ar` as a horizontal line (its steps are the code length)."""
  keys = [metric] + (["images_per_s"] if any(r["images_per_s"] > 0 for r in rows) else [])
  fig = Figure(figsize=(5 * len(keys) + 3, 4))
  axes = fig.subplots(1, len(keys), squeeze=False)
  axes = axes[0]
  groups = {}
  for row in rows:
    groups.setdefault((row["run"], row["scheme"], row["guidance"]), []).append(row)
  parallel_steps = sorted({r["steps"] for r in rows if r["scheme"] != "ar"}) or [1]
  scales = sorted({r["guidance"] for r in rows})
  runs = list(dict.fromkeys(r["run"] for r in rows))
  palette = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
  pairs = [(run, scale) for run in runs for scale in scales]  # a colour per run and scale
  colors = {pair: palette[i % len(palette)] for i, pair in enumerate(pairs)}
  styles = {"maskgit": "o-", "roar": "s:"}
  for (name, scheme, scale), group in groups.items():
    label = (f"{name} " if len(runs) > 2 else "") + f"{scheme}" + (
        f", guidance {scale:g}" if len(scales) > 1 else "")
    for ax, key in zip(axes, keys, strict=True):
      if scheme == "ar":
        ax.axhline(group[0][key], linestyle="--", color=colors[name, scale],
                   label=f"{label} ({group[0]['steps']} steps)")
      else:
        ax.plot([r["steps"] for r in group], [r[key] for r in group], styles.get(scheme, "o-"),
                color=colors[name, scale], label=label)
  for ax, key in zip(axes, keys, strict=True):
    ax.set_xscale("log", base=2)
    ax.set_xticks(parallel_steps, [str(s) for s in parallel_steps])
    ax.set_xlabel("parallel decoding steps")
    ax.set_ylabel(key.replace("images_per_s", "images/s"))
    ax.grid(alpha=0.3)
    if key == "images_per_s":
      ax.set_yscale("log")
  axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(output / "decoding.png", dpi=120)
  return output / "decoding.png"


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.quiet_library_logs()
  f = flags.FLAGS
  try:
    steps = [int(s) for s in f.steps]
    guidance = [float(s) for s in f.guidance]
  except ValueError as e:
    raise app.UsageError(f"--steps takes integers and --guidance numbers: {e}") from None
  common.report_written(lambda: run(
      f.runs, f.input, Path(f.output), schemes=f.schemes, steps=steps, guidance=guidance,
      choice_temperature=f.choice_temperature, speed_batch=f.speed_batch))


if __name__ == "__main__":
  define_flags()
  app.run(main)
