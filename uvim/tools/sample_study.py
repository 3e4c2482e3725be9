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

import dataclasses
import itertools
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from matplotlib.figure import Figure

from uvim import api, cli, input_pipeline
from uvim.errors import UserError
from uvim.tools import common

AXES = ("temperature", "top_k", "top_p")
BASE = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}  # the setting each axis varies


def define_flags() -> None:
  flags.DEFINE_string("run", None, "A single-task stage II workdir.", required=True)
  flags.DEFINE_string("input", None, "A split of the run's dataset, or `dataset:split`.",
                      required=True)
  flags.DEFINE_string("output", None, "Directory for the table and plots.", required=True)
  flags.DEFINE_list("temperature", ["0", "0.25", "0.5", "1", "1.5"], "Temperatures (no filter).")
  flags.DEFINE_list("top_k", ["2", "8"], "top-k values at T = 1 (empty: none).")
  flags.DEFINE_list("top_p", ["0.5", "0.8", "0.95"], "top-p values at T = 1 (empty: none).")
  flags.DEFINE_integer("samples", 4, "Codes sampled per image and setting (>= 2).")


@dataclasses.dataclass(frozen=True)
class Scoring:
  """How a task's samples are scored. `states(outputs, truth)` gives each of N samples of one
  image a state (N, S) that sums over images; `value(state)` is the metric of a sum of states
  (of one image: its per-image score); `difference(a, b)` is the per-pixel difference of two
  samples' outputs (the diversity), in `difference_unit`."""

  metric: str
  higher_is_better: bool
  states: Callable[[dict, dict], np.ndarray]
  value: Callable[[np.ndarray], float]
  difference: Callable[[dict, dict], float]
  difference_unit: str


def mean_scoring(metric: str, higher_is_better: bool, per_image: Callable,
                 difference: Callable, difference_unit: str) -> Scoring:
  """A metric averaged over images: the state of an image is (score, 1)."""
  return Scoring(metric, higher_is_better,
                 lambda outputs, truth: np.stack([per_image(outputs, truth),
                                                  np.ones(len(outputs[next(iter(outputs))]))], 1),
                 lambda state: float(state[0] / state[1]), difference, difference_unit)


def panoptic_scoring(categories: list[dict]) -> Scoring:
  """PQ: the state of an image is its PQ sums (true/false positives, misses, IoU per class)."""
  from evaluators import panoptic

  category_ids = np.array([c["id"] for c in categories])

  def states(outputs, truth):
    gt_ids, gt_segments = panoptic.ground_truth_segments(truth, category_ids)
    rows = []
    for semantics, instances in zip(outputs["semantics"], outputs["instances"], strict=True):
      accumulator = panoptic.PQAccumulator(categories)
      accumulator.add(gt_ids, gt_segments, *panoptic.predicted_segments(
          semantics, instances, gt_ids.shape, category_ids))
      rows.append(accumulator.state().ravel())
    return np.stack(rows)

  def value(state):
    accumulator = panoptic.PQAccumulator(categories)
    accumulator.load_state(state.reshape(4, -1))
    return 100 * accumulator.results()["All"]["pq"]

  return Scoring("PQ", True, states, value,
                 lambda a, b: float(np.mean(a["semantics"] != b["semantics"])),
                 "fraction of pixels whose class differs")


def depth_rmse(outputs: dict, truth: dict) -> np.ndarray:
  """Per-sample RMSE (N,) against `ground_truth`, as the nyu_depth evaluator scores it."""
  from evaluators.depth import depth_metrics

  gt = truth["ground_truth"][..., 0]
  pred = jax.image.resize(jnp.asarray(outputs["depth"]), (len(outputs["depth"]), *gt.shape),
                          method="nearest")
  return np.asarray(depth_metrics(pred, jnp.broadcast_to(gt, pred.shape))["rmse"])


def color_psnr(outputs: dict, truth: dict) -> np.ndarray:
  """Per-sample PSNR (N,) against `labels`, as the psnr evaluator scores it."""
  from evaluators.colorization import psnr

  colors = jnp.asarray(outputs["color"])
  return np.asarray(psnr(colors, jnp.broadcast_to(truth["labels"], colors.shape)))


