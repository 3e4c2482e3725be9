"""Sampling the guiding code from the stage II model, each scheme one compiled loop.

Schemes: `ar` (the causal model, one token a step), and on a masked model (`lm.Model.masked`)
`maskgit` (each step samples every undecided position and keeps the most confident) and `roar`
(each step decodes random undecided positions), a token schedule saying how many per step.
The image is encoded once and the cross-attention keys/values of every decoder block computed
once per image, for every scheme; `ar` also caches self-attention keys/values, so each of its
steps costs one token's worth of decoder work, while a parallel step runs the decoder over the
whole code. Every image (and every sample of it) has its own random stream, so a result does
not depend on what else is in the batch. Id 0 (BOS / MASK) is never emitted.
"""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uvim.errors import UserError, did_you_mean
from uvim.models import lm

SCHEMES = ("ar", "maskgit", "roar")
TOKEN_SCHEDULES = ("cosine", "linear")
TEMPERATURE_SCHEDULES = ("constant", "linear", "onex")
GUIDANCE_SCHEDULES = ("constant", "linear", "cosine")
UNCONDITIONAL = ("image", "everything")


def _option(default: Any, help_text: str, choices: tuple[str, ...] = ()) -> Any:
  return dataclasses.field(default=default, metadata={"help": help_text, "choices": choices})


# Bounds of the options: beyond them a code is noise (temperature) or overflows (guidance);
# values outside (NaN and infinities too) are mistakes, refused before any work.
MAX_TEMPERATURE, MAX_GUIDANCE = 100.0, 100.0


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How stage II writes a code: every sampling option with its default, its meaning and its
  domain, declared here once. predict.py's flags, the evaluators' `predict_kwargs`,
  `api.Model.predict_batch` and the tools are built from it; a new option is one field (and its
  use in `sample`). Frozen and hashable: static under `jax.jit`."""

  scheme: str | None = _option(
      None, "Decoding: ar (one token a step, causal models); maskgit or roar (a few parallel "
      "steps, masked models).", SCHEMES)
  steps: int = _option(8, "Steps of maskgit / roar.")
  token_schedule: str = _option(
      "cosine", "Tokens decided per parallel step: MaskGIT's cosine or linear.", TOKEN_SCHEDULES)
  temperature: float = _option(0.0, "Sampling temperature (0: argmax).")
  temperature_schedule: str = _option(
      "constant", "Temperature over parallel steps: constant, linear or onex (decaying).",
      TEMPERATURE_SCHEDULES)
  choice_temperature: float = _option(
      4.5, "maskgit: scale of the Gumbel noise on the confidence, annealed over the steps "
      "(MaskGIT's 4.5; 0 decides the most confident tokens first, which drifts from the random "
      "masks of training: worse on the toy tasks).")
  top_k: int = _option(0, "Sample among the k most likely tokens (0: all).")
  top_p: float = _option(1.0, "Nucleus sampling mass (1.0: all).")
  num_samples: int = _option(1, "Codes sampled per image.")
  guidance: float = _option(
      1.0, "Classifier-free guidance scale (4M's convention: 1 = none; needs a model trained "
      "with cond_dropout).")
  guidance_schedule: str = _option(
      "constant", "How the guidance scale rises from 1 over the steps.", GUIDANCE_SCHEDULES)
  unconditional: str = _option(
      "image", "What guidance's unconditional pass drops: the image, or everything (the image "
      "and every code but the one being decoded, given or generated before: 4M's "
      "cfg_grow_conditioning; multi-task chains).", UNCONDITIONAL)
  seed: int = _option(0, "Sampling seed (each image also hashes its pixels).")

  def __post_init__(self):
    for f in dataclasses.fields(self):
      value, choices = getattr(self, f.name), f.metadata["choices"]
      if choices and value not in choices and not (value is None and f.default is None):
        raise UserError(f"{f.name} must be one of {choices}, got {value!r}")
    # Comparisons are False for NaN; the bounds exclude infinities.
    domains = {"steps": self.steps >= 1,
               "temperature": 0 <= self.temperature <= MAX_TEMPERATURE,
               "choice_temperature": 0 <= self.choice_temperature <= MAX_TEMPERATURE,
               "top_k": self.top_k >= 0, "top_p": 0 < self.top_p <= 1,
               "num_samples": self.num_samples >= 1,
               "guidance": -MAX_GUIDANCE <= self.guidance <= MAX_GUIDANCE}
    rules = {"steps": ">= 1", "temperature": f"in [0, {MAX_TEMPERATURE}] (0: argmax)",
             "choice_temperature": f"in [0, {MAX_TEMPERATURE}]", "top_k": ">= 0 (0: all)",
             "top_p": "in (0, 1]", "num_samples": ">= 1",
             "guidance": f"in [-{MAX_GUIDANCE}, {MAX_GUIDANCE}] (1: none)"}
    for name, ok in domains.items():
      if not ok:
        raise UserError(f"{name} must be {rules[name]}, got {getattr(self, name)!r}")

  @classmethod
  def of(cls, sampling: "Sampling | None" = None, **options: Any) -> "Sampling":
    """`sampling` (default: the defaults) with `options` replaced; unknown names are errors."""
    unknown = sorted(set(options) - set(cls.names()))
    if unknown:
      raise UserError(f"unknown sampling option(s) {unknown}; "
                      f"{did_you_mean(unknown[0], cls.names())}valid: {sorted(cls.names())}")
    return dataclasses.replace(sampling or cls(), **options)

  @classmethod
  def names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))

  def scheme_of(self, model: nn.Module) -> str:
    """The scheme, defaulting to the model's own (`ar` causal, `maskgit` masked)."""
    return self.scheme or ("maskgit" if model.masked else "ar")

  def check_model(self, model: nn.Module) -> None:
    """The options that need something of the model: the scheme its decoder, guidance its
    unconditional input."""
    scheme = self.scheme_of(model)
    if (scheme == "ar") == model.masked:
      raise UserError(
          f"scheme {scheme!r} needs a {'causal' if scheme == 'ar' else 'masked'} stage II model "
          f"(config.model.masked={scheme != 'ar'}); this one is " + (
              "masked (use maskgit or roar)" if model.masked else "causal (use ar; maskgit "
              "and roar need a model trained with config.model.masked)"))
    if self.guidance != 1.0 and not model.cond_dropout:
      raise UserError(f"guidance {self.guidance}: this model was trained without condition "
                      "dropout (config.model.cond_dropout = 0), so it has no unconditional "
                      "input")

  def check(self, model: nn.Module, code_len: int) -> None:
    """Every option against the model, parallel steps against the `code_len` words to write."""
    self.check_model(model)
    if model.masked and not 1 <= self.steps <= code_len:
      raise UserError(f"steps {self.steps}: must be between 1 and the code length {code_len}")
    if self.top_k > model.vocab_size:
      raise UserError(f"top_k {self.top_k}: more than the model's {model.vocab_size} code words "
                      "(0: all)")


