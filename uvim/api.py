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
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from absl import logging
from PIL import Image, ImageOps

from uvim import checkpoint, cli, input_pipeline, stages
from uvim import workdir as workdir_lib
from uvim.errors import UserError
from uvim.oracle import Oracle


class Model:
  """A stage II model with its frozen oracles, ready to predict. `tasks` are the task modules
  by name (one for a single-task model, whose `task` it also is; None with several)."""

  def __init__(self, config: mlc.ConfigDict, checkpoint: str):
    if config.model_name != "proj.uvim.lm":
      raise UserError(f"{checkpoint}: a {config.model_name!r} model; api.load takes stage II "
                      "models ('proj.uvim.lm'), which predict from images alone")
    self.config = config
    self.stage = stages.get_stage(config)
    self.oracles = self.stage.oracles
    self.tasks = {name: oracle.task for name, oracle in self.oracles.items()}
    self.task = next(iter(self.tasks.values())) if len(self.tasks) == 1 else None
    image = jax.ShapeDtypeStruct((1, *self.stage.model.input_size, 3), np.float32)
    shapes = jax.eval_shape(self.stage.init_variables, jax.random.key(0), {"image": image})
    params, _ = self.stage.load_init(checkpoint, shapes["params"], {})
    self.variables = jax.device_put(self.stage.variables(params, {},
                                                         self.stage.frozen_variables()))
    self._predict = jax.jit(self.stage.predict_samples, static_argnames="plan")
    self._pp = None

  def preprocess(self, image: np.ndarray) -> dict[str, np.ndarray]:
    """`config.pp_predict` on one uint8 RGB image: the model inputs (`image`, ...)."""
    from pp.builder import get_preprocess_fn

    if self._pp is None:
      self._pp = get_preprocess_fn(self.config.pp_predict, self.config.pp_modules)
    out = self._pp({"image": np.asarray(image), "image/id": 0})
    return {k: np.asarray(v) for k, v in out.items() if k in ("image", "image_ctx")}

  def plan(self, **options: Any) -> stages.Plan:
    """The checked prediction plan of `options` (`decoding.Sampling`'s fields, `chain`,
    `given`; `temperature` left out or None: each decoded task's own default)."""
    if options.get("temperature", 0) is None:
      del options["temperature"]
    return self.stage.plan(options, "predict_batch")

  def options(self, **options: Any) -> dict[str, stages.Plan]:
    """`predict_samples`'s keyword arguments for `options` (see `plan`)."""
    return {"plan": self.plan(**options)}

  def predict_batch(self, batch: dict[str, np.ndarray], *, draft: np.ndarray | None = None,
                    **options: Any) -> dict[str, np.ndarray]:
    """Task outputs for a batch of preprocessed inputs, each (B, num_samples, ...), plus the
    sampled `code` and its `code_logprob`. `options` are `decoding.Sampling`'s fields
    (`temperature`, None or left out: the task's default; `num_samples`, `top_k`, `top_p`,
    `scheme` and `steps` (`ar`, or `maskgit` / `roar` on a masked model), `guidance`
    (classifier-free guidance's scale, 1 = none; the model needs cond_dropout), their
    schedules, `seed`), `chain` (the tasks decoded in turn; default all) and `given` (tasks
    whose code comes from the oracle of their labels in the batch), or `plan` (a `plan`'s
    result); a masked model decodes from a `draft` (B, seq_len) of word ids: see `StageII`."""
    plan = options.pop("plan", None) or self.plan(**options)
    return jax.device_get(self._predict(self.variables, batch, plan=plan, draft=draft))

  def predict(self, images: Sequence[np.ndarray], **options: Any) -> dict[str, np.ndarray]:
    """Task outputs for uint8 RGB images of any sizes (see `predict_batch` for `options`)."""
    inputs = [self.preprocess(image) for image in images]
    batch = {k: np.stack([x[k] for x in inputs]) for k in inputs[0]}
    return self.predict_batch(batch, **options)

  def evaluate(self, split: str, *, evaluator: str | None = None,
               **options: Any) -> dict[str, float]:
    """The run's evaluator `evaluator` (a name in `config.evals`; default: the one scoring the
    chain's last task) on `split` of the run's dataset, scoring the first sample of each
    prediction with `options` (as `predict_batch`): the trainer's numbers for those options."""
    plan = self.plan(**options)
    name = evaluator or evaluator_of(self.config, self.tasks[plan.chain[-1][0]])
    predict = lambda v, batch: jax.tree.map(lambda x: x[:, 0],
                                            self.stage.predict_samples(v, batch, plan))
    return evaluate(self.config, predict, self.variables, split, name)

  def categories(self, name: str | None = None) -> Any:
    """What task `name`'s `save` needs of the run's dataset (panoptic: its categories)."""
    task = self.tasks[name] if name else self.task
    return task.categories(lambda: input_pipeline.dataset_categories(self.config),
                           self.oracles[name or self.stage.names[0]].config)


