"""Runs a sweep's train.py commands on this machine, `parallel` at a time.

A finished run (its workdir holds the `params.npz` train.py writes last) is skipped; any other
run is started, and train.py resumes it from its last checkpoint. A run that fails is reported
with the last line of its log and the others go on; runs chained to it are not started. Ctrl-C
or SIGTERM is passed to every run once (each saves a checkpoint and stops) and the sweep ends
after they have; the same command then carries on. A run dies with the sweep, even a sweep
killed by `kill -9` (Linux: a parent-death signal, SIGTERM, so it saves and stops), and a rerun
that finds a run's workdir still in use (its train.py saving, or run by another sweep) waits
for it to end instead of failing it. Each run's output goes to
`<workdir>/train.log`; its attempts (start, seconds, exit status) to `<workdir>/sweep_run.json`.
"""

import contextlib
import ctypes
import dataclasses
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from uvim import workdir as workdir_lib
from uvim.sweep.plan import Run

LOG_FILE = "train.log"
ATTEMPTS_FILE = "sweep_run.json"
DONE = ("finished", "skipped")  # a run in one of these states has its params.npz
PR_SET_PDEATHSIG = 1  # prctl(2)
EXCEPTION_LINE = re.compile(r"^[\w.]+(Error|Exception|Interrupt|Exit)(: |$)")


def say(line: str) -> None:
  """Prints a progress line at once, also when the output goes to a file (nohup, a cluster)."""
  print(line, flush=True)


def is_finished(workdir: Path) -> bool:
  """Whether train.py completed in `workdir` (it writes params.npz after the final evals)."""
  return (workdir / "params.npz").exists()


@dataclasses.dataclass
class Job:
  run: Run
  process: subprocess.Popen
  started: float
  slot: int


