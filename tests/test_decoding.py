"""Cached sampling of the guiding code against step-by-step recomputation and the softmax."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from uvim import cli, decoding
from uvim.errors import UserError
from uvim.models import lm


def random_model(vocab_size=11, seq_len=7, num_layers=2, seed=0, posemb_type="learn"):
  """A small stage II model with random (non-zero) logits head, and a batch of 3 images."""
  model = lm.Model(patches={"size": (8, 8)}, num_heads=2, num_layers=num_layers, mlp_dim=32,
                   emb_dim=16, vocab_size=vocab_size, seq_len=seq_len, input_size=(16, 16),
                   posemb_type=posemb_type)
  images = jax.random.normal(jax.random.key(seed), (3, 16, 16, 3))
  params = model.init(jax.random.key(seed + 1), images,
                      jnp.zeros((3, seq_len), jnp.int32))["params"]
  params["decoder"]["LogitsDense"]["kernel"] = 2 * jax.random.normal(
      jax.random.key(seed + 2), (16, vocab_size))
  return model, params, images


def step_by_step_argmax(model, params, images):
  """Plain Python loop, full recomputation of the teacher-forced logits at every position."""
  tokens = np.zeros((len(images), model.seq_len), np.int32)
  for t in range(model.seq_len):
    logits = np.array(model.apply({"params": params}, images, jnp.asarray(tokens))[:, t])
    logits[:, 0] = -np.inf
    tokens[:, t] = logits.argmax(-1)
  return tokens


@pytest.mark.parametrize("seed,num_layers,seq_len,posemb", [
    (0, 1, 7, "learn"), (5, 3, 7, "learn"), (2, 2, 9, "sincos2d")])
def test_cached_and_uncached_greedy_equal_step_by_step_argmax(seed, num_layers, seq_len,
                                                               posemb):
  model, params, images = random_model(num_layers=num_layers, seed=seed, seq_len=seq_len,
                                       posemb_type=posemb)
  keys = jax.random.split(jax.random.key(0), 3)
  expected = step_by_step_argmax(model, params, images)
  for cached in (True, False):
    tokens, logprob = jax.jit(lambda p, i, k, c=cached: decoding.sample(
        model, p, i, k, cached=c))(params, images, keys)
    np.testing.assert_array_equal(tokens[:, 0], expected)
    teacher = jax.nn.log_softmax(model.apply({"params": params}, images, jnp.asarray(expected)))
    want = np.take_along_axis(np.asarray(teacher), expected[..., None], -1).sum((1, 2))
    np.testing.assert_allclose(logprob[:, 0], want, rtol=1e-5)
  assert len(np.unique(expected)) > 2  # the random model does not emit a constant code


def test_cached_sampling_follows_the_model_joint_distribution():
  """At T = 1, frequencies of whole 2-token codes match p(t0) p(t1 | t0) without BOS."""
  model, params, images = random_model(vocab_size=4, seq_len=2, seed=3)
  n = 6000
  tokens, _ = jax.jit(lambda p, i, k: decoding.sample(
      model, p, i, k, temperature=1.0, num_samples=n))(
          params, images[:1], jax.random.split(jax.random.key(1), 1))
  codes = np.asarray(tokens[0])
  assert codes.min() >= 1
  for a, b in itertools.product(range(1, 4), repeat=2):
    logits = np.asarray(model.apply({"params": params}, images[:1], jnp.array([[a, b]]))[0])
    p0 = np.exp(logits[0, 1:]) / np.exp(logits[0, 1:]).sum()
    p1 = np.exp(logits[1, 1:]) / np.exp(logits[1, 1:]).sum()
    p = p0[a - 1] * p1[b - 1]
    freq = np.mean((codes[:, 0] == a) & (codes[:, 1] == b))
    assert abs(freq - p) < 5 * np.sqrt(p * (1 - p) / n) + 1e-3, (a, b, freq, p)


def test_filter_logits_matches_brute_force():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(5, 9)).astype(np.float32) * 2
  for top_k, top_p in [(3, 1.0), (0, 0.6), (0, 0.95), (4, 0.5), (1, 1.0)]:
    out = np.asarray(decoding.filter_logits(jnp.asarray(logits), top_k=top_k, top_p=top_p))
    for row, got in zip(logits, out, strict=True):
      order = np.argsort(-row)
      keep = set(order[:top_k]) if top_k else set(order)
      probs = np.where(np.isin(np.arange(9), list(keep)), np.exp(row - row.max()), 0)
      probs /= probs.sum()  # top-p applies to the distribution left by top-k
      nucleus, mass = set(), 0.0
      for i in order:  # smallest prefix of the sorted vocabulary reaching top_p
        if mass >= top_p:
          break
        nucleus.add(i)
        mass += probs[i]
      keep &= nucleus if top_p < 1 else keep
      assert set(np.flatnonzero(np.isfinite(got))) == keep


def test_top_k_samples_only_the_k_most_likely_tokens():
  model, params, images = random_model(vocab_size=9, seq_len=1, seed=4)
  params["decoder"]["LogitsDense"]["kernel"] *= 0.1  # flat enough that both tokens occur
  tokens, _ = jax.jit(lambda p, i, k: decoding.sample(
      model, p, i, k, temperature=1.0, top_k=2, num_samples=500))(
          params, images[:1], jax.random.split(jax.random.key(2), 1))
  logits = np.asarray(model.apply({"params": params}, images[:1], jnp.ones((1, 1), jnp.int32)))
  top2 = set(np.argsort(-logits[0, 0, 1:])[:2] + 1)
  assert set(np.unique(tokens)) == top2


def test_each_image_has_its_own_random_stream():
  """An image's samples do not depend on the rest of the batch; different keys differ."""
  model, params, images = random_model(seed=6)
  keys = jax.random.split(jax.random.key(7), 3)
  fn = jax.jit(lambda p, i, k: decoding.sample(model, p, i, k, temperature=1.0, num_samples=4))
  together, _ = fn(params, images, keys)
  alone, _ = fn(params, images[1:2], keys[1:2])
  np.testing.assert_array_equal(together[1], alone[0])
  assert len({tuple(s) for s in np.asarray(together[1])}) > 1  # samples of one image differ
  other, _ = fn(params, images[1:2], keys[2:3])
  assert not np.array_equal(other[0], alone[0])


