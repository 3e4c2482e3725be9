r"""What sampling does to a trained stage II model: the end-task metric and the diversity of the
samples as the temperature, top-k and top-p vary (the 4M tutorial's ablations; UViM's Figures
7-9 show the samples, `predict.py --sheet_samples`).

  python -m uvim.tools.sample_study --run runs/colorization_stage2 --input "validation[:128]" \
      --output runs/samples_colorization

One axis varies at a time from the base, T = 1 without filters (the model's own scheme and
steps): each --temperature (no filter), each --top_k and each --top_p (at T = 1). Each setting
samples --samples codes per image (independent streams of one seed) and scores every sample
against the ground truth with the run's evaluator metric (PQ, depth RMSE, PSNR):
  mean, std     the metric of each sample's predictions, over the samples;
  best of N     per image, the sample with the best per-image score (what a perfect reranker
                would reach, an upper bound);
  model's pick  per image, the sample whose code the model finds most likely;
  diversity     the mean, over pairs of samples, of their per-pixel difference: panoptic, the
                fraction of pixels whose class differs; depth, mean |difference| (m); colour,
                mean |difference| in 8-bit levels;
  colourfulness colour only: Hasler & Suesstrunk's colourfulness over the ground truth's
                (below 1: washed out, T = 0's trouble);
  fid           colour only, with a `coltran_fid` evaluator in the run: FID of the first
                sample's colours on the input (the run's Inception weights; `random:<seed>`
                weights give numbers comparable only with each other).
Writes samples.csv (every number), samples.md and samples_<axis>.png.
"""

import itertools
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from absl import app, flags
from matplotlib.figure import Figure

from uvim import api, cli, input_pipeline
from uvim.errors import UserError
from uvim.tasks import Scoring
from uvim.tools import common

AXES = ("temperature", "top_k", "top_p")
BASE = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}  # the setting each axis varies
COLUMNS = ("axis", "mean", "std", "best_of_n", "model_pick", "diversity")  # and sample_<n>


def define_flags() -> None:
  flags.DEFINE_string("run", None, "A single-task stage II workdir.", required=True)
  flags.DEFINE_string("input", None, "A split of the run's dataset, or `dataset:split`.",
                      required=True)
  flags.DEFINE_string("output", None, "Directory for the table and plots.", required=True)
  flags.DEFINE_list("temperature", ["0", "0.25", "0.5", "1", "1.5"], "Temperatures (no filter).")
  flags.DEFINE_list("top_k", ["2", "8"], "top-k values at T = 1 (empty: none).")
  flags.DEFINE_list("top_p", ["0.5", "0.8", "0.95"], "top-p values at T = 1 (empty: none).")
  flags.DEFINE_integer("samples", 4, "Codes sampled per image and setting (>= 2).")


def diversity(samples: list[dict], difference: Callable[[dict, dict], float]) -> float:
  """The mean difference over the pairs of samples (0 for one sample)."""
  pairs = list(itertools.combinations(samples, 2))
  return float(np.mean([difference(a, b) for a, b in pairs])) if pairs else 0.0


def settings(temperatures: list[float], top_ks: list[int], top_ps: list[float]) -> list[dict]:
  """(axis, sampling options) for each value of each axis, the others at BASE."""
  values = {"temperature": temperatures, "top_k": top_ks, "top_p": top_ps}
  return [{"axis": axis, **BASE, axis: value} for axis in AXES for value in values[axis]]


