"""What differs between stage I and stage II: the model, its inputs, its loss and its predictions.

The trainer (uvim/trainer.py) is the same for both. A stage provides
  init_variables(rng, batch)          -> {'params', 'state'} of a fresh model
  loss(params, model_state, frozen, batch, rng) -> (loss, (metrics, new model_state))
  frozen_variables()                  -> variables of fixed models (stage II: the oracle), passed
                                         to every step as an argument, never optimised
  frozen_shapes(), abstract_batch(n)  -> their shapes and a batch's, for planning without data
  variables(params, model_state, frozen) -> what `eval_fns` take
  eval_fns()                          -> {'loss': per-example losses, 'predict': task outputs}
  load_init(model_init, params, model_state) -> (params, model_state) from `config.model_init`

`StageII.predict_samples` is the one predict path (image -> sampled code -> stage I decoder with
the image context -> task output), used by the evaluators during training and by predict.py.
`MultiTaskStageII` (a config with `oracles`) is stage II over several tasks' codes at once.
"""

import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
from absl import logging

from uvim import checkpoint, decoding, models, tasks
from uvim.errors import UserError
from uvim.models import lm, vit, vit_init


def load_variables(path: str) -> dict[str, Any]:
  """{'params', 'state'} from a big_vision npz file or one of our training workdirs."""
  if str(path).endswith(".npz"):
    if not Path(path).exists():
      raise UserError(f"Checkpoint file {path} does not exist")
    return checkpoint.load_npz(path)
  return checkpoint.load_params_from_workdir(path)


def with_state(variables: dict) -> dict:
  """Stage I variables with a `state` collection (empty for FSQ, which has no dictionary)."""
  return {"state": {}, **variables}


def load_stage1_variables(path: str, params, model_state, scanned: bool,
                          source: str | None = None) -> dict:
  """{'params', 'state'} of a stage I model from `path` (npz or workdir), in the layout
  (`scanned`) and shapes of `params`/`model_state`; mismatches name `source` (default `path`)."""
  tree = load_variables(path)
  source = source or path
  loaded = checkpoint.in_layout(tree["params"], scanned)
  return {"params": checkpoint.merge_into(params, loaded, source),
          "state": checkpoint.merge_into(model_state, tree.get("state", {}), source)}


def recorded_config(path: str) -> tuple[dict, Path] | None:
  """The config a checkpoint was trained with, and its file: `<workdir>/config.json`, or the
  one next to a `params.npz` that a run exported; None for a bare (e.g. released) npz."""
  path = Path(path)
  config_file = path.with_name("config.json") if path.suffix == ".npz" else path / "config.json"
  if (path.suffix == ".npz" and path.name != "params.npz") or not config_file.exists():
    return None
  return json.loads(config_file.read_text()), config_file


# Stage I settings that only act in training: an oracle may differ in them from its run.
TRAINING_ONLY = ("code_dropout", "dict_momentum", "min_count", "dropout")


def check_oracle_config(oracle_config, source: str) -> None:
  """Compares config.oracle (model_name, task, model) with the config the oracle `source` was
  trained with. Shapes are checked when parameters load; this catches what they cannot show
  (code_len, bottleneck, context flags...). A bare npz records nothing: a warning says so."""
  recorded = recorded_config(source)
  if recorded is None:
    logging.warning("config.oracle.model_init=%s records no config: settings its parameters do "
                    "not show (code_len, bottleneck_resize, with_*_ctx) are taken from "
                    "config.oracle.model unverified.", source)
    return
  saved, config_file = recorded
  if saved.get("model_name") != oracle_config.model_name:
    raise UserError(f"config.oracle.model_init={source} is a {saved.get('model_name')!r} run "
                    f"({config_file}), not a stage I oracle ({oracle_config.model_name!r})")
  if saved.get("task") != oracle_config.task:
    raise UserError(f"config.oracle.task is {oracle_config.task!r}, but the oracle "
                    f"{source} was trained for {saved.get('task')!r} ({config_file})")

  def settings(model_config) -> dict[str, str]:
    model = models.get_model(oracle_config.model_name, mlc.ConfigDict(model_config))
    return {f.name: _plain(getattr(model, f.name)) for f in dataclasses.fields(model)
            if f.init and f.name not in ("parent", "name", *TRAINING_ONLY)
            and f.name not in MEMORY_OPTIONS}

  ours, theirs = settings(oracle_config.model), settings(saved["model"])
  differ = [f"{k} {ours[k]} here, {theirs[k]} there" for k in ours if ours[k] != theirs[k]]
  if differ:
    raise UserError(f"config.oracle.model differs from the config the oracle was trained with "
                    f"({config_file}): {'; '.join(differ)}. Set --config.oracle.model.<key> to "
                    "its values.")


