"""`save_predictions`: writes a split's inputs and the model's predictions to an npz file.

Option `outfile` (required): the path; with several hosts each writes `<outfile>.<process>`.
Keys are the batch keys (e.g. `image`, `labels`) and `pred/<name>` for each prediction.
"""

from pathlib import Path

import jax
import numpy as np

from evaluators.common import Evaluator, register
from uvim import input_pipeline


@register("save_predictions")
class SavePredictions(Evaluator):
  OPTIONS = Evaluator.OPTIONS | {"outfile"}

  def __init__(self, name: str, config, options: dict, *, mesh, fns):
    super().__init__(name, config, options, mesh=mesh, fns=fns)
    if "outfile" not in options:
      raise ValueError(f"config.{name}: save_predictions needs an `outfile`")
    self.outfile = Path(options["outfile"])
    self._predict = jax.jit(self.fns["predict"])

  def run(self, variables) -> dict[str, float]:
    rows: dict[str, list] = {}
    for batch in self.batches():
      mask = input_pipeline.local_rows(batch[input_pipeline.MASK_KEY])
      pred = {f"pred/{k}": v for k, v in self._predict(variables, batch).items()}
      for key, value in {**batch, **pred}.items():
        if key != input_pipeline.MASK_KEY:
          rows.setdefault(key, []).append(input_pipeline.local_rows(value)[mask])
    path = self.outfile
    if jax.process_count() > 1:
      path = path.with_name(f"{path.name}.{jax.process_index()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.concatenate(v) for k, v in rows.items()}
    with open(path, "wb") as f:
      np.savez_compressed(f, **arrays)
    return {"num_examples": float(len(next(iter(arrays.values()))))}
