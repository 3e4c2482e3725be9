"""uvim.sweep: grids and their validation, local runs (failures, chaining, resume, skipping),
emitted cluster scripts, and the report against the runs' metrics.jsonl."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_notebook
from test_trainer import TINY

from uvim import api
from uvim.errors import UserError
from uvim.sweep import __main__ as sweep_main
from uvim.sweep import emit, plan, report, runner

ROOT = Path(__file__).resolve().parents[1]
LM_TINY = dict(num_layers=1, num_heads=2, mlp_dim=64, emb_dim=32)

# Tiny colorization stage I / stage II configs on toy_scenes/tiny, as files a user would write.
STAGE1 = """
from configs import colorization_stage1

def get_config(arg=None):
  c = colorization_stage1.get_config("smoke")
  c.dataset, c.data_dir = "toy_scenes/tiny", {data_dir!r}
  c.train_split, c.val_split = "train", "validation"
  c.batch_size, c.total_steps = 8, {steps}
  c.log_training_steps, c.log_eval_steps, c.checkpoint_steps = 2, 1000, 10
  c.model.update({model!r})
  c.evals = [("val", "validation")]
  return c
"""
STAGE2 = """
from configs import colorization_stage2

def get_config(arg=None):
  c = colorization_stage2.get_config("smoke")
  c.dataset, c.data_dir = "toy_scenes/tiny", {data_dir!r}
  c.train_split = "train"
  c.batch_size, c.total_steps = 8, 4
  c.log_training_steps, c.checkpoint_steps = 2, 2
  c.oracle.model.update({model!r})
  c.model.update({lm!r})
  c.evals = [("val", "validation"), ("colorization_val", "psnr")]
  c.val.split, c.colorization_val.split = "validation", "validation[:8]"
  return c
