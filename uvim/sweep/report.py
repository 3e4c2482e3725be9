"""The results of a sweep: a table (markdown and CSV) and plots (PNG), from each run's
`metrics.jsonl`, whether the sweep ran here or on a cluster (`--emit`).

Table: one row per run: the sweep point's overrides, state, steps, time, and the final and best
value of each metric. Plots: each metric (best over training, one point per run) against each
swept key, one line per combination of the other keys, a row of panels per stage; and the
training curves of every run.
"""

import csv
import dataclasses
import json
import math
import re
import signal
from pathlib import Path
from typing import Any

from uvim import workdir as workdir_lib
from uvim.errors import UserError, did_you_mean
from uvim.sweep import plan, runner

# Metrics where higher is better (matched on the name's last part); all others: lower.
HIGHER_IS_BETTER = re.compile(r"^(pq|sq|rq|psnr|delta|acc|accuracy|codebook_usage|"
                              r"codebook_perplexity)")
TRAINING_METRIC = "training_loss"
STOPPED_EXITS = (128 + signal.SIGINT, 128 + signal.SIGTERM)  # train.py, stopped by a signal
REPORT_DIR = "report"


def higher_is_better(metric: str) -> bool:
  return bool(HIGHER_IS_BETTER.match(metric.rsplit("/", 1)[-1]))


@dataclasses.dataclass
class Result:
  """What one run of the sweep has produced so far."""
  run: plan.Run
  point: dict[str, Any]  # the sweep point's overrides (a chained run: those of its first run)
  state: str  # finished, running, stopped, not started
  steps: int | None
  curves: dict[str, list[tuple[int, float]]]  # metric -> [(step, value)]
  wall_seconds: float | None  # the sweep's attempts (None when it ran elsewhere)
  train_seconds: float | None  # training steps only, from the logged images/s

  @property
  def metrics(self) -> list[str]:
    return [m for m in self.curves if "/" in m or m == TRAINING_METRIC]

  def final(self, metric: str) -> float | None:
    return self.curves[metric][-1][1] if self.curves.get(metric) else None

  def best(self, metric: str) -> float | None:
    values = [v for _, v in self.curves.get(metric, []) if math.isfinite(v)]
    if not values:
      return None
    return max(values) if higher_is_better(metric) else min(values)


def collect(sweep_dir: Path) -> list[Result]:
  """The results of every run recorded in `<sweep_dir>/sweep.json`."""
  runs = plan.load(sweep_dir)
  points = {r.workdir: r.overrides for r in runs if r.after is None}
  return [result_of(r, points.get(r.after, {}) if r.after else r.overrides) for r in runs]


def result_of(run: plan.Run, point: dict[str, Any]) -> Result:
  records = workdir_lib.read_metrics(run.workdir / workdir_lib.METRICS_FILE)
  curves: dict[str, list[tuple[int, float]]] = {}
  for record in records:
    for key, value in record.items():
      if key != "step":
        curves.setdefault(key, []).append((record["step"], value))
  return Result(run=run, point=point, state=state_of(run.workdir, records),
                steps=max((r["step"] for r in records), default=None), curves=curves,
                wall_seconds=runner.wall_seconds(run.workdir) or None,
                train_seconds=train_seconds(run.workdir, records))


def state_of(workdir: Path, records: list[dict]) -> str:
  """finished, running, failed (its last attempt under the sweep did), stopped (a signal, or
  no record of why), or not started."""
  if runner.is_finished(workdir):
    return "finished"
  if workdir_lib.lock_holder(workdir):
    return "running"
  tried = runner.attempts(workdir)
  if tried and tried[-1]["exit"] not in STOPPED_EXITS:
    return "failed"
  return "stopped" if records or tried else "not started"


def train_seconds(workdir: Path, records: list[dict]) -> float | None:
  """Seconds spent in training steps: each logged interval's steps x batch / images per second."""
  config_path = workdir / "config.json"
  if not config_path.exists():
    return None
  batch = json.loads(config_path.read_text())["batch_size"]
  total, previous = 0.0, 0
  for record in records:
    if "img_per_sec" in record:
      total += (record["step"] - previous) * batch / record["img_per_sec"]
      previous = record["step"]
  return total if previous else None


def swept_keys(results: list[Result]) -> list[str]:
  """The point keys that take more than one value (all keys when none does)."""
  keys = list(dict.fromkeys(k for r in results for k in r.point))
  varied = [k for k in keys if len({json.dumps(r.point.get(k)) for r in results}) > 1]
  return varied or keys


def stages(results: list[Result]) -> list[str]:
  return list(dict.fromkeys(r.run.stage for r in results))


def metric_names(results: list[Result]) -> list[str]:
  return list(dict.fromkeys(m for r in results for m in r.metrics))


def _fmt(value: Any) -> str:
  if value is None:
    return ""
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value)


def _minutes(seconds: float | None) -> float | None:
  return None if seconds is None else round(seconds / 60, 2)


def markdown(results: list[Result], metrics: list[str]) -> str:
  """A markdown table per stage: point, state, steps, minutes, final/best of each metric."""
  keys, out = swept_keys(results), []
  for stage in stages(results):
    rows = [r for r in results if r.run.stage == stage]
    shown = [m for m in metrics if any(m in r.curves for r in rows)]
    header = [*keys, "state", "steps", "wall min", "train min",
              *(f"{m} {kind}" for m in shown for kind in ("final", "best"))]
    out += [f"### {stage}", "", "| " + " | ".join(header) + " |",
            "|" + " --- |" * len(header)]
    for r in rows:
      cells = [*(r.point.get(k) for k in keys), r.state, r.steps, _minutes(r.wall_seconds),
               _minutes(r.train_seconds), *(v for m in shown for v in (r.final(m), r.best(m)))]
      out.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    out.append("")
  return "\n".join(out)


