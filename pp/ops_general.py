"""General ops: value ranges and moving keys around."""

from collections.abc import Sequence

import tensorflow as tf

from pp.registry import PPFn, register
from pp.utils import in_key_out_key


@register("value_range")
@in_key_out_key()
def value_range(vmin: float = -1, vmax: float = 1, in_min: float = 0, in_max: float = 255,
                clip_values: bool = False):
  """Maps [in_min, in_max] linearly to [vmin, vmax] as float32 (uint8 images -> [-1, 1])."""

  def _value_range(x):
    x = tf.cast(x, tf.float32)
    x = vmin + (x - in_min) * ((vmax - vmin) / (in_max - in_min))
    return tf.clip_by_value(x, vmin, vmax) if clip_values else x

  return _value_range


@register("keep")
def keep(*keys: str) -> PPFn:
  """Keeps only `keys`, dropping everything else."""
  return lambda data: {k: data[k] for k in keys}


@register("copy")
def copy(inkey: str, outkey: str) -> PPFn:
  """Copies `inkey` to `outkey`."""

  def _copy(data):
    data[outkey] = data[inkey]
    return data

  return _copy


@register("concat")
def concat(inkeys: Sequence[str], outkey: str | None = None, axis: int = -1) -> PPFn:
  """Concatenates `inkeys` along `axis` into `outkey` (default: the first input key)."""

  def _concat(data):
    data[outkey or inkeys[0]] = tf.concat([data[k] for k in inkeys], axis=axis)
    return data

  return _concat