def guided_model(seed=0, seq_len=6, cond_dropout=0.1):
  """A random model with a `null_image` (trained with condition dropout) and 3 images."""
  model = lm.Model(patches={"size": (8, 8)}, num_heads=2, num_layers=2, mlp_dim=32, emb_dim=16,
                   vocab_size=9, seq_len=seq_len, input_size=(16, 16),
                   cond_dropout=cond_dropout)
  images = jax.random.normal(jax.random.key(seed), (3, 16, 16, 3))
  params = model.init(jax.random.key(seed + 1), images,
                      jnp.zeros((3, seq_len), jnp.int32))["params"]
  params["decoder"]["LogitsDense"]["kernel"] = 2 * jax.random.normal(
      jax.random.key(seed + 2), (16, 9))
  if cond_dropout:  # a trained-looking "no image" input, not the initial one near zero
    params["null_image"] = jax.random.normal(jax.random.key(seed + 3), (1, 1, 16))
  return model, params, images


def teacher_logits(model, params, images, tokens, conditional: bool):
  """Teacher-forced logits, with the image or with the "no image" input."""
  encoded = model.apply({"params": params}, images, method=model.encode)
  if not conditional:
    encoded = model.apply({"params": params}, encoded, method=model.encode_unconditional)
  return np.asarray(model.apply({"params": params}, encoded, jnp.asarray(tokens),
                                method=model.decode))


@pytest.mark.parametrize("scale,schedule", [(2.0, "constant"), (3.0, "linear"),
                                            (0.5, "cosine"), (-1.0, "constant")])
def test_guided_greedy_decoding_follows_the_guidance_formula(scale, schedule):
  model, params, images = guided_model()
  n = model.seq_len
  tokens = np.zeros((3, n), np.int32)
  for t in range(n):  # brute force: full recomputation of both passes at every position
    cond = teacher_logits(model, params, images, tokens, True)[:, t]
    uncond = teacher_logits(model, params, images, tokens, False)[:, t]
    weight = {"constant": 1.0, "linear": (t + 1) / n,
              "cosine": (1 - np.cos(np.pi * (t + 1) / n)) / 2}[schedule]
    s = 1 + (scale - 1) * weight
    mixed = uncond + s * (cond - uncond)
    mixed[:, 0] = -np.inf
    tokens[:, t] = mixed.argmax(-1)
  keys = jax.random.split(jax.random.key(0), 3)
  for cached in (True, False):
    got, _ = jax.jit(lambda p, i, k, c=cached: decoding.sample(
        model, p, i, k, guidance=scale, guidance_schedule=schedule, cached=c))(
            params, images, keys)
    np.testing.assert_array_equal(got[:, 0], tokens)
  # Each image's code is its own: decoded alone, it is the same.
  alone, _ = decoding.sample(model, params, images[1:2], keys[1:2], guidance=scale,
                             guidance_schedule=schedule)
  np.testing.assert_array_equal(alone[0, 0], tokens[1])