def tasks_of(config: mlc.ConfigDict) -> dict[str, Any]:
  """The task modules of a run, by name: a stage I run's task, or a stage II run's oracles'."""
  from uvim import tasks

  if config.model_name != "proj.uvim.lm":
    return {config.task: tasks.get_task(config.task)}
  sections = config.oracles if "oracles" in config else {config.oracle.task: config.oracle}
  return {name: tasks.get_task(section.task) for name, section in sections.items()}


def evaluator_of(config: mlc.ConfigDict, task: Any = None) -> str:
  """The name of the run's evaluator that scores `task` (a task module; default: the run's
  only task), as `config.evals` lists it."""
  if task is None:
    (task, *others) = tasks_of(config).values()
    if others:
      raise UserError("a multi-task run: name the task whose evaluator to use")
  for name, kind in config.evals:
    if kind == task.EVALUATOR:
      return name
  raise UserError(f"config.evals has no {task.EVALUATOR!r} evaluator to score {task.NAME}: "
                  f"{list(config.evals)}")


def evaluator(config: mlc.ConfigDict, split: str, name: str, fns: dict, *,
              pp: str | None = None):
  """The run's evaluator `name` (of `config.evals`) on `split` of its dataset (with pp `pp`,
  if given), built as the trainer builds it but without its `predict_kwargs` and files,
  scoring the model functions `fns` ({'predict': (variables, batch) -> outputs})."""
  from evaluators import common as evaluators_common
  from uvim import trainer

  evaluators_common.register_all()
  kinds = dict(config.evals)
  if name not in kinds:
    raise UserError(f"config.evals has no evaluator {name!r}: {list(config.evals)}")
  options = {k: v for k, v in dict(config[name]).items()
             if k not in ("write_predictions", "predict_kwargs")}
  options["split"] = split
  if pp:
    options["pp"] = pp
  return evaluators_common.EVALUATORS[kinds[name]](name, config, options,
                                                  mesh=trainer.make_mesh(config), fns=fns)


def evaluate(config: mlc.ConfigDict, predict: Any, variables: Any, split: str, name: str, *,
             pp: str | None = None) -> dict[str, float]:
  """The run's evaluator `name` on `split` (see `evaluator`), scoring `predict(variables,
  batch)`: e.g. a tokenizer's reconstructions or codes edited by hand."""
  return evaluator(config, split, name, {"predict": predict}, pp=pp).run(variables)


def eval_batches(config: mlc.ConfigDict, split: str, name: str) -> Any:
  """A function giving the global batches the run's evaluator `name` reads on `split` (its pp
  and batch size; padding rows have `_mask` False), read anew at each call."""
  from uvim import trainer

  options = config[name]
  batch_size = options.get("batch_size", config.batch_size)
  input_pipeline.check_eval_input(config, split, options.pp, f"config.{name}")
  mesh = trainer.make_mesh(config)
  return lambda: input_pipeline.eval_data(config, split, options.pp, batch_size, mesh)[0]


def iter_examples(config: mlc.ConfigDict, split: str,
                  dataset: str | None = None) -> Iterator[tuple[np.ndarray, dict]]:
  """(the uint8 image, the model inputs: `image` and the labels at the model's resolution) of
  each example of `split` of the run's dataset (or `dataset`), through `config.pp_eval` as the
  trainer's evaluators see them."""
  import tensorflow as tf
  import tensorflow_datasets as tfds

  from pp.builder import get_preprocess_fn

  builder = input_pipeline.get_builder(dataset or config.dataset, config.data_dir)
  pp = get_preprocess_fn(config.pp_eval, config.pp_modules)
  skip = {"image": tfds.decode.SkipDecoding()}
  for example in builder.as_dataset(split=split, decoders=skip, shuffle_files=False):
    image = tf.io.decode_image(example["image"], channels=3, expand_animations=False).numpy()
    yield image, {k: np.asarray(v) for k, v in pp(dict(example)).items()
                  if np.asarray(v).dtype.kind in "biuf"}


