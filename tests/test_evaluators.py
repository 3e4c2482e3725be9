"""Evaluators: metrics against numpy, and `coco_panoptic` against the official panopticapi."""

import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import panoptic_stage1
from evaluators import colorization, common, depth, panoptic
from uvim import sharding
from uvim.datasets import coco_folder


def test_depth_metrics_match_numpy():
  rng = np.random.default_rng(0)
  gt = rng.uniform(0.5, 12, (3, 5, 7)).astype(np.float32)
  gt[0, 0] = 0.0  # missing
  pred = gt * rng.uniform(0.7, 1.4, gt.shape).astype(np.float32)
  ours = jax.device_get(depth.depth_metrics(jnp.asarray(pred), jnp.asarray(gt)))
  for b in range(3):
    valid = (gt[b] > 1e-3) & (gt[b] < 10)
    p, g = pred[b][valid].astype(np.float64), gt[b][valid].astype(np.float64)
    ratio = np.maximum(p / g, g / p)
    expected = {"rmse": np.sqrt(np.mean((p - g) ** 2)), "abs_rel": np.mean(np.abs(p - g) / g),
                "log10": np.mean(np.abs(np.log10(p) - np.log10(g))),
                **{f"delta{k}": np.mean(ratio < 1.25**k) for k in (1, 2, 3)}}
    for k, v in expected.items():
      np.testing.assert_allclose(ours[k][b], v, rtol=1e-5, err_msg=k)


def test_psnr_formula():
  target = np.zeros((2, 4, 4, 3), np.float32)
  pred = np.full_like(target, 0.1)
  pred[1] = 0.2
  np.testing.assert_allclose(colorization.psnr(pred, target),
                             [20 * np.log10(2) - 10 * np.log10(0.01),
                              20 * np.log10(2) - 10 * np.log10(0.04)], rtol=1e-5)


def test_unknown_evaluator_type_and_option_are_named():
  config = panoptic_stage1.get_config("smoke")
  config.evals = [("val", "validaton")]
  with pytest.raises(ValueError, match=r"Unknown evaluator type 'validaton'.*'validation'"):
    common.from_config(config, mesh=None, fns={})
  config.evals = [("val", "validation")]
  config.val.unlock()
  config.val.bogus = 1
  with pytest.raises(ValueError, match=r"config.val: unknown option\(s\) \['bogus'\]"):
    common.from_config(config, mesh=None, fns={})


def test_coco_panoptic_evaluator_agrees_with_panopticapi(toy_data_dir, tmp_path):
  from panopticapi.evaluation import pq_compute

  config = panoptic_stage1.get_config("smoke")
  config.dataset, config.data_dir = "toy_scenes/tiny", str(toy_data_dir)
  # The "model" predicts the (resized) labels themselves: PQ measures the 64 px round trip.
  fns = {"predict": lambda state, batch: {"semantics": batch["labels"][..., 0],
                                          "instances": batch["labels"][..., 1]}}
  options = dict(split="validation", pp=config.panoptic_val.pp, batch_size=8,
                 write_predictions=str(tmp_path / "pred"))
  mesh = sharding.make_mesh([("data", -1)])
  evaluator = panoptic.CocoPanoptic("panoptic_val", config, options, mesh=mesh, fns=fns)
  ours = evaluator.run(variables=None)
  assert 50 < ours["PQ"] < 100  # thin things lose pixels at 64 px

  builder = tfds.builder("toy_scenes/tiny", data_dir=toy_data_dir)
  gt_json = coco_folder.export_coco_panoptic(
      tfds.as_numpy(builder.as_dataset(split="validation")), tmp_path / "gt", "validation",
      coco_folder.categories_of(builder), "png")
  with contextlib.redirect_stdout(io.StringIO()):
    official = pq_compute(str(gt_json), str(tmp_path / "pred/panoptic_pred.json"),
                          str(tmp_path / "gt/panoptic_val2017"),
                          str(tmp_path / "pred/panoptic_pred"))
  for group, suffix in (("All", ""), ("Things", "_things"), ("Stuff", "_stuff")):
    for metric in ("pq", "sq", "rq"):
      assert abs(ours[f"{metric.upper()}{suffix}"] - 100 * official[group][metric]) < 1e-7
  cli = panoptic.score_folders(str(gt_json), str(tmp_path / "gt/panoptic_val2017"),
                               str(tmp_path / "pred/panoptic_pred.json"),
                               str(tmp_path / "pred/panoptic_pred"))
  assert abs(cli["All"]["pq"] - official["All"]["pq"]) < 1e-9


def test_save_predictions_writes_inputs_and_predictions(toy_data_dir, tmp_path):
  from evaluators import save_predictions

  config = panoptic_stage1.get_config("smoke")
  config.dataset, config.data_dir = "toy_scenes/tiny", str(toy_data_dir)
  fns = {"predict": lambda state, batch: {"instances": batch["labels"][..., 1] * 2}}
  options = dict(split="validation", pp=config.pp_eval, batch_size=24,
                 outfile=str(tmp_path / "out/pred.npz"))
  evaluator = save_predictions.SavePredictions("save", config, options,
                                               mesh=sharding.make_mesh([("data", -1)]), fns=fns)
  assert evaluator.run(None) == {"num_examples": 16.0}  # 16 examples, padding dropped
  saved = np.load(tmp_path / "out/pred.npz")
  assert sorted(saved.files) == ["image", "labels", "pred/instances"]
  np.testing.assert_array_equal(saved["pred/instances"], saved["labels"][..., 1] * 2)


def test_nyu_depth_evaluator_on_toy_scenes(toy_data_dir):
  from configs import depth_stage1

  config = depth_stage1.get_config("smoke")
  config.dataset, config.data_dir = "toy_scenes/tiny", str(toy_data_dir)
  mesh = sharding.make_mesh([("data", -1)])
  options = dict(split="validation", pp=config.nyu_depth_val.pp, batch_size=8)
  exact = {"predict": lambda state, batch: {"depth": batch["ground_truth"][..., 0]}}
  metrics = depth.NyuDepth("d", config, options, mesh=mesh, fns=exact).run(None)
  assert metrics["rmse"] < 1e-6 and metrics["delta1"] == 1.0
  # The 64 px labels, resized back: small errors at depth edges only.
  coarse = {"predict": lambda state, batch: {"depth": batch["labels"][..., 0]}}
  metrics = depth.NyuDepth("d", config, options, mesh=mesh, fns=coarse).run(None)
  assert 0 < metrics["rmse"] < 1.0 and metrics["delta1"] > 0.9
