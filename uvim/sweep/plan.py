"""What a sweep runs: its points (override dicts), one run per point and config, and the record
of the plan (`<sweep dir>/sweep.json`) that `report` reads.

A point comes from the config file's `get_sweep(add)` (or `get_sweep(add, arg)`, given the
config's `:arg`), crossed with each `--grid key=v1,v2,...`. Every override is checked against the
config it applies to before anything runs.
"""

import ast
import contextlib
import copy
import dataclasses
import hashlib
import inspect
import itertools
import json
import os
import re
import shlex
from pathlib import Path
from typing import Any

from uvim import cli
from uvim.errors import UserError

PLAN_FILE = "sweep.json"
# Chained runs take the `model.*` overrides of the run they follow as `oracle.model.*` (the
# oracle must be the model that was trained); the run's workdir becomes `oracle.model_init`.
CHAIN_MODEL_PREFIX, CHAIN_ORACLE_PREFIX = "model.", "oracle.model."
CHAIN_INIT_KEY = "oracle.model_init"
TRAIN_PY = Path(__file__).resolve().parents[2] / "train.py"


@dataclasses.dataclass(frozen=True)
class Run:
  """One train.py invocation of the sweep: `config` (path.py[:arg]) with `overrides` in
  `workdir`; `after` is the workdir of the run that must finish first (chaining)."""
  stage: str
  config: str
  name: str
  overrides: dict[str, Any]
  workdir: Path
  after: Path | None = None

  def argv(self, python: str = "python", train_py: str | Path = TRAIN_PY) -> list[str]:
    """The train.py command line of this run."""
    return [python, str(train_py), f"--config={self.config}", f"--workdir={self.workdir}",
            *(f"--config.{k}={flag_text(v)}" for k, v in self.overrides.items())]

  def command(self, python: str = "python", train_py: str | Path = TRAIN_PY) -> str:
    return shlex.join(self.argv(python, train_py))

  def to_json(self, sweep_dir: Path) -> dict[str, Any]:
    """The run as `sweep.json` records it: its workdirs relative to `sweep_dir` (a sweep folder
    can move), a chained run's oracle path left to `after`."""
    def relative(path):
      return os.path.relpath(path, sweep_dir) if path else None
    overrides = {k: v for k, v in self.overrides.items() if not (self.after and
                                                                 k == CHAIN_INIT_KEY)}
    return dict(stage=self.stage, config=self.config, name=self.name, overrides=overrides,
                workdir=relative(self.workdir), after=relative(self.after))

  @classmethod
  def from_json(cls, d: dict[str, Any], sweep_dir: Path) -> "Run":
    """A run of `sweep.json` in `sweep_dir` (paths relative to it, or absolute as earlier
    versions recorded them)."""
    after = Path(sweep_dir, d["after"]) if d["after"] else None
    overrides = {**d["overrides"], **({CHAIN_INIT_KEY: str(after)} if after else {})}
    return cls(stage=d["stage"], config=d["config"], name=d["name"], overrides=overrides,
               workdir=Path(sweep_dir, d["workdir"]), after=after)


def flag_text(value: Any) -> str:
  """`value` as train.py's `--config.key=` expects it."""
  if isinstance(value, str):
    return value
  if isinstance(value, bool):
    return str(value).lower()
  return repr(value)


def parse_value(text: str) -> Any:
  """A `--grid` value: a Python literal (16, 3e-4, (8, 8), 'x'), true/false, else the text."""
  if text.lower() in ("true", "false"):
    return text.lower() == "true"
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def split_values(text: str) -> list[str]:
  """'16,64,(8, 8)' -> ['16', '64', '(8, 8)']: commas inside brackets or quotes do not split."""
  from pp.builder import split_spec

  return [piece.strip() for _, piece in split_spec(text, sep=",")] or [""]


def parse_grid(specs: list[str]) -> list[tuple[str, list[Any]]]:
  """`--grid key=v1,v2` flags -> [(key, [v1, v2])], keys in the order given."""
  grid = []
  for spec in specs:
    key, sep, text = spec.partition("=")
    values = split_values(text) if sep else []
    if not key.strip() or not values or "" in values:
      raise UserError(f"--grid {spec!r}: expected key=value1,value2,... "
                      "(e.g. --grid model.code_len=16,64,256)")
    if key in dict(grid):
      raise UserError(f"--grid {key} is given twice; list all its values in one --grid")
    grid.append((key.strip(), [parse_value(v) for v in values]))
  return grid