def test_guidance_1_is_unguided_decoding_exactly():
  model, params, images = guided_model()
  keys = jax.random.split(jax.random.key(4), 3)
  for temperature in (0.0, 1.0):
    plain = decoding.sample(model, params, images, keys, temperature=temperature, num_samples=2)
    same = decoding.sample(model, params, images, keys, temperature=temperature, num_samples=2,
                           guidance=1.0, guidance_schedule="linear")
    for a, b in zip(plain, same, strict=True):
      np.testing.assert_array_equal(a, b)
  unguidable, params0, _ = guided_model(cond_dropout=0.0)
  assert "null_image" not in params0  # the parameter tree of released models is unchanged
  with pytest.raises(ValueError, match="cond_dropout"):
    decoding.sample(unguidable, params0, images, keys, guidance=2.0)


def test_condition_dropout_replaces_the_image_of_a_fraction_of_examples():
  model, params, images = guided_model(cond_dropout=0.5)
  images = jnp.tile(images, (22, 1, 1, 1))[:64]
  targets = jax.random.randint(jax.random.key(5), (64, model.seq_len), 1, 9)
  cond = teacher_logits(model, params, images, targets, True)
  uncond = teacher_logits(model, params, images, targets, False)
  got = np.asarray(model.apply({"params": params}, images, targets, train=True,
                               rngs={"dropout": jax.random.key(6)}))
  is_uncond = np.array([np.allclose(g, u, atol=1e-5) for g, u in zip(got, uncond, strict=True)])
  is_cond = np.array([np.allclose(g, c, atol=1e-5) for g, c in zip(got, cond, strict=True)])
  assert (is_uncond ^ is_cond).all()  # every example saw the image or the "no image" input
  assert 16 <= is_uncond.sum() <= 48  # ~half (binomial(64, 0.5): +-4 sd)
  evaluation = np.asarray(model.apply({"params": params}, images, targets))
  np.testing.assert_allclose(evaluation, cond, atol=1e-5)  # no dropout outside training


def test_sampling_options_are_checked_once_with_the_option_named():
  for options, message in [
      (dict(temperature=-1.0), r"temperature must be in \[0, 100.0\] \(0: argmax\), got -1.0"),
      (dict(num_samples=0), r"num_samples must be >= 1, got 0"),
      (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
      (dict(top_k=-2), r"top_k must be >= 0"),
      (dict(steps=0), r"steps must be >= 1, got 0"),
      (dict(scheme="beam"), r"scheme must be one of \('ar', 'maskgit', 'roar'\), got 'beam'"),
      (dict(token_schedule="cos"), r"token_schedule must be one of"),
      (dict(step=4), r"unknown sampling option\(s\) \['step'\]")]:
    with pytest.raises(UserError, match=message):
      decoding.Sampling.of(**options)
  base = decoding.Sampling(temperature=1.0)
  assert decoding.Sampling.of(base, top_k=3) == decoding.Sampling(temperature=1.0, top_k=3)
  assert hash(base) == hash(decoding.Sampling(temperature=1.0))  # static under jit
  model, _, _ = guided_model(cond_dropout=0.0)
  with pytest.raises(UserError, match=r"guidance 2.0: this model was trained without condition "
                     "dropout"):
    decoding.Sampling(guidance=2.0).check(model, model.seq_len)
  with pytest.raises(UserError, match="needs a masked stage II model"):
    decoding.Sampling(scheme="maskgit").check(model, model.seq_len)


def test_the_command_line_has_a_flag_per_sampling_option():
  values = flags.FlagValues()
  read = cli.define_sampling_flags(values)
  assert set(values) == set(decoding.Sampling.names())
  values(["predict.py", "--scheme=roar", "--steps=4", "--temperature=0.5", "--top_k=3"])
  assert read() == {"scheme": "roar", "steps": 4, "temperature": 0.5, "top_k": 3}
  sampling = decoding.Sampling.of(**read())
  assert (sampling.choice_temperature, sampling.num_samples) == (4.5, 1)  # the defaults
  assert "Default: 4.5" in values["choice_temperature"].help
  with pytest.raises(flags.IllegalFlagValueError):
    values(["predict.py", "--token_schedule=cos"])
