"""The one training loop for both stages: config -> data -> jitted step -> logs, checkpoints, evals.

Everything a run needs to continue is in its workdir: orbax checkpoints of the whole
`TrainState` (parameters, optimizer, the stage I dictionary, rng, step) and the resolved config.
The data position is a function of the step (each host has consumed `step * local_batch`
examples), so a run killed and restarted with the same command ends where an uninterrupted one
would have, bit for bit.
"""

import dataclasses
import json
import shutil
import signal
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers

from evaluators import common as evaluators_common
from uvim import checkpoint, input_pipeline, optim, sharding, stages
from uvim import workdir as workdir_lib
from uvim.errors import UserError, did_you_mean

# Top-level config keys the trainer reads (plus one ConfigDict per evaluator in `evals`).
KNOWN_KEYS = {
    "seed", "task", "dataset", "data_dir", "train_split", "val_split", "batch_size",
    "num_epochs", "total_steps", "pp_modules", "pp_train", "pp_eval", "pp_predict",
    "shuffle_buffer_size",
    "log_training_steps", "log_eval_steps", "checkpoint_steps", "keep_checkpoint_steps",
    "model_name", "model", "model_init", "optax_name", "optax", "lr", "wd", "schedule",
    "grad_clip_norm", "lr_mults", "evals", "mesh", "oracle", "grad_accum_steps",
    "compute_dtype", "remat", "scan_layers", "attention", "oracles", "condition_rate",
    "tensor_rules",
}
# Keys that must not change when a run resumes from its workdir: the model and its optimizer,
RESUME_KEYS = ("task", "model_name", "model", "optax_name", "optax", "oracle", "oracles")
# and the training data stream, whose position a resume takes as step x batch_size.
DATA_STREAM_KEYS = ("dataset", "train_split", "pp_train", "pp_modules", "batch_size",
                    "shuffle_buffer_size", "seed")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  model_state: Any  # Stage I: the dictionary sums and counts.
  rng: jax.Array


class TrainingDivergedError(RuntimeError):
  """The loss became NaN or inf."""


def check_config(config: mlc.ConfigDict) -> None:
  """Rejects unknown top-level keys (naming the closest known one) and values the trainer
  cannot run with, before anything is built."""
  known = KNOWN_KEYS | {name for name, _ in config.get("evals", [])}
  for key in config:
    is_eval_section = isinstance(config[key], mlc.ConfigDict) and "split" in config[key]
    if key not in known and not is_eval_section:  # a section left out of `evals` is unused
      raise UserError(f"Unknown config key {key!r}; {did_you_mean(key, known)}known: "
                      f"{sorted(known)}")
  missing = workdir_lib.missing_model_inits(config.to_dict())
  if missing:  # before the workdir is touched: a failed start leaves nothing behind
    raise UserError(f"model_init {missing[0]}: no such file or folder (a relative path is read "
                    f"from {Path.cwd()})")
  for key in ("batch_size", "log_training_steps", "checkpoint_steps"):
    _check_int(config, key, minimum=1)
  for key in ("keep_checkpoint_steps", "log_eval_steps", "grad_accum_steps"):
    _check_int(config, key, minimum=1, optional=True)
  _check_int(config, "total_steps", minimum=0, optional=True)
  if config.get("total_steps") is None and not (
      isinstance(config.get("num_epochs"), int | float) and config.num_epochs > 0):
    raise UserError(f"config.num_epochs must be a positive number (or set config.total_steps), "
                    f"got {config.get('num_epochs')!r}")


def _check_int(config: mlc.ConfigDict, key: str, minimum: int, optional: bool = False) -> None:
  value = config.get(key)
  if value is None and optional:
    return
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise UserError(f"config.{key} must be an integer >= {minimum}"
                    f"{' (or None)' if optional else ''}, got {value!r}")


