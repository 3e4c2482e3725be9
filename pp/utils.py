"""Helpers for writing pp ops: key routing and per-example randomness."""

import functools
import inspect
from collections.abc import Callable
from typing import Any

import tensorflow as tf

from pp.registry import PPFn

# An example may carry a stateless seed (shape [2], int64) under this key. Random ops draw from
# it, which makes a tf.data pipeline deterministic given the seed the input pipeline put there.
RNG_KEY = "_rng"


def in_key_out_key(default: str = "image", out_default: str | None = None,
                   with_data: bool = False) -> Callable:
  """Turns a factory of `tensor -> tensor` functions into one of `dict -> dict` functions.

  The decorated factory accepts `key=` (read and write the same key), or `inkey=` / `outkey=`
  (which default to `default` and `out_default`, itself defaulting to `default`).
  With `with_data=True` the tensor function also receives the whole example, to read side inputs.
  """

  def decorator(factory: Callable) -> Callable[..., PPFn]:

    @functools.wraps(factory)
    def wrapped(*args, key: str | None = None, inkey: str | None = None,
                outkey: str | None = None, **kwargs) -> PPFn:
      if key is not None and (inkey is not None or outkey is not None):
        raise TypeError("Pass either key= or inkey=/outkey=, not both.")
      src = key or inkey or default
      dst = key or outkey or out_default or default
      fn = factory(*args, **kwargs)

      def op(data: dict[str, Any]) -> dict[str, Any]:
        data[dst] = fn(data[src], data) if with_data else fn(data[src])
        return data

      return op

    wrapped.__signature__ = _with_key_params(factory)
    return wrapped

  return decorator


def _with_key_params(factory: Callable) -> inspect.Signature:
  """The factory's signature plus the key=, inkey=, outkey= keyword arguments."""
  sig = inspect.signature(factory)
  extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None)
           for n in ("key", "inkey", "outkey")]
  params = list(sig.parameters.values())
  var_kw = [p for p in params if p.kind == inspect.Parameter.VAR_KEYWORD]
  rest = [p for p in params if p.kind != inspect.Parameter.VAR_KEYWORD]
  return sig.replace(parameters=rest + extra + var_kw)


def next_seed(data: dict[str, Any]) -> tf.Tensor:
  """A fresh stateless seed for one random op.

  Splits `data[RNG_KEY]` (advancing it, so each op in a pipeline gets its own stream) when the
  example carries one; otherwise draws a seed from TF's global generator (eager use, tests).
  """
  if RNG_KEY in data:
    seeds = tf.random.experimental.stateless_split(tf.cast(data[RNG_KEY], tf.int64), 2)
    data[RNG_KEY] = seeds[0]
    return seeds[1]
  return tf.random.uniform([2], maxval=tf.int64.max, dtype=tf.int64)


def maybe_repeat(x: Any, n: int) -> tuple:
  """`x` as an n-tuple: scalars are repeated, sequences are checked for length."""
  if isinstance(x, list | tuple):
    if len(x) != n:
      raise ValueError(f"Expected {n} values, got {x!r}")
    return tuple(x)
  return (x,) * n
