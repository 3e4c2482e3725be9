"""Stage I model: parity with big_vision's UViM, and the quantiser against brute force."""

import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uvim import checkpoint
from uvim.models import vqvae

FIXTURE = Path(__file__).resolve().parent / "fixtures/bigvision_uvim_parity.npz"


@pytest.fixture(scope="module")
def parity():
  tree = checkpoint.load_npz(FIXTURE)
  cfg = json.loads(str(np.load(FIXTURE)["config_json"]))["stage1"]
  model = vqvae.Model(
      inputs={k: tuple(v) for k, v in cfg["inputs"].items()},
      outputs={k: tuple(v) for k, v in cfg["inputs"].items()},
      input_size=(cfg["input_size"],) * 2, patch_size=(cfg["patch_size"],) * 2,
      code_len=cfg["code_len"], width=cfg["width"], oracle_depth=cfg["enc_depth"],
      base_model_depth=cfg["dec_depth"], mlp_dim=cfg["mlp_dim"], num_heads=cfg["num_heads"],
      dict_size=cfg["dict_size"], codeword_dim=cfg["codeword_dim"],
      dict_momentum=cfg["dict_momentum"], with_encoder_ctx=cfg["with_encoder_ctx"],
      with_decoder_ctx=cfg["with_decoder_ctx"], bottleneck_resize=cfg["bottleneck_resize"])
  return model, tree["stage1"]


def assert_close(actual, expected, tol=1e-5):
  np.testing.assert_allclose(np.asarray(actual), expected, rtol=tol, atol=tol)


def test_parameter_names_and_shapes_match_the_original(parity):
  model, s1 = parity
  x = {k: jnp.asarray(v) for k, v in s1["in"].items() if k != "ctx"}
  variables = jax.eval_shape(lambda: model.init(
      {"params": jax.random.key(0), "state": jax.random.key(1)}, x, ctx=s1["in"]["ctx"]))
  ours = {k: v.shape for k, v in checkpoint.flatten(
      jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), variables)).items()}
  theirs = {k: v.shape for k, v in checkpoint.flatten(
      {"params": s1["params"], "state": s1["state"]}).items()}
  assert ours == theirs


def test_encode_decode_and_dictionary_update_match_the_original(parity):
  model, s1 = parity
  variables = {"params": s1["params"], "state": s1["state"]}
  x = {k: v for k, v in s1["in"].items() if k != "ctx"}
  ctx, out = s1["in"]["ctx"], s1["out"]
  quantized, aux = model.apply(variables, x, ctx=ctx, method=model.encode)
  assert_close(aux["bottleneck"], out["bottleneck"])
  np.testing.assert_array_equal(aux["code"], out["code"])
  assert_close(quantized, out["bottleneck_q"])
  logits, _ = model.apply(variables, quantized, ctx=ctx, method=model.decode)
  for k in x:
    assert_close(logits[k], out["logits_from_encode"][k])
  logits, _ = model.apply(variables, out["code"], ctx=ctx, discrete_input=True,
                          method=model.decode)
  for k in x:
    assert_close(logits[k], out["logits_from_code"][k])
  (_, aux), new_state = model.apply(variables, x, ctx=ctx, train=True, method=model.encode,
                                    mutable=["state"], rngs={"vqvae": jax.random.key(0)})
  assert_close(new_state["state"]["counts"], out["train_state"]["counts"])
  assert_close(new_state["state"]["dictionary"], out["train_state"]["dictionary"])
  assert_close(aux["codebook_max_ratio"], out["train_codebook_max_ratio"])
  assert_close(aux["codebook_zeros_ratio"], out["train_codebook_zeros_ratio"])


@pytest.mark.parametrize("gather_min_classes", [0, 1000])
def test_label_ids_embed_like_their_one_hot_vectors_in_value_and_gradient(
    parity, monkeypatch, gather_min_classes):
  """The fixture's one-hot inputs given as class ids (some outside [0, C), which one-hot as
  zeros), embedded by gathering kernel rows (0) or through one-hot vectors (1000): the same
  code, logits and parameter gradients as the one-hot (big_vision's) inputs."""
  monkeypatch.setattr(vqvae, "GATHER_MIN_CLASSES", gather_min_classes)
  model, s1 = parity
  variables = {"params": s1["params"], "state": s1["state"]}
  one_hot = {k: jnp.asarray(v) for k, v in s1["in"].items() if k != "ctx"}
  ids = {k: jnp.argmax(v, axis=-2) for k, v in one_hot.items()}
  ids["semantics"] = ids["semantics"].at[:, 0, :3].set(jnp.array([-1, 5, 99]))
  one_hot["semantics"] = one_hot["semantics"].at[:, 0, :, :3].set(0.0)
  ctx = s1["in"]["ctx"]

  def loss(params, x):
    logits, aux = model.apply({**variables, "params": params}, x, ctx=ctx)
    return sum(jnp.sum(jnp.sin(v)) for v in logits.values()), aux["code"]

  (value_ids, code_ids), grad_ids = jax.value_and_grad(loss, has_aux=True)(s1["params"], ids)
  (value_hot, code_hot), grad_hot = jax.value_and_grad(loss, has_aux=True)(s1["params"], one_hot)
  np.testing.assert_array_equal(code_ids, code_hot)
  assert_close(value_ids, value_hot)
  for k, g in checkpoint.flatten(grad_hot).items():
    assert_close(checkpoint.flatten(grad_ids)[k], g, tol=1e-4)


