"""What differs between stage I and stage II: the model, its inputs, its loss and its predictions.

The trainer (uvim/trainer.py) is the same for both. A stage provides
  init_variables(rng, batch)          -> {'params', 'state'} of a fresh model
  loss(params, model_state, frozen, batch, rng) -> (loss, (metrics, new model_state))
  frozen_variables()                  -> variables of fixed models (stage II: the oracles, by
                                         task name), passed to every step, never optimised
  frozen_shapes(), abstract_batch(n)  -> their shapes and a batch's, for planning without data
  variables(params, model_state, frozen) -> what `eval_fns` take
  eval_fns()                          -> {'loss': per-example losses, 'predict': task outputs,
                                         'options': the evaluators' `predict_kwargs` -> the
                                         checked keyword arguments of `predict` (a `Plan`),
                                         'oracles': the stage I models, by task, which say
                                         how to draw each task's labels and predictions}
  load_init(model_init, params, model_state) -> (params, model_state) from `config.model_init`

`StageII.predict_samples` is the one predict path (image -> sampled code -> stage I decoder with
the image context -> task output), doing what a `Plan` (`make_plan`) says; the evaluators
during training, predict.py and `uvim.api` use it. One StageII serves one task
(`config.oracle`) or several (`config.oracles`), a mapping of oracles in either case.
"""

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from uvim import checkpoint, decoding, models
from uvim.code_layout import CodeLayout
from uvim.decoding import Sampling
from uvim.errors import UserError, did_you_mean
from uvim.models import lm
from uvim.oracle import Oracle, with_state


class StageI:
  """`proj.uvim.vit`, the restricted oracle: labels (+ image) -> code -> labels."""

  def __init__(self, config):
    self.oracle = Oracle(config, key="config", **models.memory_options(config))
    self.model, self.task, self.model_config = self.oracle.model, self.oracle.task, config.model
    self.oracles = {config.task: self.oracle}

  def init_variables(self, rng: jax.Array, batch: dict) -> dict:
    return self.oracle.init(rng, batch)

  def frozen_variables(self) -> dict:
    return {}

  def frozen_shapes(self) -> dict:
    return {}

  def abstract_batch(self, batch_size: int) -> dict:
    """Shapes of a training batch (for planning and compiling without data)."""
    return self.oracle.abstract_batch(batch_size, self.model.input_size)

  def loss(self, params, model_state, frozen, batch: dict, rng: jax.Array):
    rng_dropout, rng_vqvae = jax.random.split(rng)
    inputs, ctx, stats = self.oracle.inputs(batch)
    (logits, aux), new_vars = self.model.apply(
        {"params": params, "state": model_state}, inputs, ctx=ctx, train=True,
        mutable=["state"], rngs={"dropout": rng_dropout, "vqvae": rng_vqvae})
    loss, parts = self.task.loss_fn(logits, batch, self.model_config, inputs)
    metrics = {**{k: jnp.mean(v) for k, v in parts.items()}, **stats,
               **{k: v for k, v in aux.items() if k.startswith("codebook_")}}
    return jnp.mean(loss), (metrics, with_state(new_vars)["state"])

  def variables(self, params, model_state, frozen) -> dict:
    return {"params": params, "state": model_state}

  def _logits(self, variables: dict, batch: dict) -> tuple[dict, dict]:
    """Logits in eval mode (no code dropout, no dictionary update), and the inputs."""
    inputs, ctx, _ = self.oracle.inputs(batch)
    return self.model.apply(variables, inputs, ctx=ctx)[0], inputs

  def eval_fns(self) -> dict[str, Callable]:
    """`predict` is the oracle's reconstruction: labels + image -> code -> labels."""
    def options(kwargs: dict, where: str) -> dict:
      if kwargs:
        raise UserError(f"{where}: stage I predictions take no options, got {sorted(kwargs)}")
      return {}

    def loss(v, batch):
      logits, inputs = self._logits(v, batch)
      return self.task.loss_fn(logits, batch, self.model_config, inputs)

    return {
        "loss": loss,
        "predict": self.oracle.reconstruct,
        "options": options,
        "oracles": self.oracles,
    }

  def load_init(self, model_init: str, params, model_state):
    """The parameters of a stage I run (npz or workdir), checked against its recorded config."""
    loaded = self.oracle.load(model_init)
    return loaded["params"], loaded["state"]


