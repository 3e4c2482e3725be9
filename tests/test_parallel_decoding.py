"""The masked stage II model and its parallel decoding (MaskGIT, ROAR) against brute force."""

import contextlib
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uvim import decoding
from uvim.models import lm


def masked_model(vocab_size=9, seq_len=6, seed=1, cond_dropout=0.0, scan_layers=False):
  """A small random masked (bidirectional) stage II model with sharp logits, and 3 images."""
  model = lm.Model(patches={"size": (8, 8)}, num_heads=2, num_layers=2, mlp_dim=32, emb_dim=16,
                   vocab_size=vocab_size, seq_len=seq_len, input_size=(16, 16), masked=True,
                   cond_dropout=cond_dropout, scan_layers=scan_layers)
  images = jax.random.normal(jax.random.key(seed), (3, 16, 16, 3))
  params = model.init(jax.random.key(seed + 1), images,
                      jnp.zeros((3, seq_len), jnp.int32))["params"]
  params["decoder"]["LogitsDense"]["kernel"] = 2 * jax.random.normal(
      jax.random.key(seed + 2), (16, vocab_size))
  if cond_dropout:
    params["null_image"] = jax.random.normal(jax.random.key(seed + 3), (1, 1, 16))
  # Positions that differ as a trained model's do, so an all-masked code is not constant.
  params["pos_embedding_decoder"] = 3 * jax.random.normal(jax.random.key(seed + 4),
                                                        (1, seq_len, 16))
  return model, params, images


def full_logits(model, params, images, tokens, conditional=True):
  """Logits of a partly masked code by the training path (image encoded, no cache)."""
  encoded = model.apply({"params": params}, images, method=model.encode)
  if not conditional:
    encoded = model.apply({"params": params}, encoded, method=model.encode_unconditional)
  return np.array(model.apply({"params": params}, encoded, jnp.asarray(tokens),
                              method=model.decode))


def brute_force_greedy_maskgit(model, params, images, counts, guidance=1.0, start=None):
  """MaskGIT by a Python loop over steps and positions: argmax tokens, confidence = their
  log-probability, decide the `counts[t]` most confident undecided positions (those MASK in
  `start`, default all)."""
  tokens = (np.zeros((len(images), model.seq_len), np.int64) if start is None
            else np.array(start, np.int64))
  order = np.full(tokens.shape, -1)
  for t, count in enumerate(counts):
    logits = full_logits(model, params, images, tokens)
    if guidance != 1.0:
      uncond = full_logits(model, params, images, tokens, conditional=False)
      logits = uncond + guidance * (logits - uncond)
    logits[..., 0] = -np.inf
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    for b in range(len(images)):
      undecided = [i for i in range(model.seq_len) if tokens[b, i] == 0]
      best = sorted(undecided, key=lambda i: -logp[b, i].max())[:count]
      for i in best:
        tokens[b, i] = logp[b, i].argmax()
        order[b, i] = t
  return tokens, order


def test_fill_in_with_the_cached_image_equals_the_training_path():
  for scan in (False, True):
    model, params, images = masked_model(scan_layers=scan)
    tokens = np.array(jax.random.randint(jax.random.key(1), (3, 6), 0, 9))
    tokens[:, ::2] = lm.MASK
    encoded = model.apply({"params": params}, images, method=model.encode)
    cache = model.apply({"params": params}, encoded, method=model.init_cache)
    got = model.apply({"params": params}, cache, jnp.asarray(tokens), method=model.fill_in)
    np.testing.assert_allclose(got, full_logits(model, params, images, tokens), atol=1e-5)
    # Bidirectional: the first position's logits depend on the last token.
    changed = tokens.copy()
    changed[:, -1] = changed[:, -1] % 8 + 1
    assert not np.allclose(full_logits(model, params, images, changed)[:, 0], got[:, 0])


@pytest.mark.parametrize("steps,schedule,guidance", [
    (3, "cosine", 1.0), (6, "linear", 1.0), (4, "linear", 2.5)])
def test_greedy_maskgit_equals_brute_force(steps, schedule, guidance):
  model, params, images = masked_model(cond_dropout=0.1 if guidance != 1.0 else 0.0)
  counts = decoding.tokens_per_step(model.seq_len, steps, schedule)
  want, want_order = brute_force_greedy_maskgit(model, params, images, counts, guidance)
  keys = jax.random.split(jax.random.key(0), 3)
  tokens, _, order = jax.jit(lambda p, i, k: decoding.sample(
      model, p, i, k, scheme="maskgit", steps=steps, token_schedule=schedule,
      guidance=guidance, choice_temperature=0.0, with_order=True))(params, images, keys)
  np.testing.assert_array_equal(tokens[:, 0], want)
  np.testing.assert_array_equal(order[:, 0], want_order)
  assert len(np.unique(want)) > 2