def label_inputs(task, batch: dict, model_config) -> tuple[dict, jnp.ndarray, dict]:
  """Stage I inputs from a batch: the task's label patches, the context image, label stats."""
  inputs, stats = task.input_pp(batch, model_config)
  return inputs, batch.get("image_ctx", batch["image"]), stats


MEMORY_OPTIONS = ("dtype", "remat", "scan_layers", "attention")


def memory_options(config) -> dict:
  """Model overrides from the run config: `compute_dtype` (activations and matmuls; parameters
  stay float32), `remat` (recompute each block's activations in the backward pass),
  `scan_layers` (one `nn.scan` per stack of transformer blocks; checkpoints convert either
  way) and `attention` (the kernel, `vit.ATTENTION`)."""
  return {"dtype": config.compute_dtype, "remat": config.remat,
          "scan_layers": config.scan_layers, "attention": config.attention}


def _plain(value: Any) -> str:
  """A setting as canonical JSON (tuples as lists, mappings sorted), for comparing."""
  def convert(v):
    if isinstance(v, Mapping):
      return {str(k): convert(x) for k, x in v.items()}
    return [convert(x) for x in v] if isinstance(v, list | tuple) else v
  return json.dumps(convert(value), sort_keys=True)


class StageI:
  """`proj.uvim.vit`, the restricted oracle: labels (+ image) -> code -> labels."""

  def __init__(self, config):
    self.model = models.get_model(config.model_name, config.model, **memory_options(config))
    self.task = tasks.get_task(config.task)
    self.model_config = config.model

  def init_variables(self, rng: jax.Array, batch: dict) -> dict:
    rng_params, rng_state = jax.random.split(rng)
    inputs, ctx, _ = label_inputs(self.task, batch, self.model_config)
    return with_state(self.model.init({"params": rng_params, "state": rng_state}, inputs,
                                      ctx=ctx))

  def frozen_variables(self) -> dict:
    return {}

  def frozen_shapes(self) -> dict:
    return {}

  def abstract_batch(self, batch_size: int) -> dict:
    """Shapes of a training batch (for planning and compiling without data)."""
    return _abstract_batch(self.task, batch_size, self.model.input_size, self.model.input_size)

  def loss(self, params, model_state, frozen, batch: dict, rng: jax.Array):
    rng_dropout, rng_vqvae = jax.random.split(rng)
    inputs, ctx, stats = label_inputs(self.task, batch, self.model_config)
    (logits, aux), new_vars = self.model.apply(
        {"params": params, "state": model_state}, inputs, ctx=ctx, train=True,
        mutable=["state"], rngs={"dropout": rng_dropout, "vqvae": rng_vqvae})
    loss, parts = self.task.loss_fn(logits, batch, self.model_config)
    metrics = {**{k: jnp.mean(v) for k, v in parts.items()}, **stats,
               **{k: v for k, v in aux.items() if k.startswith("codebook_")}}
    return jnp.mean(loss), (metrics, with_state(new_vars)["state"])

  def variables(self, params, model_state, frozen) -> dict:
    return {"params": params, "state": model_state}

  def _logits(self, variables: dict, batch: dict) -> dict:
    """Logits in eval mode (no code dropout, no dictionary update)."""
    inputs, ctx, _ = label_inputs(self.task, batch, self.model_config)
    return self.model.apply(variables, inputs, ctx=ctx)[0]

  def eval_fns(self) -> dict[str, Callable]:
    """`predict` is the oracle's reconstruction: labels + image -> code -> labels."""
    return {
        "loss": lambda v, batch: self.task.loss_fn(self._logits(v, batch), batch,
                                                   self.model_config),
        "predict": lambda v, batch: self.task.predict_outputs(self._logits(v, batch),
                                                              self.model_config),
    }

  def load_init(self, model_init: str, params, model_state):
    loaded = load_stage1_variables(model_init, params, model_state, self.model.scan_layers)
    return loaded["params"], loaded["state"]


