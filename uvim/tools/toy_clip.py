r"""Writes a toy clip to try video prediction on: a camera pan over one wide toy scene.

  python -m uvim.tools.toy_clip --output clip.mp4 [--frames 60 --step 2 --fps 10 --seed 0]

An .mp4 is H.264, a .gif an animated GIF (`uvim.video`).
"""

from pathlib import Path

from absl import app, flags

from uvim import video

_OUTPUT = flags.DEFINE_string("output", None, "The clip to write (.mp4 or .gif).", required=True)
_FRAMES = flags.DEFINE_integer("frames", 60, "Frames of the clip.", lower_bound=2)
_STEP = flags.DEFINE_integer("step", 2, "Pixels the camera moves per frame.", lower_bound=0)
_FPS = flags.DEFINE_float("fps", 10.0, "Frame rate.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "The scene's seed.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  path = Path(_OUTPUT.value)
  if path.suffix.lower() not in (".mp4", ".gif"):
    raise app.UsageError(f"--output {path}: write a .mp4 or a .gif")
  frames = video.toy_pan(_FRAMES.value, _STEP.value, _SEED.value)
  (video.write_gif if path.suffix.lower() == ".gif" else video.write_mp4)(path, frames,
                                                                          _FPS.value)
  print(f"Wrote {len(frames)} frames ({frames[0].shape[1]}x{frames[0].shape[0]}) to {path}")


if __name__ == "__main__":
  app.run(main)
