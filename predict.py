r"""Predicts panoptic segmentation, depth or colour for images with a trained UViM (stage II).

  python predict.py --config configs/panoptic_stage2.py:smoke --workdir runs/panoptic_stage2 \
      --input photos/ --output predictions/

`--input` is an image file, a folder of images, or a tfds split (`toy_scenes/medium:train[:8]`,
whose ground truth then appears on the contact sheet). Each image is converted to RGB, resized
for the model and its prediction resized back; the task writes its files per image (panoptic:
COCO PNG + JSON + overlay; depth: 16-bit PNG in mm + preview; colour: JPEG), and
`contact_sheet.png` shows, like the paper's Figures 7-9: ground truth | the model's input |
T=0 | T=1 samples.
An unreadable file is reported and skipped; the exit status is then non-zero.
"""

import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from absl import app, flags, logging
from PIL import Image

from uvim import api, cli, decoding, input_pipeline, visualize
from uvim.errors import UserError

_CONFIG = cli.define_config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Stage II training directory (latest checkpoint).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None,
                                  "Stage II parameters (.npz or workdir); overrides --workdir.")
_ORACLE = flags.DEFINE_string(
    "oracle_checkpoint", None, "Stage I parameters (.npz or workdir); default "
    "config.oracle.model_init.")