def score_setting(model: api.Model, batches: Callable, scoring: Scoring, truths: Callable,
                  options: dict, samples: int) -> dict:
  """Every number of one setting (see the module docstring), from one pass over the input."""
  states, picks, diversities, extras = [], [], [], []
  for batch in batches():
    outputs = model.predict_batch(batch, **options, num_samples=samples)
    mask = input_pipeline.local_rows(batch[input_pipeline.MASK_KEY])
    for i, truth in zip(np.nonzero(mask)[0], truths(batch, mask), strict=True):
      image = {k: v[i] for k, v in outputs.items()}  # (samples, ...) each
      states.append(scoring.states(image, truth))
      picks.append(int(np.argmax(image["code_logprob"])))
      diversities.append(diversity([{k: v[n] for k, v in image.items()}
                                    for n in range(samples)], scoring.difference))
      extras.append(scoring.extras(image, truth))
  states = np.stack(states)  # (images, samples, S)
  per_sample = [scoring.value(states[:, n].sum(0)) for n in range(samples)]
  per_image = np.vectorize(lambda i, n: scoring.value(states[i, n]))(
      *np.indices(states.shape[:2]))
  best = (np.argmax if model.task.HIGHER_IS_BETTER else np.argmin)(per_image, axis=1)
  rows = np.arange(len(states))
  return {"mean": float(np.mean(per_sample)), "std": float(np.std(per_sample)),
          "best_of_n": scoring.value(states[rows, best].sum(0)),
          "model_pick": scoring.value(states[rows, np.array(picks)].sum(0)),
          "diversity": float(np.mean(diversities)),
          **{f"sample_{n}": v for n, v in enumerate(per_sample)},
          **{k: float(np.mean([e[k] for e in extras])) for k in extras[0]}}


def run(workdir: str, source: str, output: Path, *, temperatures: list[float],
        top_ks: list[int], top_ps: list[float], samples: int) -> list[Path]:
  """Scores every setting (the table and plots rewritten after each); the files written."""
  if samples < 2:
    raise UserError(f"--samples {samples}: diversity and best of N need at least 2")
  plan = settings(temperatures, top_ks, top_ps)
  if not plan:
    raise UserError("--temperature, --top_k and --top_p are all empty: nothing to study")
  common.prepare_output(output)
  config = api.load_config(workdir)
  split = common.input_split(config, source)
  model = api.load(workdir)
  if model.task is None:
    raise UserError(f"--run: {workdir} is a multi-task run; study one of its chains with "
                    "python -m uvim.tools.chain_study")
  for value in plan:
    model.options(**{k: v for k, v in value.items() if k != "axis"})  # checked before any work
  task = model.task
  batches = api.eval_batches(config, split, api.evaluator_of(config))
  scoring = task.scoring(model.categories())
  fid = next((name for name, k in config.evals if k == "coltran_fid"), None)
  rows, start = [], time.perf_counter()
  for i, value in enumerate(plan):
    options = {k: v for k, v in value.items() if k != "axis"}
    truths = _truths(task.TRUTH, config, split)
    rows.append({**value, **score_setting(model, batches, scoring, truths, options, samples)})
    if fid:
      rows[-1]["fid"] = model.evaluate(split, evaluator=fid, **options)["fid"]
    written = write_results(rows, task, scoring.difference_unit, output,
                            f"{Path(workdir).name} on {source}")
    elapsed = time.perf_counter() - start
    print(f"{i + 1}/{len(plan)} {options}: {task.METRIC} {rows[-1]['mean']:.4g} "
          f"(best of {samples} {rows[-1]['best_of_n']:.4g}), diversity "
          f"{rows[-1]['diversity']:.3g}; ETA {elapsed / (i + 1) * (len(plan) - i - 1):.0f}s",
          file=sys.stderr, flush=True)
  return written


def _truths(where: str, config, split: str) -> Callable:
  """(batch, mask) -> the ground truth of each valid row: the raw tfds examples (the task's
  TRUTH "examples": read in step with the batches, as its evaluator does), else the batch's own
  rows."""
  if where == "examples":
    examples = input_pipeline.host_examples(
        input_pipeline.get_builder(config.dataset, config.data_dir), split)
    return lambda batch, mask: [next(examples) for _ in np.nonzero(mask)[0]]

  def rows(batch, mask):
    local = {k: input_pipeline.local_rows(v) for k, v in batch.items()}
    return [{k: v[i] for k, v in local.items()} for i in np.nonzero(mask)[0]]

  return rows