def test_revising_a_draft_redecodes_exactly_the_words_the_model_would_not_write():
  """A video frame decoded from the previous frame's code: the draft's words that differ from
  the model's argmax (seeing the whole draft) are masked again and decoded by MaskGIT."""
  model, params, images = masked_model()
  draft = np.array(jax.random.randint(jax.random.key(5), (3, 6), 1, 9))
  logits = full_logits(model, params, images, draft)
  logits[..., 0] = -np.inf
  start = np.where(logits.argmax(-1) == draft, draft, lm.MASK)
  assert 0 < np.sum(start == lm.MASK) < start.size  # some words kept, some redone
  counts = decoding.tokens_per_step(model.seq_len, 3, "cosine")
  want, want_order = brute_force_greedy_maskgit(model, params, images, counts, start=start)
  keys = jax.random.split(jax.random.key(0), 3)
  tokens, _, order = jax.jit(lambda p, i, k, g: decoding.sample(
      model, p, i, k, scheme="maskgit", steps=3, choice_temperature=0.0, with_order=True,
      given=g, revise=True))(params, images, keys, draft)
  np.testing.assert_array_equal(tokens[:, 0], want)
  np.testing.assert_array_equal(order[:, 0], want_order)
  assert np.all((order[:, 0] == -1) == (start != lm.MASK))


@contextlib.contextmanager
def decoder_inputs(method: str = "fill_in"):
  """A list that receives the code the masked decoder sees (`fill_in`'s tokens, or those of
  another `lm.Model` method taking (images or cache, tokens)) at every call run inside,
  compiled or not."""
  seen = []

  def record(next_fun, args, kwargs, context):
    if context.method_name == method and isinstance(context.module, lm.Model):
      jax.debug.callback(lambda x: seen.append(np.asarray(x)), args[1])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    yield seen


@pytest.mark.parametrize("scheme", ["maskgit", "roar"])
def test_each_step_decides_exactly_the_scheduled_tokens_and_never_changes_them(scheme):
  """Sampled at T = 1 with choice noise; the code the decoder sees at each step is recorded."""
  model, params, images = masked_model(seq_len=16)
  keys = jax.random.split(jax.random.key(3), 3)
  with decoder_inputs() as seen:
    tokens, _, order = decoding.sample(
        model, params, images, keys, scheme=scheme, steps=5, temperature=1.0,
        choice_temperature=4.5, num_samples=4, with_order=True)
  counts = decoding.tokens_per_step(16, 5, "cosine")
  states = [*seen, np.asarray(tokens).reshape(-1, 16)]
  assert len(states) == 6 and (states[0] == lm.MASK).all()
  for t, count in enumerate(counts):
    before, after = states[t], states[t + 1]
    decided = before != lm.MASK
    np.testing.assert_array_equal(after[decided], before[decided])  # never re-masked/changed
    newly = (after != lm.MASK) & ~decided
    assert (newly.sum(1) == count).all()
    np.testing.assert_array_equal(newly, np.asarray(order).reshape(-1, 16) == t)
  assert (states[-1] >= 1).all()


def exact_roar_distribution(model, params, image, vocab, orders=None):
  """P(code) for ROAR with one token a step: the mean over decoding `orders` (default: all) of
  the product of each token's probability given the tokens decided before it (others masked)."""
  length = model.seq_len
  states = list(itertools.product(range(vocab), repeat=length))  # every partly masked code
  logits = full_logits(model, params, jnp.repeat(image, len(states), 0), np.array(states))
  logits[..., 0] = -np.inf
  probs_of = dict(zip(states, np.exp(logits - np.logaddexp.reduce(logits, -1, keepdims=True)),
                      strict=True))
  orders = orders or list(itertools.permutations(range(length)))
  probs = {}
  for code in itertools.product(range(1, vocab), repeat=length):
    total = 0.0
    for order in orders:
      state, p = [0] * length, 1.0
      for i in order:
        p *= probs_of[tuple(state)][i, code[i]]
        state[i] = code[i]
      total += p
    probs[code] = total / len(orders)
  return probs


