"""`validation`: the mean loss (and per-task losses) of the model on a split, in eval mode."""

from evaluators.common import MeanEvaluator, register


@register("validation")
class Validation(MeanEvaluator):
  """Masked mean of the per-example losses over every example of `split`."""

  def per_example(self, fns, options):
    def losses(variables, batch):
      loss, parts = fns["loss"](variables, batch)
      return {"loss": loss, **parts}
    return losses