def write_results(rows: list[dict], task, unit: str, output: Path, title: str) -> list[Path]:
  """samples.csv, samples.md and a plot per axis studied."""
  common.write_csv(rows, output / "samples.csv")
  keys = list(dict.fromkeys(k for row in rows for k in row))
  n = sum(k.startswith("sample_") for k in keys)
  extra = [k for k in keys if k not in (*AXES, *COLUMNS) and not k.startswith("sample_")]
  header = ["axis", "T", "top-k", "top-p", f"{task.METRIC} (mean ± std of {n})",
            f"best of {n}", "model's pick", "diversity", *extra]
  lines = [f"# Sampling: {title}", "", "| " + " | ".join(header) + " |",
           "|---" * len(header) + "|"]
  for r in rows:
    cells = [r["axis"], f"{r['temperature']:g}", str(r["top_k"]), f"{r['top_p']:g}",
             f"{r['mean']:.4g} ± {r['std']:.2g}", f"{r['best_of_n']:.4g}",
             f"{r['model_pick']:.4g}", f"{r['diversity']:.3g}",
             *(f"{r[k]:.2f}" for k in extra)]
    lines.append("| " + " | ".join(cells) + " |")
  (output / "samples.md").write_text("\n".join(lines) + "\n")
  plots = [plot(rows, axis, task, unit, output, title) for axis in AXES
           if any(r["axis"] == axis for r in rows)]
  return [output / "samples.csv", output / "samples.md", *plots]


def plot(rows: list[dict], axis: str, task, unit: str, output: Path, title: str) -> Path:
  """The metric (mean ± std over samples, best of N, the model's pick) and the diversity
  against one axis."""
  rows = sorted((r for r in rows if r["axis"] == axis), key=lambda r: r[axis])
  x = [r[axis] for r in rows]
  fid = "fid" in rows[0]
  fig = Figure(figsize=(15 if fid else 10, 4))
  axes = fig.subplots(1, 3 if fid else 2)
  left, right = axes[:2]
  left.errorbar(x, [r["mean"] for r in rows], [r["std"] for r in rows], fmt="o-", capsize=3,
                label="a sample (mean ± std)")
  left.plot(x, [r["best_of_n"] for r in rows], "^--", label="best of N (per image)")
  left.plot(x, [r["model_pick"] for r in rows], "s:", label="the model's pick")
  left.set_ylabel(task.METRIC + ("" if task.HIGHER_IS_BETTER else " (lower is better)"))
  left.legend(fontsize=8)
  right.plot(x, [r["diversity"] for r in rows], "o-", color="C3", label="diversity")
  right.set_ylabel(f"diversity: {unit}", fontsize=9)
  extras = [k for k in rows[0] if k not in (*AXES, *COLUMNS, "fid")
            and not k.startswith("sample_")]  # the task's own numbers (Scoring.extras)
  if extras:
    twin = right.twinx()
    for k, style in zip(extras, ("s--", "d-."), strict=False):
      twin.plot(x, [r[k] for r in rows], style, color="C2", label=k)
    twin.set_ylabel(", ".join(extras), color="C2")
  if fid:
    axes[2].plot(x, [r["fid"] for r in rows], "o-", color="C4")
    axes[2].set_ylabel("FID of a sample (lower is better)")
  for ax in axes:
    ax.set_xlabel(axis.replace("_", "-"))
    ax.grid(alpha=0.3)
  fig.suptitle(f"{title}: {axis.replace('_', '-')}" + ("" if axis == "temperature" else
                                                         " at T = 1"))
  fig.tight_layout()
  path = output / f"samples_{axis}.png"
  fig.savefig(path, dpi=120)
  return path


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.quiet_library_logs()
  f = flags.FLAGS
  try:
    temperatures = [float(v) for v in f.temperature]
    top_ks = [int(v) for v in f.top_k]
    top_ps = [float(v) for v in f.top_p]
  except ValueError as e:
    raise app.UsageError(f"--temperature and --top_p take numbers, --top_k integers: {e}") from None
  common.report_written(lambda: run(f.run, f.input, Path(f.output), temperatures=temperatures,
                                    top_ks=top_ks, top_ps=top_ps, samples=f.samples))


if __name__ == "__main__":
  define_flags()
  app.run(main)
