"""Multi-task stage II: per-task losses, the roles of training, and chained generation."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_notebook
from test_images import event_images
from test_parallel_decoding import decoder_inputs
from test_stage2 import LM_TINY, stage2_config
from test_trainer import TINY

from configs import depth_stage1, multitask_stage2
from evaluators import common as evaluators_common
from evaluators.images import CELL_SIZE
from uvim import checkpoint, decoding, input_pipeline, sharding, stages, trainer
from uvim.errors import UserError
from uvim.models import lm

# One worker runs the module: its trained fixtures cost a minute on each worker that needs them.
pytestmark = pytest.mark.xdist_group("multitask")


def first_batch(config, size=4) -> dict:
  """The first `size` validation examples through the config's eval pp, as numpy."""
  mesh = sharding.make_mesh([("data", -1)])
  batches, _ = input_pipeline.eval_data(config, "validation", config.pp_eval, 8, mesh)
  return jax.tree.map(lambda x: np.asarray(x)[:size], next(iter(batches)))


def depth_oracle_config(data_dir):
  c = depth_stage1.get_config("smoke")
  c.dataset, c.data_dir = "toy_scenes/tiny", str(data_dir)
  c.train_split, c.val_split = "train", "validation"
  c.batch_size, c.total_steps, c.evals = 8, 2, []
  c.log_training_steps, c.checkpoint_steps = 1, 2
  c.model.update(TINY)
  return c


@pytest.fixture(scope="module")
def oracles(toy_data_dir, oracle_workdir, tmp_path_factory):
  """Tiny panoptic (the session's) and depth stage I runs (codes of 16 words from 16)."""
  depth = tmp_path_factory.mktemp("depth")
  trainer.train_and_evaluate(depth_oracle_config(toy_data_dir), depth)
  return {"panoptic": oracle_workdir, "depth": depth}


def multitask_config(data_dir, oracles, names=("panoptic", "depth"), tasks=None):
  c = multitask_stage2.build(tasks or {k: multitask_stage2.TASKS[k] for k in names}, "smoke")
  c.dataset, c.data_dir = "toy_scenes/tiny", str(data_dir)
  c.train_split, c.val_split = "train", "validation"
  c.batch_size, c.total_steps = 8, 2
  c.log_training_steps, c.log_eval_steps, c.checkpoint_steps = 1, 2, 2
  for name in list(c.oracles):
    if name not in names:
      del c.oracles[name]
  for name, oracle in c.oracles.items():
    oracle.model.update(TINY)
    oracle.model_init = str(oracles[name if name in oracles else "depth"])
  c.model.update(LM_TINY, num_tasks=len(names), seq_len=16 * len(names),
                 vocab_size=1 + 16 * len(names))
  for name, _ in c.evals[1:]:
    c[name].split = "validation[:4]"
  return c


@pytest.fixture(scope="module")
def trained(toy_data_dir, oracles, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("multitask")
  config = multitask_config(toy_data_dir, oracles)
  trainer.train_and_evaluate(config, workdir)
  return config, workdir


@pytest.mark.slow
def test_multitask_stage2_logs_each_tasks_loss_and_scores_each_task(trained):
  _, workdir = trained
  lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  first = {k: v for x in lines if x["step"] == 1 for k, v in x.items()}
  # The logits head starts at zero: every task's loss is that of a uniform vocabulary of 33.
  for name in ("panoptic", "depth"):
    assert first[f"loss_{name}"] == pytest.approx(np.log(33), rel=1e-5)
    assert f"{name}/oracle_codebook_usage" in first and f"token_accuracy_{name}" in first
  final = {k: v for x in lines if x["step"] == 2 for k, v in x.items()}
  assert {"val/loss_panoptic", "val/loss_depth", "coco_panoptic/PQ", "nyu_depth/rmse"} <= set(final)
  # TensorBoard's picture of the predictions: per row the input, then each task's truth and
  # prediction (the chain of all tasks).
  (sheet,) = event_images(workdir, "images/predictions").values()
  assert sheet.shape[1] == 4 + 5 * (CELL_SIZE + 4)


@pytest.mark.slow
def test_the_multitask_notebook_draws_each_task_and_both_chains(trained):
  _, workdir = trained
  executed = run_notebook("multitask", MULTITASK=str(workdir), SPLIT="validation[:2]")
  shown = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs]
  assert "tasks: ('depth', 'panoptic')" in "".join(o.get("text", "") for o in shown)
  assert sum("image/png" in o.get("data", {}) for o in shown) == 3


