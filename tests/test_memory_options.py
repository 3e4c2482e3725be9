"""Memory and speed options of the models: `remat` (rematerialised blocks), `dtype` and
`attention` (fused)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uvim import decoding
from uvim.models import lm, vqvae

REMAT = re.compile(r"\b(remat\w*|checkpoint)\[")
FUSED = re.compile(r"name=_?dot_product_attention")


def stage1_model(**kw):
  """A small stage I model and a batch (x, ctx, labels)."""
  model = vqvae.Model(inputs={"semantics": (5, 16)}, outputs={"semantics": (5, 16)},
                      input_size=(16, 16), patch_size=(4, 4), code_len=4, width=32,
                      oracle_depth=1, base_model_depth=2, num_heads=2, mlp_dim=64, dict_size=8,
                      codeword_dim=8, dropout=0.1, head_zeroinit=False, **kw)
  labels = jax.random.randint(jax.random.key(0), (2, 16, 16), 0, 5)
  x = {"semantics": jax.nn.one_hot(labels, 5, axis=2)}  # (B, tokens, C, patch^2)
  ctx = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  return model, x, ctx, labels


def stage1(**kw):
  """A small stage I model, its (non-zero-head) parameters and state, and a batch."""
  model, x, ctx, labels = stage1_model(**kw)
  variables = jax.jit(model.clone(remat=False, dtype="float32").init)(
      {"params": jax.random.key(2), "state": jax.random.key(3)}, x, ctx=ctx)
  return model, variables, x, ctx, labels


def stage1_loss(model, params, state, x, ctx, labels):
  """Training loss (cross-entropy over the channels) and the updated dictionary state."""
  (logits, _), new = model.apply(
      {"params": params, "state": state}, x, ctx=ctx, train=True, mutable=["state"],
      rngs={"vqvae": jax.random.key(4), "dropout": jax.random.key(5)})
  logp = jax.nn.log_softmax(logits["semantics"], axis=2)
  return -jnp.mean(jnp.take_along_axis(logp, labels[:, :, None], axis=2)), new["state"]


def stage2_model(**kw):
  """A small stage II model (as tests/test_decoding.py) and a batch (images, targets)."""
  model = lm.Model(patches={"size": (8, 8)}, num_heads=2, num_layers=2, mlp_dim=32, emb_dim=16,
                   vocab_size=11, seq_len=7, input_size=(16, 16), dropout_rate=0.1, **kw)
  images = jax.random.normal(jax.random.key(0), (3, 16, 16, 3))
  targets = jax.random.randint(jax.random.key(1), (3, 7), 1, 11)
  return model, images, targets


def stage2(**kw):
  """A small stage II model, random logits head, and a batch."""
  model, images, targets = stage2_model(**kw)
  params = jax.jit(model.clone(remat=False, dtype="float32").init)(
      jax.random.key(2), images, targets)["params"]
  params["decoder"]["LogitsDense"]["kernel"] = 2 * jax.random.normal(jax.random.key(3), (16, 11))
  return model, params, images, targets


def stage2_loss(model, params, images, targets):
  logits = model.apply({"params": params}, images, targets, train=True,
                       rngs={"dropout": jax.random.key(4)})
  logp = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1))


def loss_and_grad(stage, **kw):
  """(loss, grads, new state or None, jaxpr of the gradient) of a stage's training loss."""
  if stage == 1:
    model, variables, x, ctx, labels = stage1(**kw)
    fn = lambda p: stage1_loss(model, p, variables["state"], x, ctx, labels)
    params = variables["params"]
    (loss, state), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(params)
  else:
    model, params, images, targets = stage2(**kw)
    fn = lambda p: stage2_loss(model, p, images, targets)
    (loss, grads), state = jax.jit(jax.value_and_grad(fn))(params), None
  return loss, grads, state, str(jax.make_jaxpr(jax.grad(fn, has_aux=stage == 1))(params))


