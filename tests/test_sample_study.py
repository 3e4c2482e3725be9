"""The sampling study: its diversity and colourfulness against hand-made cases, and its table
against the run's own evaluator and direct `predict_batch` calls."""

import csv

import numpy as np
import pytest

from uvim import api, input_pipeline
from uvim.tasks import colorization, panoptic
from uvim.tools import sample_study


def test_diversity_is_the_mean_pairwise_difference():
  a = {"semantics": np.array([[1, 1], [1, 1]])}
  b = {"semantics": np.array([[1, 1], [1, 2]])}  # 1 of 4 pixels differs from a
  c = {"semantics": np.array([[1, 1], [3, 3]])}  # 2 of 4 from a; 2 of 4 from b
  differ = panoptic.scoring([{"id": 1, "isthing": 0}]).difference
  assert sample_study.diversity([a, b, c], differ) == pytest.approx((0.25 + 0.5 + 0.5) / 3)
  assert sample_study.diversity([a], differ) == 0.0


def test_colourfulness_of_gray_and_of_pure_red():
  gray = np.full((4, 4, 3), 0.2)
  red = np.zeros((4, 4, 3))
  red[..., 0], red[..., 1:] = 1.0, -1.0  # 8-bit (255, 0, 0): rg 255, yb 127.5, no spread
  np.testing.assert_allclose(colorization.colourfulness(np.stack([gray, red])),
                             [0.0, 0.3 * np.hypot(255, 127.5)], atol=1e-9)


def test_the_settings_vary_one_axis_from_t1():
  assert sample_study.settings([0.5], [4], []) == [
      {"axis": "temperature", "temperature": 0.5, "top_k": 0, "top_p": 1.0},
      {"axis": "top_k", "temperature": 1.0, "top_k": 4, "top_p": 1.0}]


@pytest.mark.slow
def test_sample_study_rows_equal_the_evaluator_and_predict_batch(stage2_workdir, tmp_path):
  written = sample_study.run(str(stage2_workdir), "validation[:8]", tmp_path / "s",
                             temperatures=[0.0, 1.0], top_ks=[], top_ps=[0.5], samples=2)
  assert {p.name for p in written} == {"samples.csv", "samples.md", "samples_temperature.png",
                                       "samples_top_p.png"}
  table = list(csv.DictReader((tmp_path / "s" / "samples.csv").read_text().splitlines()))
  assert [(r["axis"], float(r["temperature"]), float(r["top_p"])) for r in table] == [
      ("temperature", 0.0, 1.0), ("temperature", 1.0, 1.0), ("top_p", 1.0, 0.5)]
  greedy = table[0]  # a causal model at T = 0: every sample the same code
  assert float(greedy["std"]) == 0 and float(greedy["diversity"]) == 0
  assert float(greedy["best_of_n"]) == float(greedy["model_pick"]) == float(greedy["mean"])

  # Sample 0 of a setting is what the run's evaluator scores with those options.
  model = api.load(str(stage2_workdir))
  config = model.config
  for row, options in ((table[1], {"temperature": 1.0}),
                       (table[2], {"temperature": 1.0, "top_p": 0.5})):
    predict = lambda v, b, options=options: {k: x[:, 0] for k, x in model.stage.predict_samples(
        v, b, **model.options(**options)).items()}
    evaluator = api.evaluator(config, "validation[:8]", api.evaluator_of(config),
                              {"predict": predict})
    assert float(row["sample_0"]) == pytest.approx(evaluator.run(model.variables)["PQ"],
                                                   abs=1e-9)
    # The diversity: the fraction of pixels whose class differs between the two samples.
    disagreement = []
    for batch in evaluator.batches():
      out = model.predict_batch(batch, **options, num_samples=2)
      for i in np.nonzero(input_pipeline.local_rows(batch["_mask"]))[0]:
        s0, s1 = out["semantics"][i]
        disagreement.append(sum(int(p != q) for p, q in zip(s0.ravel(), s1.ravel(),
                                                            strict=True)) / s0.size)
    assert float(row["diversity"]) == pytest.approx(np.mean(disagreement), abs=1e-9)