"""


def write_configs(tmp_path, data_dir, steps=4):
  model = {**TINY, "oracle_depth": 0}
  s1, s2 = tmp_path / "tiny_stage1.py", tmp_path / "tiny_stage2.py"
  s1.write_text(STAGE1.format(data_dir=str(data_dir), steps=steps, model=model))
  s2.write_text(STAGE2.format(data_dir=str(data_dir), model=model, lm=LM_TINY))
  return str(s1), str(s2)


def sweep(*args, **kwargs) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "uvim.sweep", *map(str, args)], cwd=ROOT,
                        capture_output=True, text=True, timeout=600, **kwargs)


def test_grid_values_split_outside_brackets_and_parse_as_literals():
  assert plan.split_values("16,64, (8, 8),'a,b',[1, 2]") == ["16", "64", "(8, 8)", "'a,b'",
                                                              "[1, 2]"]
  grid = plan.parse_grid(["lr=3e-4,1e-3", "model.patch_size=(8, 8),(4, 4)", "flag=true,False",
                          "name=abc"])
  assert grid == [("lr", [3e-4, 1e-3]), ("model.patch_size", [(8, 8), (4, 4)]),
                  ("flag", [True, False]), ("name", ["abc"])]
  for bad in (["lr"], ["lr="], ["=1"], ["lr=1,,2"], ["lr=1", "lr=2"]):
    with pytest.raises(UserError, match="--grid"):
      plan.parse_grid(bad)


def test_points_are_get_sweep_crossed_with_the_grid(tmp_path):
  config = tmp_path / "c.py"
  config.write_text(
      "from configs import colorization_stage1\n"
      "get_config = colorization_stage1.get_config\n"
      "def get_sweep(add, arg):\n"
      "  add(lr=1e-3 if arg == 'smoke' else 1.0)\n"
      "  add(**{'model.code_len': 16})\n")
  points = plan.expand(f"{config}:smoke", plan.parse_grid(["seed=0,1", "model.dict_size=8,16"]))
  pairs = [{"seed": s, "model.dict_size": d} for s in (0, 1) for d in (8, 16)]
  with pytest.raises(UserError, match="also set by get_sweep"):
    plan.expand(f"{config}:smoke", plan.parse_grid(["lr=1,2"]))
  assert points == ([{"lr": 1e-3, **p} for p in pairs] +  # the config's `:arg` reaches it
                    [{"model.code_len": 16, **p} for p in pairs])
  # Without get_sweep (or ignoring it) the grid alone; without either, one run as configured.
  assert plan.expand(f"{config}:smoke", plan.parse_grid(["lr=1,2"]), use_get_sweep=False) == [
      {"lr": 1}, {"lr": 2}]
  assert plan.expand("configs/depth_stage1.py:smoke", []) == [{}]


def test_bad_keys_and_values_are_named_before_anything_runs(tmp_path):
  sweep_dir = tmp_path / "sweep"
  cases = {
      "--grid model.code_lenn=16": "did you mean 'model.code_len'",
      "--grid num_epochs=x": "num_epochs='x' does not fit",
      "--grid evals=3": "evals=3",
  }
  for args, message in cases.items():
    with pytest.raises(UserError, match=message):
      sweep_main.main(["--config", "configs/colorization_stage1.py:smoke",
                       "--workdir", str(sweep_dir), *args.split()])
  with pytest.raises(UserError, match=r"smok.*did you mean 'smoke'"):
    sweep_main.main(["--config", "configs/colorization_stage1.py:smok", "--workdir",
                     str(sweep_dir)])
  with pytest.raises(UserError, match=r"--then configs/nope\.py"):
    sweep_main.main(["--config", "configs/colorization_stage1.py:smoke", "--workdir",
                     str(sweep_dir), "--then", "configs/nope.py"])
  assert not sweep_dir.exists()  # nothing planned, nothing run


def test_names_are_short_unique_and_safe():
  points = [{"model.code_len": 16, "oracle.model.code_len": 16, "lr": 3e-4},
            {"model.code_len": 64, "oracle.model.code_len": 64, "lr": 3e-4}]
  assert plan.point_names(points) == [
      "model.code_len=16,oracle.model.code_len=16,lr=0.0003",
      "model.code_len=64,oracle.model.code_len=64,lr=0.0003"]
  odd = plan.point_names([{"model_init": "a/b c.npz"}, {"model_init": "a/b_c.npz"},
                          {"pp_train": "x" * 300}])
  assert odd[0] == "model_init=a_b_c.npz" and odd[1].startswith("model_init=a_b_c.npz-")
  assert len(odd[2]) <= 120 and len(set(odd)) == 3
  assert plan.point_names([{}]) == ["default"]


def test_the_figure_11_sweep_plans_and_emits_valid_commands(tmp_path):
  """colorization's get_sweep: 6 stage I runs, each chained to a stage II that reads it."""
  sweep_dir = tmp_path / "fig11"
  assert sweep_main.main(["--config", "configs/colorization_stage1.py:smoke",
                          "--workdir", str(sweep_dir), "--then",
                          "configs/colorization_stage2.py:smoke", "--emit", "commands"]) == 0
  runs = plan.load(sweep_dir)
  first = [r for r in runs if r.after is None]
  assert [(r.overrides["model.code_len"], r.overrides["model.dict_size"]) for r in first] == [
      (c, d) for c in (16, 64, 256) for d in (32, 256)]
  for r in runs:
    if r.after:
      oracle = next(f for f in first if f.workdir == r.after)
      assert r.overrides == {"oracle.model.code_len": oracle.overrides["model.code_len"],
                             "oracle.model.dict_size": oracle.overrides["model.dict_size"],
                             "oracle.model_init": str(oracle.workdir)}
  lines = (sweep_dir / "commands.sh").read_text().splitlines()
  commands = [line for line in lines if not line.startswith("#")]
  assert commands == [r.command(train_py=emit.train_py()) for r in runs]
  # Stage II's code follows the oracle's: the config references oracle.model.code_len.
  from uvim import cli
  stage2 = cli.load_config("configs/colorization_stage2.py:smoke")
  stage2.oracle.model.code_len, stage2.oracle.model.dict_size = 16, 32
  assert (stage2.model.seq_len, stage2.model.vocab_size) == (16, 33)
  # Another sweep in the same directory is refused: its runs would pass for this one's.
  with pytest.raises(UserError, match="holds a sweep of --config"):
    sweep_main.main(["--config", "configs/colorization_stage1.py:cpu", "--workdir",
                     str(sweep_dir), "--emit", "commands"])


