"""Video: reading clips, the toy pan, code changes, and predict.py on a clip and on frames."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from test_stage2 import LM_TINY, ROOT
from test_trainer import TINY

from uvim import video


def test_code_changes_count_the_words_that_differ_between_neighbouring_frames():
  codes = np.array([[1, 2, 3, 4], [1, 2, 3, 4], [1, 9, 3, 8], [0, 0, 0, 0]])
  expected = [sum(a != b for a, b in zip(codes[t], codes[t + 1], strict=True)) / 4
              for t in range(3)]
  np.testing.assert_allclose(video.code_changes(codes), expected)


def test_the_toy_pan_moves_the_camera_step_pixels_a_frame_and_survives_mp4_and_gif(tmp_path):
  frames = video.toy_pan(num_frames=8, step=3)
  assert len(frames) == 8 and frames[0].shape == (96, 128, 3)
  for t in range(7):  # what frame t shows right of column 3, frame t + 1 shows from column 0
    np.testing.assert_array_equal(frames[t][:, 3:], frames[t + 1][:, :-3])
  gif = video.open_clip(video.write_gif(tmp_path / "pan.gif", frames, fps=5))
  assert (gif.count, gif.fps) == (8, 5)
  for a, b in zip(gif, frames, strict=True):
    assert np.abs(a.astype(int) - b).mean() < 2  # GIF's palette
  mp4 = video.open_clip(video.write_mp4(tmp_path / "pan.mp4", frames, fps=5))
  assert (mp4.count, mp4.fps) == (8, 5) and video.is_video(tmp_path / "pan.mp4")
  for a, b in zip(mp4, frames, strict=True):
    assert np.abs(a.astype(int) - b).mean() < 6  # H.264 at crf 18, chroma subsampled


def test_a_still_gif_is_an_image_and_a_broken_clip_is_one_clear_error(tmp_path):
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "still.gif")
  assert not video.is_video(tmp_path / "still.gif")
  (tmp_path / "broken.mp4").write_bytes(b"\x00" * 64)
  with pytest.raises(Exception, match=r"--input .*broken.mp4: not a video FFmpeg can decode"):
    video.open_clip(tmp_path / "broken.mp4")


@pytest.mark.slow
def test_predict_on_a_clip_and_on_its_frames_writes_the_same_frames_and_an_animation(
    toy_data_dir, oracle_workdir, stage2_workdir, masked_stage2_workdir, tmp_path):
  """A clip that holds still for 5 frames, then pans: the same prediction for the same frame
  whether it comes from the .mp4 or from a folder of its frames (--video); no code word
  changes while the camera holds still."""
  pan = video.toy_pan(num_frames=5, step=4)
  clip = video.write_mp4(tmp_path / "clip.mp4", [pan[0]] * 5 + pan[1:], fps=10)
  frames = tmp_path / "frames"
  frames.mkdir()
  for i, frame in enumerate(video.open_clip(clip)):
    Image.fromarray(frame).save(frames / f"{i:03d}.png")
  common = [sys.executable, "predict.py", "--config", "configs/panoptic_stage2.py:smoke",
            f"--config.data_dir={toy_data_dir}", "--config.dataset=toy_scenes/tiny",
            *(f"--config.oracle.model.{k}={v}" for k, v in TINY.items()),
            *(f"--config.model.{k}={v}" for k, v in LM_TINY.items()),
            f"--workdir={stage2_workdir}", f"--oracle_checkpoint={oracle_workdir}",
            "--batch_size=4", "--sheet_rows=0"]
  summaries = {}
  for name, args in (("clip", [f"--input={clip}"]), ("frames", [f"--input={frames}", "--video"])):
    result = subprocess.run([*common, *args, f"--output={tmp_path / ('out_' + name)}"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "frames/s" in result.stderr
    summaries[name] = json.loads((tmp_path / f"out_{name}" / "video.json").read_text())
  read = lambda name, i: np.asarray(Image.open(
      tmp_path / f"out_{name}" / f"predictions/frame_{i:05d}/panoptic_segmentation.png"))
  for i in range(9):
    np.testing.assert_array_equal(read("clip", i), read("frames", i))
  summary = summaries["clip"]
  assert summary["frames"] == 9 and summary["clip_fps"] == 10
  assert summary["code_change"] == summaries["frames"]["code_change"]
  assert summary["code_change"][:4] == [0, 0, 0, 0]
  assert summary["code_change_mean"] == pytest.approx(np.mean(summary["code_change"]))
  with Image.open(tmp_path / "out_clip" / "animation.gif") as gif:
    assert gif.size == (2 * 128 + 2, 96)  # the frame | the prediction
    durations = []
    for i in range(gif.n_frames):  # PIL merges identical neighbours into one longer frame
      gif.seek(i)
      durations.append(gif.info["duration"])
  assert sum(durations) == 9 * 100

  # A masked model can start each frame from the previous frame's code (frame by frame); an
  # autoregressive one cannot.
  masked = [*common[:-4], f"--workdir={masked_stage2_workdir}", *common[-3:],
            "--config.model.masked=True", "--scheme=maskgit",
            f"--input={clip}", "--from_previous"]
  result = subprocess.run([*masked, f"--output={tmp_path / 'previous'}"], cwd=ROOT,
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-2000:]
  previous = json.loads((tmp_path / "previous" / "video.json").read_text())
  assert previous["frames"] == 9 and previous["code_change"][:4] == [0, 0, 0, 0]
  result = subprocess.run([*common, f"--input={clip}", "--from_previous",
                           f"--output={tmp_path / 'ar'}"], cwd=ROOT, capture_output=True,
                          text=True)
  assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == (
      "FATAL --from_previous needs a video --input and a masked model")

  (tmp_path / "broken.mp4").write_bytes(b"\x00" * 64)
  result = subprocess.run([*common, f"--input={tmp_path / 'broken.mp4'}",
                           f"--output={tmp_path / 'out'}"], cwd=ROOT, capture_output=True,
                          text=True)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith(
      f"FATAL --input {tmp_path / 'broken.mp4'}: not a video FFmpeg can decode")
