"""Stage I's labels embedded by indexing (this project) against one-hot inputs (big_vision).

Both are the real compiled training step of the same config: once with the task's class ids
(`vqvae.LabelEmbedding` gathers kernel rows from `GATHER_MIN_CLASSES` classes on, its gradient
a scatter-add), once with those ids expanded to one-hot floats first (the original's dense
layer over classes x patch^2). The figure is the speed-up; the record also holds both XLA FLOP
counts and the FLOPs the indexing removes by formula: the embedding matmul and its kernel
gradient, 2 x 2 x B x T x sum(C) x P x W.
"""

import contextlib
import types
from collections.abc import Iterator

import jax
import numpy as np

from bench import common, train_step
from uvim import stages, tasks
from uvim.models import vqvae


def one_hot_task(task: types.ModuleType) -> types.SimpleNamespace:
  """`task` with its class-id inputs given to the model as one-hot floats."""

  def input_pp(batch: dict, model_config) -> tuple[dict, dict]:
    inputs, stats = task.input_pp(batch, model_config)
    return {k: jax.nn.one_hot(x, model_config.inputs[k][0], axis=-2)
               if np.issubdtype(x.dtype, np.integer) else x for k, x in inputs.items()}, stats

  def loss_fn(logits: dict, batch: dict, model_config, inputs=None):
    return task.loss_fn(logits, batch, model_config)  # on its class ids, not the one-hot inputs

  public = {k: getattr(task, k) for k in dir(task) if not k.startswith("_")}
  return types.SimpleNamespace(**{**public, "input_pp": input_pp, "loss_fn": loss_fn})


@contextlib.contextmanager
def registered(name: str, task) -> Iterator[None]:
  """`task` available as config.task = `name` while inside."""
  tasks.TASKS[name] = task
  try:
    yield
  finally:
    del tasks.TASKS[name]


def removed_flops(config) -> float:
  """FLOPs of the one-hot embedding's matmul and of its kernel gradient, per step: the inputs
  the task gives as class ids, (B, T, P) each, over C >= GATHER_MIN_CLASSES classes."""
  stage = stages.get_stage(config)
  inputs, _ = jax.eval_shape(lambda b: stage.task.input_pp(b, config.model),
                             stage.abstract_batch(config.batch_size))
  return sum(4.0 * np.prod(x.shape) * config.model.inputs[k][0] * config.model.width
             for k, x in inputs.items() if np.issubdtype(x.dtype, np.integer)
             and config.model.inputs[k][0] >= vqvae.GATHER_MIN_CLASSES)


def measure(spec: common.ConfigSpec, steps: int) -> list[dict]:
  """One record: seconds per step with one-hot inputs / with class ids."""
  config = spec.build()
  ids = train_step.measure(config, steps=steps)
  one_hot_config = config.copy_and_resolve_references()
  one_hot_config.task = "one_hot"
  with registered("one_hot", one_hot_task(tasks.get_task(config.task))):
    one_hot = train_step.measure(one_hot_config, steps=steps)
  speedup = one_hot["seconds_per_step"] / ids["seconds_per_step"]
  fewer = 1 - ids["xla_flops_per_step"] / one_hot["xla_flops_per_step"]
  notes = (f"{ids['seconds_per_step']:.3g} s/step with class ids, "
           f"{one_hot['seconds_per_step']:.3g} s one-hot; XLA counts {fewer:.0%} fewer FLOPs")
  return [common.record(
      "label_embedding", ids["config"], speedup, "x faster", notes,
      seconds_per_step=ids["seconds_per_step"],
      one_hot_seconds_per_step=one_hot["seconds_per_step"],
      xla_flops_per_step=ids["xla_flops_per_step"],
      one_hot_xla_flops_per_step=one_hot["xla_flops_per_step"],
      removed_flops_formula=removed_flops(config))]