def filter_logits(logits_NxV: jnp.ndarray, *, top_k: int, top_p: float) -> jnp.ndarray:
  """Sets to -inf the logits outside the `top_k` most likely, then those outside the smallest
  set whose probability (renormalised after top-k) reaches `top_p`. 0 / 1.0 disable them."""
  if top_k:
    kth = jax.lax.top_k(logits_NxV, top_k)[0][..., -1:]
    logits_NxV = jnp.where(logits_NxV < kth, -jnp.inf, logits_NxV)
  if top_p < 1.0:
    sorted_desc = -jnp.sort(-logits_NxV, axis=-1)
    before = jnp.cumsum(jax.nn.softmax(sorted_desc, axis=-1), axis=-1) - jax.nn.softmax(
        sorted_desc, axis=-1)
    kept = jnp.where(before < top_p, sorted_desc, jnp.inf)  # the nucleus, in order
    threshold = jnp.min(kept, axis=-1, keepdims=True)
    logits_NxV = jnp.where(logits_NxV < threshold, -jnp.inf, logits_NxV)
  return logits_NxV


def choose_tokens(logits_Nx_xV: jnp.ndarray, rngs_N: jax.Array, *,
                  temperature: float | jnp.ndarray, top_k: int, top_p: float) -> jnp.ndarray:
  """One token per row (and position, for (N, L, V) logits): argmax at a Python temperature 0,
  else a sample of softmax(logits / T) after top-k / top-p filtering, from the row's key. BOS /
  MASK (id 0) is never chosen."""
  logits_Nx_xV = logits_Nx_xV.at[..., 0].set(-jnp.inf)
  if isinstance(temperature, int | float) and temperature == 0:
    return jnp.argmax(logits_Nx_xV, axis=-1)
  logits_Nx_xV = filter_logits(logits_Nx_xV / temperature, top_k=top_k, top_p=top_p)
  return jax.vmap(jax.random.categorical)(rngs_N, logits_Nx_xV)


