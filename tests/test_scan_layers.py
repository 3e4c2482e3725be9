"""`scan_layers`: scanned transformer blocks against the unscanned ones, and the conversion of
parameters between the two layouts (`checkpoint.scan_to_unscanned` / `unscanned_to_scan`)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uvim import checkpoint, decoding
from uvim.models import lm, vqvae

SCAN = re.compile(r"\bscan\[")
REMAT = re.compile(r"\b(remat\w*|checkpoint)\[")
ORACLE_DEPTH, BASE_MODEL_DEPTH, NUM_LAYERS = 2, 3, 3


def stage1(**kw):
  """A small stage I model (two transformers of different depths), without dropout so that the
  scanned and unscanned models compute the same function, and a batch."""
  model = vqvae.Model(inputs={"semantics": (5, 16)}, outputs={"semantics": (5, 16)},
                      input_size=(16, 16), patch_size=(4, 4), code_len=4, width=32,
                      oracle_depth=ORACLE_DEPTH, base_model_depth=BASE_MODEL_DEPTH, num_heads=2,
                      mlp_dim=64, dict_size=8, codeword_dim=8, head_zeroinit=False, **kw)
  labels = jax.random.randint(jax.random.key(0), (2, 16, 16), 0, 5)
  x = {"semantics": jax.nn.one_hot(labels, 5, axis=2)}
  ctx = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  return model, x, ctx, labels


def stage2(**kw):
  """A small stage II model and a batch."""
  model = lm.Model(patches={"size": (8, 8)}, num_heads=2, num_layers=NUM_LAYERS, mlp_dim=32,
                   emb_dim=16, vocab_size=11, seq_len=7, input_size=(16, 16), **kw)
  images = jax.random.normal(jax.random.key(0), (3, 16, 16, 3))
  targets = jax.random.randint(jax.random.key(1), (3, 7), 1, 11)
  return model, images, targets


def init(stage, **kw):
  """The model's own variables ({'params'} and, in stage I, {'state'})."""
  if stage == 1:  # jitted: one compilation, not one per operation
    model, x, ctx, _ = stage1(**kw)
    return jax.jit(model.init)({"params": jax.random.key(2), "state": jax.random.key(3)}, x,
                               ctx=ctx)
  model, images, targets = stage2(**kw)
  variables = jax.jit(model.init)(jax.random.key(2), images, targets)
  variables["params"]["decoder"]["LogitsDense"]["kernel"] = 2 * jax.random.normal(
      jax.random.key(3), (16, 11))  # Not the zero init, so that every gradient is non-zero.
  return variables


def loss_fn(stage, **kw):
  """(params, state) -> training loss of the stage's model with these options."""
  if stage == 1:
    model, x, ctx, labels = stage1(**kw)

    def fn(params, state):
      (logits, _), _ = model.apply(
          {"params": params, "state": state}, x, ctx=ctx, train=True, mutable=["state"],
          rngs={"vqvae": jax.random.key(4), "dropout": jax.random.key(5)})
      logp = jax.nn.log_softmax(logits["semantics"], axis=2)
      return -jnp.mean(jnp.take_along_axis(logp, labels[:, :, None], axis=2))
  else:
    model, images, targets = stage2(**kw)

    def fn(params, state):
      del state
      logits = model.apply({"params": params}, images, targets, train=True,
                           rngs={"dropout": jax.random.key(4)})
      logp = jax.nn.log_softmax(logits)
      return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1))
  return fn


def shapes(tree):
  return jax.tree.map(lambda v: (tuple(v.shape), v.dtype), tree)


def transformers(stage, params):
  """{name: (module params, depth)} of the stage's modules with scanned blocks."""
  if stage == 1:
    return {"encoder": (params["encoder"], ORACLE_DEPTH),
            "decoder": (params["decoder"], BASE_MODEL_DEPTH)}
  return {"encoder": (params["encoder"], NUM_LAYERS), "decoder": (params["decoder"], NUM_LAYERS)}


def blocks(stage, name):
  """(scanned, first unscanned) block names of a module: big_vision's ViT or stage II decoder."""
  return ("EncDecBlock", "EncDecBlock0") if stage == 2 and name == "decoder" else (
      "encoderblock", "encoderblock_0")


