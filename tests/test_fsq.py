"""Finite scalar quantization: the grid, index <-> code conversion, straight-through gradients,
the stage I model with `quantizer='fsq'`, and a stage II trained on an FSQ oracle."""

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_stage2 import stage2_config
from test_trainer import tiny_config

from uvim import trainer
from uvim.models import fsq, vqvae

LEVELS = (8, 5, 4)


def test_quantised_values_lie_on_the_level_grid_and_reach_every_level():
  z = jax.random.normal(jax.random.key(0), (20000, 3)) * 3
  codes, indices = fsq.quantize(z, LEVELS)
  for i, level in enumerate(LEVELS):
    half = level // 2
    digits = np.asarray(codes[:, i]) * half + half  # the level index, 0..L-1
    np.testing.assert_allclose(digits, np.round(digits), atol=1e-5)
    assert set(np.round(digits).astype(int)) == set(range(level))
  assert (np.asarray(indices) >= 0).all() and (np.asarray(indices) < np.prod(LEVELS)).all()


def test_index_and_code_round_trip_for_every_index():
  n = fsq.codebook_size(LEVELS)
  codes = fsq.indices_to_codes(jnp.arange(n), LEVELS)
  np.testing.assert_array_equal(fsq.codes_to_indices(codes, LEVELS), np.arange(n))
  assert len({tuple(c) for c in np.asarray(codes).round(6)}) == n  # n distinct grid points
  # Mixed radix, first level fastest: the brute-force enumeration of the grid.
  grid = [tuple((d - lv // 2) / (lv // 2) for d, lv in zip(digits[::-1], LEVELS, strict=True))
          for digits in itertools.product(*(range(lv) for lv in LEVELS[::-1]))]
  np.testing.assert_allclose(codes, np.array(grid), atol=1e-6)
  # quantize's indices are those of its codes.
  z = jax.random.normal(jax.random.key(1), (500, 3)) * 2
  q, idx = fsq.quantize(z, LEVELS)
  np.testing.assert_array_equal(idx, fsq.codes_to_indices(q, LEVELS))
  np.testing.assert_allclose(fsq.indices_to_codes(idx, LEVELS), q, atol=1e-6)


def test_gradients_pass_straight_through_the_rounding():
  z = jax.random.normal(jax.random.key(2), (7, 3))
  w = jax.random.normal(jax.random.key(3), (7, 3))
  half = jnp.asarray([lv // 2 for lv in LEVELS], jnp.float32)
  got = jax.grad(lambda z: jnp.sum(fsq.quantize(z, LEVELS)[0] * w))(z)
  want = jax.grad(lambda z: jnp.sum(fsq.bound(z, LEVELS) / half * w))(z)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert np.abs(np.asarray(got)).min() > 0


def test_the_bound_is_centred_for_even_and_odd_levels():
  # arctanh shift: z = 0 lands on the grid point 0 and the extremes reach the outermost levels,
  # -L/2 and L/2 - 1 for even L.
  for level in (4, 5, 6, 7, 8):
    assert float(fsq.bound(jnp.zeros(1), (level,))[0]) == pytest.approx(0, abs=1e-6)
    low, high = np.asarray(fsq.bound(jnp.array([[-20.0], [20.0]]), (level,)))[:, 0]
    assert (round(low), round(high)) == ((-(level // 2), level // 2 - 1) if level % 2 == 0
                                          else (-(level // 2), level // 2))
  # The public notebook's `tan` shift is off centre by 4e-4 for L = 4: the test can tell.
  half_l = 3 * (1 - fsq.EPS) / 2  # L = 4
  assert abs(np.tanh(np.tan(0.5 / half_l)) * half_l - 0.5) > 1e-4  # ours: < 1e-6


def test_codebook_usage_on_a_batch_equals_a_numpy_count():
  z = jax.random.normal(jax.random.key(4), (64, 16, 3)) * 0.7
  _, code = fsq.quantize(z, LEVELS)
  stats = vqvae.codebook_stats(code, fsq.codebook_size(LEVELS))
  counts = np.bincount(np.asarray(code).ravel(), minlength=fsq.codebook_size(LEVELS))
  p = counts / counts.sum()
  assert float(stats["codebook_usage"]) == pytest.approx(np.mean(counts > 0))
  assert float(stats["codebook_perplexity"]) == pytest.approx(
      np.exp(-np.sum(p[p > 0] * np.log(p[p > 0]))), rel=1e-5)


def fsq_model(**kw):
  shape = (5, 16)
  return vqvae.Model(inputs={"semantics": shape}, outputs={"semantics": shape},
                     input_size=(16, 16), patch_size=(4, 4), code_len=4, width=16,
                     oracle_depth=1, base_model_depth=1, mlp_dim=32, num_heads=2,
                     quantizer="fsq", fsq_levels=LEVELS, dict_size=160, **kw)


def test_an_fsq_stage1_model_has_no_state_and_decodes_indices_like_vectors():
  model = fsq_model()
  x = {"semantics": jax.nn.one_hot(jax.random.randint(jax.random.key(0), (2, 16, 16), 0, 5), 5,
                                   axis=2)}
  ctx = jnp.zeros((2, 16, 16, 3))
  variables = model.init({"params": jax.random.key(1)}, x, ctx=ctx)
  assert set(variables) == {"params"}
  quantized, aux = model.apply(variables, x, ctx=ctx, method=model.encode)
  assert quantized.shape == (2, 4, 3)
  from_vectors, _ = model.apply(variables, quantized, ctx=ctx, method=model.decode)
  from_ints, _ = model.apply(variables, aux["code"], ctx=ctx, discrete_input=True,
                             method=model.decode)
  np.testing.assert_allclose(from_ints["semantics"], from_vectors["semantics"], atol=1e-6)
  mismatched = fsq_model().clone(dict_size=100)
  with pytest.raises(ValueError, match=r"dict_size \(100\) must be the product of fsq_levels"):
    mismatched.init({"params": jax.random.key(1)}, x, ctx=ctx)


@pytest.mark.slow
def test_stage2_trains_on_an_fsq_oracle(toy_data_dir, tmp_path):
  fsq_options = dict(quantizer="fsq", fsq_levels=(4, 4), dict_size=16)
  stage1 = tiny_config(toy_data_dir, total_steps=4, evals=[])
  stage1.model.update(fsq_options)
  trainer.train_and_evaluate(stage1, tmp_path / "s1")
  config = stage2_config(toy_data_dir, tmp_path / "s1")
  config.oracle.model.update(fsq_options)
  trainer.train_and_evaluate(config, tmp_path / "s2")
  lines = [json.loads(x) for x in (tmp_path / "s2/metrics.jsonl").read_text().splitlines()]
  final = {k: v for x in lines if x["step"] == 4 for k, v in x.items()}
  assert {"coco_panoptic/PQ", "oracle_codebook_usage", "token_accuracy"} <= set(final)
  assert 0 < final["oracle_codebook_usage"] <= 1
