"""Tasks: everything task-specific, one module each, registered under the paper's names.

A task module provides
  input_pp(batch, model_config) -> (inputs, stats): labels -> stage I inputs, per modality
    either class ids (B, tokens, p^2) (categorical: embedded as one-hot by the model) or
    values (B, tokens, C, p^2)
  loss_fn(logits, batch, model_config) -> (loss per example (B,), per-example task losses)
  predict_outputs(logits, model_config) -> task predictions (panoptic ids, depth, colour)
and, for predict.py, on one example's numpy outputs and its uint8 image:
  render(outputs, image), render_labels(labels, image) -> uint8 pictures at the image's size
  save(outputs, image, stem, categories) -> writes the prediction files `<stem>.*`
  categories(config, model_config) -> what `save` needs of the dataset (panoptic: its COCO
    categories)
  DEFAULT_TEMPERATURE: the sampling temperature predict.py uses unless told otherwise
  LABELS: (channels, dtype) of the `labels` the pp gives (for shapes without data)
"""

from types import ModuleType

from uvim.errors import UserError, did_you_mean
from uvim.tasks import colorization, depth, panoptic

TASKS: dict[str, ModuleType] = {
    "panoptic_segmentation": panoptic,
    "colorization": colorization,
    "depth": depth,
}


def get_task(name: str) -> ModuleType:
  """The task module registered as `name` (config.task)."""
  if name not in TASKS:
    raise UserError(f"Unknown task {name!r} (config.task): {did_you_mean(name, TASKS)}known: "
                    f"{sorted(TASKS)}")
  return TASKS[name]
