r"""Video for predict.py: reading clips (any format FFmpeg decodes, through PyAV, whose wheels
bundle FFmpeg: no system install), the animated result, how much the code changes from frame
to frame, and a toy clip to try it on.

  python -m uvim.tools.toy_clip --output clip.mp4   # 60 frames: a pan over a toy scene
  python predict.py --config configs/panoptic_stage2.py:smoke --workdir runs/panoptic_stage2 \
      --input clip.mp4 --output runs/clip_predictions
"""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from uvim.errors import UserError

VIDEO_SUFFIXES = {".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".gif"}


@dataclass(frozen=True)
class Clip:
  """A video `--input`: a file, or a folder whose `frames` (image files) are read in name
  order; `fps` is the file's frame rate (a folder's: `DEFAULT_FPS`), `count` its frames."""

  path: Path
  count: int
  fps: float
  frames: tuple[Path, ...] = ()

  def __iter__(self) -> Iterator[np.ndarray]:
    """The frames as uint8 RGB (H, W, 3)."""
    if self.frames:
      from uvim.api import read_image
      return (read_image(f) for f in self.frames)
    return _decode(self.path)


DEFAULT_FPS = 10.0


def is_video(path: Path) -> bool:
  """A file FFmpeg should read as a clip: a video suffix (a GIF only if it has several frames)."""
  if path.suffix.lower() not in VIDEO_SUFFIXES:
    return False
  if path.suffix.lower() == ".gif":
    try:
      with Image.open(path) as gif:
        return getattr(gif, "n_frames", 1) > 1
    except OSError:
      return True  # not even an image: let the video reader say what is wrong
  return True


def open_clip(path: Path, frames: Sequence[Path] = ()) -> Clip:
  """The clip of a video file (checked to decode: its first frame is read), or of a folder's
  image `frames`; a UserError naming the file otherwise."""
  if frames:
    return Clip(path, len(frames), DEFAULT_FPS, tuple(frames))
  import av

  try:
    with av.open(str(path)) as container:
      if not container.streams.video:
        raise UserError(f"--input {path}: no video stream in this file")
      stream = container.streams.video[0]
      fps = float(stream.average_rate or stream.guessed_rate or DEFAULT_FPS)
      count = stream.frames or sum(1 for _ in container.decode(video=0))
  except av.error.FFmpegError as e:
    raise UserError(f"--input {path}: not a video FFmpeg can decode ({e})") from None
  if not count:
    raise UserError(f"--input {path}: the video has no frames")
  return Clip(path, count, fps)


def _decode(path: Path) -> Iterator[np.ndarray]:
  import av

  with av.open(str(path)) as container:
    for frame in container.decode(video=0):
      yield frame.to_ndarray(format="rgb24")


def write_mp4(path: Path, frames: Sequence[np.ndarray], fps: float) -> Path:
  """H.264 (yuv420p, even sides: odd ones are cropped by a pixel) at `fps`."""
  import av

  path.parent.mkdir(parents=True, exist_ok=True)
  height, width = (s - s % 2 for s in frames[0].shape[:2])
  with av.open(str(path), "w") as container:
    stream = container.add_stream("libx264", rate=round(fps))
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.options = {"crf": "18"}
    for pixels in frames:
      frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels[:height, :width]),
                                         format="rgb24")
      container.mux(stream.encode(frame))
    container.mux(stream.encode())
  return path


def write_gif(path: Path, frames: Sequence[np.ndarray], fps: float) -> Path:
  """An animated GIF that loops, at `fps` (GIF delays are whole 10 ms), written atomically."""
  from uvim import files

  images = [Image.fromarray(f) for f in frames]
  with files.atomic_path(path) as tmp:
    images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], loop=0,
                   duration=max(20, round(100 / fps) * 10), optimize=False)
  return path


def side_by_side(cells: Sequence[np.ndarray], pad: int = 2) -> np.ndarray:
  """Images of one height in a row, `pad` white pixels apart."""
  height = cells[0].shape[0]
  gap = np.full((height, pad, 3), 255, np.uint8)
  row = [c for cell in cells for c in (cell, gap)][:-1]
  return np.concatenate(row, axis=1)


def code_changes(codes_TxL: np.ndarray) -> np.ndarray:
  """Per pair of neighbouring frames, the fraction of code words that differ (T - 1,)."""
  codes = np.asarray(codes_TxL)
  return np.mean(codes[1:] != codes[:-1], axis=-1)


def toy_pan(num_frames: int = 60, step: int = 2, seed: int = 0, height: int = 96,
            width: int = 128) -> list[np.ndarray]:
  """A camera pan over one wide toy scene: `num_frames` windows of (height, width), each
  `step` pixels right of the last (objects as dense as in the dataset's scenes)."""
  from uvim.datasets import toy_scenes

  wide = width + step * (num_frames - 1)
  things = round(toy_scenes.ToyScenesConfig.max_things * wide / width)
  scene = toy_scenes.render_scene(np.random.default_rng(seed), height, wide, things)["image"]
  return [scene[:, i * step:i * step + width] for i in range(num_frames)]
