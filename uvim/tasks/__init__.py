"""Tasks: everything task-specific, one module each, registered under the paper's names.

A task module provides
  input_pp(batch, model_config) -> (inputs, stats): labels -> stage I inputs (B, tokens, C, p^2)
  loss_fn(logits, batch, model_config) -> (loss per example (B,), per-example task losses)
  predict_outputs(logits, model_config) -> task predictions (panoptic ids, depth, colour)
and, for predict.py, on one example's numpy outputs and its uint8 image:
  render(outputs, image), render_labels(labels, image) -> uint8 pictures at the image's size
  save(outputs, image, stem, categories) -> writes the prediction files `<stem>.*`
  DEFAULT_TEMPERATURE: the sampling temperature predict.py uses unless told otherwise
  LABELS: (channels, dtype) of the `labels` the pp gives (for shapes without data)
"""

import difflib
from types import ModuleType

from uvim.tasks import colorization, depth, panoptic

TASKS: dict[str, ModuleType] = {
    "panoptic_segmentation": panoptic,
    "colorization": colorization,
    "depth": depth,
}


def get_task(name: str) -> ModuleType:
  """The task module registered as `name` (config.task)."""
  if name not in TASKS:
    close = difflib.get_close_matches(name, TASKS, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ValueError(f"Unknown task {name!r} (config.task): {hint}known: {sorted(TASKS)}")
  return TASKS[name]
