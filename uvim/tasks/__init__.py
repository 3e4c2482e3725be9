"""Tasks: everything task-specific, one module each, found by name (`config.task`).

A task is a module of this package that defines `NAME` and everything `Task` lists: adding one
is one file (and its configs); the trainer, the evaluators, predict.py, the study tools and the
multi-task config ask it, and none holds a table of tasks. `TASKS` maps each `NAME` to its
module, discovered on first use; a module that lacks part of `Task` is an error naming it.
"""

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import numpy as np

from uvim.errors import UserError, did_you_mean


@dataclasses.dataclass(frozen=True)
class Scoring:
  """How the study tools score a task's samples one image at a time. `states(outputs, truth)`
  gives each of N samples of one image a state (N, S) that sums over images; `value(state)` is
  the metric of a sum of states (of one image: its per-image score); `difference(a, b)` the
  per-pixel difference of two samples' outputs (diversity), in `difference_unit`; `extras`
  (samples' outputs, truth) -> {name: value} of task-specific numbers (e.g. colourfulness)."""

  states: Callable[[dict, dict], np.ndarray]
  value: Callable[[np.ndarray], float]
  difference: Callable[[dict, dict], float]
  difference_unit: str
  extras: Callable[[dict, dict], dict[str, float]] = lambda outputs, truth: {}


def mean_scoring(per_image: Callable[[dict, dict], np.ndarray],
                 difference: Callable[[dict, dict], float], difference_unit: str,
                 **kwargs: Any) -> Scoring:
  """A metric averaged over images, `per_image(outputs, truth)` giving each sample's (N,):
  the state of an image is (score, 1)."""
  return Scoring(
      lambda outputs, truth: np.stack([per_image(outputs, truth),
                                       np.ones(len(next(iter(outputs.values()))))], 1),
      lambda state: float(state[0] / state[1]), difference, difference_unit, **kwargs)


class Task(Protocol):
  """What a task module says about its task (module attributes and functions).

  NAME                 the name configs give it (`config.task`, `config.oracle.task`)
  LABELS               (channels, dtype) of the `labels` its pp gives (shapes without data)
  DEFAULT_TEMPERATURE  the sampling temperature of its predictions unless told otherwise
  EVALUATOR            the evaluator type that scores it (`config.evals`), METRIC its headline
                       metric, HIGHER_IS_BETTER which way that metric improves
  TRUTH                where the study tools find an image's ground truth: "batch" (its rows
                       of the evaluator's batches) or "examples" (the raw tfds examples, for
                       metrics at the original resolution)
  MULTITASK            its part of a multi-task model (configs/multitask_stage2.py): `name`
                       (of its oracle there), `config` (its stage II config module), the pp
                       ops of its labels, and how they are resized and read
  """

  NAME: str
  LABELS: tuple[int, str]
  DEFAULT_TEMPERATURE: float
  EVALUATOR: str
  METRIC: str
  HIGHER_IS_BETTER: bool
  TRUTH: str
  MULTITASK: dict

  def input_pp(self, batch: dict, model_config: Any) -> tuple[dict, dict]:
    """labels -> stage I inputs per modality (class ids (B, tokens, p^2), embedded one-hot by
    the model, or values (B, tokens, C, p^2)), and label statistics."""

  def loss_fn(self, logits: dict, batch: dict, model_config: Any,
              inputs: dict | None = None) -> tuple[Any, dict]:
    """(loss per example (B,), per-example parts), on `inputs` when `input_pp` gave them."""

  def predict_outputs(self, logits: dict, model_config: Any) -> dict:
    """The task's predictions (panoptic ids, depth, colour...) from stage I logits."""

  def render(self, outputs: dict, image: np.ndarray) -> np.ndarray:
    """One example's outputs drawn as uint8 at `image`'s size."""

  def render_labels(self, labels: np.ndarray, image: np.ndarray) -> np.ndarray:
    """One example's ground truth drawn like a prediction."""

  def error_map(self, outputs: dict, labels: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1]: how wrong each pixel is."""

  def categories(self, dataset_categories: Callable[[], list[dict] | None],
                 model_config: Any) -> Any:
    """What `save` needs of the dataset; `dataset_categories()` reads its COCO categories
    (None where it has none), for the tasks that need them."""

  def save(self, outputs: dict, image: np.ndarray, stem: Path, categories: Any) -> None:
    """Writes one example's prediction files `<stem>*` at the image's size."""

  def scoring(self, categories: Any) -> Scoring:
    """How the study tools score samples (per image) and their diversity."""


REQUIRED = tuple(Task.__annotations__) + tuple(
    name for name in vars(Task) if not name.startswith("_") and callable(vars(Task)[name]))
TRUTHS = ("batch", "examples")
TASKS: dict[str, ModuleType] = {}  # NAME -> module; filled by `all_tasks`
_discovered: list[bool] = []


def check_task(module: ModuleType) -> ModuleType:
  """`module`, checked to say everything `Task` lists."""
  missing = [name for name in REQUIRED if not hasattr(module, name)]
  if missing:
    raise TypeError(f"{module.__name__} defines NAME but not {missing} (uvim.tasks.Task)")
  if module.TRUTH not in TRUTHS:
    raise TypeError(f"{module.__name__}.TRUTH must be one of {TRUTHS}, got {module.TRUTH!r}")
  return module


def all_tasks() -> dict[str, ModuleType]:
  """Every task module of this package, by NAME (imported on first call)."""
  if not _discovered:
    _discovered.append(True)
    for info in pkgutil.iter_modules(__path__):
      module = importlib.import_module(f"{__name__}.{info.name}")
      if hasattr(module, "NAME"):
        TASKS[module.NAME] = check_task(module)
  return TASKS


def get_task(name: str) -> ModuleType:
  """The task module registered as `name` (config.task)."""
  known = all_tasks()
  if name not in known:
    raise UserError(f"Unknown task {name!r} (config.task): {did_you_mean(name, known)}known: "
                    f"{sorted(known)}")
  return known[name]