def colourfulness(images: np.ndarray) -> np.ndarray:
  """Hasler & Suesstrunk's colourfulness of images (..., H, W, 3) in [-1, 1], on 8-bit levels:
  std_rgyb + 0.3 mean_rgyb of the opponent channels rg = R - G, yb = (R + G) / 2 - B."""
  rgb = (np.asarray(images, np.float64) + 1) * 127.5
  rg = rgb[..., 0] - rgb[..., 1]
  yb = (rgb[..., 0] + rgb[..., 1]) / 2 - rgb[..., 2]
  axes = (-2, -1)
  return (np.sqrt(rg.std(axes) ** 2 + yb.std(axes) ** 2)
          + 0.3 * np.sqrt(rg.mean(axes) ** 2 + yb.mean(axes) ** 2))


SCORINGS = {
    "nyu_depth": lambda builder: mean_scoring(
        "rmse", False, depth_rmse, lambda a, b: float(np.mean(np.abs(a["depth"] - b["depth"]))),
        "mean |depth difference| (m)"),
    "psnr": lambda builder: mean_scoring(
        "psnr", True, color_psnr,
        lambda a, b: float(np.mean(np.abs(a["color"] - b["color"])) * 127.5),
        "mean |colour difference| (8-bit levels)"),
    "coco_panoptic": lambda builder: panoptic_scoring(_categories(builder)),
}


def _categories(builder) -> list[dict]:
  from uvim.panoptic_format import panoptic_categories

  return panoptic_categories(builder)


def diversity(samples: list[dict], difference: Callable[[dict, dict], float]) -> float:
  """The mean difference over the pairs of samples (0 for one sample)."""
  pairs = list(itertools.combinations(samples, 2))
  return float(np.mean([difference(a, b) for a, b in pairs])) if pairs else 0.0


def settings(temperatures: list[float], top_ks: list[int], top_ps: list[float]) -> list[dict]:
  """(axis, sampling options) for each value of each axis, the others at BASE."""
  values = {"temperature": temperatures, "top_k": top_ks, "top_p": top_ps}
  return [{"axis": axis, **BASE, axis: value} for axis in AXES for value in values[axis]]


def score_setting(model: api.Model, evaluator, scoring: Scoring, truths: Callable,
                  options: dict, samples: int) -> dict:
  """Every number of one setting (see the module docstring), from one pass over the input."""
  states, picks, diversities, colour = [], [], [], []
  for batch in evaluator.batches():
    outputs = model.predict_batch(batch, **options, num_samples=samples)
    mask = input_pipeline.local_rows(batch[input_pipeline.MASK_KEY])
    for i, truth in zip(np.nonzero(mask)[0], truths(batch, mask), strict=True):
      image = {k: v[i] for k, v in outputs.items()}  # (samples, ...) each
      states.append(scoring.states(image, truth))
      picks.append(int(np.argmax(image["code_logprob"])))
      diversities.append(diversity([{k: v[n] for k, v in image.items()}
                                    for n in range(samples)], scoring.difference))
      if "color" in image:
        colour.append(colourfulness(image["color"]) / max(colourfulness(truth["labels"]), 1e-6))
  states = np.stack(states)  # (images, samples, S)
  per_sample = [scoring.value(states[:, n].sum(0)) for n in range(samples)]
  per_image = np.vectorize(lambda i, n: scoring.value(states[i, n]))(
      *np.indices(states.shape[:2]))
  best = (np.argmax if scoring.higher_is_better else np.argmin)(per_image, axis=1)
  rows = np.arange(len(states))
  row = {"mean": float(np.mean(per_sample)), "std": float(np.std(per_sample)),
         "best_of_n": scoring.value(states[rows, best].sum(0)),
         "model_pick": scoring.value(states[rows, np.array(picks)].sum(0)),
         "diversity": float(np.mean(diversities)),
         **{f"sample_{n}": v for n, v in enumerate(per_sample)}}
  if colour:
    row["colourfulness"] = float(np.mean(colour))
  return row