def examples(config: mlc.ConfigDict, split: str) -> tuple[list[np.ndarray], dict]:
  """The uint8 images of `split` and their model inputs as one batch (see `iter_examples`)."""
  images, inputs = zip(*iter_examples(config, split), strict=True)
  return list(images), {k: np.stack([x[k] for x in inputs]) for k in inputs[0]}


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
    self.oracle = Oracle(oracle)
    self.config, self.task, self.model = oracle.model, self.oracle.task, self.oracle.model
    self.code_side = self.oracle.code_side
    self.variables = jax.device_put(self.oracle.load(checkpoint))
    self._encode = jax.jit(lambda v, labels, image: self.oracle.encode(
        v, {"labels": labels, "image": image})[0])
    self._decode = jax.jit(self.oracle.decode)

  def reconstruct_batch(self, variables: dict, batch: dict) -> dict:
    """The task outputs of a batch's `labels` (and context image) through the code: what the
    stage I evaluators score (`evaluate(config, tokenizer.reconstruct_batch, ...)`)."""
    return self.oracle.reconstruct(variables, batch)

  @property
  def codewords(self) -> np.ndarray:
    """The dictionary's words (dict_size, dim), as the decoder sees them."""
    return np.asarray(self.oracle.codewords(self.variables))

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
    return mlc.ConfigDict(workdir_lib.resolve_paths(checkpoint.read_config_json(recorded),
                                                    source))
  if not Path(source.partition(":")[0]).exists():
    raise UserError(f"{source}: no such training workdir or config file")
  if not Path(source.partition(":")[0]).is_file():
    raise UserError(f"{source}: neither a training workdir (with config.json) nor a config file")
  return cli.load_config(source)


def run_config(config: mlc.ConfigDict | None, source: str,
               explicit: Sequence[str] = ()) -> mlc.ConfigDict:
  """The config to load the trained model `source` (a workdir, or a run's exported params.npz)
  with: the config its run recorded, every setting (its oracle included) as trained, with the
  dotted keys `explicit` (set on the command line) taken from `config` (None: none), each named
  on stderr. `config` itself when `source` records nothing (a released npz). Keys where `config`
  differs from the record unasked are named in a warning: the record's values hold."""
  found = checkpoint.recorded_config(source)
  if found is None:
    if config is None:
      raise UserError(f"{source} records no config (a released npz?): give --config")
    return config
  saved, config_file = found
  recorded = mlc.ConfigDict(workdir_lib.resolve_paths(saved, config_file.parent))
  if config is None:
    return recorded
  for key in explicit:
    value, before = cli.lookup(config, key), cli.lookup(recorded, key)
    if value != before:
      print(f"config.{key} = {value!r} (command line; the run recorded {before!r})",
            file=sys.stderr)
      *parents, leaf = key.split(".")
      node = cli.lookup(recorded, ".".join(parents)) if parents else recorded
      if not isinstance(node, mlc.ConfigDict):
        raise UserError(f"--config.{key}: {config_file} has no section config."
                        f"{'.'.join(parents)}")
      with node.ignore_type():
        node[leaf] = value
  ours = checkpoint.flatten_json(json.loads(config.to_json_best_effort()))
  theirs = checkpoint.flatten_json(json.loads(recorded.to_json_best_effort()))
  unasked = sorted((k for k in ours if k in theirs and ours[k] != theirs[k]
                    and not any(k == e or k.startswith(f"{e}.") for e in explicit)),
                   key=lambda k: not k.endswith("model_init"))  # the checkpoints first
  if unasked:
    logging.warning("Using %s: --config differs from it in %s%s; the run's values hold (set "
                    "--config.<key> to change one).", config_file, ", ".join(unasked[:8]),
                    f" and {len(unasked) - 8} more" if len(unasked) > 8 else "")
  return recorded


def read_image(path: str | Path) -> np.ndarray:
  """An image file as uint8 RGB (H, W, 3), upright as viewers show it (the EXIF orientation of
  phone photos applied). 16-bit and 32-bit grayscale are scaled by their bit depth, not
  clipped; palette, grayscale and RGBA images are converted."""
  with Image.open(path) as opened:
    f = ImageOps.exif_transpose(opened)
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
