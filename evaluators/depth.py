"""`nyu_depth`: RMSE, AbsRel, log10 and delta < 1.25^k of depth predictions, per image then
averaged, over ground truth in (min_depth, max_depth). The prediction is resized (nearest) to
the ground truth, which the pp carries as `ground_truth` (e.g. after `nyu_eval_crop`)."""

import jax
import jax.numpy as jnp

from evaluators.common import MeanEvaluator, register
from uvim.tasks.depth import MAX_DEPTH, MIN_DEPTH


def depth_metrics(pred_BxHxW: jnp.ndarray, gt_BxHxW: jnp.ndarray, min_depth: float = MIN_DEPTH,
                  max_depth: float = MAX_DEPTH) -> dict[str, jnp.ndarray]:
  """Per-image metrics (B,) over the valid pixels of each image."""
  valid = (gt_BxHxW > min_depth) & (gt_BxHxW < max_depth)
  n = jnp.maximum(jnp.sum(valid, axis=(1, 2)), 1)
  mean = lambda x: jnp.sum(jnp.where(valid, x, 0.0), axis=(1, 2)) / n
  pred = jnp.maximum(pred_BxHxW, min_depth)
  gt = jnp.where(valid, gt_BxHxW, 1.0)
  ratio = jnp.maximum(pred / gt, gt / pred)
  return {
      "rmse": jnp.sqrt(mean((pred - gt) ** 2)),
      "abs_rel": mean(jnp.abs(pred - gt) / gt),
      "log10": mean(jnp.abs(jnp.log10(pred) - jnp.log10(gt))),
      **{f"delta{k}": mean((ratio < 1.25**k).astype(jnp.float32)) for k in (1, 2, 3)},
  }


@register("nyu_depth")
class NyuDepth(MeanEvaluator):
  """Depth metrics of the model's predictions; options `min_depth`, `max_depth` too."""

  OPTIONS = MeanEvaluator.OPTIONS | {"min_depth", "max_depth"}

  def per_example(self, fns, options):
    limits = (options.get("min_depth", MIN_DEPTH), options.get("max_depth", MAX_DEPTH))

    def metrics(variables, batch):
      gt = batch["ground_truth"][..., 0]
      pred = jax.image.resize(fns["predict"](variables, batch)["depth"], gt.shape, method="nearest")
      return depth_metrics(pred, gt, *limits)

    return metrics