def assert_same_gradients(actual, expected, rtol: float) -> None:
  """Same parameter paths and gradients, most of them non-zero (the comparison is not between
  zeros)."""
  flat, flat_a = jax.tree.leaves_with_path(expected), jax.tree.leaves_with_path(actual)
  assert [p for p, _ in flat] == [p for p, _ in flat_a]
  for (path, g), (_, g_a) in zip(flat, flat_a, strict=True):
    np.testing.assert_allclose(g_a, g, rtol=rtol, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  nonzero = [float(jnp.abs(g).max()) > 0 for _, g in flat]
  assert sum(nonzero) > 0.9 * len(nonzero)


def shapes(variables):
  return jax.tree.map(lambda v: (v.shape, v.dtype), variables)


@pytest.mark.parametrize("stage", [1, 2])
def test_options_keep_parameter_names_shapes_and_float32(stage):
  def init(**kw):  # traced, not run: only the shapes and dtypes matter
    if stage == 1:
      model, x, ctx, _ = stage1_model(**kw)
      return jax.eval_shape(lambda: model.init(
          {"params": jax.random.key(0), "state": jax.random.key(1)}, x, ctx=ctx))
    model, images, targets = stage2_model(**kw)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), images, targets))

  expected = shapes(init())
  assert all(d == jnp.float32 for _, d in jax.tree.leaves(expected, is_leaf=lambda v: (
      isinstance(v, tuple))))
  assert shapes(init(remat=True)) == expected
  assert shapes(init(dtype="bfloat16")) == expected
  assert shapes(init(remat=True, dtype="bfloat16")) == expected


@pytest.mark.parametrize("stage", [1, 2])
def test_remat_gives_the_same_loss_and_gradients(stage):
  loss, grads, state, jaxpr = loss_and_grad(stage)
  loss_r, grads_r, state_r, jaxpr_r = loss_and_grad(stage, remat=True)
  np.testing.assert_allclose(loss_r, loss, rtol=1e-6, atol=1e-6)
  assert_same_gradients(grads_r, grads, rtol=1e-6)
  if state is not None:
    for k in ("counts", "dictionary"):
      np.testing.assert_allclose(state_r[k], state[k], rtol=1e-6, atol=1e-6)
  # Rematerialisation is really there: one remat per transformer block, and none without it.
  assert not REMAT.search(jaxpr)
  num_blocks = 1 + 2 if stage == 1 else 2 + 2
  assert len(REMAT.findall(jaxpr_r)) == num_blocks


def dot_general_lines(jaxpr: str) -> list[str]:
  return [line for line in jaxpr.splitlines() if "dot_general[" in line]


def test_bfloat16_stage2_is_close_to_float32_with_float32_logits():
  model, params, images, targets = stage2()
  model16 = model.clone(dtype="bfloat16")
  logits = model.apply({"params": params}, images, targets)
  logits16 = model16.apply({"params": params}, images, targets)
  assert logits.dtype == logits16.dtype == jnp.float32
  # The residual stream (each block's output) is in the compute dtype.
  _, captured = model16.apply({"params": params}, images, targets, capture_intermediates=True,
                              mutable=["intermediates"])
  blocks = {**captured["intermediates"]["encoder"], **captured["intermediates"]["decoder"]}
  outputs = [v["__call__"][0] for k, v in blocks.items() if "block" in k.lower()]
  assert len(outputs) == 2 + 2 and all(o.dtype == jnp.bfloat16 for o in outputs)
  scale = float(jnp.abs(logits).max())
  assert scale > 1.0
  error = float(jnp.abs(logits16 - logits).max())
  assert 0 < error < 2e-2 * scale  # bf16 changes the numbers, but only a little
  jaxpr16 = str(jax.make_jaxpr(lambda p: model16.apply({"params": p}, images, targets))(params))
  jaxpr32 = str(jax.make_jaxpr(lambda p: model.apply({"params": p}, images, targets))(params))
  assert dot_general_lines(jaxpr16) and all("bf16" in ln for ln in dot_general_lines(jaxpr16))
  assert dot_general_lines(jaxpr32) and "bf16" not in jaxpr32
  # lm.Attention's softmax runs in float32: the exps over (B, H, L = 7, S) are float32.
  exps = [ln for ln in jaxpr16.splitlines() if "= exp " in ln and "[3,2,7," in ln]
  assert len(exps) == 2 * 2 and all("f32[" in ln for ln in exps)