def test_roar_one_token_a_step_samples_the_random_order_factorisation():
  model, params, images = masked_model(vocab_size=4, seq_len=3, seed=4)
  probs = exact_roar_distribution(model, params, images[:1], 4)
  assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
  n = 8000
  tokens, _ = jax.jit(lambda p, i, k: decoding.sample(
      model, p, i, k, scheme="roar", steps=3, token_schedule="linear", temperature=1.0,
      num_samples=n))(params, images[:1], jax.random.split(jax.random.key(7), 1))
  codes = [tuple(c) for c in np.asarray(tokens[0])]
  for code, p in probs.items():
    freq = sum(c == code for c in codes) / n
    assert abs(freq - p) < 5 * np.sqrt(p * (1 - p) / n) + 1e-3, (code, freq, p)
  # The order matters: decoding left to right only would give a distribution the test tells
  # apart.
  left_to_right = exact_roar_distribution(model, params, images[:1], 4, orders=[(0, 1, 2)])
  assert max(abs(left_to_right[c] - p) / np.sqrt(p * (1 - p) / n) for c, p in probs.items()) > 10


@pytest.mark.parametrize("scheme,kwargs", [
    ("maskgit", dict(temperature=1.0, top_p=0.9, guidance=2.0, guidance_schedule="cosine")),
    ("roar", dict(temperature=2.0, temperature_schedule="onex"))])
def test_parallel_schemes_are_batch_independent(scheme, kwargs):
  model, params, images = masked_model(cond_dropout=0.1)
  keys = jax.random.split(jax.random.key(5), 3)
  fn = jax.jit(lambda p, i, k: decoding.sample(model, p, i, k, scheme=scheme, steps=3,
                                               num_samples=2, **kwargs))
  together, logprob = fn(params, images, keys)
  for b in range(3):
    alone, alone_logprob = fn(params, images[b:b + 1], keys[b:b + 1])
    np.testing.assert_array_equal(alone[0], together[b])
    np.testing.assert_allclose(alone_logprob[0], logprob[b], rtol=1e-5)
  assert not np.array_equal(together[:, 0], together[:, 1])  # samples differ


def test_guidance_1_is_unguided_parallel_decoding_exactly():
  model, params, images = masked_model(cond_dropout=0.1)
  keys = jax.random.split(jax.random.key(2), 3)
  for scheme in ("maskgit", "roar"):
    plain = decoding.sample(model, params, images, keys, scheme=scheme, steps=2,
                            temperature=1.0)
    same = decoding.sample(model, params, images, keys, scheme=scheme, steps=2,
                           temperature=1.0, guidance=1.0, guidance_schedule="linear")
    for a, b in zip(plain, same, strict=True):
      np.testing.assert_array_equal(a, b)


def test_schemes_need_the_matching_model():
  model, params, images = masked_model()
  keys = jax.random.split(jax.random.key(0), 3)
  with pytest.raises(ValueError, match="needs a causal"):
    decoding.sample(model, params, images, keys, scheme="ar")
  causal = lm.Model(patches={"size": (8, 8)}, num_heads=2, num_layers=1, mlp_dim=32, emb_dim=16,
                    vocab_size=9, seq_len=6, input_size=(16, 16))
  with pytest.raises(ValueError, match="needs a masked"):
    decoding.sample(causal, params, images, keys, scheme="roar")
  with pytest.raises(ValueError, match="steps must be between 1 and the code length 6"):
    decoding.sample(model, params, images, keys, steps=7)


def test_tokens_per_step_follows_the_schedule():
  for length, steps in itertools.product((6, 64, 256), (1, 2, 4, 8, 16)):
    if steps > length:
      continue
    for schedule, gamma in (("cosine", lambda r: np.cos(np.pi / 2 * r)),
                            ("linear", lambda r: 1 - r)):
      counts = decoding.tokens_per_step(length, steps, schedule)
      assert counts.sum() == length and (counts >= 1).all()
      masked = length - np.cumsum(counts)
      ideal = np.floor(length * gamma(np.arange(1, steps + 1) / steps) + 1e-9)
      # Equal to the schedule except where at least one token a step forces a change.
      assert np.abs(masked - ideal).max() <= steps
      if length >= 64 and steps <= 8:
        np.testing.assert_array_equal(masked, ideal)
  np.testing.assert_array_equal(decoding.tokens_per_step(256, 8, "linear"), [32] * 8)


def test_temperature_schedules():
  counts = decoding.tokens_per_step(256, 8, "linear")
  np.testing.assert_allclose(decoding.temperatures(1.0, "linear", counts),
                             [1, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])
  onex = decoding.temperatures(3.0, "onex", counts)
  assert onex[0] == pytest.approx(3.0) and onex[-1] == pytest.approx(0.5)
  assert (np.diff(onex) < 0).all()
  np.testing.assert_array_equal(decoding.temperatures(0.7, "constant", counts), [0.7] * 8)


