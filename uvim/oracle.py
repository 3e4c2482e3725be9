"""The restricted oracle as an object: a stage I model (`proj.uvim.vit`) with its task and config.

Stage I trains one, stage II holds one per task (frozen), `api.Tokenizer` wraps one, and the
study tools use it. It owns the two operations every user of a guiding code needs:

  encode(variables, batch) -> (code (B, code_len) ints in [0, dict_size), statistics)
  decode(variables, code or code vectors, ctx) -> the task outputs the code describes

and where its parameters come from (`shapes`, `load`, checked against the config the
checkpoint was trained with). A config section holds `task`, `model_name`, `model` and
`model_init`: a stage I config itself, or a stage II config's `oracle` / `oracles.<name>`.
"""

import math
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc

from uvim import checkpoint, models, tasks
from uvim.errors import UserError
from uvim.models import vit, vqvae


class Oracle:
  """A stage I model of `section` (task, model_name, model, [model_init]) whose labels are the
  batch's `labels_key`; `key` names the section in error messages (e.g. `config.oracle`).
  `overrides` are model settings of the run (`models.memory_options`)."""

  def __init__(self, section: mlc.ConfigDict, *, key: str = "config.oracle",
               labels_key: str = "labels", **overrides: Any):
    self.section, self.key, self.labels_key = section, key, labels_key
    self.task: ModuleType = tasks.get_task(section.task)
    self.config = section.model
    self.model = models.get_model(section.model_name, section.model, **overrides)

  @property
  def code_len(self) -> int:
    return self.model.code_len

  @property
  def dict_size(self) -> int:
    return self.model.dict_size

  @property
  def code_side(self) -> int:
    """The side of the code's square grid (words in raster order)."""
    return vqvae.grid_side(self.model.code_len)

  def context(self, batch: dict) -> jnp.ndarray:
    """The batch's image this oracle decodes with: the section's `context` key if it names one
    (a multi-task model's colour oracle reads the grayscale `image`), else `context(batch)`."""
    key = self.section.get("context")
    return batch[key] if key else context(batch)

  def inputs(self, batch: dict) -> tuple[dict, jnp.ndarray, dict]:
    """The model inputs of a batch: the task's label patches, the context image (`context`)
    and label statistics."""
    labels = {**batch, "labels": batch[self.labels_key]}
    inputs, stats = self.task.input_pp(labels, self.config)
    return inputs, self.context(batch), stats

  def init(self, rng: jax.Array, batch: dict) -> dict:
    """Fresh {'params', 'state'} (the state is empty for FSQ, which has no dictionary)."""
    rng_params, rng_state = jax.random.split(rng)
    inputs, ctx, _ = self.inputs(batch)
    return with_state(self.model.init({"params": rng_params, "state": rng_state}, inputs,
                                      ctx=ctx))

  def shapes(self) -> dict:
    """Shapes of {'params', 'state'}, without computing anything."""
    size = tuple(self.config.input_size)
    tokens = math.prod(vit.patch_grid(size, self.config.patch_size))
    inputs = {k: jnp.zeros((1, tokens, *shape)) for k, shape in self.config.inputs.items()}
    return jax.eval_shape(lambda: with_state(self.model.init(
        {"params": jax.random.key(0), "state": jax.random.key(1)}, inputs,
        ctx=jnp.zeros((1, *size, 3)))))

  def load(self, path: str | None = None) -> dict:
    """{'params', 'state'} from `path` (default the section's `model_init`: a workdir or a
    big_vision npz), after comparing the section with the config the checkpoint records."""
    path = path or self.section.get("model_init")
    if not path:
      raise UserError(f"{self.key}.model_init is not set: stage II needs a trained stage I (a "
                      "training workdir or a big_vision *_stageI_params.npz)")
    self.check_recorded_config(path)
    return self.load_unchecked(path, f"{self.key}.model_init={path}")

  def load_unchecked(self, path: str, source: str | None = None) -> dict:
    """{'params', 'state'} from `path` in this model's layout and shapes (mismatches name
    `source`, default `path`)."""
    shapes = self.shapes()
    tree = checkpoint.load_variables(path)
    source = source or path
    loaded = checkpoint.in_layout(tree["params"], self.model.scan_layers)
    return {"params": checkpoint.merge_into(shapes["params"], loaded, source),
            "state": checkpoint.merge_into(shapes["state"], tree.get("state", {}), source)}

  def check_recorded_config(self, path: str) -> None:
    """Compares the section (model_name, task, model) with the config `path` was trained with:
    shapes are checked when parameters load; this catches what they cannot show (code_len,
    bottleneck, context flags...)."""
    checkpoint.check_recorded_model(path, self.model, model_name=self.section.model_name,
                                    key=self.key, task=self.section.task)

  def encode(self, variables: dict, batch: dict) -> tuple[jnp.ndarray, dict]:
    """The code (B, code_len) of the batch's labels (eval mode: no dictionary update) and
    statistics: the labels' and the code's `codebook_*`."""
    inputs, ctx, stats = self.inputs(batch)
    _, aux = self.model.apply(variables, inputs, ctx=ctx, method=self.model.encode)
    codebook = {k: v for k, v in aux.items() if k.startswith("codebook_")}
    return jax.lax.stop_gradient(aux["code"]), {**stats, **codebook}

  def decode(self, variables: dict, code: jnp.ndarray, ctx: jnp.ndarray) -> dict:
    """The task outputs of a code: ints (B, code_len), or code vectors (B, code_len, dim)
    (zeros, mixtures, edits...), decoded by the base model with the context image."""
    discrete = jnp.issubdtype(code.dtype, jnp.integer)
    logits, _ = self.model.apply(variables, code, ctx=ctx, discrete_input=discrete,
                                 method=self.model.decode)
    return self.task.predict_outputs(logits, self.config)

  def reconstruct(self, variables: dict, batch: dict) -> dict:
    """The task outputs of the batch's labels through the code (eval mode: no code dropout, no
    dictionary update): what stage I's evaluators score."""
    inputs, ctx, _ = self.inputs(batch)
    return self.task.predict_outputs(self.model.apply(variables, inputs, ctx=ctx)[0], self.config)

  def codewords(self, variables: dict) -> jnp.ndarray:
    """The words (dict_size, dim) as the decoder sees them."""
    return self.model.apply(variables, method=self.model.codewords)

  def abstract_batch(self, batch_size: int, image_size) -> dict:
    """{'image', 'image_ctx', labels_key} of a batch as jax.ShapeDtypeStructs."""
    channels, dtype = self.task.LABELS
    label_size = tuple(self.config.input_size)
    return {"image": jax.ShapeDtypeStruct((batch_size, *image_size, 3), jnp.float32),
            "image_ctx": jax.ShapeDtypeStruct((batch_size, *label_size, 3), jnp.float32),
            self.labels_key: jax.ShapeDtypeStruct((batch_size, *label_size, channels),
                                                  jnp.dtype(dtype))}


def context(batch: dict) -> jnp.ndarray:
  """The image the oracle sees beside its code: `image_ctx` when the pp makes one (e.g.
  grayscale, or at the labels' resolution), else `image`."""
  return batch.get("image_ctx", batch["image"])


def with_state(variables: dict) -> dict:
  """Stage I variables with a `state` collection (empty for FSQ, which has no dictionary)."""
  return {"state": {}, **variables}
