"""`validation`: the mean loss (and per-task losses) of the model on a split, in eval mode."""

import jax
import jax.numpy as jnp

from evaluators.common import register
from uvim import input_pipeline


@register("validation")
class Validation:
  """Masked mean of the per-example losses over every example of `split`."""

  OPTIONS = frozenset({"split", "pp", "log_steps", "prefix", "batch_size"})

  def __init__(self, name: str, config, options: dict, *, mesh, loss_fn):
    """`loss_fn(state, batch) -> (loss (B,), {part: (B,)})` is jitted once here."""
    self.name, self.config, self.mesh = name, config, mesh
    self.split, self.pp = options["split"], options["pp"]
    self.log_steps = options.get("log_steps")
    self.prefix = options.get("prefix", f"{name}/")
    self.batch_size = options.get("batch_size", config.batch_size)

    def sums(state, batch):
      loss, parts = loss_fn(state, batch)
      mask = batch[input_pipeline.MASK_KEY].astype(jnp.float32)
      values = {"loss": loss, **parts}
      return {k: jnp.sum(v * mask) for k, v in values.items()}, jnp.sum(mask)

    self._sums = jax.jit(sums)

  def run(self, state) -> dict[str, float]:
    batches, _ = input_pipeline.eval_data(self.config, self.split, self.pp, self.batch_size,
                                          self.mesh)
    totals, count = None, 0.0
    for batch in batches:  # Dispatch everything, then fetch once.
      sums, n = self._sums(state, batch)
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
      count = count + n
    totals, count = jax.device_get((totals, count))
    return {k: float(v / count) for k, v in totals.items()}