def tokens_per_step(length: int, steps: int, schedule: str) -> np.ndarray:
  """How many tokens each of `steps` parallel steps decodes (summing to `length`): after step t
  a fraction gamma((t + 1) / steps) stays masked, gamma = MaskGIT's cos(pi/2 r) (`cosine`: few
  tokens first, many last) or 1 - r (`linear`), and every step decodes at least one."""
  gammas = {"cosine": lambda r: np.cos(np.pi / 2 * r), "linear": lambda r: 1 - r}
  if schedule not in gammas:
    raise ValueError(f"token_schedule must be one of {TOKEN_SCHEDULES}, got {schedule!r}")
  if not 1 <= steps <= length:
    raise ValueError(f"steps must be between 1 and the code length {length}, got {steps}")
  gamma, masked, counts = gammas[schedule], length, []
  for t in range(steps):
    after = math.floor(length * gamma((t + 1) / steps) + 1e-9)
    after = min(max(after, steps - 1 - t), masked - 1)  # >= 1 token now and at each later step
    counts.append(masked - after)
    masked = after
  return np.array(counts)


def temperatures(temperature: float, schedule: str, counts: np.ndarray) -> np.ndarray:
  """The sampling temperature of each parallel step: `constant`; `linear`, T times the
  fraction of the code still masked before the step (4M's); `onex`, a 1/x^0.5 decay over the
  steps times that fraction, from T down to T/6 (after 4M's 'onex:0.5:0.5' with T = 3)."""
  masked_before = 1 - np.concatenate([[0], np.cumsum(counts)[:-1]]) / counts.sum()
  if schedule == "constant":
    return np.full(len(counts), temperature)
  if schedule == "linear":
    return temperature * masked_before
  if schedule == "onex":
    decay = 1 / np.sqrt(np.arange(1, len(counts) + 1))
    decay = (decay - decay[-1]) / max(decay[0] - decay[-1], 1e-9) if len(counts) > 1 else decay
    return temperature / 6 + (temperature - temperature / 6) * decay * masked_before
  raise ValueError(f"temperature_schedule must be one of {TEMPERATURE_SCHEDULES}, "
                   f"got {schedule!r}")


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


def image_rngs(images_BxHxWxC: jnp.ndarray, seed: int = 0) -> jax.Array:
  """One key per image, from its 8-bit content (exact integer hash): the same image gets the
  same random stream whatever batch, device or host it is processed on."""
  pixels = jnp.round((images_BxHxWxC + 1) * 127.5).astype(jnp.uint32)
  pixels = pixels.reshape(len(pixels), -1)
  weights = jnp.arange(pixels.shape[1], dtype=jnp.uint32) * jnp.uint32(2654435761) | 1
  hashes = jnp.sum(pixels * weights, axis=1, dtype=jnp.uint32)
  return jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(seed), hashes)