def total_steps_of(config, num_train_examples: int) -> int:
  """`total_steps` if set, else `num_epochs` over the training split."""
  if config.get("total_steps") is not None:
    return int(config.total_steps)
  return int(config.num_epochs * num_train_examples // config.batch_size)


def grad_accum_steps(config: mlc.ConfigDict, mesh: jax.sharding.Mesh) -> int:
  """`config.grad_accum_steps` (default 1), once the batch is known to split evenly into that
  many micro-batches over the mesh's batch axes."""
  accum_steps = config.grad_accum_steps
  shards = input_pipeline.batch_shards(mesh)
  if config.batch_size % (accum_steps * shards):
    raise UserError(f"batch_size {config.batch_size} must be divisible by grad_accum_steps "
                    f"({accum_steps}) x batch shards ({shards}: the mesh's data x fsdp)")
  return accum_steps


def train_step(state: TrainState, batch: dict, frozen: Any, *, stage, tx, lr_fn,
               accum_steps: int = 1, param_shardings: Any = None) -> tuple[TrainState, dict]:
  """One optimisation step on a global batch; returns the new state and metrics.

  With `accum_steps` > 1 the batch is processed in that many micro-batches (rows i, i + k, ...,
  so every device keeps its share of each) whose gradients are averaged before one update; the
  model state (stage I's dictionary) is updated after each micro-batch. `param_shardings` keep
  the gradients sharded like the parameters (FSDP: reduce-scatter, never a full copy).
  """
  rng = jax.random.fold_in(state.rng, state.step)
  value_and_grad = jax.value_and_grad(stage.loss, has_aux=True)

  def grad_fn(*args):
    out, grads = value_and_grad(*args)
    if param_shardings is not None:
      grads = jax.lax.with_sharding_constraint(grads, param_shardings)
    return out, grads

  if accum_steps == 1:
    (loss, (metrics, model_state)), grads = grad_fn(state.params, state.model_state, frozen,
                                                    batch, rng)
  else:
    micro = jax.tree.map(lambda x: jnp.swapaxes(
        x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]), 0, 1), batch)

    def accumulate(carry, xs):
      model_state, grad_sum = carry
      micro_batch, i = xs
      (loss, (metrics, model_state)), grads = grad_fn(
          state.params, model_state, frozen, micro_batch, jax.random.fold_in(rng, i))
      return (model_state, jax.tree.map(jnp.add, grad_sum, grads)), (loss, metrics)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (model_state, grads), (loss, metrics) = jax.lax.scan(
        accumulate, (state.model_state, zeros), (micro, jnp.arange(accum_steps)))
    grads = jax.tree.map(lambda g: g / accum_steps, grads)
    loss, metrics = jnp.mean(loss), jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {
      "training_loss": loss, **metrics,
      "l2_grads": optax.tree.norm(grads), "l2_params": optax.tree.norm(params),
      "l2_updates": optax.tree.norm(updates), "lr": lr_fn(state.step),
  }
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            model_state=model_state)
  return new_state, metrics


def _compare_configs(saved: dict, current: dict, keys=None) -> dict[str, tuple]:
  """{dotted key: (saved value, current value)} of the keys under `keys` (default all) whose
  values differ."""
  a, b = (checkpoint.flatten_json({k: v for k, v in d.items() if keys is None or k in keys})
          for d in (saved, current))
  return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def state_init_fn(init_variables: Callable, tx) -> Callable[[jax.Array], TrainState]:
  def init(rng):
    rng_variables, rng_train = jax.random.split(rng)
    variables = init_variables(rng_variables)
    return TrainState(step=jnp.zeros([], jnp.int32), params=variables["params"],
                      opt_state=tx.init(variables["params"]), model_state=variables["state"],
                      rng=rng_train)
  return init


def train_and_evaluate(config: mlc.ConfigDict, workdir: str) -> TrainState:
  """Trains (or resumes) the model of `config` in `workdir`; evaluates on the way and at the end.

  SIGTERM or SIGINT (a scheduler's preemption, Ctrl-C) ends the current step, saves a checkpoint
  at it and raises `TrainingInterruptedError`; the same command then continues exactly.
  """
  check_config(config)
  workdir = Path(workdir)
  is_main = jax.process_index() == 0
  lock = workdir_lib.WorkdirLock(workdir).acquire() if is_main else None
  try:
    return _train_and_evaluate(config, workdir, is_main)
  finally:
    if lock:
      lock.release()


def _train_and_evaluate(config: mlc.ConfigDict, workdir: Path, is_main: bool) -> TrainState:
  mesh = make_mesh(config)
  stage = stages.get_stage(config)
  total_steps, num_train = training_length(config)
  record_config(config, workdir, is_main)
  step = build_step(config, stage, mesh, total_steps)
  input_pipeline.check_train_input(config, stage.abstract_batch(1))
  frozen = jax.device_put(stage.frozen_variables(), step.frozen_sharding)
  evaluators = evaluators_common.from_config(config, mesh=mesh, fns=stage.eval_fns())
  manager, state, start = restore_or_init(config, workdir, stage, step)
  log = MetricsLog(workdir, start, rerun_evals=start >= total_steps, is_main=is_main)
  data = input_pipeline.train_data(config, mesh, position=start * config.batch_size)
  logging.info("Training %s for %d steps (%d examples, batch %d) on %d devices.",
               config.model_name, total_steps, num_train, config.batch_size, jax.device_count())
  try:
    with StopSignals() as stop:
      state = _loop(state, data=data, step_fn=step.fn, frozen=frozen, start=start,
                    total_steps=total_steps, config=config, manager=manager, log=log,
                    evaluate=partial(_evaluate, evaluators, stage, frozen, log), stop=stop)
  finally:
    log.flush()
    checkpoint.finish_saves(manager)  # An interrupted run keeps its last complete checkpoint.
  export_params(state, workdir / "params.npz")
  return state