def oracles_of(config) -> dict[str, Oracle]:
  """The frozen oracles of a stage II config, by task name: `config.oracles` (each reading its
  labels from `labels_<name>`), or the one `config.oracle` (its labels in `labels`), named
  after its task."""
  options = models.memory_options(config)
  overrides = {k: options[k] for k in ("dtype", "scan_layers", "attention")}
  if "oracles" in config:
    return {name: Oracle(section, key=f"config.oracles.{name}", labels_key=f"labels_{name}",
                         **overrides) for name, section in config.oracles.items()}
  return {config.oracle.task: Oracle(config.oracle, **overrides)}


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a prediction does, checked once against the model (`StageII.plan`): the sampler's
  options (`num_samples` and `seed` are the whole chain's), the chain of (task, Sampling) steps
  decoded in turn, each given every code before it, and the tasks `given` the oracle's code of
  their labels. Hashable: static under jit."""

  sampling: Sampling
  chain: tuple[tuple[str, Sampling], ...]
  given: tuple[str, ...] = ()


class StageII:
  """`proj.uvim.lm`: image -> guiding code(s), trained on the codes the frozen oracles (by task
  name, one or more) give the (augmented) labels of each batch, whose layout in the sequence
  (`CodeLayout`) sets `seq_len`, `vocab_size` and `num_tasks`. With one oracle (`config.oracle`)
  this is the paper's stage II, causal or masked; with several (`config.oracles`, masked) each
  training example makes each task a condition (code visible) or a target (part hidden, the
  loss on it), so the model learns image (+ some codes) -> the others and predicts chains."""

  def __init__(self, config):
    self.oracles = oracles_of(config)
    self.names = tuple(self.oracles)
    self.multitask = "oracles" in config
    self.condition_rate = config.get("condition_rate", 0.5)
    self.layout = CodeLayout.of({k: o.code_len for k, o in self.oracles.items()},
                                {k: o.dict_size for k, o in self.oracles.items()})
    self.first_id = self.layout.first_id
    implied = implied_settings(self.layout, self.multitask)
    self.implied = {k: v for k, (v, _) in implied.items()}
    unstated = {k: v for k, v in self.implied.items() if k not in config.model}
    self.model = models.get_model(config.model_name, config.model, **unstated,
                                  **models.memory_options(config))
    for key, (value, why) in implied.items():
      if getattr(self.model, key) != value:
        raise UserError(f"config.model.{key} ({getattr(self.model, key)}) must be {value}, "
                        f"{why}")

  def oracle(self, name: str | None = None) -> Oracle:
    """The oracle of task `name` (default: the first)."""
    return self.oracles[name or self.names[0]]

  def span(self, name: str) -> tuple[int, int]:
    return self.layout.span(name)

  def by_name(self, oracle_variables: dict) -> dict:
    """The oracles' variables by task name (also from one oracle's own {'params', 'state'})."""
    if set(oracle_variables) == set(self.names):
      return oracle_variables
    return {self.names[0]: oracle_variables}

  def init_variables(self, rng: jax.Array, batch: dict) -> dict:
    targets = jnp.zeros((batch["image"].shape[0], self.model.seq_len), jnp.int32)
    return {"params": self.model.init(rng, batch["image"], targets)["params"], "state": {}}

  def frozen_shapes(self) -> dict:
    """Shapes of the oracles' {'params', 'state'}, by task name."""
    return {k: o.shapes() for k, o in self.oracles.items()}

  def frozen_variables(self) -> dict:
    """The oracles' {'params', 'state'} by task name, from their `model_init`, checked against
    the oracle sections of the config."""
    return {k: o.load() for k, o in self.oracles.items()}

  def abstract_batch(self, batch_size: int) -> dict:
    """Shapes of a training batch (for planning and compiling without data)."""
    batch = {}
    for oracle in self.oracles.values():
      batch.update(oracle.abstract_batch(batch_size, self.model.input_size))
    return batch

  def targets(self, oracle_variables: dict, batch: dict) -> tuple[jnp.ndarray, dict]:
    """Every oracle's code of the batch's labels as one sequence of tokens (B, seq_len), and
    the code statistics (`oracle_codebook_*`; by task, `<name>/...`, with several tasks)."""
    codes, stats = {}, {}
    for name, variables in self.by_name(oracle_variables).items():
      codes[name], task_stats = self.oracles[name].encode(variables, batch)
      stats.update({(f"{name}/" if self.multitask else "")
                    + ("oracle_" if k.startswith("codebook_") else "") + k: v
                    for k, v in task_stats.items()})
    return self.layout.pack(codes), stats

  def _training_mask(self, rng: jax.Array, batch: int) -> jnp.ndarray | None:
    """(B, L) positions hidden from a masked model in training (None for a causal model):
    `lm.training_mask` of the code; with several tasks, each task's role drawn per example
    (`CodeLayout.roles_mask`)."""
    if not self.model.masked:
      return None
    if not self.multitask:
      return lm.training_mask(rng, batch, self.model.seq_len, self.model.min_mask_ratio)
    return self.layout.roles_mask(rng, batch, self.condition_rate, self.model.min_mask_ratio)

  def _token_losses(self, params: Any, images: jnp.ndarray, targets_BxL: jnp.ndarray,
                    hidden_BxL: jnp.ndarray | None, dropped_BxL: jnp.ndarray | None = None,
                    **apply_kw) -> tuple[jnp.ndarray, ...]:
    """Per-position cross-entropy and correctness (B, L) of the code: causal, teacher-forced;
    masked, the positions `hidden_BxL` filled in given the others (but `dropped_BxL`)."""
    shown_as_mask = hidden_BxL if dropped_BxL is None else hidden_BxL | dropped_BxL
    inputs = targets_BxL if hidden_BxL is None else jnp.where(shown_as_mask, lm.MASK, targets_BxL)
    logits = self.model.apply({"params": params}, images, inputs, **apply_kw)
    xent = optax.softmax_cross_entropy_with_integer_labels(logits, targets_BxL)
    return xent, (jnp.argmax(logits, -1) == targets_BxL).astype(jnp.float32)

  def _per_task(self, values_BxL: jnp.ndarray, weights_BxL: jnp.ndarray | None,
                axis: int | None = None) -> dict:
    """Means of `values` over each task's positions (weighted), over the whole batch or
    per example (`axis` 1)."""
    weights = {} if weights_BxL is None else self.layout.per_task(weights_BxL)
    return {name: _mean(values, weights.get(name), axis=axis)
            for name, values in self.layout.per_task(values_BxL).items()}

  def loss(self, params, model_state, frozen, batch: dict, rng: jax.Array):
    targets, stats = self.targets(frozen, batch)
    hidden = self._training_mask(jax.random.fold_in(rng, 1), len(targets))
    dropped = (self.layout.dropped_conditions(jax.random.fold_in(rng, 2), hidden,
                                              self.model.cond_dropout)
               if self.multitask and self.model.cond_dropout and hidden is not None else None)
    xent, correct = self._token_losses(params, batch["image"], targets, hidden, dropped,
                                       train=True, rngs={"dropout": rng})
    metrics = {"token_accuracy": _mean(correct, hidden, axis=None), **stats}
    if self.multitask:
      metrics.update({f"loss_{k}": v for k, v in self._per_task(xent, hidden).items()})
      metrics.update({f"token_accuracy_{k}": v for k, v in self._per_task(correct, hidden).items()})
    return jnp.mean(_mean(xent, hidden)), (metrics, model_state)

  def variables(self, params, model_state, frozen) -> dict:
    return {"params": params, "oracle": frozen}

  def plan(self, options: Mapping[str, Any], where: str = "predict") -> Plan:
    """`options` as a checked `Plan` for this model (see `make_plan`); errors name `where`."""
    return make_plan(options, self.oracles, self.model, where)

  def predict_samples(self, variables: dict, batch: dict, plan: Plan | None = None, *,
                      draft: jnp.ndarray | None = None, **options: Any) -> dict:
    """Task outputs for `num_samples` sampled codes per image, each (B, num_samples, ...), plus
    the sequence `code` (B, num_samples, seq_len) of word ids and its log-probability
    `code_logprob` (and with several tasks each task's `code_<name>`), as `plan` (default: the
    plan of `options`) says: `given` tasks take the oracle's code of the batch's labels; then
    each step of the chain decodes its task's code given every code so far. Every decoded or
    given code is decoded by its oracle with the image context. A masked model decodes from a
    `draft` (B, seq_len) of word ids, -1 where none: the words the model would not write itself
    are decoded again (`decoding.sample`'s `revise`; e.g. a video's previous frame)."""
    plan = plan or self.plan(options)
    images, oracles, layout = batch["image"], self.by_name(variables["oracle"]), self.layout
    samples = plan.sampling.num_samples
    tokens = jnp.full((len(images), samples, layout.seq_len), lm.MASK, jnp.int32)
    if draft is not None:
      if not self.model.masked:
        raise UserError("a draft (decoding from e.g. the previous frame's code) needs a masked "
                        "model")
      tokens = jnp.broadcast_to(jnp.where(draft >= 0, draft + 1, lm.MASK)[:, None], tokens.shape)
    for name in plan.given:
      code = self.oracles[name].encode(oracles[name], batch)[0] + layout.first_id[name]
      tokens = tokens.at[:, :, slice(*layout.span(name))].set(code[:, None])
    rngs = decoding.image_rngs(images, plan.sampling.seed)
    logprob = jnp.zeros((len(images), samples), jnp.float32)
    for i, (name, step) in enumerate(plan.chain):
      part = {} if layout.whole(name) else {"span": layout.span(name),
                                            "vocab": layout.vocab(name)}
      if plan.given or i or draft is not None:
        part["given"] = tokens
      if draft is not None:
        part["revise"] = True
      # A multi-task chain draws step i from fold_in(image key, i); one task, the image key.
      keys = jax.vmap(jax.random.fold_in, (0, None))(rngs, i) if self.multitask else rngs
      tokens, step_logprob = decoding.sample(self.model, variables["params"], images, keys,
                                             step, **part)
      logprob = logprob + step_logprob
    outputs = {"code": tokens - 1, "code_logprob": logprob}
    per_sample = lambda x: x.reshape(len(images), samples, *x.shape[1:])
    for name in (*plan.given, *(n for n, _ in plan.chain)):
      code = layout.unpack(tokens, name)
      ctx = jnp.repeat(self.oracles[name].context(batch), samples, axis=0)
      decoded = self.oracles[name].decode(oracles[name], code.reshape(-1, code.shape[-1]), ctx)
      outputs.update(jax.tree.map(per_sample, decoded))
      if self.multitask:
        outputs[f"code_{name}"] = code
    return outputs

  def eval_fns(self) -> dict[str, Callable]:
    """`loss`: the code's cross-entropy (causal: teacher-forced; masked: positions drawn from
    each image's key, reproducibly; several tasks: each from the image alone, every position
    hidden, by task too); `predict`: the end task from one sampled code per image, as `plan`
    says; `options`: the evaluators' `predict_kwargs` -> {'plan': checked}."""
    def loss(v, batch):
      targets, _ = self.targets(v["oracle"], batch)
      if self.multitask:
        hidden, weights = jnp.ones_like(targets, bool), None
      elif self.model.masked:
        hidden = jax.vmap(lambda key: self._training_mask(key, 1)[0])(
            decoding.image_rngs(batch["image"]))
        weights = hidden
      else:
        hidden = weights = None
      xent, _ = self._token_losses(v["params"], batch["image"], targets, hidden)
      parts = {"loss_code": _mean(xent, weights)}
      if self.multitask:
        parts.update({f"loss_{k}": x for k, x in self._per_task(xent, None, axis=1).items()})
      return parts["loss_code"], parts

    def predict(v, batch, plan=None):
      return jax.tree.map(lambda x: x[:, 0], self.predict_samples(v, batch, plan))

    return {"loss": loss, "predict": predict, "options": lambda kwargs, where: {
        "plan": self.plan(kwargs, where)}, "oracles": self.oracles}

  def load_init(self, model_init: Any, params, model_state):
    """A whole stage II model (npz or workdir), or `{'encoder': ViT name or npz}`."""
    return checkpoint.stage2_init(model_init, params, self.model, self.implied), model_state