def sample(model: nn.Module, params: Any, images: jnp.ndarray, rngs_B: jax.Array,
           sampling: Sampling | None = None, *, given: jnp.ndarray | None = None,
           span: tuple[int, int] | None = None, vocab: tuple[int, int] | None = None,
           cached: bool = True, with_order: bool = False, revise: bool = False,
           **options: Any) -> tuple[jnp.ndarray, ...]:
  """Codes for each image: (tokens (B, num_samples, L) in [1, vocab), log-probabilities of the
  sequences under the (guided) model (B, num_samples); for parallel schemes the sum, over
  steps, of each decided token's log-probability when it was decided), and with `with_order`
  the step at which each token was decided (B, num_samples, L).

  The options are `sampling` with `options` (`Sampling`'s fields) replaced. `scheme`: `ar`,
  `maskgit` or `roar` (default: `ar` for a causal model, `maskgit` for a masked one); parallel
  schemes take `steps` steps, `token_schedule` (`tokens_per_step`) and
  `temperature_schedule` (`temperatures`); `maskgit` ranks positions by the untempered
  log-probability of the sampled token plus Gumbel noise of scale `choice_temperature`
  annealed linearly to 0 over the steps (MaskGIT's 4.5; at 0 the most confident go first,
  an order unlike training's random masks that measured worse on the toy tasks).
  `rngs_B` holds one key per image (sample s of image b uses fold_in(rngs_B[b], s)); the
  `seed` option is the caller's (`image_rngs`).
  `guidance` is classifier-free guidance's scale s (4M's convention: 1 = none, the
  unconditional pass is skipped): logits = l_uncond + s (l_cond - l_uncond), before temperature
  and filtering, on a model trained with `cond_dropout`; the conditional and unconditional
  passes run as one batch. The unconditional pass sees the "no image" input and, with
  `unconditional='everything'`, MASK outside `span` (no other task's code). `cached=False`
  recomputes the whole causal decoder at every step (the reference, for benchmarks).

  Parallel schemes can decode part of a code (one task's, in a multi-task model): `given`
  (B, L), or (B, num_samples, L) per sample, holds the tokens the decoder sees from the start
  (MASK where none), `span` = (first, end) the positions to decode (only those that are MASK
  in `given`; the others never change) and `vocab` = (low, high) the ids they may take.
  With `revise`, `given` is a draft (e.g. the code of a video's previous frame): one pass over
  it first masks again every word of the span the model, seeing the draft, would not write
  itself (its argmax), and the steps decode those.
  """
  sampling = Sampling.of(sampling, **options)
  sampling.check_model(model)
  scheme, num_samples = sampling.scheme_of(model), sampling.num_samples
  if scheme == "ar" and (given is not None or span or vocab):
    raise ValueError("given, span and vocab need a parallel scheme (a masked model)")
  batch = images.shape[0]
  variables = {"params": params}
  encoded = model.apply(variables, images, method=model.encode)
  encoded = jnp.repeat(encoded, num_samples, axis=0)  # (B * num_samples, P, E)
  if sampling.guidance != 1.0:  # conditional rows, then unconditional ones
    encoded = jnp.concatenate([encoded, model.apply(variables, encoded,
                                                    method=model.encode_unconditional)])
  rngs = jax.vmap(lambda key: jax.vmap(lambda s: jax.random.fold_in(key, s))(
      jnp.arange(num_samples)))(rngs_B).reshape(-1)
  first, end = span or (0, model.seq_len)
  in_span = (np.arange(model.seq_len) >= first) & (np.arange(model.seq_len) < end)
  guided = _Guided(sampling.guidance, sampling.guidance_schedule,
                   model.seq_len if scheme == "ar" else sampling.steps,
                   in_span if sampling.unconditional == "everything" else None)
  filters = dict(top_k=sampling.top_k, top_p=sampling.top_p)
  temperature = sampling.temperature
  if scheme == "ar":
    tokens, logprob = _autoregressive(model, variables, encoded, rngs, guided, cached,
                                      temperature=temperature, **filters)
    order = jnp.broadcast_to(jnp.arange(model.seq_len), tokens.shape)
  else:
    counts = tokens_per_step(end - first, sampling.steps, sampling.token_schedule)
    temps = temperatures(temperature, sampling.temperature_schedule, counts)
    start = (jnp.full((batch, model.seq_len), lm.MASK, jnp.int32) if given is None
             else jnp.asarray(given, jnp.int32))
    start = (start.reshape(batch * num_samples, -1) if start.ndim == 3
             else jnp.repeat(start, num_samples, axis=0))
    tokens, logprob, order = _parallel(
        model, variables, encoded, rngs, guided, scheme, counts, temps if temperature else None,
        sampling.choice_temperature, start, in_span, vocab or (1, model.vocab_size), revise,
        **filters)
  per_sample = lambda x: x.reshape(batch, num_samples, *x.shape[1:])
  return tuple(map(per_sample, (tokens, logprob, order) if with_order else (tokens, logprob)))