def test_label_embedding_initialises_like_flax_dense_general():
  """Same parameters from the same key as big_vision's layer (nn.DenseGeneral over (C, P))."""
  x = jnp.zeros((1, 2, 3, 4))
  ours = vqvae.LabelEmbedding(8, (3, 4)).init(jax.random.key(3), x)
  theirs = nn.DenseGeneral(features=(8,), axis=(-2, -1)).init(jax.random.key(3), x)
  for k, v in checkpoint.flatten(theirs).items():
    np.testing.assert_array_equal(checkpoint.flatten(ours)[k], v)
  assert np.std(checkpoint.flatten(ours)["params/kernel"]) > 0


def test_quantize_matches_brute_force_and_passes_gradients_straight_through():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 5, 4)).astype(np.float32)
  e = rng.normal(size=(7, 4)).astype(np.float32)
  q, code = vqvae.quantize(jnp.asarray(x), jnp.asarray(e))
  for b in range(3):
    for k in range(5):
      best = min(range(7), key=lambda n: float(np.sum((x[b, k] - e[n]) ** 2)))
      assert code[b, k] == best
      np.testing.assert_allclose(q[b, k], e[best], rtol=1e-6)
  grad = jax.grad(lambda x: jnp.sum(vqvae.quantize(x, jnp.asarray(e))[0] * 3.0))(jnp.asarray(x))
  np.testing.assert_allclose(grad, np.full_like(x, 3.0))


def small_model(**kw):
  args = dict(inputs={"a": (3, 4)}, outputs={"a": (3, 4)}, input_size=(8, 8), patch_size=(2, 2),
              code_len=4, width=8, oracle_depth=1, base_model_depth=1, mlp_dim=16, num_heads=2,
              dict_size=6, codeword_dim=4, dict_momentum=0.9)
  return vqvae.Model(**{**args, **kw})


def test_dictionary_ema_update_matches_numpy():
  model = small_model()
  rng = np.random.default_rng(1)
  x = {"a": jnp.asarray(rng.normal(size=(2, 16, 3, 4)), jnp.float32)}
  ctx = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
  variables = model.init({"params": jax.random.key(0), "state": jax.random.key(1)}, x, ctx=ctx)
  (_, aux), new = model.apply(variables, x, ctx=ctx, train=True, method=model.encode,
                              mutable=["state"], rngs={"vqvae": jax.random.key(2)})
  code, bottleneck = np.asarray(aux["code"]).ravel(), np.asarray(aux["bottleneck"])
  counts = np.asarray(variables["state"]["counts"]) * 0.9
  sums = np.asarray(variables["state"]["dictionary"]) * 0.9
  for i, c in enumerate(code):
    counts[c] += 1
    sums[c] += bottleneck.reshape(-1, 4)[i]
  np.testing.assert_allclose(new["state"]["counts"], counts, rtol=1e-6)
  np.testing.assert_allclose(new["state"]["dictionary"], sums, rtol=1e-5, atol=1e-6)


def test_words_below_min_count_are_replaced_by_splits_of_the_most_used():
  counts = jnp.array([5.0, 0.05, 1.0, 0.01])
  dictionary = jnp.arange(8, dtype=jnp.float32).reshape(4, 2) + 1
  state = {"rng": jax.random.key(0), "counts": counts, "dictionary": dictionary}
  state = jax.lax.while_loop(lambda s: jnp.any(s["counts"] < 0.1), vqvae.split_most_used_word,
                             state)
  # First split: word 0 (5.0) into word 3 (least, 0.01): both 2.5. Second: word 0 or 3 (2.5,
  # argmax picks 0) into word 1 (0.05): both 1.25.
  np.testing.assert_allclose(state["counts"], [1.25, 1.25, 1.0, 2.5])
  d = np.asarray(state["dictionary"])
  np.testing.assert_allclose(d[2], [5, 6])
  np.testing.assert_allclose(d[0], [1 / 4, 2 / 4])
  np.testing.assert_allclose(d[1], d[0] * 2 / 2 * (d[1] / d[0]), rtol=0)  # a perturbed copy
  assert np.all(np.abs(d[1] / d[0] - 1) <= vqvae.SPLIT_PERTURBATION + 1e-6)
  assert np.all(np.abs(d[3] / np.array([1 / 2, 1]) - 1) <= vqvae.SPLIT_PERTURBATION + 1e-6)


def test_code_dropout_keeps_a_random_fraction_per_example():
  masks = vqvae.code_dropout_mask(jax.random.key(0), 1000, 16, "random")
  kept = np.asarray(masks).mean(1)
  assert 0.4 < kept.mean() < 0.6 and kept.min() < 0.1 and kept.max() > 0.9
  middle = [tuple(m) for m in np.asarray(masks) if 3 <= m.sum() <= 13]
  assert len(set(middle)) > 0.95 * len(middle)  # the kept positions differ per example
  prefix = np.asarray(vqvae.code_dropout_mask(jax.random.key(0), 100, 16, "prefix"))
  assert all(np.all(np.diff(m.astype(int)) <= 0) for m in prefix)  # kept positions lead