def make_mesh(config: mlc.ConfigDict) -> jax.sharding.Mesh:
  """`config.mesh`, once its batch axes are known to split over the hosts."""
  mesh = sharding.make_mesh(config.mesh)
  if input_pipeline.batch_shards(mesh) % jax.process_count():
    raise UserError(f"config.mesh {dict(mesh.shape)}: each of the {jax.process_count()} hosts "
                    "reads its own rows of the batch, so data x fsdp must be a multiple of the "
                    "number of hosts (keep the `tensor` axis within a host)")
  return mesh


def training_length(config: mlc.ConfigDict) -> tuple[int, int]:
  """(total steps, training examples), once the split exists and the hosts divide the batch."""
  builder = input_pipeline.get_builder(config.dataset, config.data_dir)
  num_train = input_pipeline.num_examples(builder, config.train_split, "config.train_split")
  input_pipeline.local_batch_size(config.batch_size)
  return total_steps_of(config, num_train), num_train


def record_config(config: mlc.ConfigDict, workdir: Path, is_main: bool) -> None:
  """Writes `<workdir>/config.json` (its checkpoint paths relative to the workdir), before
  anything else is written, after refusing to resume a checkpoint with another model
  (RESUME_KEYS) or another data stream (DATA_STREAM_KEYS). Other changes (lr, evals, length)
  are allowed; the config they replace is kept as `config.step_<N>.json`."""
  path = workdir / "config.json"
  current = json.loads(config.to_json_best_effort())
  latest = checkpoint.manager(workdir).latest_step()  # on every host
  if latest is not None and path.exists():
    saved = workdir_lib.resolve_paths(checkpoint.read_config_json(path), workdir)
    changed = _compare_configs(saved, workdir_lib.absolute_paths(current))
    model = [k for k in changed if k.split(".")[0] in RESUME_KEYS]
    if model:
      raise UserError(f"{workdir} holds a checkpoint of a different config ("
                      + "; ".join(f"{k}: {changed[k][0]!r} recorded, {changed[k][1]!r} now"
                                  for k in model)
                      + "); use another --workdir or restore the config.")
    data = [f"{k} {changed[k][0]!r} -> {changed[k][1]!r}" for k in changed
            if k.split(".")[0] in DATA_STREAM_KEYS]
    if data:
      raise UserError(f"{workdir} holds a checkpoint of step {latest} trained on another data "
                      f"stream ({'; '.join(data)}): resumed, it would repeat or skip examples "
                      "(the position is step x batch_size) or change their order. Restore those "
                      "keys, or train in another --workdir.")
    if changed and is_main:
      shutil.copyfile(path, workdir / f"config.step_{latest}.json")
      logging.info("Resuming at step %d with changed keys %s; the earlier config is kept in "
                   "config.step_%d.json.", latest, sorted(changed), latest)
  if is_main:
    path.write_text(json.dumps(workdir_lib.record_paths(current, workdir), indent=2))


@dataclasses.dataclass(frozen=True)
class Step:
  """The jitted training step, `fn(state, batch, frozen) -> (state, metrics)` (state donated),
  with what initialising, restoring and planning need: a fresh-state `init(rng)`, the state's
  shapes and the shardings of state, batch and frozen variables."""
  fn: Callable
  init: Callable
  abstract_state: TrainState
  state_sharding: Any
  batch_sharding: jax.sharding.NamedSharding
  frozen_sharding: Any