def test_slurm_scripts_are_arrays_chained_task_by_task(tmp_path):
  sweep_dir = tmp_path / "s"
  sweep_main.main(["--config", "configs/colorization_stage1.py:smoke", "--workdir",
                   str(sweep_dir), "--grid", "model.code_len=16,64", "--ignore_get_sweep", "--then",
                   "configs/colorization_stage2.py:smoke", "--emit", "slurm",
                   "--sbatch=--gres=gpu:1"])
  runs = plan.load(sweep_dir)
  for stage in ("colorization_stage1", "colorization_stage2"):
    script = (sweep_dir / "slurm" / f"{stage}.sbatch").read_text()
    assert "#SBATCH --array=0-1" in script and "#SBATCH --gres=gpu:1" in script
    for r in runs:
      assert (r.command(train_py=emit.train_py()) in script) == (r.stage == stage)
    assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0
  submit = (sweep_dir / "slurm" / "submit.sh").read_text()
  assert "--dependency=aftercorr:" in submit
  assert subprocess.run(["bash", "-n", str(sweep_dir / "slurm" / "submit.sh")]).returncode == 0


def metrics_of(workdir: Path) -> list[dict]:
  return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_failed_run_stops_only_its_chain_and_a_rerun_skips_finished_ones(toy_data_dir,
                                                                           tmp_path):
  s1, s2 = write_configs(tmp_path, toy_data_dir)
  sweep_dir = tmp_path / "sweep"
  # code_len 15 is valid to the config but not to the model (a square grid): it fails.
  args = ["--config", s1, "--workdir", sweep_dir, "--grid", "model.code_len=16,15", "--then",
          s2, "--parallel", "2"]
  result = sweep(*args)
  assert result.returncode == 1, result.stdout + result.stderr
  assert "FAILED tiny_stage1/code_len=15" in result.stdout
  assert "needs a square code_len" in result.stdout  # the reason, from the run's log
  assert "not starting tiny_stage2/code_len=15" in result.stdout
  good1, good2 = sweep_dir / "tiny_stage1/code_len=16", sweep_dir / "tiny_stage2/code_len=16"
  assert (good1 / "params.npz").exists() and (good2 / "params.npz").exists()
  chained = json.loads((good2 / "config.json").read_text())
  assert chained["oracle"]["model_init"] == "../../tiny_stage1/code_len=16"  # relative: movable
  assert api.load_config(str(good2)).oracle.model_init == str(good1.resolve())
  assert chained["oracle"]["model"]["code_len"] == chained["model"]["seq_len"] == 16

  # The report's values are the runs' own.
  text, paths = report.write(sweep_dir)
  assert {p.name for p in paths} >= {"report.md", "report.csv", "curves.png",
                                     "colorization_psnr.png", "val_loss.png"}
  with open(paths[1]) as f:
    rows = {(r["stage"], r["name"]): r for r in csv.DictReader(f)}
  assert rows["tiny_stage1", "code_len=15"]["state"] == "failed"
  assert rows["tiny_stage2", "code_len=15"]["state"] == "not started"
  for stage, workdir in (("tiny_stage1", good1), ("tiny_stage2", good2)):
    row, records = rows[stage, "code_len=16"], metrics_of(workdir)
    assert row["state"] == "finished" and int(row["steps"]) == 4
    for metric in [k for k in row if k.startswith("final:") and row[k]]:
      name = metric[len("final:"):]
      values = [r[name] for r in records if name in r]
      best = max(values) if report.higher_is_better(name) else min(values)
      assert math.isclose(float(row[metric]), values[-1], rel_tol=1e-12)
      assert math.isclose(float(row[f"best:{name}"]), best, rel_tol=1e-12)
  assert "colorization/psnr" in text

  # A rerun skips the finished runs (their metrics untouched) and retries the failed one.
  before = {w: (w / "metrics.jsonl").read_text() for w in (good1, good2)}
  again = sweep(*args)
  assert "2 of 4 runs finished earlier; skipped" in again.stdout
  assert "started tiny_stage1/code_len=16" not in again.stdout
  assert "FAILED tiny_stage1/code_len=15" in again.stdout and again.returncode == 1
  assert before == {w: (w / "metrics.jsonl").read_text() for w in (good1, good2)}

  # The sweeps notebook reads this sweep: its report's figures and its runs ranked.
  executed = run_notebook("sweeps", SWEEP=str(sweep_dir), METRIC="colorization/psnr")
  shown = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs]
  assert sum("image/png" in o.get("data", {}) for o in shown) == sum(
      p.suffix == ".png" for p in paths)
  ranked = "".join(o.get("text", "") for o in shown).strip().splitlines()
  bests = sorted((float(r["best:colorization/psnr"]) for r in rows.values()
                  if r.get("best:colorization/psnr")), reverse=True)
  assert len(ranked) == len(bests) >= 1 and all("finished" in line for line in ranked)
  assert all(f"best colorization/psnr {b:.4g} " in line for b, line in zip(bests, ranked,
                                                                             strict=True))