def implied_settings(layout: CodeLayout, multitask: bool) -> dict[str, tuple[Any, str]]:
  """What the oracles' codes imply of a stage II model, and why: {setting: (value, reason)}. A
  config may state them (the paper's do); a value that differs is an error."""
  if multitask and len(set(layout.code_lens)) != 1:
    raise UserError(f"config.oracles: every oracle's model.code_len must be the same, got "
                    f"{dict(zip(layout.names, layout.code_lens, strict=True))}")
  source = "config.oracles" if multitask else "config.oracle.model"
  implied = {"seq_len": (layout.seq_len, f"the code_len of {source}"),
             "vocab_size": (layout.vocab_size,
                            f"1 + the dict_size of {source} {list(layout.dict_sizes)}"),
             "num_tasks": (len(layout.names) if multitask else 1, "one per oracle")}
  if multitask:
    implied["masked"] = (True, "a multi-task model (chains decode in any order)")
  return implied


def make_plan(options: Mapping[str, Any], oracles: Mapping[str, Oracle], model: Any,
              where: str = "predict") -> Plan:
  """`options` (Sampling's fields, or `sampling`, a base Sampling; `chain`: task names or
  (name, options) pairs, options a mapping of Sampling's fields or a Sampling, default every
  task in order; `given`: task names) checked against a stage II `model` over `oracles`; a
  step whose temperature no option sets samples at its task's DEFAULT_TEMPERATURE. Errors
  name `where`."""
  options, names = dict(options), tuple(oracles)
  chain, given = options.pop("chain", None), tuple(options.pop("given", None) or ())
  try:
    sampling = Sampling.of(options.pop("sampling", None), **options)
    steps = []
    for item in names if chain is None else chain:
      name, step = (item, {}) if isinstance(item, str) else item
      if name not in names:
        raise UserError(f"chain: unknown task {name!r}; {did_you_mean(name, names)}the "
                        f"model's tasks are {names}")
      if not isinstance(step, Sampling):
        if "temperature" not in options:
          step = {"temperature": oracles[name].task.DEFAULT_TEMPERATURE, **step}
        step = Sampling.of(sampling, **step)
      if (step.num_samples, step.seed) != (sampling.num_samples, sampling.seed):
        raise UserError(f"chain step {name!r}: num_samples and seed are the whole chain's")
      step.check(model, oracles[name].code_len)
      steps.append((name, step))
    check_chain(tuple(n for n, _ in steps), given, names)
  except UserError as e:
    raise UserError(f"{where}: {e}") from None
  return Plan(sampling, tuple(steps), given)


