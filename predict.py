r"""Predicts panoptic segmentation, depth or colour for images with a trained UViM (stage II).

  python predict.py --workdir runs/panoptic_stage2 --input photos/ --output predictions/

`--input` is an image file, a folder of images, a tfds split (`toy_scenes/medium:train[:8]`,
whose ground truth then appears on the contact sheet), or a video: a clip (.mp4, .mov, .webm,
an animated .gif...) or, with --video, a folder of frames. A video's frames are predicted in
order and written as `frame_00000.*`..., with `animation.gif` (input beside prediction) and
`video.json` (frames/s, and the fraction of code words that change between neighbouring
frames). Each image is read upright (its EXIF
orientation applied), converted to RGB, resized for the model and its prediction resized back;
the task writes its files per image (panoptic: COCO PNG + JSON + overlay; depth: 16-bit PNG
in mm + preview; colour: JPEG), and
`contact_sheet.png` shows, like the paper's Figures 7-9: ground truth | the model's input |
T=0 | T=1 samples.

Each input's files go in a folder of its own, named after the whole input:
`<output>/predictions/<input file name, tfds index or frame_NNNNN>/<task>[_s<k>].*` (sample k
> 0 of --num_samples), so that no input's name can reach another input's files or the run's own
(`contact_sheet.png`, `animation.gif`, `video.json`, beside `predictions/`). Every file is
written to a temporary name and renamed. Before the model loads, predict.py refuses an --output
that is a file, holds the inputs, cannot be written, is used by another predict.py, or holds an
earlier run's predictions (--overwrite replaces them). A workdir's recorded config is the
source of truth: `--config.<key>=` changes a setting by saying so. An unreadable image or frame
is reported and skipped; the exit status is then non-zero.
"""

import json
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from absl import app, flags, logging
from PIL import Image

from uvim import api, cli, decoding, files, input_pipeline, video, visualize, workdir
from uvim.errors import UserError

_CONFIG = cli.define_config_flag(
    required=False, help_extra=" (default: the run's recorded config.json; needed for a "
    "released npz, or to change a setting with --config.<key>)")
_WORKDIR = flags.DEFINE_string("workdir", None, "Stage II training directory (latest checkpoint).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None,
                                  "Stage II parameters (.npz or workdir); overrides --workdir.")
_ORACLE = flags.DEFINE_string(
    "oracle_checkpoint", None, "Stage I parameters (.npz or workdir); default "
    "config.oracle.model_init.")
_INPUT = flags.DEFINE_string("input", None, "An image file, a folder of images, a tfds split "
                             "(`dataset:split`) or a video file.", required=True)
_VIDEO = flags.DEFINE_bool("video", False, "A folder --input holds the frames of one video (in "
                           "name order).")
_FROM_PREVIOUS = flags.DEFINE_bool(
    "from_previous", False, "A video on a masked model: decode each frame from the previous "
    "frame's code, redoing the words the model would not write itself (frame by frame).")
_OUTPUT = flags.DEFINE_string("output", None, "Directory to write predictions to.", required=True)
_SAMPLING = cli.define_sampling_flags()  # --scheme, --steps, --temperature, --num_samples...
for _name in decoding.Sampling.names():
  flags.declare_key_flag(_name)  # listed by --help
_CHAIN = flags.DEFINE_list("chain", None, "Multi-task models: the tasks to decode, in turn, "
                           "each conditioned on those before (default: all, in order).")
_GIVEN = flags.DEFINE_list("given", [], "Multi-task models and a tfds --input: tasks whose code "
                           "is the oracle's code of the ground truth, a condition of the chain.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Images per forward pass.", lower_bound=1,
                                    upper_bound=1024)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace the predictions of an earlier run in "
                               "--output (refused otherwise: old files would mix with new ones).")