_INPUT = flags.DEFINE_string("input", None, "An image file, a folder of images or a tfds split "
                             "(`dataset:split`).", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Directory to write predictions to.", required=True)
_TEMPERATURE = flags.DEFINE_float("temperature", None, "Sampling temperature (0: argmax); "
                                   "default: the task's (colour 1, others 0).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1.0: all).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Predictions per image; sample k > 0 is "
                                    "written as `<name>_s<k>.*`.")
_GUIDANCE = flags.DEFINE_float("guidance", 1.0, "Classifier-free guidance scale (4M's "
                               "convention: 1 = none; needs a model trained with cond_dropout).")
_GUIDANCE_SCHEDULE = flags.DEFINE_enum("guidance_schedule", "constant",
                                       list(decoding.GUIDANCE_SCHEDULES),
                                       "How the guidance scale rises from 1 over the steps.")
_SCHEME = flags.DEFINE_enum("scheme", None, list(decoding.SCHEMES),
                            "Decoding: ar (one token a step, causal models); maskgit or roar "
                            "(a few parallel steps, masked models). Default: the model's.")
_STEPS = flags.DEFINE_integer("steps", 8, "Steps of maskgit / roar.")
_TOKEN_SCHEDULE = flags.DEFINE_enum("token_schedule", "cosine", list(decoding.TOKEN_SCHEDULES),
                                    "Tokens decided per parallel step: MaskGIT's cosine or "
                                    "linear.")
_TEMPERATURE_SCHEDULE = flags.DEFINE_enum(
    "temperature_schedule", "constant", list(decoding.TEMPERATURE_SCHEDULES),
    "Temperature over parallel steps: constant, linear or onex (decaying).")
_CHOICE_TEMPERATURE = flags.DEFINE_float(
    "choice_temperature", 4.5, "maskgit: scale of the Gumbel noise on the confidence, annealed "
    "over the steps (MaskGIT's 4.5; 0 decides the most confident tokens first, which drifts "
    "from the random masks of training: worse on the toy tasks).")
_CHAIN = flags.DEFINE_list("chain", None, "Multi-task models: the tasks to decode, in turn, "
                           "each conditioned on those before (default: all, in order).")
_GIVEN = flags.DEFINE_list("given", [], "Multi-task models and a tfds --input: tasks whose code "
                           "is the oracle's code of the ground truth, a condition of the chain.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed (each image also hashes its pixels).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Images per forward pass.")
_SHEET_ROWS = flags.DEFINE_integer("sheet_rows", 8, "Images on the contact sheet (0: none).")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SHEET_SAMPLES = 2  # T = 1 samples per row of the contact sheet


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.quiet_library_logs()
  config = _CONFIG.value
  if config.model_name != "proj.uvim.lm":
    raise app.UsageError(f"predict.py runs stage II models ('proj.uvim.lm'); this config has "
                         f"{config.model_name!r}. A stage I oracle needs labels: evaluate it with "
                         "train.py --config.total_steps=0 --config.model_init=<checkpoint>.")
  if _ORACLE.value:
    config.oracle.model_init = _ORACLE.value
  source = _CHECKPOINT.value or _WORKDIR.value
  if not source:
    raise app.UsageError("Give --workdir or --checkpoint (the trained stage II model).")
  try:
    model = api.Model(config, source)
    chain = {}
    if model.multitask:
      chain = {"chain": tuple(_CHAIN.value or model.stage.names), "given": tuple(_GIVEN.value)}
    elif _CHAIN.value or _GIVEN.value:
      raise UserError("--chain and --given need a multi-task model (config.oracles)")
    failures = run(model, _INPUT.value, Path(_OUTPUT.value), temperature=_TEMPERATURE.value,
                   num_samples=_NUM_SAMPLES.value, batch_size=_BATCH_SIZE.value,
                   sheet_rows=_SHEET_ROWS.value,
                   sampling=dict(top_k=_TOP_K.value, top_p=_TOP_P.value, seed=_SEED.value,
                                 guidance=_GUIDANCE.value,
                                 guidance_schedule=_GUIDANCE_SCHEDULE.value,
                                 scheme=_SCHEME.value, steps=_STEPS.value,
                                 token_schedule=_TOKEN_SCHEDULE.value,
                                 temperature_schedule=_TEMPERATURE_SCHEDULE.value,
                                 choice_temperature=_CHOICE_TEMPERATURE.value, **chain))
  except UserError as e:
    sys.exit(f"FATAL {e}")
  if failures:
    print(f"{len(failures)} input(s) failed:", *failures, sep="\n  ", file=sys.stderr)
    sys.exit(1)


def run(model: api.Model, source: str, output: Path, *, temperature: float | None,
        num_samples: int, batch_size: int, sheet_rows: int, sampling: dict) -> list[str]:
  """Predicts every input of `source`, writes the task's files and a contact sheet of
  `sheet_rows` images into `output`; returns the inputs that failed. `temperature` None is the
  task's default; `sampling` holds the other options of `api.Model.predict_batch`."""
  output.mkdir(parents=True, exist_ok=True)
  if model.multitask:
    return run_chain(model, source, output, batch_size=batch_size, sheet_rows=sheet_rows,
                     sampling=dict(sampling, temperature=temperature or 0.0))
  config, stage = model.config, model.stage
  predict = lambda batch, **kwargs: model.predict_batch(batch, **sampling, **kwargs)
  categories = panoptic_categories(config, stage.task, stage.oracle_config)
  failures: list[str] = []
  examples = read_inputs(source, model, failures)
  total = examples.total
  rows, done, start = [], 0, time.perf_counter()
  for batch_examples in batched(examples, batch_size):
    batch = pad_batch([e["model"] for e in batch_examples], batch_size)
    outputs = predict(batch, temperature=temperature, num_samples=num_samples)
    want_sheet = len(rows) < sheet_rows
    if want_sheet:
      greedy = predict(batch, temperature=0.0, num_samples=1)
      samples = predict(batch, temperature=1.0, num_samples=SHEET_SAMPLES)
    for i, example in enumerate(batch_examples):
      image, name = example["image"], example["name"]
      for k in range(num_samples):
        stem = output / (name if k == 0 else f"{name}_s{k}")
        stage.task.save(take(outputs, i, k), image, stem, categories)
      if want_sheet and len(rows) < sheet_rows:
        truth = example.get("labels")
        rows.append(([None if truth is None else stage.task.render_labels(truth, image)]
                     + [model_view(example["model"]["image"], image),
                        stage.task.render(take(greedy, i, 0), image)]
                     + [stage.task.render(take(samples, i, k), image)
                        for k in range(SHEET_SAMPLES)], name))
    done += len(batch_examples)
    show_progress(done, total, start)
  print(file=sys.stderr)
  if rows:
    titles = ["ground truth", "input", "T=0", *(f"T=1 #{k + 1}" for k in range(SHEET_SAMPLES))]
    sheet = visualize.contact_sheet([r for r, _ in rows], titles, [n[:16] for _, n in rows],
                                    cell_size=160)
    visualize.save_png(output / "contact_sheet.png", sheet)
  print(f"Wrote predictions for {done} image(s) to {output}", file=sys.stderr)
  return failures


def run_chain(model: api.Model, source: str, output: Path, *, batch_size: int,
              sheet_rows: int, sampling: dict) -> list[str]:
  """`run` for a multi-task model: every task of the chain (and every given one) writes its
  files as `<name>_<task>.*`; the contact sheet shows the input, then per task the ground
  truth (tfds inputs) and the chain's prediction."""
  stage = model.stage
  if sampling["given"] and ":" not in source:
    raise UserError("--given needs a tfds --input (the ground truth of the given tasks)")
  names = (*sampling["given"], *sampling["chain"])
  categories = {n: panoptic_categories(model.config, stage.tasks[n],
                                        stage.oracle_sections[n].model)
                for n in names}
  failures: list[str] = []
  examples = read_inputs(source, model, failures)
  rows, done, start = [], 0, time.perf_counter()
  for batch_examples in batched(examples, batch_size):
    batch = pad_batch([e["model"] for e in batch_examples], batch_size,
                      [f"labels_{n}" for n in sampling["given"]])
    outputs = model.predict_batch(batch, **sampling)
    for i, example in enumerate(batch_examples):
      image, name, cells = example["image"], example["name"], [
          model_view(example["model"]["image"], example["image"])]
      for n in names:
        task, out = stage.tasks[n], take(outputs, i, 0)
        task.save(out, image, output / f"{name}_{n}", categories[n])
        truth = example["model"].get(f"labels_{n}")
        cells += [None if truth is None else task.render_labels(truth, image),
                  task.render(out, image)]
      if len(rows) < sheet_rows:
        rows.append((cells, name))
    done += len(batch_examples)
    show_progress(done, examples.total, start)
  print(file=sys.stderr)
  if rows:
    titles = ["input", *(t for n in names for t in (f"{n}: truth", f"{n}: "
                                                   + ("given" if n in sampling["given"]
                                                      else "chain")))]
    sheet = visualize.contact_sheet([r for r, _ in rows], titles, [n[:16] for _, n in rows],
                                    cell_size=160)
    visualize.save_png(output / "contact_sheet.png", sheet)
  print(f"Wrote predictions for {done} image(s) to {output}", file=sys.stderr)
  return failures


def model_view(model_image: np.ndarray, image: np.ndarray) -> np.ndarray:
  """What the model sees (e.g. grayscale for colorization), back at the image's size."""
  pixels = np.round((model_image + 1) * 127.5).clip(0, 255).astype(np.uint8)
  height, width = image.shape[:2]
  return np.asarray(Image.fromarray(pixels).resize((width, height), Image.BILINEAR))


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


def read_inputs(source: str, model: api.Model, failures: list[str]) -> Inputs:
  """Files, a folder, or a tfds split; unreadable files are appended to `failures`."""
  from pp.builder import get_preprocess_fn

  config = model.config
  path = Path(source)
  if path.is_dir() or path.is_file():
    files = [path] if path.is_file() else sorted(
        p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
      raise app.UsageError(f"No images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {path}")
    return Inputs(_file_examples(files, model.preprocess, failures), len(files))
  if ":" not in source:
    raise app.UsageError(f"--input {source}: no such file or folder (a tfds split is written "
                         "`dataset:split`, e.g. toy_scenes/medium:train[:8])")
  colon = source.split("[", 1)[0].rindex(":")  # the split's slice may hold colons too
  dataset, split = source[:colon], source[colon + 1:]
  builder = input_pipeline.get_builder(dataset, config.data_dir)
  pp = get_preprocess_fn(config.pp_eval, config.pp_modules)
  total = input_pipeline.num_examples(builder, split, "--input")
  return Inputs(_tfds_examples(builder, split, pp), total)


def _file_examples(files: list[Path], preprocess, failures: list[str]) -> Iterator[dict]:
  for file in files:
    try:
      image = api.read_image(file)
    except Exception as e:  # any unreadable file is reported and skipped
      logging.error("Cannot read %s: %s", file, e)
      failures.append(f"{file}: {e}")
      continue
    yield {"name": file.stem, "image": image,
           "model": preprocess(image)}


def _tfds_examples(builder, split: str, pp) -> Iterator[dict]:
  import tensorflow as tf
  import tensorflow_datasets as tfds

  skip = {"image": tfds.decode.SkipDecoding()}
  for index, example in enumerate(builder.as_dataset(split=split, decoders=skip)):
    processed = _numpy(pp(dict(example)))
    image = tf.io.decode_image(example["image"], channels=3, expand_animations=False).numpy()
    yield {"name": f"{index:05d}", "image": image, "labels": processed.get("labels"),
           "model": processed}


def _numpy(example: dict) -> dict:
  return {k: np.asarray(v) for k, v in example.items()
          if np.asarray(v).dtype.kind in "biuf"}


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


def panoptic_categories(config, task, oracle_config) -> list[dict]:
  """The dataset's COCO categories when known, else ids 1..N for the N classes (none for
  other tasks)."""
  if task.__name__ != "uvim.tasks.panoptic":
    return []
  from uvim.panoptic_format import panoptic_categories as categories_of

  try:
    return categories_of(input_pipeline.get_builder(config.dataset, config.data_dir))
  except Exception as e:  # any reason: fall back to class indices
    logging.warning("No categories from %s (%s); category_id = class index + 1", config.dataset,
                    e)
    num_classes = oracle_config.inputs["semantics"][0] - 1
    return [{"id": k + 1, "name": f"class {k + 1}", "isthing": 1} for k in range(num_classes)]


def show_progress(done: int, total: int, start: float) -> None:
  rate = done / max(time.perf_counter() - start, 1e-9)
  eta = (total - done) / rate if rate else 0
  print(f"\r{done}/{total} images ({100 * done / max(total, 1):.0f}%), {rate:.1f} img/s, "
        f"ETA {int(eta) // 60}m{int(eta) % 60:02d}s", end="", file=sys.stderr, flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
