"""`psnr`: peak signal-to-noise ratio of colour predictions on [-1, 1] images (range 2)."""

import jax.numpy as jnp

from evaluators.common import MeanEvaluator, register


def psnr(pred_BxHxWx3: jnp.ndarray, target_BxHxWx3: jnp.ndarray) -> jnp.ndarray:
  """Per image: 20 log10(2) - 10 log10(MSE)."""
  mse = jnp.mean((pred_BxHxWx3 - target_BxHxWx3) ** 2, axis=(1, 2, 3))
  return 20 * jnp.log10(2.0) - 10 * jnp.log10(jnp.maximum(mse, 1e-12))


@register("psnr")
class Psnr(MeanEvaluator):
  """Mean PSNR of the predicted colours against `labels`."""

  def per_example(self, fns, options):
    return lambda state, batch: {"psnr": psnr(fns["predict"](state, batch)["color"],
                                              batch["labels"])}