_SHEET_ROWS = flags.DEFINE_integer("sheet_rows", 8, "Images on the contact sheet (0: none).")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
_SHEET_SAMPLES = flags.DEFINE_integer(
    "sheet_samples", 2, "T = 1 samples per row of a single-task contact sheet (UViM's Figures "
    "7-9 show 3).", lower_bound=1)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.quiet_library_logs()
  source = _CHECKPOINT.value or _WORKDIR.value
  if not source:
    raise app.UsageError("Give --workdir or --checkpoint (the trained stage II model).")
  try:
    config, explicit = _CONFIG.value, cli.explicit_keys() if _CONFIG.value else []
    config = api.run_config(config, source, explicit)
    if _ORACLE.value:
      print(f"config.oracle.model_init = {_ORACLE.value!r} (command line; the run recorded "
            f"{config.oracle.get('model_init')!r})", file=sys.stderr)
      config.oracle.model_init = _ORACLE.value
    if config.model_name != "proj.uvim.lm":
      raise UserError(f"predict.py runs stage II models ('proj.uvim.lm'); {source} is a "
                      f"{config.model_name!r}. A stage I oracle needs labels: evaluate it with "
                      "train.py --config.total_steps=0 --config.model_init=<checkpoint>.")
    inputs = check_input_and_output(_INPUT.value, Path(_OUTPUT.value), config.data_dir,
                                    frames=_VIDEO.value)
    check_sampling(_SAMPLING())  # the options' domains, before the model loads
    lock = prepare_output(Path(_OUTPUT.value), _OVERWRITE.value)
    model = api.Model(config, source)
    if not model.stage.multitask and (_CHAIN.value or _GIVEN.value):
      raise UserError("--chain and --given need a multi-task model (config.oracles)")
    options = {**_SAMPLING(), "chain": _CHAIN.value, "given": tuple(_GIVEN.value)}
    model.options(**options)  # checked before reading any input
    if _FROM_PREVIOUS.value and not (isinstance(inputs, video.Clip) and model.stage.model.masked):
      raise UserError("--from_previous needs a video --input and a masked model")
    failures = run(model, inputs, Path(_OUTPUT.value), options=options,
                   batch_size=_BATCH_SIZE.value, sheet_rows=_SHEET_ROWS.value,
                   sheet_samples=_SHEET_SAMPLES.value, from_previous=_FROM_PREVIOUS.value)
    lock.release()
  except UserError as e:
    sys.exit(f"FATAL {e}")
  if failures:
    print(f"{len(failures)} input(s) failed:", *failures, sep="\n  ", file=sys.stderr)
    sys.exit(1)


