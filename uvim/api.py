"""A trained or released UViM in one call, predicting on arrays: for notebooks and scripts.

  from uvim import api
  model = api.load("runs/panoptic_stage2")  # a stage II workdir: its config and checkpoint
  model = api.load("configs/panoptic_stage2.py",  # or a config and released big_vision files
                   checkpoint="uvim_panoptic_stageII_params.npz",
                   oracle="uvim_panoptic_stageI_params.npz")
  outputs = model.predict([api.read_image("photo.jpg")])  # task outputs, (B, samples, ...)

`predict` runs the one predict path of the trainer and predict.py (image -> sampled code ->
stage I decoder -> task output) at the model's resolution; `model.task.render(output, image)`
draws one output over its image at the image's size.

The stage I oracle alone is a tokenizer of task outputs:

  tok = api.load_tokenizer("runs/panoptic_stage1")  # or a stage II workdir (its oracle), or a
  code = tok.encode(labels, image)                  # config + a *_stageI_params.npz
  outputs = tok.decode(code, image)                 # the task output the code describes
  outputs = tok.decode_embeddings(tok.embed(code) * 0, image)  # continuous edits
"""

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from PIL import Image

from uvim import cli, decoding, models, stages, tasks
from uvim.errors import UserError


class Model:
  """A stage II model with its frozen oracle, ready to predict."""

  def __init__(self, config: mlc.ConfigDict, checkpoint: str):
    if config.model_name != "proj.uvim.lm":
      raise UserError(f"{checkpoint}: a {config.model_name!r} model; api.load takes stage II "
                      "models ('proj.uvim.lm'), which predict from images alone")
    self.config = config
    self.stage = stages.get_stage(config)
    # A multi-task model (config.oracles) has a task per oracle, in `tasks`, and no `task`.
    self.multitask = isinstance(self.stage, stages.MultiTaskStageII)
    self.tasks = self.stage.tasks if self.multitask else {}
    self.task = None if self.multitask else self.stage.task
    image = jax.ShapeDtypeStruct((1, *self.stage.model.input_size, 3), np.float32)
    shapes = jax.eval_shape(self.stage.init_variables, jax.random.key(0), {"image": image})
    params, _ = self.stage.load_init(checkpoint, shapes["params"], {})
    self.variables = jax.device_put(self.stage.variables(params, {},
                                                         self.stage.frozen_variables()))
    static = (*decoding.OPTIONS, "seed", *(("chain", "given") if self.multitask else ()))
    self._predict = jax.jit(self.stage.predict_samples, static_argnames=static)
    self._pp = None

  def preprocess(self, image: np.ndarray) -> dict[str, np.ndarray]:
    """`config.pp_predict` on one uint8 RGB image: the model inputs (`image`, ...)."""
    from pp.builder import get_preprocess_fn

    if self._pp is None:
      self._pp = get_preprocess_fn(self.config.pp_predict, self.config.pp_modules)
    out = self._pp({"image": np.asarray(image), "image/id": 0})
    return {k: np.asarray(v) for k, v in out.items() if k in ("image", "image_ctx")}

  def predict_batch(self, batch: dict[str, np.ndarray], *, temperature: float | None = None,
                    seed: int = 0, **sampling: Any) -> dict[str, np.ndarray]:
    """Task outputs for a batch of preprocessed inputs, each (B, num_samples, ...), plus the
    sampled `code` and its `code_logprob`. `temperature` None is the task's default;
    `sampling` takes `decoding.sample`'s options: `num_samples`, `top_k`, `top_p`, `scheme`
    and `steps` (`ar`, or `maskgit` / `roar` on a masked model), `guidance` (classifier-free
    guidance's scale, 1 = none; the model needs cond_dropout), their schedules... A multi-task
    model also takes `chain` (task names decoded in turn; default all) and `given` (tasks
    whose code comes from `labels_<name>` in the batch): see `MultiTaskStageII`."""
    valid = set(decoding.OPTIONS) | ({"chain", "given"} if self.multitask else set())
    unknown = set(sampling) - valid
    if unknown:
      raise UserError(f"unknown sampling option(s) {sorted(unknown)}; valid: {sorted(valid)}")
    if self.multitask:
      sampling = {**sampling, **{k: tuple(sampling[k]) for k in ("given",) if k in sampling}}
      if sampling.get("chain") is not None:  # hashable (static under jit) and checked
        sampling["chain"] = tuple((name, tuple(sorted(dict(options).items())))
                                  for name, options in self.stage.chain_steps(sampling["chain"]))
    if temperature is None:
      temperature = 0.0 if self.multitask else self.task.DEFAULT_TEMPERATURE
    guidance = sampling.get("guidance", 1.0)
    if guidance != 1.0 and not self.stage.model.cond_dropout:
      raise UserError(f"guidance {guidance}: this model was trained without condition dropout "
                      "(config.model.cond_dropout = 0), so it has no unconditional input")
    masked, scheme = self.stage.model.masked, sampling.get("scheme")
    if scheme is not None and (scheme == "ar") == masked:
      raise UserError(f"scheme {scheme!r}: this stage II model is " + (
          "masked (use maskgit or roar)" if masked else
          "causal (use ar; maskgit and roar need a model trained with config.model.masked)"))
    steps = sampling.get("steps", 8)
    if masked and not 1 <= steps <= self.stage.model.seq_len:
      raise UserError(f"steps {steps}: must be between 1 and the code length "
                      f"{self.stage.model.seq_len}")
    return jax.device_get(self._predict(self.variables, batch, temperature=temperature,
                                        seed=seed, **sampling))

  def predict(self, images: Sequence[np.ndarray], **sampling: Any) -> dict[str, np.ndarray]:
    """Task outputs for uint8 RGB images of any sizes (see `predict_batch` for `sampling`)."""
    inputs = [self.preprocess(image) for image in images]
    batch = {k: np.stack([x[k] for x in inputs]) for k in inputs[0]}
    return self.predict_batch(batch, **sampling)