def run(workdir: str, source: str, output: Path, *, temperatures: list[float],
        top_ks: list[int], top_ps: list[float], samples: int) -> list[Path]:
  """Scores every setting (the table and plots rewritten after each); the files written."""
  from uvim import trainer

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
  kind = common.task_evaluator(config)[1]
  evaluator = common.make_evaluator(config, {"predict": lambda v, b: {}}, split,
                                    trainer.make_mesh(config))  # its input alone
  builder = input_pipeline.get_builder(config.dataset, config.data_dir)
  scoring = SCORINGS[kind](builder)
  fid = next((name for name, k in config.evals if k == "coltran_fid"), None)
  rows, start = [], time.perf_counter()
  for i, value in enumerate(plan):
    options = {k: v for k, v in value.items() if k != "axis"}
    truths = _truths(kind, builder, split)
    rows.append({**value, **score_setting(model, evaluator, scoring, truths, options,
                                          samples)})
    if fid:
      rows[-1]["fid"] = first_sample_metrics(model, options, split, fid)["fid"]
    written = write_results(rows, scoring, output, f"{Path(workdir).name} on {source}")
    elapsed = time.perf_counter() - start
    print(f"{i + 1}/{len(plan)} {options}: {scoring.metric} {rows[-1]['mean']:.4g} "
          f"(best of {samples} {rows[-1]['best_of_n']:.4g}), diversity "
          f"{rows[-1]['diversity']:.3g}; ETA {elapsed / (i + 1) * (len(plan) - i - 1):.0f}s",
          file=sys.stderr, flush=True)
  return written


def first_sample_metrics(model: api.Model, options: dict, split: str, name: str) -> dict:
  """The run's evaluator `name` on `split`, scoring the first sample of `options` (what the
  evaluator scores with these `predict_kwargs`)."""
  from uvim import trainer

  predict = lambda v, b: {k: x[:, 0] for k, x in model.stage.predict_samples(
      v, b, **model.options(**options)).items()}
  evaluator = common.make_evaluator(model.config, {"predict": predict}, split,
                                    trainer.make_mesh(model.config), name=name)
  return evaluator.run(model.variables)


def _truths(kind: str, builder, split: str) -> Callable:
  """(batch, mask) -> the ground truth of each valid row: the raw tfds examples for PQ (read
  in step with the batches, as the evaluator does), else the batch's own rows."""
  if kind == "coco_panoptic":
    examples = input_pipeline.host_examples(builder, split)
    return lambda batch, mask: [next(examples) for _ in np.nonzero(mask)[0]]

  def rows(batch, mask):
    local = {k: input_pipeline.local_rows(v) for k, v in batch.items()}
    return [{k: v[i] for k, v in local.items()} for i in np.nonzero(mask)[0]]

  return rows


def write_results(rows: list[dict], scoring: Scoring, output: Path, title: str) -> list[Path]:
  """samples.csv, samples.md and a plot per axis studied."""
  common.write_csv(rows, output / "samples.csv")
  keys = list(dict.fromkeys(k for row in rows for k in row))
  n = sum(k.startswith("sample_") for k in keys)
  extra = [k for k in ("colourfulness", "fid") if k in keys]
  header = ["axis", "T", "top-k", "top-p", f"{scoring.metric} (mean ± std of {n})",
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
  plots = [plot(rows, axis, scoring, output, title) for axis in AXES
           if any(r["axis"] == axis for r in rows)]
  return [output / "samples.csv", output / "samples.md", *plots]


def plot(rows: list[dict], axis: str, scoring: Scoring, output: Path, title: str) -> Path:
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
  left.set_ylabel(scoring.metric + ("" if scoring.higher_is_better else " (lower is better)"))
  left.legend(fontsize=8)
  right.plot(x, [r["diversity"] for r in rows], "o-", color="C3", label="diversity")
  right.set_ylabel(f"diversity: {scoring.difference_unit}", fontsize=9)
  if "colourfulness" in rows[0]:
    twin = right.twinx()
    twin.plot(x, [r["colourfulness"] for r in rows], "s--", color="C2")
    twin.set_ylabel("colourfulness / ground truth's", color="C2")
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