def test_training_roles_hide_nothing_of_a_condition_and_leave_a_target(toy_data_dir, oracles):
  stage = stages.get_stage(multitask_config(toy_data_dir, oracles))
  hidden = np.asarray(stage._training_mask(jax.random.key(0), 4000)).reshape(4000, 2, 16)
  targets = hidden.any(axis=2)
  assert targets.any(axis=1).all()  # at least one target per example
  # condition_rate 0.5 per task, an all-condition example (1/4) has one random target:
  # both tasks targets 1/4, task 0 a target 1/2 + 1/8.
  assert targets.all(axis=1).mean() == pytest.approx(0.25, abs=0.03)
  assert targets[:, 0].mean() == pytest.approx(0.625, abs=0.03)


def jitter(params, scale=0.1):
  """`params` plus noise: distinct logits everywhere (a 2-step model's are nearly tied, and
  a tie may break differently in two equivalent computations)."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return jax.tree.unflatten(tree, [jnp.asarray(x) + scale * jax.random.normal(k, x.shape)
                                   for x, k in zip(leaves, keys, strict=True)])


def chain_reference(stage, params, images, given_tokens, chain, steps):
  """Greedy confidence-first decoding of each task of `chain` in turn, one full decoder pass
  per step, in Python: the tokens of other spans are whatever the previous steps left."""
  tokens = np.array(given_tokens)
  for name in chain:
    first, end = stage.span(name)
    low, high = stage.layout.vocab(name)
    for count in decoding.tokens_per_step(end - first, steps, "cosine"):
      logits = np.asarray(stage.model.apply({"params": params}, images, jnp.asarray(tokens)))
      allowed = np.full(logits.shape[-1], -np.inf)
      allowed[low:high] = 0
      logp = jax.nn.log_softmax(logits + allowed, axis=-1)
      best, score = np.argmax(logp, -1), np.max(logp, -1)
      for b in range(len(tokens)):
        free = [i for i in range(first, end) if tokens[b, i] == lm.MASK]
        for i in sorted(free, key=lambda i: -score[b, i])[:count]:
          tokens[b, i] = best[b, i]
  return tokens


def test_chains_condition_on_the_previous_steps_and_keep_given_codes(toy_data_dir, trained):
  config, workdir = trained
  stage = stages.get_stage(config)
  params = jitter(checkpoint.load_npz(workdir / "params.npz")["params"])
  variables = {"params": params, "oracle": stage.frozen_variables()}
  batch = first_batch(config)
  images = batch["image"]
  options = dict(scheme="maskgit", steps=3, choice_temperature=0.0)

  with decoder_inputs() as seen:
    out = stage.predict_samples(variables, batch, chain=("depth", "panoptic"), **options)
  code = np.asarray(out["code"][:, 0]) + 1  # tokens
  start = np.full(code.shape, lm.MASK)
  np.testing.assert_array_equal(code, chain_reference(
      stage, variables["params"], images, start, ("depth", "panoptic"), 3))
  depth = slice(*stage.span("depth"))
  assert len(seen) == 6
  for inputs in seen[3:]:  # the panoptic steps see exactly the depth code decoded before
    np.testing.assert_array_equal(inputs[:, depth], code[:, depth])
  assert (seen[0] == lm.MASK).all()

  with decoder_inputs() as seen:
    out = stage.predict_samples(variables, batch, chain=("panoptic",), given=("depth",),
                                **options)
  truth = stage.oracles["depth"].encode(variables["oracle"]["depth"], batch)[0] + stage.first_id[
      "depth"]
  code = np.asarray(out["code"][:, 0]) + 1
  np.testing.assert_array_equal(code[:, depth], truth)  # the given code is never overwritten
  np.testing.assert_array_equal(out["code_depth"][:, 0],
                                np.asarray(truth) - stage.first_id["depth"])
  for inputs in seen:
    np.testing.assert_array_equal(inputs[:, depth], truth)
  assert {"semantics", "instances", "depth"} <= set(out)


def test_a_one_task_model_predicts_like_the_single_task_stage(toy_data_dir, oracles):
  """With one task the multi-task prediction path is the single-task masked stage II's: same
  parameters, same codes and outputs."""
  multi_config = multitask_config(toy_data_dir, oracles, names=("panoptic",))
  multi_config.model.cond_dropout = 0.0  # as the single-task config (no null image)
  multi = stages.get_stage(multi_config)
  single_config = stage2_config(toy_data_dir, oracles["panoptic"])
  single_config.model.masked = single_config.model.neighbour_tokens = True  # `:masked`
  single = stages.get_stage(single_config)
  batch = first_batch(single_config)
  params = jitter(single.init_variables(jax.random.key(0), batch)["params"])
  oracle = single.frozen_variables()
  options = dict(scheme="maskgit", steps=4, choice_temperature=0.0)
  ours = multi.predict_samples({"params": params, "oracle": {"panoptic": oracle[single.names[0]]}},
                               {**batch, "labels_panoptic": batch["labels"]}, **options)
  theirs = single.predict_samples({"params": params, "oracle": oracle}, batch, **options)
  for k in ("code", "semantics", "instances"):
    np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)


def test_a_multitask_evaluator_takes_every_sampling_option(trained):
  """`predict_kwargs` of a multi-task evaluator are the sampler's options, checked against the
  model when the evaluator is built and used by its predictions."""
  config, workdir = trained
  config = config.copy_and_resolve_references()
  config.evals = [("panoptic_val", "coco_panoptic")]
  options = dict(chain=("panoptic",), scheme="roar", temperature=1.0)
  config.panoptic_val.predict_kwargs = options
  stage = stages.get_stage(config)
  params = checkpoint.load_npz(workdir / "params.npz")["params"]
  variables = stage.variables(jitter(params), {}, stage.frozen_variables())
  mesh = sharding.make_mesh([("data", -1)])
  (evaluator,) = evaluators_common.from_config(config, mesh=mesh, fns=stage.eval_fns())
  batch = first_batch(config)
  got = evaluator.fns["predict"](variables, batch)
  want = stage.predict_samples(variables, batch, **options)
  greedy = stage.predict_samples(variables, batch, chain=("panoptic",))
  np.testing.assert_array_equal(got["code"], want["code"][:, 0])
  assert not np.array_equal(got["code"], greedy["code"][:, 0])  # the options took effect
  assert 0 <= evaluator.run(variables)["PQ"] <= 100
  config.panoptic_val.predict_kwargs = dict(chain=("panoptic",), scheme="ar")
  with pytest.raises(UserError, match=r"config\.panoptic_val\.predict_kwargs: scheme 'ar' "
                     r"needs a causal"):
    evaluators_common.from_config(config, mesh=mesh, fns=stage.eval_fns())
  config.panoptic_val.predict_kwargs = dict(temprature=1.0)
  with pytest.raises(UserError, match=r"unknown sampling option\(s\) \['temprature'\]; did "
                     r"you mean 'temperature'"):
    evaluators_common.from_config(config, mesh=mesh, fns=stage.eval_fns())
  config.panoptic_val.predict_kwargs = dict(chain=())  # `--chain=` (an IndexError before)
  with pytest.raises(UserError, match=r"predict_kwargs: chain is empty: name the task"):
    evaluators_common.from_config(config, mesh=mesh, fns=stage.eval_fns())


def test_a_third_task_is_one_entry_of_the_config(toy_data_dir, oracles):
  """A task is an entry of the config's table: its oracle section, its labels' pp; the model's
  sequence, vocabulary and task count follow from the oracles."""
  far = {**multitask_stage2.TASKS["depth"], "labels": 'nyu_depth(outkey="labels_far")|',
         "evaluator": None}
  config = multitask_config(toy_data_dir, oracles, ("panoptic", "depth", "far"),
                            tasks={**multitask_stage2.TASKS, "far": far})
  assert (config.model.seq_len, config.model.vocab_size, config.model.num_tasks) == (48, 49, 3)
  stage = stages.get_stage(config)
  assert stage.names == ("depth", "far", "panoptic")
  assert [stage.span(n) for n in stage.names] == [(0, 16), (16, 32), (32, 48)]
  assert [stage.layout.vocab(n) for n in stage.names] == [(1, 17), (17, 33), (33, 49)]
  batch = first_batch(config)
  variables = stage.variables(stage.init_variables(jax.random.key(0), batch)["params"], {},
                              stage.frozen_variables())
  loss, (metrics, _) = stage.loss(variables["params"], {}, variables["oracle"], batch,
                                  jax.random.key(1))
  assert loss == pytest.approx(np.log(49), rel=1e-5)  # a zero head: uniform over 49 tokens
  assert {"loss_far", "token_accuracy_far", "far/oracle_codebook_usage"} <= set(metrics)
  out = stage.predict_samples(variables, batch, chain=("far",), given=("depth",), steps=2)
  depth_code = stage.oracles["depth"].encode(variables["oracle"]["depth"], batch)[0]
  np.testing.assert_array_equal(out["code_depth"][:, 0], depth_code)
  assert out["code_far"].shape == (4, 1, 16) and (out["code_far"] >= 0).all()
  assert (out["code_far"] < 16).all() and {"depth", "code_logprob"} <= set(out)
  unstated = config.copy_and_resolve_references()
  del unstated.model["seq_len"], unstated.model["vocab_size"], unstated.model["num_tasks"]
  model = stages.get_stage(unstated).model  # the oracles say what the config does not
  assert (model.seq_len, model.vocab_size, model.num_tasks) == (48, 49, 3)
  config.model.seq_len = 32
  with pytest.raises(UserError, match=r"config\.model\.seq_len \(32\) must be 48"):
    stages.get_stage(config)


def test_condition_dropout_of_codes_hides_exactly_the_condition_tasks(toy_data_dir, oracles):
  config = multitask_config(toy_data_dir, oracles)
  config.model.cond_dropout = 0.5
  stage = stages.get_stage(config)
  hidden = stage._training_mask(jax.random.key(0), 4000)
  dropped = np.asarray(stage.layout.dropped_conditions(
      jax.random.key(1), hidden, stage.model.cond_dropout)).reshape(4000, 2, 16)
  hidden = np.asarray(hidden).reshape(4000, 2, 16)
  condition = ~hidden.any(axis=2)
  # A task's code is dropped whole or not at all, and only a condition's (no target loses
  # positions it would be scored on).
  assert (dropped.all(axis=2) | ~dropped.any(axis=2)).all()
  assert not (dropped.any(axis=2) & ~condition).any()
  # Per example, every condition or none: with probability cond_dropout.
  has_condition = condition.any(axis=1)
  drops = dropped.any(axis=(1, 2))
  np.testing.assert_array_equal(dropped.any(axis=2)[drops], condition[drops])
  assert drops[has_condition].mean() == pytest.approx(0.5, abs=0.04)
  # The loss sees MASK there and scores the targets alone.
  batch = first_batch(config)
  variables = stage.variables(stage.init_variables(jax.random.key(0), batch)["params"], {},
                              stage.frozen_variables())
  targets, _ = stage.targets(variables["oracle"], batch)
  some_hidden = jnp.asarray(hidden[:4].reshape(4, -1))
  some_dropped = jnp.asarray(dropped[:4].reshape(4, -1))
  with decoder_inputs(method="__call__") as seen:
    stage._token_losses(variables["params"], batch["image"], targets, some_hidden, some_dropped)
  np.testing.assert_array_equal(seen[0], np.where(hidden[:4].reshape(4, -1)
                                                  | dropped[:4].reshape(4, -1), lm.MASK,
                                                  np.asarray(targets)))


def guided_chain_reference(stage, params, images, tokens, name, steps, scale):
  """Greedy confidence-first decoding of task `name` with guidance whose unconditional pass
  sees the "no image" input and MASK outside the task's span: both passes recomputed in full
  at every step, in Python."""
  tokens = np.array(tokens)
  first, end = stage.span(name)
  low, high = stage.layout.vocab(name)
  model, variables = stage.model, {"params": params}
  encoded = model.apply(variables, images, method=model.encode)
  null = model.apply(variables, encoded, method=model.encode_unconditional)
  for count in decoding.tokens_per_step(end - first, steps, "cosine"):
    outside = np.full(tokens.shape, lm.MASK)
    outside[:, first:end] = tokens[:, first:end]
    cond = np.asarray(model.apply(variables, encoded, jnp.asarray(tokens), method=model.decode))
    uncond = np.asarray(model.apply(variables, null, jnp.asarray(outside), method=model.decode))
    logits = uncond + scale * (cond - uncond)
    allowed = np.full(logits.shape[-1], -np.inf)
    allowed[low:high] = 0
    logp = jax.nn.log_softmax(logits + allowed, axis=-1)
    best, score = np.argmax(logp, -1), np.max(logp, -1)
    for b in range(len(tokens)):
      free = [i for i in range(first, end) if tokens[b, i] == lm.MASK]
      for i in sorted(free, key=lambda i: -score[b, i])[:count]:
        tokens[b, i] = best[b, i]
  return tokens


def test_guidance_that_drops_everything_masks_every_other_code_in_the_unconditional_pass(
    toy_data_dir, oracles):
  config = multitask_config(toy_data_dir, oracles)
  config.model.cond_dropout = 0.1
  stage = stages.get_stage(config)
  batch = first_batch(config)
  params = jitter(stage.init_variables(jax.random.key(0), batch)["params"], 0.3)
  variables = {"params": params, "oracle": stage.frozen_variables()}
  options = dict(scheme="maskgit", steps=3, choice_temperature=0.0, guidance=2.0)
  truth = stage.oracles["depth"].encode(variables["oracle"]["depth"], batch)[0] + stage.first_id[
      "depth"]
  start = np.full((4, 32), lm.MASK)
  start[:, slice(*stage.span("depth"))] = truth
  for unconditional in ("everything", "image"):
    out = stage.predict_samples(variables, batch, chain=("panoptic",), given=("depth",),
                                unconditional=unconditional, **options)
    code = np.asarray(out["code"][:, 0]) + 1
    reference = guided_chain_reference(stage, params, batch["image"], start, "panoptic", 3, 2.0)
    if unconditional == "everything":
      np.testing.assert_array_equal(code, reference)
    else:  # the unconditional pass sees the given depth code: another result
      assert (code != reference).any()


def test_with_colour_the_model_reads_grayscale_and_each_oracle_its_own_context(toy_data_dir,
                                                                               oracles):
  config = multitask_stage2.build(multitask_stage2.TASKS, "smoke")
  config.dataset, config.data_dir = "toy_scenes/tiny", str(toy_data_dir)
  batch = first_batch(config)
  image, ctx = batch["image"], batch["image_ctx"]
  np.testing.assert_allclose(image[..., 0], image[..., 1], atol=1e-6)  # gray: R = G = B
  np.testing.assert_allclose(image[..., 1], image[..., 2], atol=1e-6)
  assert np.abs(ctx[..., 0] - ctx[..., 1]).max() > 0.1  # the context keeps its colours
  # The colour labels are the image itself, resized like the context; its gray is the input.
  np.testing.assert_array_equal(batch["labels_colorization"], ctx)
  gray = ctx @ np.array([0.2989, 0.587, 0.114])
  np.testing.assert_allclose(image[..., 0], gray, atol=2e-3)
  stage = stages.get_stage(config)
  assert stage.oracles["colorization"].context(batch) is batch["image"]
  assert stage.oracles["panoptic"].context(batch) is batch["image_ctx"]
  assert stage.oracles["depth"].context(batch) is batch["image_ctx"]


def test_chain_study_scores_every_chain_of_two_and_three_tasks():
  from uvim.tools import chain_study

  rows = dict(chain_study.chains(("colorization", "depth", "panoptic")))
  assert len(rows) == 3 * 10  # per target: 1 + 2 x 2 + 2 x 2 + 1
  assert rows["image -> depth -> colorization -> panoptic"] == {
      "chain": ("depth", "colorization", "panoptic")}
  assert rows["image + true depth code -> colorization -> panoptic"] == {
      "chain": ("colorization", "panoptic"), "given": ("depth",)}
  assert rows["image + true colorization and depth codes -> panoptic"] == {
      "chain": ("panoptic",), "given": ("colorization", "depth")}
  assert len(chain_study.chains(("depth", "panoptic"))) == 2 * 3  # no chains of three


def test_chain_study_refuses_singles_that_are_not_single_task_runs(trained, oracles, tmp_path):
  """Checked before any chain is scored: a stage I run given as a single used to fail after
  every chain was scored, writing nothing."""
  from uvim.tools import chain_study

  _, workdir = trained
  with pytest.raises(UserError, match=r"--singles .*: not a single-task stage II run \(model_name "
                                      "'proj.uvim.vit'"):
    chain_study.run(str(workdir), "validation[:4]", tmp_path / "out",
                    singles=[str(oracles["panoptic"])], sampling={})
  assert not (tmp_path / "out").exists()