def config_sweep(spec: str) -> list[dict[str, Any]]:
  """The points of the config file's `get_sweep(add[, arg])`, or one empty point without one."""
  path, _, arg = spec.partition(":")
  module = cli.load_config_module(path)
  get_sweep = getattr(module, "get_sweep", None)
  if get_sweep is None:
    return [{}]
  points: list[dict[str, Any]] = []
  add = lambda **overrides: points.append(overrides)
  if len(inspect.signature(get_sweep).parameters) > 1:
    get_sweep(add, arg or None)
  else:
    get_sweep(add)
  if not points:
    raise UserError(f"{path}: get_sweep added no runs")
  return points


def expand(spec: str, grid: list[tuple[str, list[Any]]],
           use_get_sweep: bool = True) -> list[dict[str, Any]]:
  """The sweep's points: `get_sweep`'s points (unless not `use_get_sweep`) crossed with every
  grid key's values."""
  points = config_sweep(spec) if use_get_sweep else [{}]
  for key, _ in grid:
    if any(key in p for p in points):
      raise UserError(f"--grid {key}: the key is also set by get_sweep in {spec}; set it in one "
                      "place (--ignore_get_sweep runs the grid alone)")
  keys = [k for k, _ in grid]
  combos = list(itertools.product(*(values for _, values in grid)))
  return [{**p, **dict(zip(keys, combo, strict=True))} for p in points for combo in combos]


def check_overrides(spec: str, points: list[dict[str, Any]], source: str) -> None:
  """Applies each point's overrides to the config `spec`; a bad key or value is a UserError
  naming it (and the closest valid key), before anything runs."""
  base = cli.load_config(spec)
  for point in points:
    config = copy.deepcopy(base)  # locked like train.py's: no new keys
    config.lock()
    for key, value in point.items():
      problem = cli.find_unknown_key(config, key)
      if problem:
        raise UserError(f"{source}: {key}={value!r}: {problem}")
      try:
        cli.set_value(config, key, value)
      except (TypeError, ValueError, KeyError) as e:
        raise UserError(f"{source}: {key}={value!r} does not fit {spec}: "
                        f"{cli.last_line(e)}") from None


def point_names(points: list[dict[str, Any]]) -> list[str]:
  """A directory name per point from its overrides, e.g. 'code_len=16,dict_size=32' (a key's
  last part, unless two keys share it); unique, filesystem-safe, at most 120 characters."""
  keys = list(dict.fromkeys(k for p in points for k in p))
  last = [k.rsplit(".", 1)[-1] for k in keys]
  short = {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last, strict=True)}
  names = []
  for point in points:
    text = ",".join(f"{short[k]}={flag_text(v)}" for k, v in point.items()) or "default"
    name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)
    if len(name) > 120 or name in names:
      name = f"{name[:110]}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
    names.append(name)
  return names


def stage_name(spec: str) -> str:
  """The directory of a config's runs: its file name without .py ('colorization_stage1')."""
  return Path(spec.partition(":")[0]).stem


def chained_overrides(point: dict[str, Any], first_workdir: Path) -> dict[str, Any]:
  """A chained run's overrides: the first run's `model.*` ones as `oracle.model.*`, and its
  workdir as the oracle."""
  oracle = {CHAIN_ORACLE_PREFIX + k[len(CHAIN_MODEL_PREFIX):]: v for k, v in point.items()
            if k.startswith(CHAIN_MODEL_PREFIX)}
  return {**oracle, CHAIN_INIT_KEY: str(first_workdir)}


def make_runs(sweep_dir: Path, spec: str, points: list[dict[str, Any]], then: str | None,
              then_set: dict[str, Any] | None = None) -> list[Run]:
  """The runs of a sweep: one per point of `spec`, then (chained) one per point of `then`, each
  with the fixed overrides `then_set`."""
  stages = [stage_name(spec)] + ([stage_name(then)] if then else [])
  if len(set(stages)) < len(stages):
    stages = [f"{s}_{i}" for i, s in enumerate(stages, 1)]
  firsts = [Run(stages[0], spec, name, point, sweep_dir / stages[0] / name)
            for name, point in zip(point_names(points), points, strict=True)]
  if not then:
    return firsts
  seconds = [Run(stages[1], then, r.name, {**(then_set or {}),
                                            **chained_overrides(r.overrides, r.workdir)},
                 sweep_dir / stages[1] / r.name, after=r.workdir) for r in firsts]
  return firsts + seconds


