"""Models under the paper's names: `proj.uvim.vit` (stage I) and `proj.uvim.lm` (stage II)."""

import difflib

import flax.linen as nn

from uvim.models import lm, vqvae

MODELS = {"proj.uvim.vit": vqvae.Model, "proj.uvim.lm": lm.Model}


def get_model(name: str, model_config, **overrides) -> nn.Module:
  """The model `name` (config.model_name) built from `model_config` (config.model), with
  `overrides` (e.g. the run's `dtype` and `remat`) on top."""
  if name not in MODELS:
    close = difflib.get_close_matches(name, MODELS, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ValueError(f"Unknown model_name {name!r}: {hint}known: {sorted(MODELS)}")
  kwargs = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
  kwargs.update(overrides)
  try:
    return MODELS[name](**kwargs)
  except TypeError as e:
    raise ValueError(f"config.model does not fit {name!r}: {e}") from None