@pytest.mark.parametrize("stage", [1, 2])
def test_scanned_init_stacks_the_blocks_and_converts_to_the_unscanned_names(stage):
  plain, scanned = init(stage)["params"], init(stage, scan_layers=True)["params"]
  for name, (tree, depth) in transformers(stage, scanned).items():
    stacked_name, first = blocks(stage, name)
    plain_tree = transformers(stage, plain)[name][0]
    others = {k for k in plain_tree if not re.fullmatch(re.escape(first[:-1]) + r"\d+", k)}
    assert set(tree) == others | {stacked_name}, name
    block = plain_tree[first]
    assert jax.tree.structure(tree[stacked_name]) == jax.tree.structure(block)
    for stacked, one in zip(jax.tree.leaves(tree[stacked_name]), jax.tree.leaves(block),
                            strict=True):
      assert stacked.shape == (depth, *one.shape)
    # Each layer is initialised with its own rng.
    kernel = tree[stacked_name]["MLP" if stacked_name == "EncDecBlock" else "MlpBlock_0"][
        "Dense_0"]["kernel"]
    assert not np.allclose(kernel[0], kernel[1])
  assert shapes(checkpoint.scan_to_unscanned(scanned)) == shapes(plain)


@pytest.mark.parametrize("stage", [1, 2])
def test_round_trips_are_exact(stage):
  plain = jax.tree.map(np.asarray, init(stage)["params"])
  scanned = checkpoint.unscanned_to_scan(plain)
  assert "encoderblock_0" not in scanned["encoder"]
  assert scanned["encoder"]["encoderblock"]["LayerNorm_0"]["scale"].shape[0] == (
      ORACLE_DEPTH if stage == 1 else NUM_LAYERS)
  assert all(isinstance(v, np.ndarray) for v in jax.tree.leaves(scanned))  # stays on the host
  if stage == 2:
    assert "EncDecBlock0" not in scanned["decoder"]
    np.testing.assert_array_equal(
        scanned["decoder"]["EncDecBlock"]["SelfAttn"]["query"]["kernel"][2],
        plain["decoder"]["EncDecBlock2"]["SelfAttn"]["query"]["kernel"])
  back = checkpoint.scan_to_unscanned(scanned)
  assert jax.tree.structure(back) == jax.tree.structure(plain)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(plain), strict=True):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  # Block i of the stack is block i of the unscanned layout.
  layer = scanned["encoder"]["encoderblock"]["MlpBlock_0"]["Dense_1"]["kernel"]
  np.testing.assert_array_equal(layer[1], plain["encoder"]["encoderblock_1"]["MlpBlock_0"][
      "Dense_1"]["kernel"])
  scanned_init = init(stage, scan_layers=True)["params"]
  again = checkpoint.unscanned_to_scan(checkpoint.scan_to_unscanned(scanned_init))
  assert jax.tree.structure(again) == jax.tree.structure(scanned_init)
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(scanned_init), strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("remat", [False, True])
def test_scanned_model_gives_the_same_loss_and_gradients(stage, remat):
  variables = init(stage)
  params, state = variables["params"], variables.get("state")
  loss, grads = jax.jit(jax.value_and_grad(loss_fn(stage)))(params, state)
  scanned_fn = loss_fn(stage, scan_layers=True, remat=remat)
  loss_s, grads_s = jax.jit(jax.value_and_grad(scanned_fn))(
      checkpoint.unscanned_to_scan(params), state)
  np.testing.assert_allclose(loss_s, loss, rtol=1e-5, atol=1e-6)
  grads_s = checkpoint.scan_to_unscanned(grads_s)
  flat, flat_s = jax.tree.leaves_with_path(grads), jax.tree.leaves_with_path(grads_s)
  assert [p for p, _ in flat] == [p for p, _ in flat_s]
  for (path, g), (_, g_s) in zip(flat, flat_s, strict=True):
    np.testing.assert_allclose(g_s, g, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  nonzero = [float(jnp.abs(g).max()) > 0 for _, g in flat]
  assert sum(nonzero) > 0.9 * len(nonzero)  # the comparison is not between zeros
  # One scan per transformer, with one rematerialised block body inside each when asked.
  jaxpr = str(jax.make_jaxpr(jax.grad(scanned_fn))(checkpoint.unscanned_to_scan(params), state))
  num_scanned = len(transformers(stage, params))
  assert len(SCAN.findall(jaxpr)) >= num_scanned
  assert len(REMAT.findall(jaxpr)) == (num_scanned if remat else 0)


def test_scanned_dropout_differs_per_layer_and_from_evaluation():
  """With dropout the scanned model trains (finite, rng-dependent loss); each layer gets its own
  dropout rng, so the masks are not those of the unscanned model (only the same in law)."""
  model, images, targets = stage2(scan_layers=True, dropout_rate=0.3)
  params = checkpoint.unscanned_to_scan(init(2)["params"])
  train = lambda key: model.apply({"params": params}, images, targets, train=True,
                                  rngs={"dropout": key})
  a, b = train(jax.random.key(0)), train(jax.random.key(1))
  evaluation = model.apply({"params": params}, images, targets)
  assert np.all(np.isfinite(a)) and not np.allclose(a, b) and not np.allclose(a, evaluation)
  np.testing.assert_array_equal(a, train(jax.random.key(0)))
  # Per-layer rngs: the dropout masks of the scanned layers differ from one another.
  _, sown = model.apply({"params": params}, images, targets, train=True,
                        rngs={"dropout": jax.random.key(0)}, capture_intermediates=True,
                        mutable=["intermediates"])
  masked = sown["intermediates"]["encoder"]["encoderblock"]["MlpBlock_0"]["Dropout_0"][
      "__call__"][0] == 0
  assert masked.shape[0] == NUM_LAYERS and not np.array_equal(masked[0], masked[1])


@pytest.mark.parametrize("remat", [False, True])
def test_cached_decoding_with_scanned_layers(remat):
  model, images, _ = stage2()
  scanned = model.clone(scan_layers=True, remat=remat)
  params = init(2)["params"]
  params_s = checkpoint.unscanned_to_scan(params)
  keys = jax.random.split(jax.random.key(0), 3)
  sample = lambda m, p, cached, temperature=0.0: jax.jit(lambda *args: decoding.sample(
      m, *args, cached=cached, temperature=temperature, num_samples=2))(p, images, keys)
  tokens, logprob = sample(model, params, True)
  assert len(np.unique(tokens)) > 2
  for cached in (True, False):
    tokens_s, logprob_s = sample(scanned, params_s, cached)
    np.testing.assert_array_equal(tokens_s, tokens)
    np.testing.assert_allclose(logprob_s, logprob, rtol=1e-5)
  tokens, logprob = sample(model, params, True, temperature=1.0)
  tokens_s, logprob_s = sample(scanned, params_s, True, temperature=1.0)
  np.testing.assert_array_equal(tokens_s, tokens)
  np.testing.assert_allclose(logprob_s, logprob, rtol=1e-5)


def test_bfloat16_scanned_model_matches_unscanned():
  model, images, targets = stage2(dtype="bfloat16")
  params = init(2)["params"]
  logits = model.apply({"params": params}, images, targets)
  logits_s = model.clone(scan_layers=True, remat=True).apply(
      {"params": checkpoint.unscanned_to_scan(params)}, images, targets)
  assert logits_s.dtype == jnp.float32
  encoded = model.clone(scan_layers=True).apply(
      {"params": checkpoint.unscanned_to_scan(params)}, images, method=lm.Model.encode)
  assert encoded.dtype == jnp.bfloat16
  # Not bitwise: XLA rounds the bfloat16 loop body differently from the unrolled blocks.
  scale = float(jnp.abs(logits).max())
  assert scale > 1.0
  np.testing.assert_allclose(logits_s, logits, atol=2e-2 * scale)


def test_conversion_rejects_inconsistent_trees():
  block = {"Dense_0": {"kernel": np.ones((2, 3))}}
  with pytest.raises(ValueError, match="numbered"):
    checkpoint.unscanned_to_scan({"enc": {"encoderblock_0": block, "encoderblock_2": block}})
  with pytest.raises(ValueError, match="Both"):
    checkpoint.unscanned_to_scan({"encoderblock_0": block, "encoderblock": block})
  with pytest.raises(ValueError, match="different parameters"):
    checkpoint.unscanned_to_scan({"encoderblock_0": block, "encoderblock_1": {"x": np.ones(1)}})
  with pytest.raises(ValueError, match="leading depth axis"):
    checkpoint.scan_to_unscanned({"encoderblock": {"a": np.ones((2, 3)), "b": np.ones((3,))}})
  # Names that only look alike are left alone.
  other = {"encoderblock_x": block, "encoderblock0": block, "EncDecBlock_0": block,
           "LayerNorm_0": {"scale": np.ones(3)}}
  for convert in (checkpoint.unscanned_to_scan, checkpoint.scan_to_unscanned):
    assert checkpoint.flatten(convert(other)).keys() == checkpoint.flatten(other).keys()
