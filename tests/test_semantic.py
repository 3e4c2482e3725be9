"""The fourth task, semantic segmentation, added as one module (uvim/tasks/semantic.py) and its
configs: its loss, predictions and mIoU against brute-force loops, its evaluator on the real
input pipeline, its files, and its place in the multi-task config."""

import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest
from PIL import Image

from configs import multitask_stage2, semantic_stage1, semantic_stage2
from uvim import api, stages, tasks
from uvim.tasks import semantic


def brute_miou(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> float:
  """Mean IoU over classes 1..C-1 that occur, summing pixels over every image, void ignored."""
  ious = []
  for c in range(1, num_classes):
    inter = union = 0
    for p, t in zip(pred.ravel(), truth.ravel(), strict=True):
      if t == 0:
        continue  # a void pixel counts for no class
      inter += (p == c) and (t == c)
      union += (p == c) or (t == c)
    if union:
      ious.append(inter / union)
  return 100 * float(np.mean(ious))


def test_miou_equals_a_brute_force_loop():
  rng = np.random.default_rng(0)
  truth = rng.integers(0, 5, (3, 6, 7))
  pred = np.where(rng.uniform(size=truth.shape) < 0.6, truth, rng.integers(0, 5, truth.shape))
  inter, union = semantic.confusion(jnp.asarray(pred), jnp.asarray(truth), 5)
  ours = semantic.miou(np.asarray(inter).sum(0), np.asarray(union).sum(0))
  assert ours == pytest.approx(brute_miou(pred, truth, 5), abs=1e-4)
  assert semantic.miou(*(np.asarray(x).sum(0) for x in semantic.confusion(
      jnp.asarray(truth), jnp.asarray(truth), 5))) == pytest.approx(100)


def test_loss_and_prediction_of_the_classes():
  cfg = mlc.ConfigDict(dict(patch_size=(2, 2), input_size=(2, 4),
                            inputs={"semantics": (3, 4)}))
  labels = np.array([[[1], [1], [2], [0]], [[1], [1], [2], [2]]], np.int32)[None]
  inputs, stats = semantic.input_pp({"labels": labels}, cfg)
  assert int(stats["pixels_class_out_of_range"]) == 0
  right = 20.0 * np.moveaxis(np.eye(3)[np.asarray(inputs["semantics"])], -1, -2)
  loss, _ = semantic.loss_fn({"semantics": jnp.asarray(right)}, {"labels": labels}, cfg)
  assert float(loss[0]) < 1e-6
  uniform, _ = semantic.loss_fn({"semantics": jnp.zeros((1, 2, 3, 4))}, {"labels": labels}, cfg)
  np.testing.assert_allclose(uniform, [np.log(3)], rtol=1e-6)
  out = semantic.predict_outputs({"semantics": jnp.asarray(right)}, cfg)["semantics"]
  np.testing.assert_array_equal(out[0], labels[0, ..., 0])


def test_the_task_is_found_by_name_and_checked():
  assert tasks.get_task("semantic_segmentation") is semantic
  broken = type(semantic)("broken")
  broken.NAME = "broken"
  with pytest.raises(TypeError, match=r"broken defines NAME but not \['LABELS'"):
    tasks.check_task(broken)


def test_the_miou_evaluator_on_the_toy_scenes_equals_brute_force(toy_data_dir):
  """The evaluator over the real pipeline (padding rows masked) scoring the truth with class 1
  written over every pixel of the image's top rows: the same mIoU as a loop over the labels."""
  config = semantic_stage1.get_config("smoke")
  config.dataset, config.data_dir, config.batch_size = "toy_scenes/tiny", str(toy_data_dir), 8
  wrong = lambda labels: jnp.asarray(labels).at[:, :20].set(1)
  predict = lambda v, batch: {"semantics": wrong(batch["labels"][..., 0])}
  ours = api.evaluate(config, predict, {}, "validation[:12]", "semantic_val")
  _, batch = api.examples(config, "validation[:12]")
  truth = batch["labels"][..., 0]
  assert len(truth) == 12  # 2 batches of 8, the last padded
  assert ours["miou"] == pytest.approx(brute_miou(np.asarray(wrong(truth)), truth, 9), abs=1e-3)
  labelled = truth > 0
  assert ours["pixel_accuracy"] == pytest.approx(
      100 * np.mean(np.asarray(wrong(truth))[labelled] == truth[labelled]), abs=1e-3)


def test_save_writes_the_classes_at_the_image_size(tmp_path):
  image = np.zeros((30, 20, 3), np.uint8)
  semantics = np.array([[1, 2], [3, 0]], np.int32)
  semantic.save({"semantics": semantics}, image, tmp_path / "x.001" / "semantic", None)
  written = np.asarray(Image.open(tmp_path / "x.001" / "semantic.png"))
  assert written.shape == (30, 20)
  np.testing.assert_array_equal(written[::15, ::10], semantics)
  assert (tmp_path / "x.001" / "semantic_overlay.png").exists()


def test_the_multitask_config_takes_the_task_from_its_module():
  config = multitask_stage2.get_config("smoke,tasks=panoptic+semantic")
  assert dict(config.evals)["semantic_val"] == "miou"
  assert config.oracles.semantic.task == "semantic_segmentation"
  assert 'copy("semantics", "labels_semantic")' in config.pp_train
  stage = stages.StageII(config)
  assert stage.names == ("panoptic", "semantic") and stage.model.num_tasks == 2
  assert "semantic" not in multitask_stage2.DEFAULT_TASKS  # the README's model keeps its three
  assert semantic_stage2.get_config("smoke").oracle.task == "semantic_segmentation"