def test_bfloat16_stage1_is_close_to_float32_and_keeps_the_dictionary_float32():
  model, variables, x, ctx, _ = stage1()
  model16 = model.clone(dtype="bfloat16")
  _, aux = model.apply(variables, x, ctx=ctx)
  _, aux16 = model16.apply(variables, x, ctx=ctx)
  for k in ("bottleneck", "bottleneck_q"):
    assert aux16[k].dtype == jnp.float32
  np.testing.assert_allclose(aux16["bottleneck"], aux["bottleneck"], atol=0.05)
  (logits16, _), new16 = model16.apply(variables, x, ctx=ctx, train=True, mutable=["state"],
                                       rngs={"vqvae": jax.random.key(0),
                                             "dropout": jax.random.key(1)})
  assert logits16["semantics"].dtype == jnp.float32
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(new16))
  logits, _ = model.apply(variables, aux16["bottleneck_q"], ctx=ctx, method=model.decode)
  logits16, _ = model16.apply(variables, aux16["bottleneck_q"], ctx=ctx, method=model16.decode)
  scale = float(jnp.abs(logits["semantics"]).max())
  error = float(jnp.abs(logits16["semantics"] - logits["semantics"]).max())
  assert 0 < error < 2e-2 * scale
  fwd = lambda m: str(jax.make_jaxpr(lambda v: m.apply(v, x, ctx=ctx))(variables))
  jaxpr16, jaxpr32 = fwd(model16), fwd(model)
  assert any("bf16" in ln for ln in dot_general_lines(jaxpr16))
  assert dot_general_lines(jaxpr32) and "bf16" not in jaxpr32
  # The quantiser's distances to the (float32) dictionary are float32 matmuls.
  dict_size = model.dict_size
  assert any(f"f32[2,4,{dict_size}] = dot_general" in ln for ln in dot_general_lines(jaxpr16))


def test_cached_decoding_with_remat_and_bfloat16():
  model, params, images, _ = stage2()
  keys = jax.random.split(jax.random.key(0), 3)
  sample = lambda m, cached: jax.jit(lambda p, i, k: decoding.sample(m, p, i, k, cached=cached))(
      params, images, keys)
  remat = model.clone(remat=True)
  tokens, logprob = sample(model, True)
  for cached in (True, False):
    tokens_r, logprob_r = sample(remat, cached)
    np.testing.assert_array_equal(tokens_r, tokens)
    np.testing.assert_allclose(logprob_r, logprob, rtol=1e-5)
  assert len(np.unique(tokens)) > 2
  model16 = model.clone(dtype="bfloat16")
  tokens16, logprob16 = sample(model16, True)
  assert tokens16.shape == tokens.shape and logprob16.dtype == jnp.float32
  assert np.all((np.asarray(tokens16) >= 1) & (np.asarray(tokens16) < model.vocab_size))
  assert np.all(np.isfinite(logprob16)) and np.all(np.asarray(logprob16) <= 0)
  sampled16, _ = jax.jit(lambda p, i, k: decoding.sample(
      model16, p, i, k, temperature=1.0, num_samples=4))(params, images, keys)
  assert np.all((np.asarray(sampled16) >= 1) & (np.asarray(sampled16) < model.vocab_size))


@pytest.mark.parametrize("stage", [1, 2])
def test_fused_attention_gives_the_same_loss_and_gradients(stage):
  loss, grads, state, jaxpr = loss_and_grad(stage)
  loss_f, grads_f, state_f, jaxpr_f = loss_and_grad(stage, attention="fused")
  np.testing.assert_allclose(loss_f, loss, rtol=1e-5, atol=1e-6)
  assert_same_gradients(grads_f, grads, rtol=1e-4)
  if state is not None:
    np.testing.assert_allclose(state_f["dictionary"], state["dictionary"], rtol=1e-5, atol=1e-6)
  # jax.nn.dot_product_attention is really called: in every ViT block (stage II's decoder, with
  # attention dropout, keeps the einsums when training).
  assert not FUSED.search(jaxpr)
  assert len(FUSED.findall(jaxpr_f)) >= (3 if stage == 1 else 2)


def test_fused_attention_in_the_decoder_and_cached_decoding():
  model, params, images, targets = stage2()
  fused = model.clone(attention="fused")
  logits = model.apply({"params": params}, images, targets)
  np.testing.assert_allclose(fused.apply({"params": params}, images, targets), logits,
                             rtol=1e-5, atol=1e-5)
  keys = jax.random.split(jax.random.key(0), 3)
  for temperature in (0.0, 1.0):
    sample = lambda m, t=temperature: jax.jit(lambda p, i, k: decoding.sample(
        m, p, i, k, temperature=t, num_samples=2))(params, images, keys)
    (tokens, logprob), (tokens_f, logprob_f) = sample(model), sample(fused)
    assert len(np.unique(tokens)) > 2
    np.testing.assert_array_equal(tokens_f, tokens)
    np.testing.assert_allclose(logprob_f, logprob, rtol=1e-5)
  with pytest.raises(ValueError, match="attention must be one of"):
    model.clone(attention="flash").apply({"params": params}, images, targets)