class _Guided:
  """Guidance of a sampler with `steps` steps: `twice` doubles a batch of decoder inputs for the
  two passes (the unconditional one MASK outside `keep`, if given), `logits` mixes their
  outputs; both are identities at scale 1."""

  def __init__(self, scale: float, schedule: str, steps: int, keep: np.ndarray | None = None):
    self.scale, self.schedule, self.steps, self.keep = scale, schedule, steps, keep

  def twice(self, x: jnp.ndarray) -> jnp.ndarray:
    if self.scale == 1.0:
      return x
    return jnp.concatenate([x, x if self.keep is None else jnp.where(self.keep, x, lm.MASK)])

  def logits(self, logits_2Nx_xV: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    if self.scale == 1.0:
      return logits_2Nx_xV
    return guide(logits_2Nx_xV, guidance_scale(self.scale, self.schedule, t, self.steps))


def _autoregressive(model, variables, encoded, rngs, guided: _Guided, cached: bool, *,
                    temperature: float, top_k: int, top_p: float):
  """`ar`: one token a step, left to right, against the self-attention cache."""
  seq_len = model.seq_len
  tokens = jnp.zeros((len(rngs), seq_len), jnp.int32)
  logprob = jnp.zeros(len(rngs), jnp.float32)

  def next_logits(t, tokens, cache):
    if not cached:
      logits = model.apply(variables, encoded, guided.twice(tokens), method=model.decode)
      return jax.lax.dynamic_index_in_dim(logits, t, axis=1, keepdims=False), cache
    previous = jax.lax.dynamic_index_in_dim(tokens, jnp.maximum(t - 1, 0), 1, keepdims=False)
    previous = jnp.where(t == 0, 0, previous)
    return model.apply(variables, cache, guided.twice(previous), t, method=model.decode_step)

  def step(t, carry):
    tokens, logprob, cache = carry
    logits, cache = next_logits(t, tokens, cache)
    logits = guided.logits(logits, t)
    token = choose_tokens(logits, jax.vmap(jax.random.fold_in, (0, None))(rngs, t),
                          temperature=temperature, top_k=top_k, top_p=top_p)
    logprob += jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], 1)[:, 0]
    return tokens.at[:, t].set(token), logprob, cache

  cache = model.apply(variables, encoded, method=model.init_cache) if cached else None
  tokens, logprob, _ = jax.lax.fori_loop(0, seq_len, step, (tokens, logprob, cache))
  return tokens, logprob


def _parallel(model, variables, encoded, rngs, guided: _Guided, scheme: str, counts: np.ndarray,
              temps: np.ndarray | None, choice_temperature: float, start: jnp.ndarray,
              in_span: np.ndarray, vocab: tuple[int, int], revise: bool, *, top_k: int,
              top_p: float):
  """`maskgit` / `roar`: step t samples every masked position of `start` in the span and
  decides `counts[t]` of them (the most confident, or random ones); decided tokens are never
  re-masked. `temps` None is greedy; `revise` first masks the span's words of `start` that
  differ from the model's argmax. Also returns the step that decided each token (-1: not
  decided here)."""
  steps, seq_len = len(counts), model.seq_len
  counts_j = jnp.asarray(counts)
  ids = jnp.arange(model.vocab_size)
  allowed = (ids >= vocab[0]) & (ids < vocab[1]) & (ids != lm.MASK)
  cache = model.apply(variables, encoded, method=model.init_cache)
  if revise:
    logits = guided.logits(model.apply(variables, cache, guided.twice(start),
                                       method=model.fill_in), 0)
    own = jnp.argmax(jnp.where(allowed, logits, -jnp.inf), axis=-1)
    start = jnp.where(in_span & (own != start), lm.MASK, start)

  def step(t, carry):
    tokens, logprob, order = carry
    logits = guided.logits(model.apply(variables, cache, guided.twice(tokens),
                                       method=model.fill_in), t)
    logits = jnp.where(allowed, logits, -jnp.inf)
    sample_rngs, order_rngs = jnp.moveaxis(jax.vmap(lambda k: jax.random.split(
        jax.random.fold_in(k, t)))(rngs), 1, 0)
    sampled = choose_tokens(logits, sample_rngs, temperature=0.0 if temps is None else
                            jnp.asarray(temps, jnp.float32)[t], top_k=top_k, top_p=top_p)
    token_logprob = jnp.take_along_axis(jax.nn.log_softmax(logits), sampled[..., None],
                                        -1)[..., 0]
    if scheme == "maskgit":
      noise = jax.vmap(lambda k: jax.random.gumbel(k, (seq_len,)))(order_rngs)
      score = token_logprob + choice_temperature * (1 - (t + 1) / steps) * noise
    else:
      score = jax.vmap(lambda k: jax.random.uniform(k, (seq_len,)))(order_rngs)
    undecided = (tokens == lm.MASK) & in_span
    score = jnp.where(undecided, score, -jnp.inf)
    rank = jnp.argsort(jnp.argsort(-score, axis=1), axis=1)  # 0 = the best undecided
    chosen = undecided & (rank < counts_j[t])
    return (jnp.where(chosen, sampled, tokens),
            logprob + jnp.sum(jnp.where(chosen, token_logprob, 0), axis=1),
            jnp.where(chosen, t, order))

  return jax.lax.fori_loop(0, steps, step, (start, jnp.zeros(len(rngs), jnp.float32),
                                            jnp.full(start.shape, -1, jnp.int32)))
