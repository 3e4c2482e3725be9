"""What a run keeps in its workdir besides checkpoints: the lock, `metrics.jsonl`, and the paths
its `config.json` records.

The lock (`<workdir>/LOCK`, an fcntl lock plus who holds it) stops a second run from writing
into a workdir that a live run uses; the kernel drops it when the holder dies, even by kill -9,
so a crashed run never leaves a stale lock. `metrics.jsonl` holds one JSON object per logged
step; a line that cannot be read (a run killed mid-write, a full disk) is named and set aside
in `metrics.jsonl.damaged` by the run that writes the file (readers skip it), never dropped
silently. The checkpoints a config loads (`model_init`, `oracle.model_init`,
`oracles.<task>.model_init`) are recorded relative to the workdir, so a folder of runs can move
(a sweep copied back from a cluster) and a workdir loads from any current folder.
"""

import copy
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from absl import logging

from uvim.errors import UserError

LOCK_FILE = "LOCK"
METRICS_FILE = "metrics.jsonl"


class WorkdirLock:
  """Holds `<workdir>/LOCK` (or `name`) for the life of a run; a second holder gets a UserError
  saying who holds it (pid, host, start time, command)."""

  def __init__(self, workdir: str | Path, *, name: str = LOCK_FILE, user: str = "training",
               advice: str = "use another --workdir"):
    self.path, self.user, self.advice = Path(workdir) / name, user, advice
    self._file = None

  def acquire(self) -> "WorkdirLock":
    self.path.parent.mkdir(parents=True, exist_ok=True)
    f = open(self.path, "a+")  # noqa: SIM115  (kept open: the lock lives with the descriptor)
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or "another process"
      f.close()
      raise UserError(f"{self.path.parent} is in use by a running {self.user} ({holder}); wait "
                      f"for it to finish, stop it, or {self.advice}") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv)[:300]}\n")
    f.flush()
    self._file = f
    return self

  def release(self) -> None:
    if self._file is not None:
      self._file.truncate(0)
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def lock_holder(workdir: str | Path) -> str | None:
  """Who holds the lock of `workdir` (a live train.py), or None when nobody does."""
  path = Path(workdir) / LOCK_FILE
  if not path.exists():
    return None
  with open(path) as f:
    try:
      fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
      return f.read().strip() or "another process"
    fcntl.flock(f, fcntl.LOCK_UN)
  return None


def read_metrics(path: str | Path, repair: bool = False) -> list[dict[str, Any]]:
  """The records of a `metrics.jsonl`; damaged lines are skipped with a warning that names the
  file and line. With `repair` (only the run that writes the file: readers would race with
  its appends) they are moved to `<path>.damaged` and the file is rewritten without them."""
  path = Path(path)
  if not path.exists():
    return []
  records, damaged = [], []
  lines = path.read_text(errors="replace").splitlines()
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        raise ValueError("not an object with an integer 'step'")
      records.append(record)
    except ValueError as e:
      damaged.append(line)
      logging.warning("%s line %d is damaged (%s); %s", path, number, e,
                      f"moved to {path.name}.damaged" if repair else "skipped")
  if damaged and repair:
    with open(path.with_name(path.name + ".damaged"), "a") as f:
      f.writelines(f"{line}\n" for line in damaged)
    write_metrics(path, records)
  return records


def write_metrics(path: Path, records: list[dict[str, Any]]) -> None:
  """Replaces `path` with `records`, atomically (temp file, then rename)."""
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
  tmp.replace(path)


class JsonlWriter:
  """Appends one JSON object per logging step to `<workdir>/metrics.jsonl`.

  When a run resumes at `start`, records a killed run logged after its last checkpoint are
  dropped, since those steps are about to be run (and logged) again; so are the evaluations at
  `start` when `rerun_evals_at_start` (a finished run evaluates again).
  """

  def __init__(self, path: Path, start: int = 0, rerun_evals_at_start: bool = False):
    self.path = path
    if path.exists():
      def keep(r):
        return r["step"] < start or (r["step"] == start and
                                     ("training_loss" in r or not rerun_evals_at_start))
      write_metrics(path, [r for r in read_metrics(path, repair=True) if keep(r)])

  def write(self, step: int, scalars: dict[str, float]) -> None:
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": step, **{k: float(v) for k, v in scalars.items()}}) + "\n")


def _model_init_nodes(config: dict) -> list[dict]:
  """The sections of a config (as a dict) that may hold a `model_init` path."""
  sections = [config, config.get("oracle"), *(config.get("oracles") or {}).values()]
  return [s for s in sections if isinstance(s, dict) and isinstance(s.get("model_init"), str)
          and s["model_init"]]


def missing_model_inits(config: dict) -> list[str]:
  """The `model_init` paths of a config (as a dict) that name nothing on disk."""
  return [node["model_init"] for node in _model_init_nodes(config)
          if not Path(node["model_init"]).exists()]


def record_paths(config: dict, workdir: str | Path) -> dict:
  """`config` with its existing `model_init` paths relative to `workdir`, as config.json holds
  them."""
  config = copy.deepcopy(config)
  for node in _model_init_nodes(config):
    if Path(node["model_init"]).exists():
      node["model_init"] = os.path.relpath(Path(node["model_init"]).resolve(),
                                           Path(workdir).resolve())
  return config


def resolve_paths(config: dict, workdir: str | Path) -> dict:
  """`config` as recorded in `workdir/config.json`, with its `model_init` paths absolute:
  relative to the workdir, or, as earlier versions recorded them, to the current folder."""
  config = copy.deepcopy(config)
  for node in _model_init_nodes(config):
    path = Path(node["model_init"])
    if not path.is_absolute():
      for base in (Path(workdir), Path.cwd()):
        if (base / path).exists():
          node["model_init"] = str((base / path).resolve())
          break
  return config


def absolute_paths(config: dict) -> dict:
  """`config` with its existing `model_init` paths absolute (to compare with a recorded one)."""
  config = copy.deepcopy(config)
  for node in _model_init_nodes(config):
    if Path(node["model_init"]).exists():
      node["model_init"] = str(Path(node["model_init"]).resolve())
  return config