def write_csv(results: list[Result], path: Path) -> None:
  """Every run and every metric, values as logged (full precision)."""
  keys = list(dict.fromkeys(k for r in results for k in r.point))
  metrics = metric_names(results)
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["stage", "name", *keys, "state", "steps", "wall_minutes", "train_minutes",
                     *(f"{kind}:{m}" for m in metrics for kind in ("final", "best"))])
    for r in results:
      writer.writerow([r.run.stage, r.run.name, *(r.point.get(k, "") for k in keys), r.state,
                       r.steps, _minutes(r.wall_seconds), _minutes(r.train_seconds),
                       *(v for m in metrics for v in (r.final(m), r.best(m)))])


def _numeric(values: list[Any]) -> bool:
  return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def plot_metric(results: list[Result], metric: str, path: Path) -> None:
  """`metric` (best over training) against each swept key: a row of panels per stage that
  logged it, one line per combination of the other swept keys."""
  from matplotlib.figure import Figure

  keys = swept_keys(results) or ["run"]
  rows = [s for s in stages(results) if any(metric in r.curves for r in results
                                             if r.run.stage == s)]
  fig = Figure(figsize=(4.2 * len(keys), 3.4 * len(rows)))
  axes = fig.subplots(len(rows), len(keys), squeeze=False)
  direction = "higher" if higher_is_better(metric) else "lower"
  for i, stage in enumerate(rows):
    done = [r for r in results if r.run.stage == stage and r.best(metric) is not None]
    for j, key in enumerate(keys):
      ax = axes[i][j]
      values = sorted({json.dumps(r.point.get(key, r.run.name)) for r in done})
      xs = [json.loads(v) for v in values]
      numeric = _numeric(xs)
      position = {v: (x if numeric else k) for k, (v, x) in enumerate(zip(values, xs,
                                                                         strict=True))}
      others = [k for k in keys if k != key]
      groups: dict[str, list[Result]] = {}
      for r in done:
        label = ", ".join(f"{k.rsplit('.', 1)[-1]}={r.point.get(k)}" for k in others)
        groups.setdefault(label, []).append(r)
      for label, group in groups.items():
        group.sort(key=lambda r: position[json.dumps(r.point.get(key, r.run.name))])
        ax.plot([position[json.dumps(r.point.get(key, r.run.name))] for r in group],
                [r.best(metric) for r in group], "o-", label=label or None)
      if numeric and xs and min(xs) > 0 and max(xs) >= 8 * min(xs):
        ax.set_xscale("log", base=2 if all(float(x).is_integer() for x in xs) else 10)
      ax.set_xticks([position[v] for v in values], [str(x) for x in xs])
      ax.minorticks_off()
      ax.set_xlabel(key)
      ax.set_ylabel(f"{metric} ({direction} is better)" if j == 0 else "")
      ax.set_title(stage)
      ax.grid(alpha=0.3)
      if len(groups) > 1:
        ax.legend(fontsize=8)
  fig.suptitle(f"{metric}: best over training, one point per run")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def plot_curves(results: list[Result], metrics: list[str], path: Path) -> None:
  """Training curves: a row per stage, a column per metric (training loss first), a line per
  run."""
  from matplotlib.figure import Figure

  columns = [TRAINING_METRIC, *(m for m in metrics if m != TRAINING_METRIC)]
  rows = stages(results)
  width = max(3.8 * len(columns), 7.6)
  fig = Figure(figsize=(width, 3.2 * len(rows)), layout="constrained")
  axes = fig.subplots(len(rows), len(columns), squeeze=False)
  for i, stage in enumerate(rows):
    for j, metric in enumerate(columns):
      ax = axes[i][j]
      logged = [r for r in results if r.run.stage == stage and r.curves.get(metric)]
      if not logged:
        ax.set_axis_off()
        continue
      for r in logged:
        steps, values = zip(*r.curves[metric], strict=True)
        ax.plot(steps, values, "o-" if len(steps) < 12 else "-", markersize=3,
                label=r.run.name, linewidth=1)
      ax.set_title(f"{stage}: {metric}", fontsize=9)
      ax.set_xlabel("step")
      ax.grid(alpha=0.3)
      if metric == TRAINING_METRIC:
        ax.set_yscale("log")
  handles, labels = axes[0][0].get_legend_handles_labels()
  if handles:  # below the panels, as many runs a line as fit
    longest = max(len(label) for label in labels)
    fig.legend(handles, labels, loc="outside lower center", fontsize=8,
               ncol=max(1, min(len(labels), int(width * 12 / (longest + 6)))))
  fig.savefig(path, dpi=100)


def write(sweep_dir: Path, metrics: list[str] | None = None) -> tuple[str, list[Path]]:
  """Writes `<sweep_dir>/report/`: report.md, report.csv, a PNG per metric and curves.png;
  the markdown and the paths written."""
  results = collect(sweep_dir)
  known = metric_names(results)
  metrics = metrics or [m for m in known if m != TRAINING_METRIC]
  unknown = [m for m in metrics if m not in known]
  if unknown:
    raise UserError(f"--metric {unknown[0]}: no run of {sweep_dir} logged it; "
                    f"{did_you_mean(unknown[0], known)}logged: {known}")
  out = Path(sweep_dir) / REPORT_DIR
  out.mkdir(exist_ok=True)
  text = markdown(results, metrics)
  paths = [out / "report.md", out / "report.csv", out / "curves.png"]
  paths[0].write_text(f"# Sweep {sweep_dir}\n\n{text}")
  write_csv(results, paths[1])
  plot_curves(results, metrics, paths[2])
  for metric in metrics:
    paths.append(out / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', metric)}.png")
    plot_metric(results, metric, paths[-1])
  return text, paths
