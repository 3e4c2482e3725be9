"""Evaluators from `config.evals`, the paper's form: a list of (name, type) pairs, where the
ConfigDict `config.<name>` holds `split`, `pp`, `log_steps`, `prefix` and type-specific options.

An evaluator is built once and run by the trainer on its own cadence and at the end of
training; `run(state)` returns {metric name: value}, which the trainer writes under `prefix`.
"""

import difflib
from collections.abc import Callable

from absl import logging

EVALUATORS: dict[str, type] = {}
# Types of the paper's configs that a later version provides; configs using them still run.
NOT_YET = {"coco_panoptic", "nyu_depth", "coltran_fid", "psnr", "save_predictions"}


def register(name: str) -> Callable[[type], type]:
  def decorator(cls: type) -> type:
    EVALUATORS[name] = cls
    return cls
  return decorator


def from_config(config, **kwargs) -> list:
  """The evaluators of `config.evals`; `kwargs` (mesh, model functions) go to each."""
  from evaluators import validation  # noqa: F401  (registers)

  evaluators = []
  for name, kind in config.evals:
    if kind not in EVALUATORS:
      if kind in NOT_YET:
        logging.warning("Evaluator type %r (config.evals %r) is not implemented yet; skipped.",
                        kind, name)
        continue
      close = difflib.get_close_matches(kind, [*EVALUATORS, *NOT_YET], n=1)
      hint = f"did you mean {close[0]!r}? " if close else ""
      raise ValueError(f"Unknown evaluator type {kind!r} for {name!r} in config.evals: {hint}"
                       f"known: {sorted(EVALUATORS)}")
    if name not in config:
      raise ValueError(f"config.evals names {name!r}, but there is no config.{name}")
    options = dict(config[name])
    unknown = set(options) - EVALUATORS[kind].OPTIONS
    if unknown:
      raise ValueError(f"config.{name}: unknown option(s) {sorted(unknown)} for evaluator "
                       f"{kind!r}; valid: {sorted(EVALUATORS[kind].OPTIONS)}")
    evaluators.append(EVALUATORS[kind](name, config, options, **kwargs))
  return evaluators
