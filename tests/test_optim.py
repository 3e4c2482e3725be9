"""The optimizer: big_vision's Adafactor variant against a direct numpy implementation."""

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from uvim import optim


def numpy_adafactor_steps(params, grads_seq, *, lr, wd, beta2_cap, total, warmup, clip,
                          mults):
  """Direct implementation of the documented update, one parameter at a time."""
  params = {k: v.astype(np.float64).copy() for k, v in params.items()}
  state = {k: {"row": None, "col": None, "v": None, "m": np.zeros_like(v)}
           for k, v in params.items()}
  for t, grads in enumerate(grads_seq):
    norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads.values()))
    factor = min(1.0, clip / norm)
    beta2 = min(beta2_cap, 1 - (t + 1) ** -0.8)
    progress = np.clip((t - warmup) / (total - warmup), 0, 1)
    sched = 0.5 * (1 + np.cos(np.pi * progress)) * min(1.0, t / warmup)
    for k, p in params.items():
      g = grads[k] * factor
      s = state[k]
      g2 = g * g + 1e-30
      if p.ndim == 2 and min(p.shape) >= 32:
        # Factor over rows (axis 1 mean) and columns (axis 0 mean) of a matrix.
        s["row"] = (beta2 * s["row"] if s["row"] is not None else 0) + (1 - beta2) * g2.mean(1)
        s["col"] = (beta2 * s["col"] if s["col"] is not None else 0) + (1 - beta2) * g2.mean(0)
        v_hat = np.outer(s["row"], s["col"]) / s["row"].mean()
      else:
        s["v"] = (beta2 * s["v"] if s["v"] is not None else 0) + (1 - beta2) * g2
        v_hat = s["v"]
      u = g / np.sqrt(v_hat)
      s["m"] = 0.9 * s["m"] + 0.1 * u
      decay = wd if k == "kernel" and mults[k] > 0 else 0.0
      params[k] = p - sched * (lr * mults[k] * s["m"] + decay * p)
  return params


def config(**kw):
  base = dict(optax_name="scale_by_adafactor", optax=dict(beta2_cap=0.95), lr=0.1, wd=0.01,
              schedule=dict(decay_type="cosine", warmup_steps=2), grad_clip_norm=1.0,
              lr_mults=[])
  return mlc.ConfigDict({**base, **kw})


@pytest.mark.parametrize("lr_mults", [[], [("bias", 0.5)], [("bias", 0.0)]])
def test_adafactor_chain_matches_numpy(lr_mults):
  rng = np.random.default_rng(0)
  params = {"kernel": rng.normal(size=(40, 48)).astype(np.float32),
            "bias": rng.normal(size=(48,)).astype(np.float32)}
  grads_seq = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
               for _ in range(6)]
  tx, _ = optim.make(config(lr_mults=lr_mults), params, total_steps=10)
  p = jax.tree.map(jnp.asarray, params)
  state = tx.init(p)
  for grads in grads_seq:
    updates, state = tx.update(jax.tree.map(jnp.asarray, grads), state, p)
    p = jax.tree.map(lambda a, b: a + b, p, updates)
  mults = {"kernel": 1.0, "bias": dict(lr_mults).get("bias", 1.0)}
  expected = numpy_adafactor_steps(params, grads_seq, lr=0.1, wd=0.01, beta2_cap=0.95,
                                   total=10, warmup=2, clip=1.0, mults=mults)
  # Momentum is kept in bf16, as in big_vision: agreement to bf16 precision.
  for k in params:
    np.testing.assert_allclose(p[k], expected[k], rtol=2e-2, atol=2e-3)
  if mults["bias"] == 0:
    np.testing.assert_array_equal(p["bias"], params["bias"])


def test_adafactor_with_fp32_momentum_matches_numpy_tightly():
  rng = np.random.default_rng(1)
  params = {"kernel": rng.normal(size=(32, 64)).astype(np.float32)}
  grads_seq = [{"kernel": rng.normal(size=(32, 64)).astype(np.float32)} for _ in range(5)]
  c = config(optax=dict(beta2_cap=0.95, momentum_dtype=jnp.float32), grad_clip_norm=100.0)
  tx, _ = optim.make(c, params, total_steps=10)
  p = jax.tree.map(jnp.asarray, params)
  state = tx.init(p)
  for grads in grads_seq:
    updates, state = tx.update(grads, state, p)
    p = jax.tree.map(lambda a, b: a + b, p, updates)
  expected = numpy_adafactor_steps(params, grads_seq, lr=0.1, wd=0.01, beta2_cap=0.95,
                                   total=10, warmup=2, clip=100.0, mults={"kernel": 1.0})
  np.testing.assert_allclose(p["kernel"], expected["kernel"], rtol=1e-5, atol=1e-6)


def test_schedules():
  cosine = optim.schedule_fn(100, "cosine", warmup_steps=10)
  np.testing.assert_allclose([cosine(0), cosine(5), cosine(10), cosine(55), cosine(100)],
                             [0, 0.5, 1, 0.5, 0], atol=1e-6)
  linear = optim.schedule_fn(100, "linear", warmup_steps=0, linear_end=0.1)
  np.testing.assert_allclose(linear(50), 0.55, atol=1e-6)
  rsqrt = optim.schedule_fn(100, "rsqrt", warmup_steps=0, timescale=10)
  np.testing.assert_allclose([rsqrt(5), rsqrt(40)], [1, 0.5], atol=1e-6)
  with pytest.raises(ValueError, match="Unknown schedule decay_type 'cosin'"):
    optim.schedule_fn(10, "cosin")


def test_plain_optax_names_and_unknown_names():
  params = {"kernel": jnp.ones((3, 3))}
  for name, kw in [("adam", {}), ("adamw", {"b1": 0.8}), ("sgd", {}), ("scale_by_lion", {})]:
    tx, _ = optim.make(config(optax_name=name, optax=kw), params, total_steps=10)
    updates, _ = tx.update({"kernel": jnp.ones((3, 3))}, tx.init(params), params)
    assert np.all(np.isfinite(updates["kernel"]))
  with pytest.raises(ValueError, match="Unknown optax_name 'adamm'"):
    optim.make(config(optax_name="adamm", optax={}), params, total_steps=10)


def test_lr_mults_match_the_first_regex_on_paths():
  params = {"encoder": {"a": {"kernel": 0}}, "decoder": {"kernel": 0}, "pos": 0}
  mults = optim.tree_of_mults(params, [("encoder/.*", 0.1), ("decoder/.*", 1.0), (".*", 0.5)])
  assert mults == {"encoder": {"a": {"kernel": 0.1}}, "decoder": {"kernel": 1.0}, "pos": 0.5}