def load(source: str, *, checkpoint: str | None = None, oracle: str | None = None,
         overrides: dict[str, Any] | None = None) -> Model:
  """A stage II model from a training workdir (its `config.json` and latest checkpoint) or from
  a config file (`path.py[:arg]`) and a `checkpoint` (npz or workdir). `oracle` replaces
  `config.oracle.model_init`; `overrides` sets dotted config keys."""
  config = load_config(source)
  if checkpoint is None:
    if not Path(source, "config.json").exists():
      raise UserError(f"{source} is a config file: give checkpoint=<stage II npz or workdir>")
    checkpoint = source
  for key, value in (overrides or {}).items():
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = node[part]
    node[leaf] = value
  if oracle is not None:
    config.oracle.model_init = oracle
  return Model(config, checkpoint)


class Tokenizer:
  """A stage I model (`proj.uvim.vit`) as a tokenizer: task labels (+ image) -> code (ints),
  code (or its vectors) + image -> task output. Arrays are batched at the model's resolution:
  `labels` as the task's batches hold them (panoptic (B, H, W, 2) ints, depth (B, H, W, 1)
  metres, colour (B, H, W, 3) in [-1, 1]) and `image` RGB in [-1, 1] (B, H, W, 3) (the
  context: colorization's grayscale image). Everything runs in eval mode: no code dropout, no
  dictionary update; `decode(encode(labels, image), image)` is the oracle's prediction in the
  trainer's evaluations."""

  def __init__(self, oracle: mlc.ConfigDict, checkpoint: str):
    """`oracle` holds `task`, `model_name` and `model` (a stage I config, or a stage II config's
    `oracle` section); `checkpoint` is a workdir or a big_vision npz."""
    if oracle.model_name != "proj.uvim.vit":
      raise UserError(f"{checkpoint}: a tokenizer is a stage I model ('proj.uvim.vit'), not "
                      f"{oracle.model_name!r}")
    self.config, self.task = oracle.model, tasks.get_task(oracle.task)
    self.model = models.get_model(oracle.model_name, oracle.model)
    self.code_side = round(self.model.code_len**0.5)
    size = tuple(oracle.model.input_size)
    label_shape = (1, *size, self.task.LABELS[0])
    batch = {"labels": jax.ShapeDtypeStruct(label_shape, np.dtype(self.task.LABELS[1])),
             "image": jax.ShapeDtypeStruct((1, *size, 3), np.float32)}
    shapes = jax.eval_shape(lambda b: self._init(b), batch)
    self.variables = jax.device_put(stages.load_stage1_variables(
        checkpoint, shapes["params"], shapes["state"], self.model.scan_layers))
    self._encode = jax.jit(self._encode_fn)
    self._decode = jax.jit(self._decode_fn)

  def _init(self, batch: dict) -> dict:
    inputs, _ = self.task.input_pp(batch, self.config)
    rngs = {"params": jax.random.key(0), "state": jax.random.key(1)}
    return stages.with_state(self.model.init(rngs, inputs, ctx=batch["image"]))

  def _encode_fn(self, variables: dict, labels: jax.Array, image: jax.Array) -> jax.Array:
    inputs, _ = self.task.input_pp({"labels": labels, "image": image}, self.config)
    _, aux = self.model.apply(variables, inputs, ctx=image, method=self.model.encode)
    return aux["code"]

  def _decode_fn(self, variables: dict, vectors: jax.Array, image: jax.Array) -> dict:
    logits, _ = self.model.apply(variables, vectors, ctx=image, method=self.model.decode)
    return self.task.predict_outputs(logits, self.config)

  @property
  def codewords(self) -> np.ndarray:
    """The dictionary's words (dict_size, dim), as the decoder sees them."""
    return np.asarray(self.model.apply(self.variables, method=self.model.codewords))

  def encode(self, labels: np.ndarray, image: np.ndarray) -> np.ndarray:
    """The code (B, code_len) ints in [0, dict_size) of `labels` (and `image`, if the oracle
    sees it), in raster order over a (sqrt(code_len))^2 grid."""
    return np.asarray(self._encode(self.variables, labels, image))

  def embed(self, code: np.ndarray) -> np.ndarray:
    """The vectors (B, code_len, dim) the decoder sees for `code`."""
    return self.codewords[np.asarray(code)]

  def decode(self, code: np.ndarray, image: np.ndarray) -> dict[str, np.ndarray]:
    """The task output (e.g. {'semantics', 'instances'}) that `code` describes on `image`."""
    return self.decode_embeddings(self.embed(code), image)

  def decode_embeddings(self, vectors: np.ndarray, image: np.ndarray) -> dict[str, np.ndarray]:
    """The task output of arbitrary code vectors (B, code_len, dim): zeros, mixtures, ..."""
    return jax.device_get(self._decode(self.variables, jnp.asarray(vectors, jnp.float32),
                                       image))