class StageII:
  """`proj.uvim.lm`: image -> guiding code, trained on the codes the frozen oracle gives the
  (augmented) labels of each batch; predictions decode sampled codes with the oracle."""

  def __init__(self, config):
    self.model = models.get_model(config.model_name, config.model, **memory_options(config))
    options = memory_options(config)
    self.oracle = models.get_model(config.oracle.model_name, config.oracle.model,
                                   dtype=options["dtype"], scan_layers=options["scan_layers"],
                                   attention=options["attention"])
    self.task = tasks.get_task(config.oracle.task)
    self.oracle_config = config.oracle.model
    self.oracle_full_config = config.oracle
    self.oracle_init = config.oracle.model_init
    if self.model.seq_len != self.oracle.code_len:
      raise UserError(f"config.model.seq_len ({self.model.seq_len}) must equal "
                       f"config.oracle.model.code_len ({self.oracle.code_len})")
    if self.model.vocab_size != self.oracle.dict_size + 1:
      raise UserError(f"config.model.vocab_size ({self.model.vocab_size}) must be "
                       f"config.oracle.model.dict_size + 1 ({self.oracle.dict_size + 1})")

  def init_variables(self, rng: jax.Array, batch: dict) -> dict:
    targets = jnp.zeros((batch["image"].shape[0], self.model.seq_len), jnp.int32)
    return {"params": self.model.init(rng, batch["image"], targets)["params"], "state": {}}

  def frozen_shapes(self) -> dict:
    """Shapes of the oracle's {'params', 'state'}."""
    return stage1_shapes(self.oracle, self.oracle_config)

  def frozen_variables(self) -> dict:
    """The oracle's {'params', 'state'} from `config.oracle.model_init`, checked against the
    oracle model of the config."""
    if not self.oracle_init:
      raise UserError("config.oracle.model_init is not set: stage II needs a trained stage I "
                       "(a training workdir or a big_vision *_stageI_params.npz)")
    check_oracle_config(self.oracle_full_config, self.oracle_init)
    shapes = self.frozen_shapes()
    return load_stage1_variables(self.oracle_init, shapes["params"], shapes["state"],
                                 self.oracle.scan_layers,
                                 f"config.oracle.model_init={self.oracle_init}")

  def abstract_batch(self, batch_size: int) -> dict:
    """Shapes of a training batch (for planning and compiling without data)."""
    return _abstract_batch(self.task, batch_size, self.model.input_size,
                           self.oracle_config.input_size)

  def targets(self, oracle_variables: dict, batch: dict) -> tuple[jnp.ndarray, dict]:
    """The oracle's code of the batch's labels, + 1 (id 0 is BOS), and code statistics."""
    inputs, ctx, stats = label_inputs(self.task, batch, self.oracle_config)
    _, aux = self.oracle.apply(oracle_variables, inputs, ctx=ctx, method=self.oracle.encode)
    codebook = {f"oracle_{k}": v for k, v in aux.items() if k.startswith("codebook_")}
    return jax.lax.stop_gradient(aux["code"]) + 1, {**stats, **codebook}

  def _xent(self, logits_BxLxV: jnp.ndarray, targets_BxL: jnp.ndarray,
            weights_BxL: jnp.ndarray | None = None) -> jnp.ndarray:
    """Per-example cross-entropy, averaged over the code (or over its `weights`)."""
    xent = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, targets_BxL)
    if weights_BxL is None:
      return jnp.mean(xent, axis=-1)
    return jnp.sum(xent * weights_BxL, axis=-1) / jnp.sum(weights_BxL, axis=-1)

  def _code_loss(self, params: Any, images: jnp.ndarray, targets_BxL: jnp.ndarray,
                 hidden_BxL: jnp.ndarray | None, **apply_kw) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(per-example cross-entropy, token accuracy) of the code. Causal: teacher-forced over
    the whole code. Masked: over the positions `hidden_BxL`, given the others."""
    if not self.model.masked:
      logits = self.model.apply({"params": params}, images, targets_BxL, **apply_kw)
      return (self._xent(logits, targets_BxL),
              jnp.mean(jnp.argmax(logits, -1) == targets_BxL))
    logits = self.model.apply({"params": params}, images,
                              jnp.where(hidden_BxL, lm.MASK, targets_BxL), **apply_kw)
    correct = (jnp.argmax(logits, -1) == targets_BxL) & hidden_BxL
    return self._xent(logits, targets_BxL, hidden_BxL), jnp.sum(correct) / jnp.sum(hidden_BxL)

  def _training_mask(self, rng: jax.Array, batch: int) -> jnp.ndarray | None:
    """The masked model's hidden positions (`lm.training_mask`); None for a causal model."""
    if not self.model.masked:
      return None
    return lm.training_mask(rng, batch, self.model.seq_len, self.model.min_mask_ratio)

  def loss(self, params, model_state, frozen, batch: dict, rng: jax.Array):
    targets, stats = self.targets(frozen, batch)
    hidden = self._training_mask(jax.random.fold_in(rng, 1), len(targets))
    xent, accuracy = self._code_loss(params, batch["image"], targets, hidden, train=True,
                                     rngs={"dropout": rng})
    return jnp.mean(xent), ({"token_accuracy": accuracy, **stats}, model_state)

  def variables(self, params, model_state, frozen) -> dict:
    return {"params": params, "oracle": frozen}

  def predict_samples(self, variables: dict, batch: dict, *, scheme: str | None = None,
                      steps: int = 8, token_schedule: str = "cosine", temperature: float = 0.0,
                      temperature_schedule: str = "constant", choice_temperature: float = 4.5,
                      top_k: int = 0, top_p: float = 1.0, num_samples: int = 1,
                      guidance: float = 1.0, guidance_schedule: str = "constant",
                      seed: int = 0) -> dict:
    """Task outputs for `num_samples` sampled codes per image: each (B, num_samples, ...), plus
    `code` (B, num_samples, code_len) and its log-probability `code_logprob`. The options are
    `decoding.sample`'s: the scheme (`ar`, or `maskgit` / `roar` in `steps` steps on a masked
    model), temperature, filters and classifier-free guidance (scale 1 = none)."""
    images = batch["image"]
    batch_size = images.shape[0]
    tokens, logprob = decoding.sample(
        self.model, variables["params"], images, image_rngs(images, seed), scheme=scheme,
        steps=steps, token_schedule=token_schedule, temperature=temperature,
        temperature_schedule=temperature_schedule, choice_temperature=choice_temperature,
        top_k=top_k, top_p=top_p, num_samples=num_samples, guidance=guidance,
        guidance_schedule=guidance_schedule)
    codes = tokens.reshape(batch_size * num_samples, -1) - 1
    ctx = jnp.repeat(batch.get("image_ctx", images), num_samples, axis=0)
    logits, _ = self.oracle.apply(variables["oracle"], codes, ctx=ctx, discrete_input=True,
                                  method=self.oracle.decode)
    outputs = self.task.predict_outputs(logits, self.oracle_config)
    outputs = jax.tree.map(lambda x: x.reshape(batch_size, num_samples, *x.shape[1:]), outputs)
    return {**outputs, "code": tokens - 1, "code_logprob": logprob}

  def eval_fns(self) -> dict[str, Callable]:
    """`loss`: teacher-forced cross-entropy on the oracle's code; `predict`: the end task
    from one sampled code per image (greedy unless `predict_kwargs` say otherwise)."""
    def loss(v, batch):
      targets, _ = self.targets(v["oracle"], batch)
      # A masked model hides positions drawn from each image's own key: reproducible.
      hidden = (jax.vmap(lambda key: self._training_mask(key, 1)[0])(image_rngs(batch["image"]))
                if self.model.masked else None)
      xent, _ = self._code_loss(v["params"], batch["image"], targets, hidden)
      return xent, {"loss_code": xent}

    def predict(v, batch, **kwargs):
      return jax.tree.map(lambda x: x[:, 0], self.predict_samples(v, batch, **kwargs))
    predict.__wrapped__ = self.predict_samples  # its options, for checking predict_kwargs

    return {"loss": loss, "predict": predict}

  def load_init(self, model_init: Any, params, model_state):
    """A whole stage II model (npz or workdir), or `{'encoder': ViT name or npz}`."""
    if isinstance(model_init, str):
      tree = load_variables(model_init)
      learned = "pos_embedding_decoder" in tree["params"]
      if learned != (self.model.posemb_type == "learn"):
        raise UserError(f"{model_init} has {'learned' if learned else 'no learned'} position "
                         f"embeddings; set config.model.posemb_type to "
                         f"{'learn' if learned else 'sincos2d'!r} (it is "
                         f"{self.model.posemb_type!r}): big_vision's models use 'learn'")
      guided = "null_image" in tree["params"]
      if guided != bool(self.model.cond_dropout):
        raise UserError(f"{model_init} was trained {'with' if guided else 'without'} condition "
                         "dropout (a learned no-image input); set config.model.cond_dropout "
                         f"{'> 0 (e.g. 0.1)' if guided else 'to 0'}")
      loaded = checkpoint.in_layout(tree["params"], self.model.scan_layers)
      return checkpoint.merge_into(params, loaded, model_init), model_state
    unknown = set(model_init) - {"encoder"}
    if unknown:
      raise UserError(f"config.model_init: unknown part(s) {sorted(unknown)}; stage II "
                       "takes a checkpoint path or {'encoder': <ViT name or .npz>}")
    if model_init.get("encoder") and self.model.posemb_type != "learn":
      raise UserError(f"config.model_init.encoder={model_init['encoder']} is a ViT with learned "
                       f"position embeddings; config.model.posemb_type="
                       f"{self.model.posemb_type!r} has none: set it to 'learn'")
    if model_init.get("encoder"):
      grid = vit.patch_grid(self.model.input_size, self.model.patches["size"])
      logging.info("Stage II encoder from %s", model_init["encoder"])
      unscanned = checkpoint.in_layout(jax.device_get(params), scanned=False)
      params = checkpoint.in_layout(
          vit_init.load_encoder(model_init["encoder"], unscanned, grid=grid),
          self.model.scan_layers)
    return params, model_state