def build_step(config: mlc.ConfigDict, stage, mesh: jax.sharding.Mesh, total_steps: int) -> Step:
  """The training step of `config` on `mesh` from shapes only (model, loss, optimizer,
  shardings, donation): the one train.py runs, `uvim.tools.plan` sizes and `bench` times."""
  one = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), stage.abstract_batch(1))
  init_variables = partial(stage.init_variables, batch=one)
  abstract_params = jax.eval_shape(init_variables, jax.random.PRNGKey(0))["params"]
  tx, schedule = optim.make(config, abstract_params, total_steps)
  init = state_init_fn(init_variables, tx)
  abstract_state = jax.eval_shape(init, jax.random.PRNGKey(config.seed))
  rules = sharding.config_rules(config)
  state_sharding = sharding.tree_shardings(abstract_state, mesh, rules, abstract_state.params)
  batch_sharding = input_pipeline.batch_sharding(mesh)
  frozen_sharding = sharding.tree_shardings(stage.frozen_shapes(), mesh, rules)
  fn = jax.jit(partial(train_step, stage=stage, tx=tx,
                       lr_fn=lambda step: config.lr * schedule(step),
                       accum_steps=grad_accum_steps(config, mesh),
                       param_shardings=state_sharding.params),
               in_shardings=(state_sharding, batch_sharding, frozen_sharding),
               out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=0)
  return Step(fn=fn, init=init, abstract_state=abstract_state, state_sharding=state_sharding,
              batch_sharding=batch_sharding, frozen_sharding=frozen_sharding)


def restore_or_init(config: mlc.ConfigDict, workdir: Path, stage,
                    step: Step) -> tuple[ocp.CheckpointManager, TrainState, int]:
  """(checkpoint manager, state, step): the newest intact checkpoint of `workdir`, or a fresh
  state (from `config.model_init` when set) at step 0."""
  manager, state, start = checkpoint.restore_latest_intact(
      partial(checkpoint.manager, workdir, config.keep_checkpoint_steps), step.abstract_state,
      step.state_sharding)
  if state is not None:
    logging.info("Resumed from %s at step %d.", workdir, start)
    return manager, jax.block_until_ready(state), start  # restored before the first step
  state = jax.jit(step.init, out_shardings=step.state_sharding)(jax.random.PRNGKey(config.seed))
  if config.get("model_init"):
    params, model_state = stage.load_init(config.model_init, state.params, state.model_state)
    state = jax.device_put(state.replace(params=params, model_state=model_state),
                           step.state_sharding)
  return manager, state, 0


class MetricsLog:
  """Scalars to TensorBoard and the console (every process) and `metrics.jsonl` (process 0);
  images (uint8 HxWx3 arrays, e.g. the `images` evaluator's sheet) to TensorBoard."""

  def __init__(self, workdir: Path, start: int, rerun_evals: bool, is_main: bool):
    self.writer = metric_writers.create_default_writer(str(workdir), just_logging=not is_main)
    self.jsonl = workdir_lib.JsonlWriter(workdir / workdir_lib.METRICS_FILE, start,
                                         rerun_evals_at_start=rerun_evals) if is_main else None

  def write(self, step: int, values: dict) -> None:
    images = {k: v[None] for k, v in values.items() if np.ndim(v) == 3}
    scalars = {k: v for k, v in values.items() if k not in images}
    if images:
      self.writer.write_images(step, images)
    if scalars:
      self.writer.write_scalars(step, scalars)
      if self.jsonl:
        self.jsonl.write(step, scalars)

  def flush(self) -> None:
    self.writer.flush()


def _evaluate(evaluators: list, stage, frozen: Any, log: MetricsLog, step: int,
              state: TrainState, final: bool) -> bool:
  """Runs the evaluators due at `step` (all of them when `final`); whether any ran."""
  due = [ev for ev in evaluators if final or (ev.log_steps and step % ev.log_steps == 0)]
  for ev in due:
    variables = stage.variables(state.params, state.model_state, frozen)
    log.write(step, {f"{ev.prefix}{k}": v for k, v in ev.run(variables).items()})
  return bool(due)


def export_params(state: TrainState, path: Path) -> None:
  """Writes the parameters and model state as a big_vision npz (unscanned layout)."""
  exported = {"params": state.params, "state": state.model_state}
  if jax.process_count() > 1:  # every process takes part in gathering sharded arrays
    from jax.experimental import multihost_utils
    exported = multihost_utils.process_allgather(exported, tiled=True)
  if jax.process_index() == 0:
    exported = jax.device_get(exported)
    exported["params"] = checkpoint.scan_to_unscanned(exported["params"])
    checkpoint.save_npz(path, exported)


