"""Evaluators from `config.evals`, the paper's form: a list of (name, type) pairs, where the
ConfigDict `config.<name>` holds `split`, `pp`, `log_steps`, `prefix` and type-specific options.

An evaluator is built once and run by the trainer on its own cadence and at the end of
training; `run(variables)` returns {metric name: value}, which the trainer writes under `prefix`.
It computes through the model functions `fns` the stage gives it (uvim/stages.py): `loss` and
`predict`, both (variables, batch) -> per-example arrays, jit-compiled by the evaluator.
"""

import functools
from collections.abc import Callable

from uvim.errors import UserError, did_you_mean

EVALUATORS: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
  def decorator(cls: type) -> type:
    EVALUATORS[name] = cls
    return cls
  return decorator


def register_all() -> None:
  """Imports the evaluator modules and the tasks, which register their types in EVALUATORS."""
  import importlib
  import pkgutil

  import evaluators
  from uvim import tasks

  for info in pkgutil.iter_modules(evaluators.__path__):
    importlib.import_module(f"evaluators.{info.name}")
  tasks.all_tasks()


def from_config(config, **kwargs) -> list:
  """The evaluators of `config.evals`; `kwargs` (mesh, model functions) go to each."""
  register_all()
  evaluators = []
  for entry in config.evals:
    if not (isinstance(entry, list | tuple) and len(entry) == 2
            and all(isinstance(x, str) for x in entry)):
      raise UserError(f"config.evals holds (name, evaluator type) pairs of strings, got {entry!r}")
    name, kind = entry
    if kind not in EVALUATORS:
      raise UserError(f"Unknown evaluator type {kind!r} for {name!r} in config.evals: "
                      f"{did_you_mean(kind, EVALUATORS)}known: {sorted(EVALUATORS)}")
    if name not in config:
      raise UserError(f"config.evals names {name!r}, but there is no config.{name}")
    options = dict(config[name])
    unknown = set(options) - EVALUATORS[kind].OPTIONS
    if unknown:
      raise UserError(f"config.{name}: unknown option(s) {sorted(unknown)} for evaluator "
                      f"{kind!r}; valid: {sorted(EVALUATORS[kind].OPTIONS)}")
    for key in ("split", "pp"):
      if not options.get(key):
        raise UserError(f"config.{name} needs a `{key}` (evaluator {kind!r})")
    evaluators.append(EVALUATORS[kind](name, config, options, **kwargs))
  return evaluators


class Evaluator:
  """Options every evaluator takes: `split`, `pp`, `log_steps`, `prefix`, `batch_size`, and
  `predict_kwargs` for stage II's sampler (e.g. `dict(temperature=1.0)`; default greedy).

  Construction checks them all and builds the input (split, pp string, shapes) without reading
  it, so that a mistake stops the run before its first step, not when the evaluator first runs.
  """

  OPTIONS = frozenset({"split", "pp", "log_steps", "prefix", "batch_size", "predict_kwargs"})

  def __init__(self, name: str, config, options: dict, *, mesh, fns: dict):
    from uvim import input_pipeline

    # The prediction plan (task defaults applied), checked by the stage before the first step.
    if "options" in fns:
      checked = fns["options"](dict(options.get("predict_kwargs") or {}),
                               f"config.{name}.predict_kwargs")
      fns = {**fns, "predict": functools.partial(fns["predict"], **checked)}
    self.config, self.mesh, self.fns = config, mesh, fns
    self.split, self.pp = options["split"], options["pp"]
    self.log_steps = options.get("log_steps")
    self.prefix = options.get("prefix", f"{name}/")
    self.batch_size = options.get("batch_size", config.batch_size)
    for key in ("log_steps", "batch_size"):
      value = getattr(self, key)
      if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                or value < (key == "batch_size")):
        raise UserError(f"config.{name}.{key} must be a non-negative integer, got {value!r}")
    input_pipeline.check_eval_input(config, self.split, self.pp, f"config.{name}")

  def batches(self):
    """Global batches covering `split` once (padding has `_mask` False)."""
    from uvim import input_pipeline
    batches, _ = input_pipeline.eval_data(self.config, self.split, self.pp, self.batch_size,
                                          self.mesh)
    return batches


class MeanEvaluator(Evaluator):
  """Masked mean over every example of `split` of per-example metrics, jitted once."""

  def __init__(self, name: str, config, options: dict, *, mesh, fns: dict):
    import jax
    import jax.numpy as jnp

    super().__init__(name, config, options, mesh=mesh, fns=fns)
    per_example = self.per_example(self.fns, options)

    def sums(variables, batch):
      mask = batch["_mask"].astype(jnp.float32)
      return ({k: jnp.sum(v * mask) for k, v in per_example(variables, batch).items()},
              jnp.sum(mask))

    self._sums = jax.jit(sums)

  def per_example(self, fns: dict, options: dict) -> Callable:
    """(variables, batch) -> {metric: (B,) values}."""
    raise NotImplementedError

  def run(self, variables) -> dict[str, float]:
    import jax
    import jax.numpy as jnp

    totals, count = None, 0.0
    for batch in self.batches():  # Dispatch every batch, then fetch once.
      sums, n = self._sums(variables, batch)
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
      count = count + n
    totals, count = jax.device_get((totals, count))
    return {k: float(v / count) for k, v in totals.items()}