class MultiTaskStageII(StageII):
  """Stage II over several tasks' codes (`config.oracles`: task name -> oracle section as in
  `config.oracle`): one masked model (`model.num_tasks`) whose sequence is the tasks' codes in
  the sorted order of their names, word w of task k as token 1 + (words of the tasks before k)
  + w;
  each task reads its labels from `labels_<name>`. In training every example gives each task a
  role: condition (its code visible whole, probability `config.condition_rate`) or target (a
  cosine-scheduled part hidden, the loss on it), at least one target; so the model learns
  image -> any task and image + some tasks' codes -> the others. Predictions run a chain: each
  task of it decoded in turn, conditioned on the codes given or decoded before it."""

  def __init__(self, config):
    options = memory_options(config)
    self.model = models.get_model(config.model_name, config.model, **options)
    self.names = tuple(config.oracles)
    self.condition_rate = config.get("condition_rate", 0.5)
    self.oracle_sections = config.oracles
    self.oracles = {k: models.get_model(o.model_name, o.model, dtype=options["dtype"],
                                        scan_layers=options["scan_layers"],
                                        attention=options["attention"])
                    for k, o in config.oracles.items()}
    self.tasks = {k: tasks.get_task(o.task) for k, o in config.oracles.items()}
    code_lens = {o.code_len for o in self.oracles.values()}
    if len(code_lens) != 1:
      raise UserError(f"config.oracles: every oracle's model.code_len must be the same, got "
                       f"{ {k: o.code_len for k, o in self.oracles.items()} }")
    self.code_len = code_lens.pop()
    sizes = [self.oracles[k].dict_size for k in self.names]
    self.first_id = dict(zip(self.names, 1 + np.cumsum([0, *sizes[:-1]]), strict=True))
    expected = {"masked": True, "num_tasks": len(self.names),
                "seq_len": len(self.names) * self.code_len, "vocab_size": 1 + sum(sizes)}
    for key, value in expected.items():
      if getattr(self.model, key) != value:
        raise UserError(f"config.model.{key} must be {value} for the oracles {self.names} "
                         f"(codes of {self.code_len} words from {sizes}), got "
                         f"{getattr(self.model, key)}")

  def span(self, name: str) -> tuple[int, int]:
    """The positions of task `name`'s code in the sequence."""
    first = self.names.index(name) * self.code_len
    return first, first + self.code_len

  def vocab(self, name: str) -> tuple[int, int]:
    """The token ids of task `name`'s words."""
    first = int(self.first_id[name])
    return first, first + self.oracles[name].dict_size

  def task_batch(self, batch: dict, name: str) -> dict:
    """The batch as task `name` sees it: its labels as `labels`."""
    return {**{k: v for k, v in batch.items() if not k.startswith("labels_")},
            "labels": batch[f"labels_{name}"]}

  def frozen_shapes(self) -> dict:
    return {k: stage1_shapes(self.oracles[k], self.oracle_sections[k].model) for k in self.names}

  def frozen_variables(self) -> dict:
    """Every oracle's {'params', 'state'}, by task name."""
    variables = {}
    for name, section in self.oracle_sections.items():
      if not section.model_init:
        raise UserError(f"config.oracles.{name}.model_init is not set: multi-task stage II "
                         "needs a trained stage I per task")
      check_oracle_config(section, section.model_init)
      shapes = stage1_shapes(self.oracles[name], section.model)
      variables[name] = load_stage1_variables(
          section.model_init, shapes["params"], shapes["state"], self.oracles[name].scan_layers,
          f"config.oracles.{name}.model_init={section.model_init}")
    return variables

  def abstract_batch(self, batch_size: int) -> dict:
    batch = {}
    for name in self.names:
      one = _abstract_batch(self.tasks[name], batch_size, self.model.input_size,
                            self.oracles[name].input_size)
      batch.update({"image": one["image"], "image_ctx": one["image_ctx"],
                    f"labels_{name}": one["labels"]})
    return batch

  def task_code(self, oracle_variables: dict, batch: dict, name: str) -> tuple[jnp.ndarray, dict]:
    """Task `name`'s oracle code of the batch's labels as tokens (B, code_len), and stats."""
    oracle = self.oracles[name]
    inputs, ctx, stats = label_inputs(self.tasks[name], self.task_batch(batch, name),
                                      self.oracle_sections[name].model)
    _, aux = oracle.apply(oracle_variables[name], inputs, ctx=ctx, method=oracle.encode)
    stats = {**stats, **{f"oracle_{k}": v for k, v in aux.items() if k.startswith("codebook_")}}
    return jax.lax.stop_gradient(aux["code"]) + self.first_id[name], stats

  def targets(self, oracle_variables: dict, batch: dict) -> tuple[jnp.ndarray, dict]:
    """Every task's code as one sequence of tokens, and per-task code statistics."""
    codes, stats = [], {}
    for name in self.names:
      code, task_stats = self.task_code(oracle_variables, batch, name)
      codes.append(code)
      stats.update({f"{name}/{k}": v for k, v in task_stats.items()})
    return jnp.concatenate(codes, axis=1), stats

  def _training_mask(self, rng: jax.Array, batch: int) -> jnp.ndarray:
    """(B, L) hidden positions: per example each task is a condition (nothing hidden) with
    probability `condition_rate`, else a target hiding `lm.training_mask` of its code; an
    example whose tasks all drew "condition" has one of them, at random, as a target."""
    role_rng, pick_rng, mask_rng = jax.random.split(rng, 3)
    num_tasks = len(self.names)
    condition = jax.random.bernoulli(role_rng, self.condition_rate, (batch, num_tasks))
    pick = jax.random.randint(pick_rng, (batch, 1), 0, num_tasks) == jnp.arange(num_tasks)
    condition = condition & ~(jnp.all(condition, axis=1, keepdims=True) & pick)
    hidden = lm.training_mask(mask_rng, batch * num_tasks, self.code_len,
                              self.model.min_mask_ratio).reshape(batch, num_tasks, -1)
    return (hidden & ~condition[:, :, None]).reshape(batch, -1)

  def _per_task(self, values_BxL: jnp.ndarray, weights_BxL: jnp.ndarray) -> dict:
    """Weighted means of `values` over each task's positions (over the whole batch)."""
    out = {}
    for name in self.names:
      first, end = self.span(name)
      w = weights_BxL[:, first:end]
      out[name] = jnp.sum(values_BxL[:, first:end] * w) / jnp.maximum(jnp.sum(w), 1)
    return out

  def loss(self, params, model_state, frozen, batch: dict, rng: jax.Array):
    targets, stats = self.targets(frozen, batch)
    hidden = self._training_mask(jax.random.fold_in(rng, 1), len(targets))
    logits = self.model.apply({"params": params}, batch["image"],
                              jnp.where(hidden, lm.MASK, targets), train=True,
                              rngs={"dropout": rng})
    xent = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    per_example = jnp.sum(xent * hidden, axis=1) / jnp.maximum(jnp.sum(hidden, axis=1), 1)
    metrics = {**{f"loss_{k}": v for k, v in self._per_task(xent, hidden).items()},
               **{f"token_accuracy_{k}": v for k, v in self._per_task(correct, hidden).items()},
               "token_accuracy": jnp.sum(correct * hidden) / jnp.sum(hidden), **stats}
    return jnp.mean(per_example), (metrics, model_state)

  def chain_steps(self, chain: Any) -> list[tuple[str, dict]]:
    """`chain` (task names, or (name, sampler options) pairs; None: every task in order) as
    (name, options) steps, checked."""
    steps = [(c, {}) if isinstance(c, str) else (c[0], dict(c[1]))
             for c in (self.names if chain is None else chain)]
    for name, _ in steps:
      if name not in self.names:
        raise UserError(f"chain: unknown task {name!r}; the model's tasks are {self.names}")
    return steps

  def predict_samples(self, variables: dict, batch: dict, *, chain: Any = None,
                      given: tuple[str, ...] = (), seed: int = 0, **sampling) -> dict:
    """Chained generation: the codes of the `given` tasks from their oracles (the batch's
    `labels_<name>`), then each step of `chain` decodes its task's code (`decoding.sample`
    with the step's options over `sampling`, e.g. scheme, steps, temperature, guidance) given
    every code so far. Returns each decoded or given task's outputs (from its oracle), its
    code `code_<name>` and the sequence `code`, each with a samples axis of 1."""
    images = batch["image"]
    tokens = jnp.full((len(images), self.model.seq_len), lm.MASK, jnp.int32)
    for name in given:
      first, end = self.span(name)
      tokens = tokens.at[:, first:end].set(self.task_code(variables["oracle"], batch, name)[0])
    steps = self.chain_steps(chain)
    rngs = image_rngs(images, seed)
    for i, (name, options) in enumerate(steps):
      if name in given:
        raise UserError(f"chain: task {name!r} is both given and decoded")
      tokens, _ = decoding.sample(
          self.model, variables["params"], images, jax.vmap(jax.random.fold_in, (0, None))(
              rngs, i), given=tokens, span=self.span(name), vocab=self.vocab(name),
          **{**sampling, **options})
      tokens = tokens[:, 0]
    outputs = {"code": tokens[:, None] - 1}  # as a single task's: token - 1
    for name in (*given, *(n for n, _ in steps)):
      first, end = self.span(name)
      code = tokens[:, first:end] - self.first_id[name]
      oracle = self.oracles[name]
      logits, _ = oracle.apply(variables["oracle"][name], code,
                               ctx=batch.get("image_ctx", images), discrete_input=True,
                               method=oracle.decode)
      task_outputs = self.tasks[name].predict_outputs(logits, self.oracle_sections[name].model)
      outputs.update({k: v[:, None] for k, v in task_outputs.items()})
      outputs[f"code_{name}"] = code[:, None]
    return outputs

  def eval_fns(self) -> dict[str, Callable]:
    """`loss`: each task's cross-entropy from the image alone in one pass (every position
    hidden); `predict`: `predict_samples` (default chain: every task in order)."""
    def loss(v, batch):
      targets, _ = self.targets(v["oracle"], batch)
      logits = self.model.apply({"params": v["params"]}, batch["image"],
                                jnp.full_like(targets, lm.MASK))
      xent = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
      parts = {f"loss_{k}": jnp.mean(xent[:, slice(*self.span(k))], axis=1) for k in self.names}
      return jnp.mean(xent, axis=1), {"loss_code": jnp.mean(xent, axis=1), **parts}

    def predict(v, batch, **kwargs):
      return jax.tree.map(lambda x: x[:, 0], self.predict_samples(v, batch, **kwargs))
    predict.__wrapped__ = self.predict_samples

    return {"loss": loss, "predict": predict}


