"""`images`: the model's predictions on a few fixed examples as one contact sheet (the model's
input, then per task its ground truth and prediction), which the trainer writes to TensorBoard
at each evaluation, so that a run's progress can be watched as pictures. `split` chooses the
examples (e.g. `validation[:4]`); with several hosts the sheet shows process 0's share.

The toy configs list it in `config.evals` (`configs.common.add_prediction_images`); a large run
adds it the same way (one sheet costs one predict batch).
"""

import jax
import numpy as np

from evaluators.common import Evaluator, register
from uvim import input_pipeline, visualize

CELL_SIZE = 128  # pixels of a sheet cell's longer side


@register("images")
class Images(Evaluator):
  def __init__(self, name: str, config, options: dict, *, mesh, fns):
    super().__init__(name, config, options, mesh=mesh, fns=fns)
    self.oracles = fns["oracles"]
    self._predict = jax.jit(self.fns["predict"])
    many = len(self.oracles) > 1
    self.titles = ["input", *(t for n in self.oracles for t in (
        (f"{n}: truth", f"{n}: prediction") if many else ("ground truth", "prediction")))]

  def run(self, variables) -> dict[str, np.ndarray]:
    """{'predictions': the sheet, uint8 (H, W, 3)}."""
    rows = []
    for batch in self.batches():
      outputs = jax.tree.map(input_pipeline.local_rows, self._predict(variables, batch))
      batch = {k: input_pipeline.local_rows(v) for k, v in batch.items()}
      for i in np.flatnonzero(batch[input_pipeline.MASK_KEY]):
        rows.append(self.row(batch, {k: v[i] for k, v in outputs.items()}, i))
    return {"predictions": visualize.contact_sheet(rows, self.titles, cell_size=CELL_SIZE)}

  def row(self, batch: dict, outputs: dict, i: int) -> list[np.ndarray]:
    image = visualize.from_model_range(batch["image"][i])
    cells = [image]
    for oracle in self.oracles.values():
      cells += [oracle.task.render_labels(batch[oracle.labels_key][i], image),
                oracle.task.render(outputs, image)]
    return cells
