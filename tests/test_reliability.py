"""What happens to real runs: concurrent runs, signals, damaged checkpoints and metrics, full
disks, config mistakes, and checkpoints loaded the way users load them."""

import asyncio
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_trainer import ROOT, TINY, losses, tiny_config

from uvim import api, checkpoint, input_pipeline, trainer, workdir
from uvim.errors import UserError

FIXTURE = Path(__file__).resolve().parent / "fixtures/bigvision_uvim_parity.npz"


# 2. A workdir is locked by the run that uses it.

def test_a_locked_workdir_names_its_holder_and_a_killed_holder_frees_it(tmp_path):
  held = workdir.WorkdirLock(tmp_path).acquire()
  with pytest.raises(UserError, match=rf"in use by a running training \(pid {os.getpid()} on"):
    workdir.WorkdirLock(tmp_path).acquire()
  held.release()
  workdir.WorkdirLock(tmp_path).acquire().release()

  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from uvim import workdir; "
       f"lock = workdir.WorkdirLock({str(tmp_path)!r}).acquire(); print('held', flush=True); "
       "time.sleep(600)"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "held"
  with pytest.raises(UserError, match=rf"pid {holder.pid} on"):
    workdir.WorkdirLock(tmp_path).acquire()
  holder.kill()  # SIGKILL: no cleanup runs, the kernel drops the lock
  holder.wait()
  workdir.WorkdirLock(tmp_path).acquire().release()


def test_a_second_run_on_a_locked_workdir_stops_before_writing(toy_data_dir, tmp_path):
  with workdir.WorkdirLock(tmp_path), pytest.raises(UserError, match="in use"):
    trainer.train_and_evaluate(tiny_config(toy_data_dir), tmp_path)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["LOCK"]


# 3. Images of any bit depth are scaled, not clipped.

def test_sixteen_bit_grayscale_is_scaled_by_its_depth(tmp_path):
  values = np.array([[0, 257, 32768], [65535, 1000, 51400]], np.uint16)
  Image.fromarray(values).save(tmp_path / "gray16.png")
  assert Image.open(tmp_path / "gray16.png").mode.startswith("I")
  rgb = api.read_image(tmp_path / "gray16.png")
  expected = np.round(values / 65535 * 255).astype(np.uint8)
  assert rgb.dtype == np.uint8 and rgb.shape == (2, 3, 3)
  np.testing.assert_array_equal(rgb, np.repeat(expected[..., None], 3, -1))

  eight = np.array([[0, 17], [128, 255]], np.uint8)  # 8-bit images are left as they are
  Image.fromarray(eight).save(tmp_path / "gray8.png")
  np.testing.assert_array_equal(api.read_image(tmp_path / "gray8.png")[..., 1], eight)

  Image.fromarray(np.full((2, 2), 1.5, np.float32)).save(tmp_path / "float.tif")
  with pytest.raises(UserError, match=r"float.tif: a float image must lie in \[0, 1\]"):
    api.read_image(tmp_path / "float.tif")


# 4. SIGTERM and SIGINT save at the current step and stop; the rerun continues exactly.

def test_a_second_signal_stops_at_once():
  # The second signal goes to the handler found on entry: Python's own here, whatever a test
  # worker had installed. raise_signal delivers to this thread (os.kill may reach another).
  outer = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    with trainer.StopSignals() as stop:
      signal.raise_signal(signal.SIGINT)
      assert stop.signum == signal.SIGINT
      with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  finally:
    signal.signal(signal.SIGINT, outer)


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_the_rerun_ends_like_an_uninterrupted_run(
    toy_data_dir, tmp_path, monkeypatch):
  straight = trainer.train_and_evaluate(tiny_config(toy_data_dir, evals=[]), tmp_path / "a")
  original, calls = input_pipeline.GlobalBatches.__next__, []

  def preempted_next(self):  # the scheduler's SIGTERM arrives while step 5 fetches its batch
    calls.append(1)
    if len(calls) == 5:
      os.kill(os.getpid(), signal.SIGTERM)
    return original(self)

  monkeypatch.setattr(input_pipeline.GlobalBatches, "__next__", preempted_next)
  with pytest.raises(trainer.TrainingInterruptedError, match="SIGTERM at step 5") as stopped:
    trainer.train_and_evaluate(tiny_config(toy_data_dir, evals=[]), tmp_path / "b")
  assert stopped.value.signum == signal.SIGTERM
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored
  steps = sorted(int(p.name) for p in (tmp_path / "b/checkpoints").iterdir())
  assert steps[-1] == 5  # not a multiple of checkpoint_steps (3): saved on the signal
  monkeypatch.setattr(input_pipeline.GlobalBatches, "__next__", original)
  resumed = trainer.train_and_evaluate(tiny_config(toy_data_dir, evals=[]), tmp_path / "b")
  for a, b in zip(checkpoint.flatten(straight.params).values(),
                  checkpoint.flatten(resumed.params).values(), strict=True):
    np.testing.assert_array_equal(a, b)
  assert losses(tmp_path / "a") == losses(tmp_path / "b")


