"""Models under the paper's names: `proj.uvim.vit` (stage I) and `proj.uvim.lm` (stage II)."""


import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import flax.linen as nn

from uvim.errors import UserError, did_you_mean
from uvim.models import lm, vqvae

MODELS = {"proj.uvim.vit": vqvae.Model, "proj.uvim.lm": lm.Model}


def get_model(name: str, model_config, **overrides) -> nn.Module:
  """The model `name` (config.model_name) built from `model_config` (config.model), with
  `overrides` (e.g. the run's `dtype` and `remat`) on top."""
  if name not in MODELS:
    raise UserError(f"Unknown model_name {name!r}: {did_you_mean(name, MODELS)}known: "
                    f"{sorted(MODELS)}")
  kwargs = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
  kwargs.update(overrides)
  try:
    return MODELS[name](**kwargs)
  except TypeError as e:
    raise UserError(f"config.model does not fit {name!r}: {e}") from None


# Settings of how a model computes, not what: the run's, applied to every model it builds.
MEMORY_OPTIONS = ("dtype", "remat", "scan_layers", "attention")


def memory_options(config) -> dict:
  """Model overrides from the run config: `compute_dtype` (activations and matmuls; parameters
  stay float32), `remat` (recompute each block's activations in the backward pass),
  `scan_layers` (one `nn.scan` per stack of transformer blocks; checkpoints convert either
  way) and `attention` (the kernel, `vit.ATTENTION`)."""
  return {"dtype": config.compute_dtype, "remat": config.remat,
          "scan_layers": config.scan_layers, "attention": config.attention}


# Settings that only act in training: a trained model may be used with other values of them.
TRAINING_ONLY = ("code_dropout", "dict_momentum", "min_count", "dropout", "cond_dropout")


def inference_settings(model: nn.Module) -> dict[str, str]:
  """A built model's settings that act at inference (not TRAINING_ONLY or MEMORY_OPTIONS), as
  canonical JSON, for comparing a model with the one a checkpoint was trained as."""
  return {f.name: _plain(getattr(model, f.name)) for f in dataclasses.fields(model)
          if f.init and f.name not in ("parent", "name", *TRAINING_ONLY, *MEMORY_OPTIONS)}


def _plain(value: Any) -> str:
  """A setting as canonical JSON (tuples as lists, mappings sorted)."""
  def convert(v):
    if isinstance(v, Mapping):
      return {str(k): convert(x) for k, x in v.items()}
    return [convert(x) for x in v] if isinstance(v, list | tuple) else v
  return json.dumps(convert(value), sort_keys=True)