def test_training_mask_hides_a_cosine_scheduled_fraction():
  hidden = np.asarray(lm.training_mask(jax.random.key(0), 20000, 16, min_ratio=0.25))
  count = hidden.sum(1)
  assert count.min() == 4 and count.max() == 16  # at least 25% of 16, up to all
  r = np.linspace(0, 1, 200001)
  exact = np.clip(np.ceil(np.maximum(np.cos(np.pi / 2 * r), 0.25) * 16), 1, 16)
  assert abs(count.mean() - exact.mean()) < 5 * exact.std() / np.sqrt(len(count))
  assert np.abs(hidden.mean(0) - hidden.mean()).max() < 0.02  # positions uniformly


def neighbour_model(num_tasks=1, side=3, seed=0):
  """A small masked model whose positions see their grid neighbours' tokens, with a random
  (not zero) neighbour kernel; `num_tasks` codes of side x side tokens."""
  seq_len = num_tasks * side * side
  model = lm.Model(patches={"size": (8, 8)}, num_heads=2, num_layers=1, mlp_dim=16, emb_dim=8,
                   vocab_size=7, seq_len=seq_len, input_size=(24, 24), masked=True,
                   neighbour_tokens=True, num_tasks=num_tasks)
  images = jax.random.normal(jax.random.key(seed), (2, 24, 24, 3))
  params = model.init(jax.random.key(seed + 1), images,
                      jnp.zeros((2, seq_len), jnp.int32))["params"]
  params["decoder"]["NeighbourTokens"]["kernel"] = jax.random.normal(jax.random.key(seed + 2),
                                                                     (3, 3, 8, 8))
  return model, params, images


@pytest.mark.parametrize("num_tasks", [1, 2])
def test_neighbour_tokens_add_each_grid_neighbours_embedding_through_its_kernel_tap(num_tasks):
  model, params, _ = neighbour_model(num_tasks)
  side, seq_len = 3, model.seq_len
  tokens = np.array(jax.random.randint(jax.random.key(5), (2, seq_len), 0, 7))
  pos = np.zeros((1, seq_len, 8), np.float32)
  got = np.asarray(model.apply({"params": params}, jnp.asarray(tokens), jnp.asarray(pos),
                               method=lambda m, t, p: m.decoder._embed(t, p, neighbours=True)))
  table = np.asarray(params["decoder"]["EmbedTargets"]["embedding"])
  kernel = np.asarray(params["decoder"]["NeighbourTokens"]["kernel"])
  want = table[tokens].copy()
  for b, task, i, j in itertools.product(range(2), range(num_tasks), range(side), range(side)):
    at = task * side * side + i * side + j
    for di, dj in itertools.product((-1, 0, 1), (-1, 0, 1)):
      if 0 <= i + di < side and 0 <= j + dj < side:  # never across a code's edge or task
        neighbour = tokens[b, task * side * side + (i + di) * side + j + dj]
        want[b, at] += table[neighbour] @ kernel[di + 1, dj + 1]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_neighbour_tokens_start_as_the_plain_decoder_and_cache_like_training():
  model, params, images = neighbour_model(side=2)
  tokens = np.array([[0, 3, 5, 0], [2, 0, 0, 6]])
  encoded = model.apply({"params": params}, images, method=model.encode)
  cache = model.apply({"params": params}, encoded, method=model.init_cache)
  np.testing.assert_allclose(
      model.apply({"params": params}, cache, jnp.asarray(tokens), method=model.fill_in),
      full_logits(model, params, images, tokens), atol=1e-5)
  # Freshly initialised, the path is zero: the plain masked decoder's logits exactly.
  fresh = model.init(jax.random.key(3), images, jnp.asarray(tokens))["params"]
  plain = lm.Model(**{**{f: getattr(model, f) for f in ("patches", "num_heads", "num_layers",
                                                        "mlp_dim", "emb_dim", "vocab_size",
                                                        "seq_len", "input_size", "masked")}})
  without = {k: v for k, v in fresh.items()}
  without["decoder"] = {k: v for k, v in fresh["decoder"].items() if k != "NeighbourTokens"}
  np.testing.assert_array_equal(model.apply({"params": fresh}, images, jnp.asarray(tokens)),
                                plain.apply({"params": without}, images, jnp.asarray(tokens)))


def test_neighbour_tokens_need_a_masked_model_and_a_square_code():
  images = jnp.zeros((1, 16, 16, 3))
  for kw in (dict(masked=False, seq_len=4), dict(masked=True, seq_len=6)):
    model = lm.Model(patches={"size": (8, 8)}, num_heads=2, num_layers=1, mlp_dim=16,
                     emb_dim=8, vocab_size=7, input_size=(16, 16), neighbour_tokens=True, **kw)
    with pytest.raises(ValueError, match="neighbour_tokens needs a masked model and a square"):
      model.init(jax.random.key(0), images, jnp.zeros((1, kw["seq_len"]), jnp.int32))