@pytest.mark.slow
def test_ctrl_c_stops_the_runs_with_a_checkpoint_and_a_rerun_finishes_them(toy_data_dir,
                                                                           tmp_path):
  s1, _ = write_configs(tmp_path, toy_data_dir, steps=60)
  sweep_dir = tmp_path / "sweep"
  args = [sys.executable, "-m", "uvim.sweep", "--config", s1, "--workdir", str(sweep_dir),
          "--grid", "seed=1,2", "--parallel", "2", "--gpus_per_run", "1"]
  # Its own process group, as a shell gives a command: Ctrl-C signals the whole group.
  process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
  workdirs = [sweep_dir / "tiny_stage1" / f"seed={s}" for s in (1, 2)]
  deadline = time.monotonic() + 300
  while not all((w / "metrics.jsonl").exists() for w in workdirs):
    assert time.monotonic() < deadline and process.poll() is None
    time.sleep(0.2)
  os.killpg(process.pid, signal.SIGINT)
  output, _ = process.communicate(timeout=300)
  assert process.returncode == 128 + signal.SIGINT, output
  assert output.count("it resumes on rerun") == 2 and "rerun the same command" in output
  for w in workdirs:
    assert not (w / "params.npz").exists()
    assert list((w / "checkpoints").iterdir())  # each run saved where it stopped
  stopped = {w: max(r["step"] for r in metrics_of(w)) for w in workdirs}
  assert all(step < 60 for step in stopped.values())
  slots = sorted((w / "train.log").read_text().split("CUDA_VISIBLE_DEVICES=")[1][0]
                 for w in workdirs)
  assert slots == ["0", "1"]  # each parallel slot had a GPU of its own

  result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr
  for w in workdirs:
    steps = [r["step"] for r in metrics_of(w) if "training_loss" in r]
    assert steps == list(range(2, 61, 2))  # resumed exactly: every step logged once
    assert "Resumed from" in (w / "train.log").read_text()


def test_eta_counts_waiting_runs_at_their_stages_mean_length(tmp_path):
  first = [plan.Run("s1", "c.py", f"r{i}", {}, tmp_path / f"s1/r{i}") for i in range(3)]
  second = [plan.Run("s2", "d.py", r.name, {}, tmp_path / f"s2/{r.name}", after=r.workdir)
            for r in first]
  for r, seconds in zip(first[:2], (100.0, 200.0), strict=True):
    r.workdir.mkdir(parents=True)
    runner.record_attempt(r.workdir, seconds / 2, 130)  # stopped once, then resumed
    runner.record_attempt(r.workdir, seconds / 2, 0)
    (r.workdir / "params.npz").touch()
  sweep = runner.Sweep(first + second, parallel=2, echo=lambda _: None)
  assert sweep.counts()["skipped"] == 2
  # One stage I run left (150 s, the mean of its stage) and three stage II runs, of which
  # nothing is known yet (150 s: the mean of the stages that are), over two slots.
  assert sweep.eta() == pytest.approx((150 + 3 * 150) / 2)
  assert runner.Sweep(second, parallel=1, echo=lambda _: None).eta() is None


def test_report_states_follow_the_workdir(tmp_path):
  from uvim import workdir as workdir_lib

  w = tmp_path / "run"
  assert report.state_of(w, []) == "not started"
  w.mkdir()
  with workdir_lib.WorkdirLock(w):  # a live train.py holds the lock
    assert report.state_of(w, []) == "running"
  runner.record_attempt(w, 5.0, 128 + signal.SIGINT)
  assert report.state_of(w, [{"step": 10}]) == "stopped"
  runner.record_attempt(w, 5.0, 1)
  assert report.state_of(w, [{"step": 10}]) == "failed"
  (w / "params.npz").touch()
  assert report.state_of(w, [{"step": 20}]) == "finished"
  assert runner.wall_seconds(w) == 10.0