class TrainingInterruptedError(Exception):
  """Training stopped on SIGTERM/SIGINT after saving a checkpoint at the current step."""

  def __init__(self, signum: int, step: int, directory: str):
    self.signum, self.step = signum, step
    super().__init__(f"Stopped by {signal.Signals(signum).name} at step {step}: checkpoint "
                     f"saved in {directory}; rerun the same command to continue.")


class StopSignals:
  """Turns the first SIGTERM or SIGINT into a request to stop after the current step (the loop
  then saves); a second one stops at once, as without this. Only in the main thread."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signum: int | None = None
    self._previous: dict = {}

  def _handle(self, signum, frame):
    if self.signum is not None:
      signal.signal(signum, self._previous[signum])
      signal.raise_signal(signum)
      return
    self.signum = signum
    logging.warning("%s received: saving a checkpoint after this step (send it again to stop "
                    "at once).", signal.Signals(signum).name)

  def __enter__(self) -> "StopSignals":
    if threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)


def _loop(state: TrainState, *, data, step_fn: Callable, frozen: Any, start: int,
          total_steps: int, config: mlc.ConfigDict, manager: ocp.CheckpointManager,
          log: MetricsLog, evaluate: Callable, stop: StopSignals) -> TrainState:
  """Steps from `start` to `total_steps`: log, check for divergence, checkpoint, evaluate, and
  stop (after saving) when a stop signal arrived."""
  timer, saving = StepTimer(start), False
  for step in range(start + 1, total_steps + 1):
    state, metrics = step_fn(state, next(data), frozen)
    if saving and not manager.is_saving_in_progress():
      checkpoint.finish_saves(manager)  # reports a failed save at the first step after it ended
      saving = False
    log_now = step % config.log_training_steps == 0 or step == total_steps
    stopping = _agree_to_stop(stop, log_now, state)
    save_now = step % config.checkpoint_steps == 0 or step == total_steps or stopping
    if log_now or save_now:
      metrics = jax.device_get(metrics)
      _raise_if_diverged(metrics["training_loss"], step, manager)
    if log_now:
      _log_progress(log, metrics, step, total_steps, config.batch_size, timer)
    if save_now:
      checkpoint.finish_saves(manager)
      manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
                   force=stopping)
      saving = True
    if stopping:
      checkpoint.finish_saves(manager)
      raise TrainingInterruptedError(stop.signum or signal.SIGTERM, step, str(manager.directory))
    if step != total_steps and evaluate(step, state, final=False):
      timer.mark(step)  # img/s counts training time only
  evaluate(total_steps, state, final=True)
  return state


class StepTimer:
  """Seconds per training step since the last mark."""

  def __init__(self, step: int):
    self.mark(step)

  def mark(self, step: int) -> None:
    self.step, self.time = step, time.perf_counter()

  def per_step(self, step: int) -> float:
    return (time.perf_counter() - self.time) / max(step - self.step, 1)


def _log_progress(log: MetricsLog, metrics: dict, step: int, total_steps: int, batch_size: int,
                  timer: StepTimer) -> None:
  """Writes the step's metrics with images/s and the ETA, and logs a progress line."""
  per_step = timer.per_step(step)
  metrics["img_per_sec"] = batch_size / per_step
  metrics["eta_hours"] = per_step * (total_steps - step) / 3600
  log.write(step, metrics)
  logging.info("step %d/%d loss %.4f, %.1f img/s, ETA %s", step, total_steps,
               metrics["training_loss"], metrics["img_per_sec"],
               _duration(per_step * (total_steps - step)))
  timer.mark(step)


def _raise_if_diverged(loss: float, step: int, manager: ocp.CheckpointManager) -> None:
  """A NaN or inf loss stops the run, naming the last good checkpoint (kept)."""
  if np.isfinite(loss):
    return
  checkpoint.finish_saves(manager)
  last = manager.latest_step()
  kept = ("no checkpoint was saved yet" if last is None
          else f"the last good checkpoint (step {last}) is kept")
  raise TrainingDivergedError(f"Loss is {loss} at step {step}; {kept}.")


def _agree_to_stop(stop: StopSignals, log_now: bool, state: TrainState) -> bool:
  """Whether to stop after this step. One process decides at every step; several agree at
  logging steps with a tiny all-gather, once the step has finished everywhere (on CPUs, two
  programs' collectives running at once would mismatch), so that they all save the same step."""
  if jax.process_count() == 1:
    return stop.signum is not None
  if not log_now:
    return False
  from jax.experimental import multihost_utils
  jax.block_until_ready(state)
  flags = multihost_utils.process_allgather(np.array([stop.signum is not None], np.int32))
  return bool(np.any(flags))


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"
