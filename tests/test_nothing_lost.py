"""Nothing lost, nothing silently wrong, round two (issue 36): predict.py's output folder, the
recorded run as the source of truth, damaged files, bounded options and memory, unsafe inputs.

predict.py's naming and its recorded oracle run end to end in
test_stage2.py::test_predict_cli_writes_each_input_in_its_own_folder_with_the_recorded_oracle;
docs/predict.md lists what predict.py writes and refuses.
"""

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from test_coco_folder import build
from test_stage2 import stage2_config

import predict
from configs import multitask_stage2
from uvim import api, checkpoint, decoding, stages, trainer, visualize
from uvim.datasets import coco_folder
from uvim.errors import UserError
from uvim.sweep import emit, plan
from uvim.tools import decode_study, mask_code

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------
# predict.py's output folder and files.


def test_an_output_folder_is_checked_locked_and_never_mixed_with_an_earlier_run(tmp_path):
  out = tmp_path / "out"
  lock = predict.prepare_output(out)
  with pytest.raises(UserError, match=r"in use by a running predict.py \(pid \d+"):
    predict.prepare_output(out)  # a second predict.py on the same --output
  lock.release()
  (out / "predictions/a.png").mkdir(parents=True)
  (out / "contact_sheet.png").write_bytes(b"old")
  (out / "notes.txt").write_text("the user's")
  with pytest.raises(UserError, match=r"holds an earlier run's predictions \(predictions, "
                                      r"contact_sheet.png\); .* --overwrite"):
    predict.prepare_output(out)
  assert (out / "contact_sheet.png").read_bytes() == b"old"
  predict.prepare_output(out, overwrite=True).release()
  assert sorted(p.name for p in out.iterdir()) == [".predict.lock", "notes.txt"]
  (tmp_path / "a_file").write_text("")
  with pytest.raises(UserError, match=r"--output .*a_file/out: cannot write there"):
    predict.prepare_output(tmp_path / "a_file" / "out")


def test_a_file_that_cannot_be_written_leaves_nothing_under_its_name(tmp_path, monkeypatch):
  """A full disk mid-write: one line naming the file, no 0-byte or cut file left behind."""
  visualize.save_png(tmp_path / "kept.png", np.zeros((4, 4), np.uint8))
  before = (tmp_path / "kept.png").read_bytes()

  def disk_full(image, fp, *args, **kwargs):
    Path(fp).write_bytes(b"\x89PNG partial")
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(Image.Image, "save", disk_full)
  for name in ("new.png", "kept.png"):
    with pytest.raises(UserError, match=rf"cannot write {tmp_path / name}: No space left"):
      visualize.save_png(tmp_path / name, np.ones((4, 4), np.uint8))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.png"]
  assert (tmp_path / "kept.png").read_bytes() == before


def test_dotted_names_keep_every_part():
  stem = predict.prediction_stem(Path("out"), "scan.001.png", "depth", 1)
  assert stem == Path("out/predictions/scan.001.png/depth_s1")
  assert visualize.beside(stem, ".png") == Path("out/predictions/scan.001.png/depth_s1.png")
  assert visualize.beside(Path("scan.001"), ".png").name == "scan.001.png"


@pytest.fixture(scope="module")
def stage2_model(stage2_workdir):
  return api.load(str(stage2_workdir))


def frame(value: int) -> np.ndarray:
  return np.full((12, 16, 3), value, np.uint8)