def stage1_shapes(model, model_config) -> dict:
  """Shapes of a stage I model's {'params', 'state'}."""
  size = model_config.input_size
  tokens = math.prod(vit.patch_grid(size, model_config.patch_size))
  inputs = {k: jnp.zeros((1, tokens, *shape)) for k, shape in model_config.inputs.items()}
  return jax.eval_shape(lambda: with_state(model.init(
      {"params": jax.random.key(0), "state": jax.random.key(1)}, inputs,
      ctx=jnp.zeros((1, *size, 3)))))


def _abstract_batch(task, batch_size: int, image_size, label_size) -> dict:
  """{'image', 'image_ctx', 'labels'} as jax.ShapeDtypeStructs."""
  channels, dtype = task.LABELS
  image = jax.ShapeDtypeStruct((batch_size, *image_size, 3), jnp.float32)
  return {"image": image,
          "image_ctx": jax.ShapeDtypeStruct((batch_size, *label_size, 3), jnp.float32),
          "labels": jax.ShapeDtypeStruct((batch_size, *label_size, channels), jnp.dtype(dtype))}


def image_rngs(images_BxHxWxC: jnp.ndarray, seed: int = 0) -> jax.Array:
  """One key per image, from its 8-bit content (exact integer hash): the same image gets the
  same random stream whatever batch, device or host it is processed on."""
  pixels = jnp.round((images_BxHxWxC + 1) * 127.5).astype(jnp.uint32)
  pixels = pixels.reshape(len(pixels), -1)
  weights = jnp.arange(pixels.shape[1], dtype=jnp.uint32) * jnp.uint32(2654435761) | 1
  hashes = jnp.sum(pixels * weights, axis=1, dtype=jnp.uint32)
  return jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(seed), hashes)


STAGES = {"proj.uvim.vit": StageI, "proj.uvim.lm": StageII}


def get_stage(config) -> StageI | StageII:
  """The stage of `config.model_name` (a multi-task stage II with `config.oracles`)."""
  if "oracles" in config:
    return MultiTaskStageII(config)
  if config.model_name not in STAGES:
    models.get_model(config.model_name, config.model)  # raises, naming the known models
  return STAGES[config.model_name](config)