def parse_sets(specs: list[str]) -> dict[str, Any]:
  """`--then_set key=value` flags -> {key: value} (values parsed as `--grid` values)."""
  sets: dict[str, Any] = {}
  for spec in specs:
    key, sep, text = spec.partition("=")
    if not key.strip() or not sep:
      raise UserError(f"--then_set {spec!r}: expected key=value (e.g. --then_set "
                      "total_steps=200)")
    if key.startswith(CHAIN_ORACLE_PREFIX) or key == CHAIN_INIT_KEY:
      raise UserError(f"--then_set {key}: the chained run takes its oracle from the run it "
                      "follows; set the first stage's model.* instead")
    sets[key.strip()] = parse_value(text)
  return sets


def plan(sweep_dir: Path, spec: str, grid_specs: list[str], then: str | None,
         use_get_sweep: bool = True, then_set: list[str] = ()) -> list[Run]:
  """Expands and checks the sweep, and records it in `<sweep_dir>/sweep.json` (merged with the
  runs an earlier, compatible command planned there)."""
  grid = parse_grid(grid_specs)
  fixed = parse_sets(list(then_set))
  if fixed and not then:
    raise UserError("--then_set needs --then (the chained config it applies to)")
  with _naming("--config", spec):
    points = expand(spec, grid, use_get_sweep)
    check_overrides(spec, points, "--grid/get_sweep")
  runs = make_runs(sweep_dir, spec, points, then, fixed)
  if then:
    with _naming("--then", then):
      check_overrides(then, [r.overrides for r in runs if r.after],
                      f"--then {then} (--then_set)")
  return record(sweep_dir, spec, then, runs)


@contextlib.contextmanager
def _naming(flag: str, spec: str):
  """Turns a config file that cannot be loaded into a UserError naming the flag and file."""
  try:
    yield
  except UserError:
    raise
  except Exception as e:  # a missing file, an unknown `:arg`, an error in the file itself
    raise UserError(f"{flag} {spec}: {cli.last_line(e)}") from None


def record(sweep_dir: Path, spec: str, then: str | None, runs: list[Run]) -> list[Run]:
  """Writes the plan; a directory that holds a sweep of other configs is refused (its finished
  runs would be skipped as if they were this sweep's)."""
  path = sweep_dir / PLAN_FILE
  earlier: list[Run] = []
  if path.exists():
    saved = json.loads(path.read_text())
    if (saved["config"], saved["then"]) != (spec, then):
      raise UserError(f"{sweep_dir} holds a sweep of --config {saved['config']}"
                      f"{' --then ' + saved['then'] if saved['then'] else ''}, not of "
                      f"--config {spec}{' --then ' + then if then else ''}; use another --workdir")
    earlier = [Run.from_json(r, sweep_dir) for r in saved["runs"]]
  new_dirs = {r.workdir for r in runs}
  merged = [r for r in earlier if r.workdir not in new_dirs] + runs
  sweep_dir.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(PLAN_FILE + ".tmp")
  runs_json = [r.to_json(sweep_dir) for r in merged]
  tmp.write_text(json.dumps(dict(config=spec, then=then, runs=runs_json), indent=2))
  tmp.replace(path)
  return runs


def datasets(runs: list[Run]) -> list[tuple[str, str | None]]:
  """The (dataset, data_dir) pairs the runs read, each once."""
  pairs = {}
  for run in runs:
    config = cli.load_config(run.config)
    for key, value in run.overrides.items():
      cli.set_value(config, key, value)
    pairs[(config.dataset, config.get("data_dir"))] = None
  return list(pairs)


def load(sweep_dir: Path) -> list[Run]:
  """The runs recorded in `<sweep_dir>/sweep.json`."""
  path = Path(sweep_dir) / PLAN_FILE
  if not path.exists():
    raise UserError(f"{sweep_dir} holds no {PLAN_FILE}: not a sweep directory (run "
                    "`python -m uvim.sweep --config ... --workdir DIR` first)")
  return [Run.from_json(r, sweep_dir) for r in json.loads(path.read_text())["runs"]]