def check_input_and_output(source: str, output: Path, data_dir: str | None = None, *,
                           frames: bool = False) -> "str | list[Path] | video.Clip":
  """The image files of `--input` (a file or a folder), the tfds split it names (checked to
  exist in `data_dir`, and to hold examples), or its video (a clip that decodes, or with
  `frames` a folder of images), after
  checking that `--output` can hold the predictions without touching an input: it must not be
  an existing file, nor a folder that holds an input (its files would be overwritten, and read
  as inputs by the next run)."""
  if output.exists() and not output.is_dir():
    raise UserError(f"--output {output} is a file; give a folder for the predictions")
  path = Path(source)
  if not (path.is_dir() or path.is_file()):
    if ":" not in source:
      raise UserError(f"--input {source}: no such file or folder (a tfds split is written "
                      "`dataset:split`, e.g. toy_scenes/medium:train[:8])")
    dataset, split = split_source(source)
    input_pipeline.num_examples(input_pipeline.get_builder(dataset, data_dir, "--input"), split,
                               "--input")
    return source
  if path.is_file() and video.is_video(path):
    files = [path]
  else:
    files = [path] if path.is_file() else sorted(
        p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
      raise UserError(f"--input {path}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
  if output.exists() and any(f.parent.resolve() == output.resolve() for f in files):
    raise UserError(f"--output {output} holds the --input images: predictions would overwrite "
                    "them and be read as inputs next time; give another folder")
  if path.is_file() and video.is_video(path):
    return video.open_clip(path)
  if frames:
    if path.is_file():
      raise UserError(f"--video: --input {path} is a file; give the folder of the frames")
    return video.open_clip(path, files)
  return files


MAX_SAMPLES = 256  # --num_samples: each sample's outputs are held per batch and written


def check_sampling(options: dict) -> decoding.Sampling:
  """The sampling options checked (their domains, and few enough samples to hold in memory)."""
  sampling = decoding.Sampling.of(**options)
  if sampling.num_samples > MAX_SAMPLES:
    raise UserError(f"--num_samples {sampling.num_samples}: at most {MAX_SAMPLES} (each is "
                    "decoded to full task outputs and written)")
  return sampling


PREDICTIONS = "predictions"  # the folder of the per-input folders, in --output
RUN_FILES = ("contact_sheet.png", "animation.gif", "video.json")  # beside it


def prediction_stem(output: Path, name: str, task: str, sample: int = 0) -> Path:
  """Where the files of input `name` (its whole file name, tfds index or frame) for `task` and
  sample `sample` begin: a folder per input, which no other input's name can reach."""
  return output / PREDICTIONS / name / (task + (f"_s{sample}" if sample else ""))


def prepare_output(output: Path, overwrite: bool = False) -> workdir.WorkdirLock:
  """Readies `--output` before the model loads: a folder this process can write, locked against a
  second predict.py, holding no earlier run's predictions (refused, or with `overwrite`
  removed: old files never mix with new ones). Returns the held lock."""
  try:
    output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=output):
      pass
  except OSError as e:
    raise UserError(f"--output {output}: cannot write there ({e.strerror})") from None
  lock = workdir.WorkdirLock(output, name=".predict.lock", user="predict.py",
                             advice="give another --output").acquire()
  earlier = [p for p in (output / PREDICTIONS, *(output / f for f in RUN_FILES)) if p.exists()]
  if earlier and not overwrite:
    lock.release()
    raise UserError(f"--output {output} holds an earlier run's predictions "
                    f"({', '.join(p.name for p in earlier)}); give another folder, or "
                    "--overwrite to replace them")
  for path in earlier:
    shutil.rmtree(path) if path.is_dir() else path.unlink()
  return lock


def run(model: api.Model, source: "str | list[Path] | video.Clip", output: Path, *,
        options: dict, batch_size: int, sheet_rows: int, sheet_samples: int = 2,
        from_previous: bool = False) -> list[str]:
  """Predicts every input of `source` (image files, a tfds split `dataset:split`, or a video's
  frames, in order), writes each task's files and a contact sheet of `sheet_rows` images
  (`sheet_samples` T = 1 samples each) into `output`, and for a video its `Film` (with
  `from_previous`, each frame decoded alone from the previous frame's code); returns the
  inputs that failed. `options` are those of
  `api.Model.predict_batch` (sampling, `chain`, `given`). Each input's files are
  `prediction_stem(output, name, task, sample)`.* for every task of the chain and every given
  one."""
  stage, given = model.stage, tuple(options.get("given") or ())
  if given and not isinstance(source, str):
    raise UserError("--given needs a tfds --input (the ground truth of the given tasks)")
  names = (*given, *(c if isinstance(c, str) else c[0]
                     for c in options.get("chain") or stage.names))
  categories = {n: model.categories(n) for n in names}
  plan = model.plan(**options)  # checked once, for every batch
  sheet = (ChainSheet(model, names, given) if stage.multitask
           else TaskSheet(model, options, plan, sheet_samples))
  num_samples = options.get("num_samples", 1)
  film = Film(model, names, source.fps) if isinstance(source, video.Clip) else None
  output.mkdir(parents=True, exist_ok=True)
  failures: list[str] = []
  examples = read_inputs(source, model, failures)
  rows, done, start, warm = [], 0, time.perf_counter(), None
  batch_size = 1 if from_previous else batch_size
  for batch_examples in batched(examples, batch_size):
    batch = pad_batch([e["model"] for e in batch_examples], batch_size,
                      [model.oracles[n].labels_key for n in given])
    draft = None
    if from_previous:  # the first frame from nothing (-1: every word decoded), in one trace
      draft = (film.codes[-1] if film.codes
               else np.full(model.stage.model.seq_len, -1, np.int32))[None]
    outputs = model.predict_batch(batch, draft=draft, plan=plan)
    extra = sheet.predict(batch, outputs) if len(rows) < sheet_rows else None
    for i, example in enumerate(batch_examples):
      for n in names:
        for k in range(num_samples):
          model.tasks[n].save(take(outputs, i, k), example["image"],
                              prediction_stem(output, example["name"], n, k), categories[n])
      if extra is not None and len(rows) < sheet_rows:
        rows.append((sheet.row(example, take(outputs, i, 0), extra, i), example["name"]))
      if film:
        film.add(example["image"], take(outputs, i, 0))
    done += len(batch_examples)
    warm = warm or (done, time.perf_counter())  # after the first batch, which compiles
    show_progress(done, examples.total, start)
  print(file=sys.stderr)
  if film and done:
    later = (done - warm[0], time.perf_counter() - warm[1])
    film.write(output, later[0] / later[1] if later[0] else done / (warm[1] - start))
  if rows:
    image = visualize.contact_sheet([r for r, _ in rows], sheet.titles,
                                    [n[:16] for _, n in rows], cell_size=160)
    visualize.save_png(output / RUN_FILES[0], image)
  print(f"Wrote predictions for {done} image(s) to {output}", file=sys.stderr)
  return failures


class TaskSheet:
  """A single-task contact sheet, like the paper's Figures 7-9: ground truth | the model's
  input | T=0 | T=1 samples (the other sampling options as given)."""

  def __init__(self, model: api.Model, options: dict, plan, samples: int = 2):
    self.model, self.task, self.samples = model, model.task, samples
    options = {k: v for k, v in options.items() if k not in ("temperature", "num_samples")}
    self.plans = (model.plan(**options, temperature=0.0, num_samples=1),
                  model.plan(**options, temperature=1.0, num_samples=samples))
    self.predicted = plan  # what the batch's own predictions are: reused where they are a column
    self.titles = ["ground truth", "input", "T=0", *(f"T=1 #{k + 1}" for k in range(samples))]

  def predict(self, batch: dict, outputs: dict) -> tuple[dict, ...]:
    return tuple(outputs if plan == self.predicted else self.model.predict_batch(batch, plan=plan)
                 for plan in self.plans)

  def row(self, example: dict, outputs: dict, extra: tuple[dict, dict], i: int) -> list:
    image, (greedy, samples) = example["image"], extra
    truth = example["model"].get(self.model.stage.oracle().labels_key)
    return ([None if truth is None else self.task.render_labels(truth, image),
             model_view(example["model"]["image"], image),
             self.task.render(take(greedy, i, 0), image)]
            + [self.task.render(take(samples, i, k), image) for k in range(self.samples)])


class ChainSheet:
  """A chain's contact sheet: the model's input, then per task the ground truth (tfds inputs)
  and the prediction (given or decoded)."""

  def __init__(self, model: api.Model, names: Sequence[str], given: Sequence[str]):
    self.model, self.names = model, names
    self.titles = ["input", *(t for n in names for t in (
        f"{n}: truth", f"{n}: " + ("given" if n in given else "chain")))]

  def predict(self, batch: dict, outputs: dict) -> tuple:
    return ()

  def row(self, example: dict, outputs: dict, extra: tuple, i: int) -> list:
    image, cells = example["image"], [model_view(example["model"]["image"], example["image"])]
    for n in self.names:
      task, truth = self.model.tasks[n], example["model"].get(self.model.oracles[n].labels_key)
      cells += [None if truth is None else task.render_labels(truth, image),
                task.render(outputs, image)]
    return cells


class Film:
  """A video's predictions: the animation (the frame beside each task's prediction) and the
  code of every frame, for how much it changes between neighbouring frames. The animation
  holds at most `MAX_FRAMES` frames, evenly spread (every `stride`-th; the stride doubles each
  time they would overflow), so memory stays bounded on clips of any length."""

  HEIGHT = 240  # most pixels of the animation's height (a frame's own size if smaller)
  MAX_FRAMES = 300

  def __init__(self, model: api.Model, names: Sequence[str], fps: float):
    self.model, self.names, self.fps = model, names, fps
    self.frames: list[np.ndarray] = []
    self.codes: list[np.ndarray] = []
    self.stride = 1

  def add(self, image: np.ndarray, outputs: dict) -> None:
    self.codes.append(outputs["code"])
    if (len(self.codes) - 1) % self.stride:
      return
    if len(self.frames) == self.MAX_FRAMES:
      self.frames, self.stride = self.frames[::2], 2 * self.stride
      if (len(self.codes) - 1) % self.stride:
        return
    height, width = image.shape[:2]
    if height > self.HEIGHT:
      size = (round(width * self.HEIGHT / height), self.HEIGHT)
      image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    cells = [image, *(self.model.tasks[n].render(outputs, image) for n in self.names)]
    self.frames.append(video.side_by_side(cells))

  def write(self, output: Path, frames_per_second: float) -> dict:
    """`animation.gif` and `video.json`; returns the latter's summary."""
    video.write_gif(output / RUN_FILES[1], self.frames, self.fps / self.stride)
    changes = video.code_changes(np.stack(self.codes))
    summary = {"frames": len(self.codes), "clip_fps": self.fps,
               "animation_frames": len(self.frames), "animation_stride": self.stride,
               "frames_per_second": round(frames_per_second, 2),
               "code_change_mean": float(changes.mean()) if len(changes) else 0.0,
               "code_change_max": float(changes.max()) if len(changes) else 0.0,
               "code_change": [round(float(c), 4) for c in changes]}
    files.write_text(output / RUN_FILES[2], json.dumps(summary, indent=1) + "\n")
    print(f"{summary['frames']} frames at {frames_per_second:.1f} frames/s (after the first "
          f"batch); code words changed between neighbouring frames: "
          f"{100 * summary['code_change_mean']:.1f}% on average, "
          f"{100 * summary['code_change_max']:.1f}% at most", file=sys.stderr)
    return summary


def model_view(model_image: np.ndarray, image: np.ndarray) -> np.ndarray:
  """What the model sees (e.g. grayscale for colorization), back at the image's size."""
  height, width = image.shape[:2]
  pixels = Image.fromarray(visualize.from_model_range(model_image))
  return np.asarray(pixels.resize((width, height), Image.BILINEAR))


def take(outputs: dict, i: int, k: int) -> dict:
  """Image i, sample k of a batch of outputs (B, samples, ...)."""
  return {key: value[i, k] for key, value in outputs.items()}


class Inputs:
  """An iterator of examples {'name', 'image' (uint8 RGB), 'model' (pp'd), ['labels']} with a
  known `total` (for the ETA)."""

  def __init__(self, iterator: Iterator[dict], total: int):
    self.iterator, self.total = iterator, total

  def __iter__(self) -> Iterator[dict]:
    return self.iterator


def read_inputs(source: "str | list[Path] | video.Clip", model: api.Model,
                failures: list[str]) -> Inputs:
  """Image files, a tfds split or a video's frames; unreadable files are appended to
  `failures`."""
  config = model.config
  if isinstance(source, video.Clip):
    names = [f"frame_{i:05d}" for i in range(source.count)]
    if source.frames:  # a folder of frames: an unreadable one is skipped, as an image is
      return Inputs(_file_examples(source.frames, names, model.preprocess, failures),
                    source.count)
    return Inputs(({"name": name, "image": frame, "model": model.preprocess(frame)}
                   for name, frame in zip(names, source, strict=False)), source.count)
  if not isinstance(source, str):
    return Inputs(_file_examples(source, [f.name for f in source], model.preprocess, failures),
                  len(source))
  dataset, split = split_source(source)
  total = input_pipeline.num_examples(input_pipeline.get_builder(dataset, config.data_dir), split,
                                      "--input")
  return Inputs(({"name": f"{index:05d}", "image": image, "labels": inputs.get("labels"),
                  "model": inputs}
                 for index, (image, inputs) in enumerate(api.iter_examples(config, split,
                                                                           dataset))), total)


def split_source(source: str) -> tuple[str, str]:
  """'dataset:split' -> (dataset, split); the split's slice may hold colons too."""
  colon = source.split("[", 1)[0].rindex(":")
  return source[:colon], source[colon + 1:]


def _file_examples(paths: Sequence[Path], names: Sequence[str], preprocess,
                   failures: list[str]) -> Iterator[dict]:
  for file, name in zip(paths, names, strict=True):
    try:
      image = api.read_image(file)
    except Exception as e:  # any unreadable file is reported and skipped
      logging.error("Cannot read %s: %s", file, e)
      failures.append(f"{file}: {e}")
      continue
    yield {"name": name, "image": image,
           "model": preprocess(image)}


def batched(examples, size: int) -> Iterator[list[dict]]:
  batch = []
  for example in examples:
    batch.append(example)
    if len(batch) == size:
      yield batch
      batch = []
  if batch:
    yield batch


def pad_batch(examples: list[dict], size: int, labels: Sequence[str] = ()) -> dict:
  """Stacks the model inputs (and the `labels` keys), repeating the last example up to `size`
  (one compilation)."""
  keys = ("image", "image_ctx", *labels)
  rows = examples + [examples[-1]] * (size - len(examples))
  return {k: np.stack([r[k] for r in rows]) for k in keys if k in examples[0]}


def show_progress(done: int, total: int, start: float) -> None:
  rate = done / max(time.perf_counter() - start, 1e-9)
  eta = (total - done) / rate if rate else 0
  print(f"\r{done}/{total} images ({100 * done / max(total, 1):.0f}%), {rate:.1f} img/s, "
        f"ETA {int(eta) // 60}m{int(eta) % 60:02d}s", end="", file=sys.stderr, flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
