"""Each task's labels -> inputs, loss and predictions on hand-made labels."""

import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from uvim.tasks import colorization, common, depth, get_task, panoptic


def model_config(**inputs):
  return mlc.ConfigDict(dict(input_size=(4, 4), patch_size=(2, 2), inputs=inputs))


def test_patchify_layout_and_round_trip():
  x = np.arange(2 * 4 * 4 * 3).reshape(2, 4, 4, 3)
  p = common.patchify(x, (2, 2))
  assert p.shape == (2, 4, 3, 4)
  # Token 1 is the top-right 2x2 patch; its pixels in raster order, per channel.
  np.testing.assert_array_equal(p[0, 1, 0], x[0, 0:2, 2:4, 0].ravel())
  np.testing.assert_array_equal(common.unpatchify(p, (2, 2), (2, 2)), x)


def test_panoptic_inputs_are_ids_per_patch_and_out_of_range_ids_are_counted():
  labels = np.zeros((1, 4, 4, 2), np.int32)
  labels[0, 0, 0] = (2, 1)
  labels[0, 3, 3] = (9, 7)   # class 9 >= 3 classes, instance 7 >= 4 slots
  labels[0, 1, 1, 1] = -1    # unlabelled instance pixel
  inputs, stats = panoptic.input_pp({"labels": labels}, model_config(semantics=(3, 4),
                                                                     instances=(4, 4)))
  np.testing.assert_array_equal(inputs["semantics"], [[[2, 0, 0, 0], [0] * 4, [0] * 4,
                                                       [0, 0, 0, 9]]])
  np.testing.assert_array_equal(inputs["instances"][0, :, [0, 3]].T,
                                [[1, -1], [0, 0], [0, 0], [0, 7]])
  assert int(stats["pixels_class_out_of_range"]) == 1
  assert int(stats["pixels_instance_out_of_range"]) == 1


def test_softmax_xent_of_ids_equals_one_hot_cross_entropy():
  """Against -sum(one_hot * log_softmax), where an id outside [0, C) is an all-zero target."""
  logits = np.random.default_rng(0).normal(size=(2, 3, 5, 4)).astype(np.float32) * 3
  ids = np.random.default_rng(1).integers(-1, 7, size=(2, 3, 4))
  one_hot = (ids[:, :, None, :] == np.arange(5)[:, None]).astype(np.float64)
  log_p = logits - np.log(np.exp(logits.astype(np.float64)).sum(-2, keepdims=True))
  np.testing.assert_allclose(common.softmax_xent(jnp.asarray(logits), jnp.asarray(ids)),
                             -(one_hot * log_p).sum(-2), rtol=1e-5, atol=1e-6)
  assert np.any((ids < 0) | (ids >= 5))


def confident(ids, num_classes, scale=50.0):
  """Logits (B, T, C, P) that put `scale` on each id's class."""
  return scale * (ids[:, :, None, :] == jnp.arange(num_classes)[:, None])


def test_panoptic_loss_is_cross_entropy():
  cfg = model_config(semantics=(3, 4), instances=(4, 4))
  labels = np.zeros((2, 4, 4, 2), np.int32)
  labels[1, ..., 0] = 2
  logits = {"semantics": jnp.zeros((2, 4, 3, 4)), "instances": jnp.zeros((2, 4, 4, 4))}
  loss, parts = panoptic.loss_fn(logits, {"labels": labels}, cfg)
  np.testing.assert_allclose(loss, [np.log(3) + np.log(4)] * 2, rtol=1e-6)
  inputs, _ = panoptic.input_pp({"labels": labels}, cfg)
  right = {k: confident(v, cfg.inputs[k][0]) for k, v in inputs.items()}
  loss, parts = panoptic.loss_fn(right, {"labels": labels}, cfg)
  np.testing.assert_allclose(loss, 0, atol=1e-6)
  assert set(parts) == {"loss_semantics", "loss_instances"}


def test_panoptic_prediction_gives_one_class_per_instance():
  cfg = model_config(semantics=(3, 4), instances=(2, 4))
  inst = np.zeros((1, 4, 4, 2), np.float32)
  inst[0, :, :2, 0] = 1   # left half: instance 0
  inst[0, :, 2:, 1] = 1   # right half: instance 1
  sem = np.zeros((1, 4, 4, 3), np.float32)
  sem[0, :, :2, 1] = 1.0  # left mostly class 1 ...
  sem[0, 0, 0] = (0, 0, 3.0)  # ... but one pixel strongly class 2 (loses in the sum: 8 vs 3)
  sem[0, :, 2:, 2] = 1.0
  logits = {"semantics": common.patchify(sem, (2, 2)),
            "instances": common.patchify(inst, (2, 2))}
  out = panoptic.predict_outputs(logits, cfg)
  np.testing.assert_array_equal(out["instances"][0], np.repeat([[0, 0, 1, 1]], 4, 0))
  np.testing.assert_array_equal(out["semantics"][0], np.repeat([[1, 1, 2, 2]], 4, 0))


def test_depth_bins_mask_and_prediction():
  assert list(depth.depth_to_bins(jnp.array([0.0, 1e-3, 5.0, 9.99, 20.0]), 256)) == [
      0, 0, int((5.0 - 1e-3) / (10 - 1e-3) * 256), 255, 255]
  np.testing.assert_allclose(depth.bins_to_depth(jnp.array([0, 255]), 256),
                             [1e-3 + 0.5 / 256 * (10 - 1e-3), 10 - 0.5 / 256 * (10 - 1e-3)],
                             rtol=1e-6)
  cfg = model_config(depth=(4, 4))
  labels = np.full((1, 4, 4, 1), 6.0, np.float32)
  labels[0, :2] = 0.0  # missing depth: top half
  inputs, _ = depth.input_pp({"labels": labels}, cfg)
  right = confident(inputs["depth"], 4)  # confident and right where depth is known
  wrong_on_missing = {"depth": right.at[:, :2].set(-right[:, :2])}
  loss, _ = depth.loss_fn(wrong_on_missing, {"labels": labels}, cfg)
  np.testing.assert_allclose(loss, 0, atol=1e-6)  # the missing half does not count
  pred = depth.predict_outputs(wrong_on_missing, cfg)["depth"]
  np.testing.assert_allclose(pred[0, 3], depth.bins_to_depth(jnp.array(2), 4), rtol=1e-6)


def test_colorization_mse_and_clipped_prediction():
  cfg = model_config(color=(3, 4))
  labels = np.full((1, 4, 4, 3), 0.5, np.float32)
  logits = {"color": jnp.full((1, 4, 3, 4), 1.5)}
  loss, _ = colorization.loss_fn(logits, {"labels": labels}, cfg)
  np.testing.assert_allclose(loss, [1.0], rtol=1e-6)
  np.testing.assert_array_equal(colorization.predict_outputs(logits, cfg)["color"], 1.0)


def test_task_registry():
  assert get_task("panoptic_segmentation") is panoptic
  with pytest.raises(ValueError, match="did you mean 'depth'"):
    get_task("dpeth")
