"""Sampling the guiding code from the stage II model, all inside one compiled loop.

The image is encoded once; the cross-attention keys/values of every decoder block are computed
once per image and the self-attention keys/values are cached as tokens are produced, so each
step costs one token's worth of decoder work. Every image (and every sample of it) has its own
random stream, so a result does not depend on what else is in the batch. Id 0 (BOS) is never
emitted.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def filter_logits(logits_NxV: jnp.ndarray, *, top_k: int = 0, top_p: float = 1.0) -> jnp.ndarray:
  """Sets to -inf the logits outside the `top_k` most likely, then those outside the smallest
  set whose probability (renormalised after top-k) reaches `top_p`. 0 / 1.0 disable them."""
  if top_k:
    kth = jax.lax.top_k(logits_NxV, top_k)[0][:, -1:]
    logits_NxV = jnp.where(logits_NxV < kth, -jnp.inf, logits_NxV)
  if top_p < 1.0:
    sorted_desc = -jnp.sort(-logits_NxV, axis=-1)
    before = jnp.cumsum(jax.nn.softmax(sorted_desc, axis=-1), axis=-1) - jax.nn.softmax(
        sorted_desc, axis=-1)
    kept = jnp.where(before < top_p, sorted_desc, jnp.inf)  # the nucleus, in order
    threshold = jnp.min(kept, axis=-1, keepdims=True)
    logits_NxV = jnp.where(logits_NxV < threshold, -jnp.inf, logits_NxV)
  return logits_NxV


def choose_tokens(logits_NxV: jnp.ndarray, rngs_N: jax.Array, *, temperature: float,
                  top_k: int = 0, top_p: float = 1.0) -> jnp.ndarray:
  """One token per row: argmax at temperature 0, else a sample of softmax(logits / T) after
  top-k / top-p filtering. BOS (id 0) is never chosen."""
  logits_NxV = logits_NxV.at[:, 0].set(-jnp.inf)
  if temperature == 0:
    return jnp.argmax(logits_NxV, axis=-1)
  logits_NxV = filter_logits(logits_NxV / temperature, top_k=top_k, top_p=top_p)
  return jax.vmap(jax.random.categorical)(rngs_N, logits_NxV)


GUIDANCE_SCHEDULES = ("constant", "linear", "cosine")


def guidance_scale(scale: float, schedule: str, t: jnp.ndarray, steps: int) -> jnp.ndarray:
  """The guidance scale at step t of `steps` (4M's convention: 1 = none): `constant`, or
  rising from 1 to `scale` over the steps, `linear` or `cosine` (1 + (s - 1) w, w = (t + 1) / n
  or (1 - cos(pi (t + 1) / n)) / 2)."""
  progress = (t + 1) / steps
  weight = {"constant": lambda: jnp.ones_like(progress), "linear": lambda: progress,
            "cosine": lambda: (1 - jnp.cos(jnp.pi * progress)) / 2}
  if schedule not in weight:
    raise ValueError(f"guidance_schedule must be one of {GUIDANCE_SCHEDULES}, got {schedule!r}")
  return 1 + (scale - 1) * weight[schedule]()


def guide(logits_2NxV: jnp.ndarray, scale: jnp.ndarray) -> jnp.ndarray:
  """Classifier-free guidance on stacked (conditional; unconditional) logits:
  l_u + s (l_c - l_u)."""
  cond, uncond = jnp.split(logits_2NxV, 2)
  return uncond + scale * (cond - uncond)


def sample(model: nn.Module, params: Any, images: jnp.ndarray, rngs_B: jax.Array, *,
           temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, num_samples: int = 1,
           guidance: float = 1.0, guidance_schedule: str = "constant",
           cached: bool = True) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Codes for each image: (tokens (B, num_samples, L) in [1, vocab), log-probabilities of the
  sequences under the (guided) model (B, num_samples)).

  `rngs_B` holds one key per image (sample s of image b uses fold_in(rngs_B[b], s)).
  `guidance` is classifier-free guidance's scale s (4M's convention: 1 = none, the
  unconditional pass is skipped): logits = l_uncond + s (l_cond - l_uncond), before temperature
  and filtering, on a model trained with `cond_dropout`; the conditional and unconditional
  passes run as one batch. `cached=False` recomputes the whole decoder at every step (the
  reference, for benchmarks).
  """
  batch, seq_len = images.shape[0], model.seq_len
  variables = {"params": params}
  encoded = model.apply(variables, images, method=model.encode)
  encoded = jnp.repeat(encoded, num_samples, axis=0)  # (B * num_samples, P, E)
  guided = guidance != 1.0
  if guided:  # conditional rows, then unconditional ones
    encoded = jnp.concatenate([encoded, model.apply(variables, encoded,
                                                    method=model.encode_unconditional)])
  twice = (lambda x: jnp.concatenate([x, x])) if guided else (lambda x: x)
  rngs = jax.vmap(lambda key: jax.vmap(lambda s: jax.random.fold_in(key, s))(
      jnp.arange(num_samples)))(rngs_B).reshape(-1)
  tokens = jnp.zeros((batch * num_samples, seq_len), jnp.int32)
  logprob = jnp.zeros(batch * num_samples, jnp.float32)

  def next_logits(t, tokens, cache):
    if not cached:
      logits = model.apply(variables, encoded, twice(tokens), method=model.decode)
      return jax.lax.dynamic_index_in_dim(logits, t, axis=1, keepdims=False), cache
    previous = jax.lax.dynamic_index_in_dim(tokens, jnp.maximum(t - 1, 0), 1, keepdims=False)
    previous = jnp.where(t == 0, 0, previous)
    return model.apply(variables, cache, twice(previous), t, method=model.decode_step)

  def step(t, carry):
    tokens, logprob, cache = carry
    logits, cache = next_logits(t, tokens, cache)
    if guided:
      logits = guide(logits, guidance_scale(guidance, guidance_schedule, t, seq_len))
    token = choose_tokens(logits.astype(jnp.float32), jax.vmap(jax.random.fold_in, (0, None))(
        rngs, t), temperature=temperature, top_k=top_k, top_p=top_p)
    logprob += jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], 1)[:, 0]
    return tokens.at[:, t].set(token), logprob, cache

  cache = model.apply(variables, encoded, method=model.init_cache) if cached else None
  tokens, logprob, _ = jax.lax.fori_loop(0, seq_len, step, (tokens, logprob, cache))
  return (tokens.reshape(batch, num_samples, seq_len),
          logprob.reshape(batch, num_samples))