def load_tokenizer(source: str, checkpoint: str | None = None) -> Tokenizer:
  """The stage I model of a stage I workdir, of a stage II workdir (its oracle), or of a config
  file (`path.py[:arg]`, stage I or II) with `checkpoint` (workdir or npz; a stage II config
  defaults to its `oracle.model_init`)."""
  config = load_config(source)
  if config.model_name == "proj.uvim.lm":
    oracle = config.oracle
    checkpoint = checkpoint or oracle.model_init
  else:
    oracle = mlc.ConfigDict(dict(task=config.task, model_name=config.model_name,
                                 model=config.model))
    if checkpoint is None and Path(source, "config.json").exists():
      checkpoint = source
  if not checkpoint:
    raise UserError(f"{source} is a config file: give checkpoint=<stage I npz or workdir>")
  return Tokenizer(oracle, str(checkpoint))


def load_config(source: str) -> mlc.ConfigDict:
  """The config of a workdir (`config.json`) or of a config file (`path.py[:arg]`)."""
  recorded = Path(source, "config.json")
  if recorded.exists():
    return mlc.ConfigDict(json.loads(recorded.read_text()))
  if not Path(source.partition(":")[0]).is_file():
    raise UserError(f"{source}: neither a training workdir (with config.json) nor a config file")
  return cli.load_config(source)


def read_image(path: str | Path) -> np.ndarray:
  """An image file as uint8 RGB (H, W, 3). 16-bit and 32-bit grayscale are scaled by their bit
  depth, not clipped; palette, grayscale and RGBA images are converted."""
  with Image.open(path) as f:
    if f.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
      return gray_to_rgb8(np.asarray(f), f.mode, str(path))
    return np.asarray(f.convert("RGB"))


def gray_to_rgb8(pixels: np.ndarray, mode: str, name: str) -> np.ndarray:
  """A 16-bit, 32-bit integer or float grayscale image as uint8 RGB, scaled to its range:
  16-bit by 65535; 32-bit integers by 65535 when they fit 16 bits (PNG readers widen 16-bit
  data), else by 2^32 - 1; floats must lie in [0, 1]."""
  pixels = pixels.astype(np.float64)
  if mode == "F":
    if pixels.min() < 0 or pixels.max() > 1:
      raise UserError(f"{name}: a float image must lie in [0, 1], got [{pixels.min():g}, "
                      f"{pixels.max():g}]")
    top = 1.0
  elif mode == "I" and pixels.max() > 65535:
    top = 2.0**32 - 1
  else:
    top = 65535.0
  gray = np.round(pixels / top * 255).clip(0, 255).astype(np.uint8)
  return np.repeat(gray[..., None], 3, axis=-1)