class Sweep:
  """The state of every run and the jobs in flight; `step()` advances it once."""

  def __init__(self, runs: list[Run], parallel: int, python: str = sys.executable,
               echo: Callable[[str], None] = say, gpus_per_run: int = 0):
    self.runs, self.parallel, self.python, self.echo = runs, max(parallel, 1), python, echo
    self.gpus_per_run = gpus_per_run
    self.status = {r.workdir: "skipped" if is_finished(r.workdir) else "waiting" for r in runs}
    self.jobs: dict[Path, Job] = {}
    self.seconds: dict[Path, float] = {}  # finished in this sweep: how long they took
    self.stopping: int | None = None
    self.busy: set[Path] = set()  # waiting runs whose workdir another process holds

  def step(self) -> bool:
    """Collects ended jobs and starts what may start; whether anything changed."""
    changed = False
    for workdir, job in list(self.jobs.items()):
      code = job.process.poll()
      if code is not None:
        del self.jobs[workdir]
        self._ended(job, code)
        changed = True
    if self.stopping is None:
      for run in self.runs:
        if self.status[run.workdir] != "waiting":
          continue
        needed = "finished" if run.after is None else self.status.get(
            run.after, "skipped" if is_finished(run.after) else "failed")
        if needed in ("failed", "not started"):
          self.status[run.workdir] = "not started"
          self.echo(f"not starting {self.label(run)}: {self.label_of(run.after)} {needed}")
          changed = True
        elif needed in DONE and len(self.jobs) < self.parallel and self._free(run):
          self._start(run)
          changed = True
    return changed

  def active(self) -> bool:
    return bool(self.jobs) or (self.stopping is None and "waiting" in self.status.values())

  def stop(self, signum: int) -> None:
    """Passes the signal to every running job (they save and stop) and starts no more."""
    self.stopping = signum
    for job in self.jobs.values():
      job.process.send_signal(signum)

  def label(self, run: Run) -> str:
    return f"{run.stage}/{run.name}"

  def label_of(self, workdir: Path) -> str:
    return next(self.label(r) for r in self.runs if r.workdir == workdir)

  def _free(self, run: Run) -> bool:
    """Whether the run's workdir is free; says once when another process (a run of a killed
    sweep finishing its save, another sweep) holds it."""
    holder = workdir_lib.lock_holder(run.workdir)
    if holder is None:
      self.busy.discard(run.workdir)
      return True
    if run.workdir not in self.busy:
      self.busy.add(run.workdir)
      self.echo(f"waiting for {self.label(run)}: its workdir is in use ({holder})")
    return False

  def _start(self, run: Run) -> None:
    run.workdir.mkdir(parents=True, exist_ok=True)
    log_path = run.workdir / LOG_FILE
    slot = min(set(range(self.parallel)) - {j.slot for j in self.jobs.values()})
    env, prefix = dict(os.environ), ""
    if self.gpus_per_run:  # slot i: GPUs i*k ... i*k + k-1
      gpus = range(slot * self.gpus_per_run, (slot + 1) * self.gpus_per_run)
      env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
      prefix = f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']} "
    with open(log_path, "a") as log:
      log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {prefix}{run.command(self.python)}\n")
      log.flush()
      # A session of its own: a terminal's Ctrl-C reaches the sweep, which passes it on once.
      process = subprocess.Popen(run.argv(self.python), stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True, env=env,
                                 preexec_fn=partial(die_with_parent, os.getpid()))
    self.jobs[run.workdir] = Job(run, process, time.monotonic(), slot)
    self.status[run.workdir] = "running"
    self.echo(f"started {self.label(run)} (log: {log_path})")

  def _ended(self, job: Job, code: int) -> None:
    run, seconds = job.run, time.monotonic() - job.started
    record_attempt(run.workdir, seconds, code)
    took = format_duration(seconds)
    if code == 0 and is_finished(run.workdir):
      self.status[run.workdir] = "finished"
      self.seconds[run.workdir] = seconds
      self.echo(f"finished {self.label(run)} in {took}{summary(run.workdir)}")
    elif self.stopping is not None:
      self.status[run.workdir] = "waiting"
      self.echo(f"stopped {self.label(run)} after {took} (exit {code}); it resumes on rerun")
    else:
      self.status[run.workdir] = "failed"
      self.echo(f"FAILED {self.label(run)} after {took} (exit {code}): "
                f"{last_message(run.workdir / LOG_FILE)}; log: {run.workdir / LOG_FILE}")

  def counts(self) -> dict[str, int]:
    return {s: list(self.status.values()).count(s) for s in
            ("finished", "skipped", "running", "waiting", "failed", "not started")}

  def progress(self) -> str:
    c = self.counts()
    eta = self.eta()
    return (f"[sweep] {c['finished'] + c['skipped']}/{len(self.runs)} done "
            f"({c['skipped']} earlier), {c['running']} running, {c['waiting']} waiting, "
            f"{c['failed']} failed, {c['not started']} not started; "
            f"ETA {format_duration(eta) if eta is not None else 'unknown'}")

  def eta(self) -> float | None:
    """Seconds until the sweep ends (None while nothing tells), over the parallel slots: a run
    is expected to last as long as its stage's finished runs did (as the sweep timed them),
    else as its stage's running runs will by their metrics, else as the other stages' runs."""
    now = time.monotonic()
    lengths: dict[str, list[float]] = {}
    for r in self.runs:
      if self.status[r.workdir] in DONE and wall_seconds(r.workdir):
        lengths.setdefault(r.stage, []).append(wall_seconds(r.workdir))
    timed = set(lengths)
    progress = {w: training_progress(w) for w in self.jobs}
    for w, job in self.jobs.items():
      if job.run.stage not in timed and progress[w]:
        lengths.setdefault(job.run.stage, []).append(sum(progress[w]))
    if not lengths:
      return None
    mean = {stage: statistics.mean(v) for stage, v in lengths.items()}
    overall = statistics.mean(mean.values())
    expected = {r.stage: mean.get(r.stage, overall) for r in self.runs}
    total = 0.0
    for w, job in self.jobs.items():
      spent = wall_seconds(w) + now - job.started
      left = progress[w][1] if progress[w] else 0.0
      total += max(left, expected[job.run.stage] - spent) if job.run.stage in timed else left
    total += sum(expected[r.stage] for r in self.runs if self.status[r.workdir] == "waiting")
    return total / self.parallel

  def stage_of(self, workdir: Path) -> str:
    return next(r.stage for r in self.runs if r.workdir == workdir)