def check_chain(chain: Sequence[str], given: Sequence[str], names: Sequence[str]) -> None:
  """A chain decodes some of `names` once each, none of them `given` (also of `names`)."""
  if not chain:
    raise UserError(f"chain is empty: name the task(s) to decode, of {tuple(names)}")
  twice = sorted({n for n in chain if list(chain).count(n) > 1})
  if twice:
    raise UserError(f"chain: {twice} named twice; each task is decoded once")
  for name in given:
    if name not in names:
      raise UserError(f"given: unknown task {name!r}; the model's tasks are {tuple(names)}")
    if name in chain:
      raise UserError(f"chain: task {name!r} is both given and decoded")


def _mean(values: jnp.ndarray, weights: jnp.ndarray | None, axis: int | None = -1) -> jnp.ndarray:
  """The mean of `values` over `axis` (None: all), weighted by `weights` (None: uniform)."""
  if weights is None:
    return jnp.mean(values, axis=axis)
  weights = weights.astype(values.dtype)
  return jnp.sum(values * weights, axis=axis) / jnp.maximum(jnp.sum(weights, axis=axis), 1)


STAGES = {"proj.uvim.vit": StageI, "proj.uvim.lm": StageII}


def get_stage(config) -> StageI | StageII:
  """The stage of `config.model_name`."""
  if config.model_name not in STAGES:
    models.get_model(config.model_name, config.model)  # raises, naming the known models
  return STAGES[config.model_name](config)
