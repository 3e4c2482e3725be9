"""The optimizer from config: big_vision's chain, its Adafactor variant, schedules, lr_mults.

The update of a parameter p with gradient g at step t is

  u = core(clip(g)),  p <- p - sched(t) * (lr * mult(p) * u + wd * [p is a kernel] * p)

so weight decay is decoupled and follows the schedule but not the learning rate (big_vision's
convention). `core` is `scale_by_adafactor` (big_vision's variant: factored second moments with
beta2_t = min(beta2_cap, 1 - (t+1)^-0.8), then momentum 0.9 kept in bf16, no bias correction)
or any optax `scale_by_<name>` (`adam`, `adamw`, `sgd` are aliases). `mult(p)` is the first
matching `lr_mults` regex over the '/'-joined parameter path; a multiplier of 0 freezes p
(no update, no decay).
"""

import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from uvim.tree import path_name

WD_PATTERN = r".*/kernel$|^kernel$"  # decay weights, not biases, norms or embeddings


class FactoredState(NamedTuple):
  count: jnp.ndarray
  v_row: Any
  v_col: Any
  v: Any


def _factored_dims(shape: Sequence[int], min_dim_size_to_factor: int) -> tuple[int, int] | None:
  """The (second largest, largest) axes to factor over, or None for small tensors."""
  if len(shape) < 2:
    return None
  order = np.argsort(shape)
  if shape[order[-2]] < min_dim_size_to_factor:
    return None
  return int(order[-2]), int(order[-1])


def factored_away(shape: Sequence[int], state_path: Sequence[str]) -> int | None:
  """The axis of a parameter of `shape` that the factored state on `state_path` (path parts,
  holding `v_row` or `v_col`) averages away: v_row the largest, v_col the second largest
  (`_factored_dims`); None for other states."""
  dims = _factored_dims(shape, 0)
  if dims is None:
    return None
  if "v_row" in state_path:
    return dims[1]
  return dims[0] if "v_col" in state_path else None


def scale_by_factored_rms(beta2_cap: float = 0.999, decay_rate: float = 0.8,
                          min_dim_size_to_factor: int = 32,
                          epsilon: float = 1e-30) -> optax.GradientTransformation:
  """Adafactor's second-moment scaling with beta2_t = min(beta2_cap, 1 - (t+1)^-decay_rate)."""

  def init(params):
    def row(p):
      dims = _factored_dims(p.shape, min_dim_size_to_factor)
      return jnp.zeros(np.delete(p.shape, dims[1]) if dims else (1,), jnp.float32)

    def col(p):
      dims = _factored_dims(p.shape, min_dim_size_to_factor)
      return jnp.zeros(np.delete(p.shape, dims[0]) if dims else (1,), jnp.float32)

    def full(p):
      dims = _factored_dims(p.shape, min_dim_size_to_factor)
      return jnp.zeros((1,) if dims else p.shape, jnp.float32)

    return FactoredState(jnp.zeros([], jnp.int32), jax.tree.map(row, params),
                         jax.tree.map(col, params), jax.tree.map(full, params))

  def update(grads, state, params=None):
    del params
    beta2 = jnp.minimum(beta2_cap, 1.0 - (state.count + 1.0) ** -decay_rate)

    def one(g, v_row, v_col, v):
      g2 = g * g + epsilon
      dims = _factored_dims(g.shape, min_dim_size_to_factor)
      if dims is None:
        v = beta2 * v + (1 - beta2) * g2
        return g * jax.lax.rsqrt(v), v_row, v_col, v
      d0, d1 = dims
      v_row = beta2 * v_row + (1 - beta2) * jnp.mean(g2, axis=d1)
      v_col = beta2 * v_col + (1 - beta2) * jnp.mean(g2, axis=d0)
      reduced_d1 = d1 - 1 if d1 > d0 else d1
      row_factor = jax.lax.rsqrt(v_row / jnp.mean(v_row, axis=reduced_d1, keepdims=True))
      col_factor = jax.lax.rsqrt(v_col)
      u = g * jnp.expand_dims(row_factor, d1) * jnp.expand_dims(col_factor, d0)
      return u, v_row, v_col, v

    out = jax.tree.map(one, grads, state.v_row, state.v_col, state.v)
    pick = lambda i: jax.tree.map(lambda _, o: o[i], grads, out)
    return pick(0), FactoredState(state.count + 1, pick(1), pick(2), pick(3))

  return optax.GradientTransformation(init, update)