def die_with_parent(parent: int) -> None:
  """In a run's process before train.py starts: asks Linux to send it SIGTERM when the sweep
  dies (it saves a checkpoint and stops), and stops it if the sweep is already gone."""
  if sys.platform.startswith("linux"):
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
  if os.getppid() != parent:
    os.kill(os.getpid(), signal.SIGTERM)


def training_progress(workdir: Path) -> tuple[float, float] | None:
  """(seconds trained, seconds left) by the last training record of `<workdir>/metrics.jsonl`
  (its step, images/s and ETA; evaluations not counted)."""
  path, config = workdir / workdir_lib.METRICS_FILE, workdir / "config.json"
  if not path.exists() or not config.exists():
    return None
  for line in reversed(path.read_text(errors="replace").splitlines()):
    with contextlib.suppress(ValueError):
      record = json.loads(line)
      if isinstance(record, dict) and "eta_hours" in record and record.get("img_per_sec"):
        batch = json.loads(config.read_text())["batch_size"]
        return record["step"] * batch / record["img_per_sec"], record["eta_hours"] * 3600
  return None


def wall_seconds(workdir: Path) -> float:
  """Seconds the sweep's earlier attempts at the run in `workdir` took."""
  return sum(a["seconds"] for a in attempts(workdir))


def attempts(workdir: Path) -> list[dict]:
  """The sweep's attempts at the run in `workdir`: start time, seconds, exit status."""
  path = workdir / ATTEMPTS_FILE
  return json.loads(path.read_text())["attempts"] if path.exists() else []


def summary(workdir: Path) -> str:
  """': name value, ...' of the final evaluation metrics of a finished run."""
  final: dict[str, float] = {}
  for record in workdir_lib.read_metrics(workdir / workdir_lib.METRICS_FILE):
    final.update({k: v for k, v in record.items() if "/" in k})
  return ": " + ", ".join(f"{k} {v:.4g}" for k, v in final.items()) if final else ""


def record_attempt(workdir: Path, seconds: float, code: int) -> None:
  """Appends an attempt (start time, seconds, exit status) to `<workdir>/sweep_run.json`."""
  done = [*attempts(workdir), dict(started=time.strftime(
      "%Y-%m-%d %H:%M:%S", time.localtime(time.time() - seconds)), seconds=round(seconds, 1),
      exit=code)]
  (workdir / ATTEMPTS_FILE).write_text(json.dumps(dict(attempts=done), indent=1))


def last_message(log_path: Path) -> str:
  """The line of a run's log that says why it ended: its last FATAL line, else the last
  exception line of a traceback, else its last line."""
  lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines()
           if line.strip()]
  fatal = [line for line in lines if line.startswith("FATAL")]
  raised = [line for line in lines if EXCEPTION_LINE.match(line)]
  return (fatal or raised or lines or ["(empty log)"])[-1][:400]


def format_duration(seconds: float) -> str:
  seconds = round(seconds)
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


def run(runs: list[Run], parallel: int, gpus_per_run: int = 0, python: str = sys.executable,
        echo: Callable[[str], None] = say, poll_s: float = 0.5,
        progress_s: float = 60.0) -> dict[str, int]:
  """Runs the sweep to its end (or to a stop signal, passed on to the runs); the run counts by
  state, and `interrupted` (the signal number, or 0). With `gpus_per_run`, each of the
  `parallel` slots sees its own GPUs."""
  sweep = Sweep(runs, parallel, python, echo, gpus_per_run)
  if sweep.counts()["skipped"]:
    echo(f"[sweep] {sweep.counts()['skipped']} of {len(runs)} runs finished earlier; skipped")
  previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  for s in previous:
    signal.signal(s, lambda signum, frame: sweep.stop(signum))
  try:
    last_progress = 0.0
    while sweep.active():
      changed = sweep.step()
      if changed or time.monotonic() - last_progress > progress_s:
        echo(sweep.progress())
        last_progress = time.monotonic()
      time.sleep(poll_s)
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  return {**sweep.counts(), "interrupted": sweep.stopping or 0}
