"""The `images` evaluator: a run's predictions as contact sheets in TensorBoard."""

import io

import jax
import numpy as np
import tensorflow as tf
from PIL import Image
from test_trainer import tiny_config

from evaluators.images import CELL_SIZE
from pp.builder import get_preprocess_fn
from uvim import checkpoint, input_pipeline, stages, trainer, visualize


def event_images(workdir, tag: str) -> dict[int, np.ndarray]:
  """{step: image} of the image summaries `tag` in a workdir's TensorBoard event files."""
  images = {}
  for path in sorted(workdir.glob("events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        if value.tag == tag:
          png = tf.make_ndarray(value.tensor)[2]  # [width, height, png bytes]
          images[event.step] = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
  return images


def cell(sheet: np.ndarray, row: int, column: int, pad: int = 4) -> np.ndarray:
  """Cell (row, column) of a contact sheet without row titles (its layout: visualize.py)."""
  x = pad + column * (CELL_SIZE + pad)
  y = visualize.TITLE_HEIGHT + pad + row * (CELL_SIZE + pad)
  return sheet[y:y + CELL_SIZE, x:x + CELL_SIZE]


def test_a_runs_tensorboard_shows_its_predictions_at_each_evaluation(toy_data_dir, tmp_path):
  config = tiny_config(toy_data_dir, total_steps=4, evals=[("images", "images")])
  config.images.split, config.images.log_steps = "validation[:3]", 2
  trainer.train_and_evaluate(config, tmp_path)
  sheets = event_images(tmp_path, "images/predictions")
  assert sorted(sheets) == [2, 4]
  assert sheets[4].shape == (visualize.TITLE_HEIGHT + 4 + 3 * (CELL_SIZE + 4), 4 + 3 * (
      CELL_SIZE + 4), 3)

  # The examples, and the final model's predictions of them, drawn independently.
  pp = get_preprocess_fn(config.pp_eval, config.pp_modules)
  builder = input_pipeline.get_builder(config.dataset, config.data_dir)
  examples = [{k: np.asarray(v) for k, v in pp(e).items()}
              for e in builder.as_dataset(split="validation[:3]")]
  stage = stages.StageI(config)
  predict = stage.eval_fns()["predict"]
  params = checkpoint.load_npz(tmp_path / "params.npz")
  batch = {k: np.stack([e[k] for e in examples]) for k in ("image", "labels")}
  outputs = jax.device_get(predict(params, batch))
  for row, example in enumerate(examples):
    image = np.round((example["image"] + 1) * 127.5).clip(0, 255).astype(np.uint8)
    enlarge = lambda x: np.repeat(np.repeat(x, CELL_SIZE // x.shape[0], 0),
                                  CELL_SIZE // x.shape[1], 1)
    np.testing.assert_array_equal(cell(sheets[4], row, 0), enlarge(image))
    np.testing.assert_array_equal(cell(sheets[4], row, 1),
                                  enlarge(stage.task.render_labels(example["labels"], image)))
    prediction = stage.task.render({k: v[row] for k, v in outputs.items()}, image)
    np.testing.assert_array_equal(cell(sheets[4], row, 2), enlarge(prediction))
