"""Nothing lost, nothing silently wrong, on the surfaces around training (issue 27): image
orientation, recorded paths, sweep folders that move, killed sweeps, readers of live files.

The predict.py, resume, recorded-model and tool cases run against real runs in
test_stage2.py and test_code_tools.py; docs/training.md#reliability lists them all.
"""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from uvim import api, workdir
from uvim.errors import UserError
from uvim.sweep import plan, report, runner

STAGE1, STAGE2 = "configs/depth_stage1.py:smoke", "configs/depth_stage2.py:smoke"


def test_photos_are_read_upright_as_their_exif_orientation_says(tmp_path):
  pixels = np.zeros((40, 60, 3), np.uint8)  # stored 60 wide, 40 high
  pixels[:5, :5] = 255  # a white top-left corner, as stored
  exif = Image.Exif()
  exif[0x0112] = 6  # "rotate 90 degrees clockwise to display", as phones write it
  Image.fromarray(pixels).save(tmp_path / "phone.png", exif=exif)
  upright = api.read_image(tmp_path / "phone.png")
  assert upright.shape == (60, 40, 3)  # as displayed
  np.testing.assert_array_equal(upright, np.rot90(pixels, k=-1))
  assert upright[:5, -5:].min() == 255  # the stored top-left is now top-right


def write_run(directory: Path, **config) -> Path:
  directory.mkdir(parents=True)
  (directory / "config.json").write_text(json.dumps(config))
  return directory