def test_a_long_video_keeps_a_bounded_evenly_spread_animation(stage2_model, monkeypatch,
                                                              tmp_path):
  outputs = {k: v[0, 0] for k, v in stage2_model.predict([frame(0)], temperature=0.0).items()}
  monkeypatch.setattr(predict.Film, "MAX_FRAMES", 4)
  film = predict.Film(stage2_model, stage2_model.stage.names, fps=10)
  for i in range(19):
    film.add(frame(10 * i), outputs)
    kept = [j for j in range(i + 1) if j % film.stride == 0]
    assert len(film.frames) <= 4
    assert [f[0, 0, 0] // 10 for f in film.frames] == kept  # every stride-th frame, in order
  assert film.stride == 8 and len(film.codes) == 19
  summary = film.write(tmp_path, frames_per_second=1.0)
  assert (summary["frames"], summary["animation_frames"], summary["animation_stride"]) == (
      19, 3, 8)
  with Image.open(tmp_path / "animation.gif") as gif:
    assert gif.n_frames == 3 and gif.info["duration"] == 800  # 8 frames at 10 frames/s


def test_an_unreadable_frame_of_a_frames_folder_is_reported_and_skipped(stage2_model,
                                                                        tmp_path):
  folder = tmp_path / "frames"
  folder.mkdir()
  for i in range(3):
    Image.fromarray(frame(50 * i)).save(folder / f"{i:03d}.png")
  (folder / "001.png").write_bytes(b"cut")
  clip = predict.check_input_and_output(str(folder), tmp_path / "out", frames=True)
  failures = predict.run(stage2_model, clip, tmp_path / "out", options={}, batch_size=2,
                         sheet_rows=0)
  assert len(failures) == 1 and "001.png" in failures[0]
  assert sorted(p.name for p in (tmp_path / "out/predictions").iterdir()) == [
      "frame_00000", "frame_00002"]
  assert json.loads((tmp_path / "out/video.json").read_text())["frames"] == 2


# ------------------------------------------------------------------------------------------
# The recorded run holds; options are finite and bounded.


def test_the_recorded_config_holds_and_the_command_line_changes_it_by_saying_so(
    toy_data_dir, oracle_workdir, stage2_workdir, tmp_path, capsys):
  config = stage2_config(toy_data_dir, oracle_workdir)
  config.oracle.model_init = str(tmp_path / "another_oracle")
  config.model.temperature_unused = 1  # a key the run never had
  config.batch_size = 3
  recorded = api.run_config(config, str(stage2_workdir), explicit=["batch_size"])
  assert recorded.oracle.model_init == str(oracle_workdir.resolve())
  assert recorded.batch_size == 3 and "temperature_unused" not in recorded.model
  assert "config.batch_size = 3 (command line; the run recorded 8)" in capsys.readouterr().err
  # A released npz records nothing: the config holds.
  assert api.run_config(config, str(tmp_path / "released.npz")) is config


@pytest.mark.parametrize("option", ["temperature", "choice_temperature", "guidance"])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_sampling_options_are_finite(option, value):
  with pytest.raises(UserError, match=rf"^{option} must be in \["):
    decoding.Sampling.of(**{option: value})


def test_sampling_options_are_bounded(stage2_model):
  with pytest.raises(UserError, match=r"--num_samples 257: at most 256"):
    predict.check_sampling({"num_samples": 257})
  vocab = stage2_model.stage.model.vocab_size
  with pytest.raises(UserError, match=rf"top_k {vocab + 1}: more than the model's {vocab}"):
    stage2_model.options(top_k=vocab + 1)
  stage2_model.options(top_k=vocab)


def test_study_tools_check_steps_and_temperature_before_any_work(
    toy_data_dir, oracle_workdir, stage2_workdir, masked_stage2_workdir, tmp_path, monkeypatch):
  masked = api.load(str(masked_stage2_workdir))
  with pytest.raises(UserError, match=r"--steps \[1000\]: a masked model decodes its 16-word "):
    decode_study.settings(masked, ["maskgit"], [4, 1000], [1.0], 4.5)
  monkeypatch.setattr(api, "Model", None)  # loading the model would fail the test
  with pytest.raises(UserError, match=r"temperature must be in \[0, 100.0\]"):
    mask_code.run(stage2_config(toy_data_dir, oracle_workdir), str(stage2_workdir),
                  "validation[:4]", tmp_path / "out", codes="stage2", steps=2, sheet_count=0,
                  temperature=math.inf, seed=0)
  result = subprocess.run([sys.executable, "-m", "uvim.tools.mask_code", "--config",
                           "configs/panoptic_stage2.py:smoke", "--workdir", "w", "--input", "v",
                           "--output", str(tmp_path / "o"), "--steps=0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 1 and "--steps=0" in result.stderr
  assert "0 is not integer >= 2" in result.stderr


def test_each_task_once_in_a_multitask_config_and_a_chain():
  for tasks, why in (("depth+depth", r"\['depth'\] named twice"),
                     ("foo+depth", r"unknown task\(s\) \['foo'\]"), ("depth", "one task")):
    with pytest.raises(ValueError, match=rf"tasks={re.escape(tasks)}: {why}"):
      multitask_stage2.get_config(f"smoke,tasks={tasks}")
  stage = stages.StageII(multitask_stage2.get_config("smoke,tasks=panoptic+depth"))
  with pytest.raises(UserError, match=r"chain: \['panoptic'\] named twice"):
    stage.plan({"chain": ("panoptic", "depth", "panoptic")})


# ------------------------------------------------------------------------------------------
# Damaged files: one line naming the file; readers fall back to the latest intact checkpoint.


def test_a_cut_npz_or_config_json_is_one_line_naming_the_file(toy_data_dir, oracle_workdir,
                                                              tmp_path):
  npz = tmp_path / "params.npz"
  checkpoint.save_npz(npz, {"params": {"w": np.arange(1000.0)}})
  npz.write_bytes(npz.read_bytes()[:600])
  with pytest.raises(UserError, match=rf"^{npz}: not a readable .npz checkpoint, damaged or "
                                      "cut short"):
    checkpoint.load_variables(str(npz))
  run = tmp_path / "run"
  shutil.copytree(oracle_workdir, run)
  for text in ("", '{"model_name": "proj.uvim.vit", "mod'):
    (run / "config.json").write_text(text)
    with pytest.raises(UserError, match=rf"^{run / 'config.json'}: damaged"):
      api.load_config(str(run))
    with pytest.raises(UserError, match=rf"{run / 'config.json'}: damaged"):
      api.load_tokenizer(str(run))


def test_predicting_from_a_workdir_skips_a_damaged_latest_checkpoint(stage2_workdir,
                                                                     stage2_model, tmp_path):
  run = stage2_workdir.parent / f"copy_{tmp_path.name}"  # its oracle where the run recorded it
  shutil.copytree(stage2_workdir, run)
  latest = run / "checkpoints" / "4"
  shutil.copytree(latest, run / "checkpoints" / "9")  # a later checkpoint, half deleted
  for path in sorted((run / "checkpoints/9/state").rglob("*")):
    if path.is_file() and "manifest" in path.name:
      path.unlink()
  for path in (run / "checkpoints/9/state").iterdir():
    if path.is_dir():
      shutil.rmtree(path)
  model = api.load(str(run))
  image = frame(100)
  for key, value in model.predict([image], temperature=0.0).items():
    np.testing.assert_array_equal(value, stage2_model.predict([image], temperature=0.0)[key])
  assert (run / "checkpoints/9").is_dir()  # a reader moves nothing


# ------------------------------------------------------------------------------------------
# Failed starts leave nothing; unsafe inputs are refused.


def test_a_training_whose_checkpoint_path_is_missing_touches_no_workdir(toy_data_dir,
                                                                        oracle_workdir,
                                                                        tmp_path):
  config = stage2_config(toy_data_dir, tmp_path / "no_such_oracle")
  with pytest.raises(UserError, match=r"model_init .*no_such_oracle: no such file or folder"):
    trainer.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_sbatch_options_and_folders_cannot_inject_shell_lines(tmp_path):
  runs = plan.plan(tmp_path / "sweep", "configs/depth_stage1.py:smoke", ["lr=1e-3,3e-4"], None)
  with pytest.raises(UserError, match=r"--sbatch '--gres=gpu:1\\necho owned': give one sbatch "
                                      "option on one line"):
    emit.slurm(runs, tmp_path / "sweep", ["--gres=gpu:1\necho owned"])
  spaced = plan.plan(tmp_path / "my sweep", "configs/depth_stage1.py:smoke", ["lr=1e-3"], None)
  with pytest.raises(UserError, match=r"sweep folder .*my sweep: the #SBATCH lines name it"):
    emit.slurm(spaced, tmp_path / "my sweep", [])
  assert not (tmp_path / "sweep/slurm").exists()
  (script,) = [p for p in emit.slurm(runs, tmp_path / "sweep", ["--gres=gpu:1", "-p gpu"])
               if p.suffix == ".sbatch"]
  assert "#SBATCH --gres=gpu:1\n#SBATCH -p gpu\n" in script.read_text()


def test_a_coco_folder_cannot_name_files_outside_itself(toy_data_dir, tmp_path):
  builder = tfds.builder("toy_scenes/tiny", data_dir=toy_data_dir)
  root = tmp_path / "coco"
  json_path = coco_folder.export_coco_panoptic(
      tfds.as_numpy(builder.as_dataset(split="validation[:2]")), root, "validation[:2]",
      coco_folder.categories_of(builder))
  assert json_path.name == "panoptic_val2017.json"  # the slice is no part of the name
  assert len(list(build(root, tmp_path / "tfds").as_dataset(split="validation"))) == 2
  (tmp_path / "secret.png").write_bytes(b"outside")
  data = json.loads(json_path.read_text())
  for name in ("../../secret.png", str(tmp_path / "secret.png")):
    data["images"][0]["file_name"] = name
    json_path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"file_name '{name}' points outside"):
      build(root, tmp_path / f"tfds_{len(name)}")
  with pytest.raises(ValueError, match=r"split 'train\+validation': export one named split"):
    coco_folder.export_coco_panoptic([], root, "train+validation", [])