# 5. Resume falls back to the newest intact checkpoint.

def _damage(step_dir: Path, how: str) -> None:
  if how == "truncated data files":  # as a copy or a write cut short
    for data in step_dir.glob("state/ocdbt.process_*/d/*"):
      with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)
  elif how == "missing _METADATA":
    (step_dir / "state/_METADATA").unlink()
  else:
    shutil.rmtree(step_dir)
    step_dir.mkdir()


@pytest.fixture(scope="module")
def finished_run(toy_data_dir, tmp_path_factory):
  """A 6-step run keeping the checkpoints of steps 3 and 6, and its final parameters."""
  path = tmp_path_factory.mktemp("finished")
  state = trainer.train_and_evaluate(
      tiny_config(toy_data_dir, evals=[], keep_checkpoint_steps=3), path)
  return path, checkpoint.flatten(state.params)


@pytest.mark.slow
@pytest.mark.xdist_group("finished_run")  # one worker trains the fixture
@pytest.mark.parametrize("how", ["truncated data files", "missing _METADATA", "empty folder"])
def test_a_damaged_latest_checkpoint_is_set_aside_and_the_previous_one_resumes(
    toy_data_dir, tmp_path, finished_run, how, caplog):
  source, final = finished_run
  shutil.copytree(source, tmp_path / "run")
  (tmp_path / "run/LOCK").unlink()
  _damage(tmp_path / "run/checkpoints/6", how)
  state = trainer.train_and_evaluate(
      tiny_config(toy_data_dir, evals=[], keep_checkpoint_steps=3), tmp_path / "run")
  assert "Skipping the checkpoint of step 6" in caplog.text
  assert (tmp_path / "run/checkpoints_damaged/6").is_dir()
  assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == ["3", "6"]
  for (name, a), b in zip(final.items(), checkpoint.flatten(state.params).values(), strict=True):
    np.testing.assert_array_equal(a, b, err_msg=name)  # steps 4-6 redone exactly


def test_only_orbax_futures_whose_error_nobody_read_are_not_reported(caplog):
  """After a failed restore, orbax abandons the reads that failed after the first: asyncio
  reports each when it is collected. Those are dropped; any other such future is reported."""
  checkpoint._drop_orbax_abandoned_work_noise()
  loop = asyncio.new_event_loop()
  for error in ['OUT_OF_RANGE: Error reading "params.x/0" in OCDBT database', "ours"]:
    future = loop.create_future()
    future.set_exception(ValueError(error))
    del future
    gc.collect()
  loop.close()
  reported = [r.getMessage() for r in caplog.records if "never retrieved" in r.getMessage()]
  assert len(reported) == 1 and "ValueError('ours')" in reported[0]


# 6. A damaged metrics line is named and set aside, never lost.

def test_damaged_metrics_lines_are_named_and_set_aside(tmp_path, caplog):
  path = tmp_path / "metrics.jsonl"
  good = [{"step": 1, "training_loss": 2.0}, {"step": 2, "training_loss": 1.5}]
  path.write_text(json.dumps(good[0]) + "\n" + '{"step": 2, "trai\n' + json.dumps(good[1])
                  + "\n" + "\x00\x00\x00\n")
  writer = workdir.JsonlWriter(path, start=2)
  assert f"{path} line 2 is damaged" in caplog.text and f"{path} line 4" in caplog.text
  assert workdir.read_metrics(path) == good
  assert (tmp_path / "metrics.jsonl.damaged").read_text() == '{"step": 2, "trai\n\x00\x00\x00\n'
  writer.write(3, {"training_loss": 1.0})
  assert [r["step"] for r in workdir.read_metrics(path)] == [1, 2, 3]


def test_a_finished_run_rerun_replaces_its_final_evaluation(tmp_path):
  path = tmp_path / "metrics.jsonl"
  records = [{"step": 6, "training_loss": 1.0}, {"step": 6, "val/loss": 2.0},
             {"step": 3, "val/loss": 3.0}]
  workdir.write_metrics(path, records)
  workdir.JsonlWriter(path, start=6, rerun_evals_at_start=True)
  assert workdir.read_metrics(path) == [records[0], records[2]]
  workdir.write_metrics(path, records)
  workdir.JsonlWriter(path, start=6)  # a resume at 6 that will not re-evaluate keeps them
  assert workdir.read_metrics(path) == records