def test_recorded_checkpoint_paths_resolve_from_any_folder(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  oracle = write_run(Path("runs/s1"), model_name="proj.uvim.vit")
  recorded = workdir.record_paths({"oracle": {"model_init": "runs/s1"}, "model_init": ""},
                                  "runs/s2")
  assert recorded["oracle"]["model_init"] == "../s1"  # relative to the workdir
  write_run(Path("runs/s2"), **recorded)
  moved = tmp_path / "elsewhere"
  shutil.copytree("runs", moved / "runs")  # the runs folder moves; a notebook opens it
  monkeypatch.chdir(tmp_path / "..")
  config = api.load_config(str(moved / "runs/s2"))
  assert config.oracle.model_init == str((moved / "runs/s1").resolve())
  # Workdirs of earlier versions recorded the path relative to the folder they ran in.
  write_run(Path(tmp_path / "old/s2"), oracle={"model_init": "runs/s1"})
  monkeypatch.chdir(tmp_path)
  config = api.load_config("old/s2")
  assert config.oracle.model_init == str(oracle.resolve())


def plan_depth_sweep(sweep_dir: Path, *then_set: str) -> list[plan.Run]:
  return plan.plan(sweep_dir, STAGE1, ["lr=1e-3,3e-4"], STAGE2, then_set=list(then_set))


def test_a_sweep_folder_moves_with_its_runs(tmp_path):
  runs = plan_depth_sweep(tmp_path / "cluster/sweep")
  finished = runs[0].workdir
  write_run(finished, model_name="proj.uvim.vit", batch_size=8)
  (finished / "params.npz").touch()
  text = (tmp_path / "cluster/sweep" / plan.PLAN_FILE).read_text()
  assert str(tmp_path) not in text  # nothing recorded absolute
  shutil.move(tmp_path / "cluster/sweep", tmp_path / "laptop")
  moved = plan.load(tmp_path / "laptop")
  assert [r.workdir for r in moved] == [tmp_path / "laptop" / r.workdir.relative_to(
      tmp_path / "cluster/sweep") for r in runs]
  chained = moved[2]
  assert chained.after == moved[0].workdir
  assert chained.overrides[plan.CHAIN_INIT_KEY] == str(moved[0].workdir)
  states = [r.state for r in report.collect(tmp_path / "laptop")]
  assert states == ["finished", "not started", "not started", "not started"]
  # Planned again where it now lies, the sweep resumes there: the same runs, no others.
  assert [r.workdir for r in plan_depth_sweep(tmp_path / "laptop")] == [r.workdir for r in moved]


def test_the_chained_stage_takes_fixed_overrides(tmp_path):
  runs = plan_depth_sweep(tmp_path / "s", "total_steps=50", "lr=1e-4")
  assert [r.overrides.get("total_steps") for r in runs] == [None, None, 50, 50]
  assert runs[2].overrides["lr"] == 1e-4 and runs[0].overrides["lr"] == 1e-3
  assert runs[2].argv()[-1] == f"--config.oracle.model_init={runs[0].workdir}"
  with pytest.raises(UserError, match=r"--then_set\): total_stepz=50.*did you mean 'total_steps'"):
    plan_depth_sweep(tmp_path / "t", "total_stepz=50")
  with pytest.raises(UserError, match="takes its oracle from the run it follows"):
    plan_depth_sweep(tmp_path / "u", "oracle.model.code_len=16")


PARENT = """
import subprocess, sys, time
from functools import partial
from uvim.sweep import runner
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], start_new_session=True,
                         preexec_fn=partial(runner.die_with_parent, __import__("os").getpid()))
print(child.pid, flush=True)
time.sleep(600)
"""
CHILD = """
import signal, sys, time
def stop(signum, frame):
  open(sys.argv[1], "w").write(f"saved at signal {signum}")
  sys.exit(128 + signum)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
time.sleep(600)
"""


def test_a_killed_sweep_takes_its_runs_down_with_a_checkpoint(tmp_path):
  """The sweep's runs live in sessions of their own; kill -9 of the sweep sends each SIGTERM
  (train.py's "save and stop"), instead of leaving them to train unsupervised."""
  marker = tmp_path / "stopped"
  child_code = CHILD.replace("sys.argv[1]", repr(str(marker)))
  parent = subprocess.Popen([sys.executable, "-c", PARENT, child_code], stdout=subprocess.PIPE,
                            text=True, cwd=Path(__file__).resolve().parents[1])
  child = int(parent.stdout.readline())
  assert parent.stdout.readline() == "ready\n"  # the child (same stdout) has its handler
  parent.kill()
  parent.wait()
  deadline = time.monotonic() + 30
  while not (marker.exists() and marker.read_text()) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert marker.read_text() == f"saved at signal {signal.SIGTERM}"
  deadline = time.monotonic() + 10
  while alive(child) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert not alive(child)


def alive(pid: int) -> bool:
  """Whether process `pid` runs (an exited one nobody has reaped yet is a zombie, 'Z')."""
  try:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
  except FileNotFoundError:
    return False


def test_a_rerun_waits_for_a_run_whose_workdir_is_in_use(tmp_path):
  """A rerun that finds a run of the killed sweep still saving waits for it, instead of
  counting it as failed (train.py would refuse the locked workdir)."""
  runs = plan.plan(tmp_path / "s", STAGE1, [], None)
  said = []
  sweep = runner.Sweep(runs, parallel=1, python="/bin/true", echo=said.append)
  lock = workdir.WorkdirLock(runs[0].workdir).acquire()
  for _ in range(3):
    sweep.step()
  assert sweep.status[runs[0].workdir] == "waiting" and not sweep.jobs
  assert [s for s in said if s.startswith("waiting for")] == [
      f"waiting for depth_stage1/default: its workdir is in use ({lock.path.read_text().strip()})"]
  lock.release()
  sweep.step()
  assert sweep.status[runs[0].workdir] == "running"
  sweep.jobs[runs[0].workdir].process.wait()


def test_readers_of_a_live_metrics_file_never_rewrite_it(tmp_path, caplog):
  path = tmp_path / workdir.METRICS_FILE
  text = '{"step": 1, "training_loss": 2.0}\n{"step": 2, "trai\n'
  path.write_text(text)
  assert workdir.read_metrics(path) == [{"step": 1, "training_loss": 2.0}]
  assert path.read_text() == text and not path.with_name(path.name + ".damaged").exists()
  assert "line 2 is damaged" in caplog.text and "skipped" in caplog.text
  (tmp_path / "config.json").write_text(json.dumps({"batch_size": 8}))
  result = report.result_of(plan.Run("s", STAGE1, "r", {}, tmp_path), {})
  assert result.steps == 1 and path.read_text() == text  # the sweep's report only reads