def scale_by_adafactor(beta2_cap: float = 0.999, momentum: float = 0.9,
                       min_dim_size_to_factor: int = 32,
                       momentum_dtype: Any = jnp.bfloat16) -> optax.GradientTransformation:
  """big_vision's Adafactor: factored RMS scaling, then an EMA of the updates (no debias)."""
  return optax.chain(
      scale_by_factored_rms(beta2_cap=beta2_cap, min_dim_size_to_factor=min_dim_size_to_factor),
      optax.ema(momentum, debias=False, accumulator_dtype=momentum_dtype))


ALIASES = {"adam": "scale_by_adam", "adamw": "scale_by_adam", "sgd": "trace",
           "scale_by_adafactor": "scale_by_adafactor",
           "big_vision.scale_by_adafactor": "scale_by_adafactor"}


def core_transform(name: str, kwargs: dict) -> optax.GradientTransformation:
  """The gradient-scaling core named by `config.optax_name`, built with `config.optax`."""
  name = ALIASES.get(name, name)
  if name == "scale_by_adafactor":
    return scale_by_adafactor(**kwargs)
  if name == "trace" and not kwargs:
    return optax.identity()
  factory = getattr(optax, name, None)
  if factory is None:
    raise ValueError(f"Unknown optax_name {name!r}: use 'scale_by_adafactor', 'adam', 'adamw', "
                     "'sgd' or an optax gradient transformation such as 'scale_by_lion'")
  return factory(**kwargs)


def schedule_fn(total_steps: int, decay_type: str = "cosine", warmup_steps: int = 0,
                linear_end: float = 0.0, timescale: int = 10_000) -> Callable[[jnp.ndarray], Any]:
  """Multiplier of the learning rate and weight decay at a step: linear warmup, then decay."""
  if decay_type not in ("cosine", "linear", "rsqrt", "constant"):
    raise ValueError(f"Unknown schedule decay_type {decay_type!r}: expected 'cosine', "
                     "'linear', 'rsqrt' or 'constant'")

  def fn(step):
    step = jnp.asarray(step, jnp.float32)
    progress = jnp.clip((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
    if decay_type == "cosine":
      value = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    elif decay_type == "linear":
      value = 1.0 - (1.0 - linear_end) * progress
    elif decay_type == "rsqrt":
      value = jax.lax.rsqrt(jnp.maximum(step - warmup_steps, timescale) / timescale)
    else:
      value = jnp.ones_like(step)
    if warmup_steps:
      value = value * jnp.minimum(1.0, step / warmup_steps)
    return value

  return fn


def tree_of_mults(params: Any, lr_mults: Sequence[tuple[str, float]]) -> Any:
  """Per parameter, the multiplier of the first regex in `lr_mults` that matches its path."""
  compiled = [(re.compile(p), m) for p, m in lr_mults]

  def mult(path, _):
    name = path_name(path)
    return next((m for pattern, m in compiled if pattern.fullmatch(name)), 1.0)

  return jax.tree_util.tree_map_with_path(mult, params)


def decoupled_update(lr: float, wd: float, mults: Any, schedule: Callable,
                     wd_pattern: str = WD_PATTERN) -> optax.GradientTransformation:
  """u -> -sched(t) * (lr * mult * u + wd * [kernel and mult > 0] * p)."""
  wd_re = re.compile(wd_pattern)

  def init(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params):
    scale = schedule(state.count)

    def one(path, u, p, m):
      decay = wd if (m > 0 and wd_re.fullmatch(path_name(path))) else 0.0
      return -scale * (lr * m * u + decay * p)

    new = jax.tree_util.tree_map_with_path(one, updates, params, mults)
    return new, optax.ScaleByScheduleState(count=state.count + 1)

  return optax.GradientTransformation(init, update)


def make(config, params: Any, total_steps: int) -> tuple[optax.GradientTransformation, Callable]:
  """The optimizer of `config` for `params`, and its schedule (for logging the lr)."""
  schedule = schedule_fn(total_steps, **config.schedule)
  mults = tree_of_mults(params, config.get("lr_mults") or ())
  frozen = jax.tree.map(lambda m: m == 0, mults)
  parts = []
  if config.get("grad_clip_norm"):
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  parts += [optax.masked(core_transform(config.optax_name, dict(config.optax)),
                         jax.tree.map(lambda f: not f, frozen)),
            decoupled_update(config.lr, config.wd, mults, schedule)]
  return optax.chain(*parts), schedule