# 7. Evaluators are built and checked before the first step.

@pytest.mark.parametrize("section, value, message", [
    ("pp", 'decode|coco_panoptic|resze(64)|keep("image")',
     r"config.panoptic_val.pp: .*Unknown pp op 'resze'; did you mean 'resize'"),
    ("pp", 'decode|resize(64)|value_range(-1, 1, key="labels")',
     r"config.panoptic_val.pp: .*labels"),
    ("split", "validaton[:8]", r"config.panoptic_val.split='validaton\[:8\]': Unknown split"),
    ("log_steps", -1, r"config.panoptic_val.log_steps must be a non-negative integer"),
])
def test_evaluator_mistakes_stop_the_run_before_its_first_step(toy_data_dir, tmp_path, section,
                                                               value, message):
  config = tiny_config(toy_data_dir)
  config.panoptic_val[section] = value
  with pytest.raises(UserError, match=message):
    trainer.train_and_evaluate(config, tmp_path)
  assert not list(tmp_path.glob("checkpoints/*")) and not (tmp_path / "metrics.jsonl").exists()


# 8. A failed save is reported with its cause.

LIMITED = """
import os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


@pytest.mark.slow
def test_a_checkpoint_that_does_not_fit_on_disk_stops_the_run_with_its_cause(toy_data_dir,
                                                                           tmp_path):
  """Files are limited to 20 kB (RLIMIT_FSIZE, as a full disk): the tiny model's checkpoint
  files are larger, its metrics and config are not."""
  args = ["train.py", "--config=configs/panoptic_stage1.py:smoke", f"--workdir={tmp_path}",
          "--config.dataset=toy_scenes/tiny", f"--config.data_dir={toy_data_dir}",
          "--config.train_split=train", "--config.batch_size=8", "--config.total_steps=6",
          "--config.checkpoint_steps=3", "--config.evals=[]",
          *[f"--config.model.{k}={v}" for k, v in TINY.items()]]
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": ""}
  result = subprocess.run([sys.executable, "-c", LIMITED.format(limit=20_000), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith(f"FATAL Saving a checkpoint to {tmp_path}/checkpoints failed: ")
  assert "File too large" in last
  assert "sys.meta_path is None" not in result.stderr
  assert result.stderr.count("Event loop is closed") == 0
  assert not (tmp_path / "params.npz").exists()


# 9. Every config mistake is one line naming the key.

def train_cli(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout)


@pytest.mark.parametrize("override, message", [
    ("--config.checkpoint_steps=0", "config.checkpoint_steps must be an integer >= 1, got 0"),
    ("--config.log_training_steps=0", "config.log_training_steps must be an integer >= 1, got 0"),
    ("--config.batch_size=0", "config.batch_size must be an integer >= 1, got 0"),
    ("--config.total_steps=-5", "config.total_steps must be an integer >= 0 (or None), got -5"),
    ("--config.dataset=toy_scens/medium",
     "Unknown dataset 'toy_scens/medium' (config.dataset): did you mean 'toy_scenes'? built in: "
     "'toy_scenes', 'coco_panoptic_folder', others are tfds catalog names"),
])
def test_config_values_are_checked_in_one_line(tmp_path, override, message):
  result = train_cli("--config=configs/panoptic_stage1.py:smoke", f"--workdir={tmp_path}",
                     override)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == f"FATAL {message}"
  assert "Traceback" not in result.stderr


def test_a_config_arg_of_the_wrong_type_is_named(tmp_path):
  result = train_cli("--config=configs/panoptic_stage1.py:smoke,res=abc", f"--workdir={tmp_path}")
  assert result.returncode != 0
  assert "Config arg 'res' expects int, got 'abc'" in result.stderr
  assert "Traceback" not in result.stderr


PARSE = """
import sys
from uvim import cli
holder = cli.define_config_flag()
cli.parse_flags(["x", "--config=configs/panoptic_stage2.py:smoke", *sys.argv[1:]])
print(repr(holder.value.model_init), list(map(tuple, holder.value.evals)), holder.value.lr)
"""


@pytest.mark.parametrize("args, printed", [
    (["--config.model_init=release/stageII.npz"], "'release/stageII.npz' [('val', "),
    (["--config.evals=[('val', 'validation')]", "--config.lr=0.5"], "[('val', 'validation')] 0.5"),
    (["--config.evals=[]"], "[] 0.001"),
])
def test_list_keys_and_model_init_paths_override_from_the_command_line(args, printed):
  result = subprocess.run([sys.executable, "-c", PARSE, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert printed in result.stdout


def test_a_list_key_given_a_non_list_is_named():
  result = subprocess.run([sys.executable, "-c", PARSE, "--config.evals=3"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert "--config.evals=3: config.evals is a list, got int" in result.stderr


@pytest.mark.slow
def test_divergence_before_any_checkpoint_says_so(toy_data_dir, tmp_path):
  config = tiny_config(toy_data_dir, lr=1e30, checkpoint_steps=100, grad_clip_norm=0.0,
                       evals=[], schedule=dict(decay_type="constant", warmup_steps=0))
  with pytest.raises(trainer.TrainingDivergedError, match="no checkpoint was saved yet"):
    trainer.train_and_evaluate(config, tmp_path)


# 10. Loading checkpoints the way users do.

def _write_released_files(tmp_path: Path) -> tuple[Path, Path, dict]:
  """The parity fixture's models as big_vision's released files (stage I: params and
  dictionary state; stage II: params) and its sizes as config overrides."""
  fixture = np.load(FIXTURE)
  sizes = json.loads(str(fixture["config_json"]))
  for stage, name in (("stage1", "stageI"), ("stage2", "stageII")):
    np.savez(tmp_path / f"toy_{name}_params.npz",
             **{k[len(stage) + 1:]: fixture[k] for k in fixture.files
                if k.startswith((f"{stage}/params/", f"{stage}/state/"))})
  one, two = sizes["stage1"], sizes["stage2"]
  inputs = {k: tuple(v) for k, v in one["inputs"].items()}
  overrides = {
      "oracle.model.input_size": (one["input_size"],) * 2,
      "oracle.model.patch_size": (one["patch_size"],) * 2,
      "oracle.model.inputs": inputs, "oracle.model.outputs": inputs,
      "oracle.model.oracle_depth": one["enc_depth"],
      "oracle.model.base_model_depth": one["dec_depth"],
      **{f"oracle.model.{k}": one[k] for k in ("code_len", "width", "mlp_dim", "num_heads",
                                               "dict_size", "codeword_dim", "with_encoder_ctx",
                                               "with_decoder_ctx")},
      **{f"model.{k}": two[k] for k in ("num_layers", "num_heads", "mlp_dim", "emb_dim")},
      "model.patches.size": (two["patch_size"],) * 2,
      "model.input_size": (two["input_size"],) * 2,
      "model.posemb_type": "learn",  # big_vision's
  }
  return tmp_path / "toy_stageI_params.npz", tmp_path / "toy_stageII_params.npz", overrides


@pytest.mark.parametrize("scan_layers", [False, True])
def test_released_npz_files_load_in_one_call_and_predict_like_big_vision(tmp_path, scan_layers,
                                                                         caplog):
  oracle, model_file, overrides = _write_released_files(tmp_path)
  model = api.load("configs/panoptic_stage2.py:smoke,ids=raster", checkpoint=str(model_file),
                   oracle=str(oracle), overrides={**overrides, "scan_layers": scan_layers})
  assert "records no config" in caplog.text  # a bare npz cannot be checked: said so
  fixture = np.load(FIXTURE)
  images = fixture["stage2/in/image"]
  outputs = model.predict_batch({"image": images, "image_ctx": images}, temperature=0.0)
  np.testing.assert_array_equal(outputs["code"][:, 0],
                                fixture["stage2/out/greedy_tokens_bos_masked"] - 1)
  assert outputs["semantics"].shape == (2, 1, 64, 64)

  # From uint8 images of any size: resized by config.pp_predict, as predict.py does.
  uint8 = [np.round((x + 1) * 127.5).astype(np.uint8) for x in images]
  wide = np.asarray(Image.fromarray(uint8[0]).resize((96, 64), Image.NEAREST))
  again = model.predict([uint8[0], wide], temperature=0.0)
  batch = {k: np.stack([model.preprocess(x)[k] for x in (uint8[0], wide)])
           for k in ("image", "image_ctx")}
  np.testing.assert_array_equal(again["code"], model.predict_batch(batch, temperature=0.0)["code"])


def test_api_load_refuses_what_it_cannot_load(tmp_path):
  with pytest.raises(UserError, match="no such training workdir or config file"):
    api.load(str(tmp_path / "nothing"))
  with pytest.raises(UserError, match="give checkpoint="):
    api.load("configs/panoptic_stage2.py:smoke")
  with pytest.raises(UserError, match="takes stage II models"):
    api.load("configs/panoptic_stage1.py:smoke", checkpoint="x.npz")


def test_min_count_is_a_config_key():
  from configs import colorization_stage1, panoptic_stage1
  from uvim import models

  for module in (panoptic_stage1, colorization_stage1):
    config = module.get_config("smoke")
    config.model.min_count = 0.25
    assert models.get_model(config.model_name, config.model).min_count == 0.25
