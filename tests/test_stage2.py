"""Stage II on toy scenes: oracle codes as targets, the predict path, encoder init, predict.py."""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image
from test_trainer import TINY, losses, tiny_config

from configs import panoptic_stage2
from uvim import api, checkpoint, decoding, input_pipeline, sharding, stages, trainer
from uvim.errors import UserError
from uvim.panoptic_format import rgb_to_id
from uvim.tools import decode_study

ROOT = Path(__file__).resolve().parents[1]
LM_TINY = dict(num_layers=1, num_heads=2, mlp_dim=64, emb_dim=32)


def stage2_config(data_dir, oracle_workdir, **overrides):
  c = panoptic_stage2.get_config("smoke")
  c.dataset, c.data_dir = "toy_scenes/tiny", str(data_dir)
  c.train_split, c.val_split = "train", "validation"
  c.batch_size, c.total_steps = 8, 4
  c.log_training_steps, c.log_eval_steps, c.checkpoint_steps = 1, 4, 4
  c.oracle.model.update({k: v for k, v in TINY.items()})
  c.oracle.model_init = str(oracle_workdir)
  c.model.update(LM_TINY)
  c.evals = [("val", "validation"), ("panoptic_val", "coco_panoptic")]
  c.panoptic_val.split = "validation[:8]"
  c.update(overrides)
  return c


def final_metrics(workdir) -> dict:
  """The metrics a run logged at its last step."""
  lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {k: v for x in lines if x["step"] == lines[-1]["step"] for k, v in x.items()}


@pytest.mark.slow
def test_stage2_trains_and_evaluates_the_end_task(stage2_workdir):
  lines = [json.loads(x) for x in (stage2_workdir / "metrics.jsonl").read_text().splitlines()]
  # The logits head starts at zero: the first loss is that of a uniform vocabulary of 17.
  assert losses(stage2_workdir)[1] == pytest.approx(np.log(17), rel=1e-5)
  final = {k: v for x in lines if x["step"] == 4 for k, v in x.items()}
  assert {"val/loss", "coco_panoptic/PQ", "oracle_codebook_usage", "token_accuracy"} <= set(final)
  assert np.isfinite(final["val/loss"]) and 0 <= final["coco_panoptic/PQ"] <= 100


def forced_code_params(params: dict, code_L: np.ndarray) -> dict:
  """Stage II parameters that emit `code` + 1 whatever the image: only the position
  embedding reaches the logits (token embeddings and every residual branch are zero), and
  position t's one-hot embedding votes for token code[t] + 1."""
  params = jax.tree.map(np.zeros_like, jax.device_get(params))
  decoder = params["decoder"]
  for name, block in decoder.items():
    if name.startswith("EncDecBlock"):
      for part in ("LayerNorm1", "LayerNorm2", "LayerNorm3"):
        block[part]["scale"] = np.ones_like(block[part]["scale"])
  decoder["LayerNorm"]["scale"] = np.ones_like(decoder["LayerNorm"]["scale"])
  seq_len, width = params["pos_embedding_decoder"].shape[1:]
  params["pos_embedding_decoder"][0] = 5 * np.eye(seq_len, width)
  kernel = decoder["LogitsDense"]["kernel"]
  kernel[np.arange(seq_len), code_L + 1] = 10.0
  return params


@pytest.mark.slow
def test_predict_path_decodes_codes_like_the_oracle_reconstructs(toy_data_dir, oracle_workdir):
  """Sampling a code equal to the oracle's code of an image and decoding it with the frozen
  oracle gives exactly the stage I reconstruction of that image."""
  config = stage2_config(toy_data_dir, oracle_workdir)
  config.model.posemb_type = "learn"  # forced_code_params writes the learned embedding
  stage = stages.StageII(config)
  oracle = stages.StageI(ml_collections.ConfigDict(dict(
      model_name=config.oracle.model_name, model=config.oracle.model, task=config.oracle.task,
      compute_dtype="float32", remat=False, scan_layers=False, attention="einsum")))
  frozen = stage.frozen_variables()
  mesh = sharding.make_mesh([("data", -1)])
  batches, _ = input_pipeline.eval_data(config, "validation", config.pp_eval, 8, mesh)
  batch = next(iter(batches))
  one = jax.tree.map(lambda x: np.asarray(x)[:1], batch)
  targets, _ = stage.targets(frozen, one)
  code = np.asarray(targets[0]) - 1
  shapes = jax.eval_shape(stage.init_variables, jax.random.key(0), one)
  init = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes["params"])
  variables = stage.variables(forced_code_params(init, code), {}, frozen)
  got = jax.jit(stage.predict_samples, static_argnames="num_samples")(variables, one,
                                                                      num_samples=1)
  np.testing.assert_array_equal(got["code"][0, 0], code)
  want = oracle.eval_fns()["predict"](frozen[stage.names[0]], one)
  for key in ("semantics", "instances"):
    np.testing.assert_array_equal(got[key][:, 0], want[key])
  segments = want["semantics"] * 1000 + want["instances"]
  assert len(np.unique(segments)) > 1  # a non-trivial reconstruction


def test_image_rngs_depend_on_the_image_only():
  images = jax.random.uniform(jax.random.key(0), (3, 8, 8, 3), minval=-1, maxval=1)
  keys = jax.random.key_data(decoding.image_rngs(images))
  alone = jax.random.key_data(decoding.image_rngs(images[2:3]))
  np.testing.assert_array_equal(keys[2], alone[0])
  assert len({tuple(np.ravel(k)) for k in np.asarray(keys)}) == 3
  other_seed = jax.random.key_data(decoding.image_rngs(images, seed=1))
  assert not np.array_equal(other_seed, keys)


@pytest.mark.slow
def test_encoder_starts_from_a_vit_checkpoint(toy_data_dir, oracle_workdir, tmp_path):
  config = stage2_config(toy_data_dir, oracle_workdir, total_steps=0, evals=[])
  config.model.posemb_type = "learn"  # a ViT checkpoint brings learned position embeddings
  stage = stages.StageII(config)
  image = jnp.zeros((1, *config.model.input_size, 3))
  vit = stage.init_variables(jax.random.key(42), {"image": image})["params"]
  checkpoint.save_npz(tmp_path / "vit.npz", {
      "Transformer": vit["encoder"], "embedding": vit["EmbedPatches"],
      "pos_embedding": vit["pos_embedding_encoder"], "head": {"kernel": np.zeros((32, 5))}})
  config.model_init.encoder = str(tmp_path / "vit.npz")
  state = trainer.train_and_evaluate(config, tmp_path / "run")
  for part in ("encoder", "EmbedPatches", "pos_embedding_encoder"):
    for a, b in zip(jax.tree.leaves(state.params[part]), jax.tree.leaves(vit[part]), strict=True):
      np.testing.assert_array_equal(a, b)
  fresh = stage.init_variables(jax.random.key(0), {"image": image})["params"]
  assert not np.array_equal(state.params["EmbedPatches"]["kernel"], fresh["EmbedPatches"]["kernel"])


def test_a_vit_encoder_needs_learned_position_embeddings(toy_data_dir, oracle_workdir):
  config = stage2_config(toy_data_dir, oracle_workdir, total_steps=0, evals=[])
  config.model.posemb_type = "sincos2d"
  config.model_init.encoder = "vit.npz"
  stage = stages.StageII(config)
  with pytest.raises(UserError, match="posemb_type='sincos2d' has none: set it to 'learn'"):
    stage.load_init(config.model_init, {}, {})


def test_a_checkpoint_and_the_config_must_agree_on_position_embeddings(tmp_path):
  config = panoptic_stage2.get_config("smoke")
  config.model.update(LM_TINY)
  stage = stages.StageII(config)
  image = jnp.zeros((1, *config.model.input_size, 3))
  params = stage.init_variables(jax.random.key(0), {"image": image})["params"]
  checkpoint.save_npz(tmp_path / "sincos.npz", {"params": params})
  config.model.posemb_type = "learn"
  with pytest.raises(UserError, match=r"no learned position embeddings; set config\.model\."
                                      "posemb_type to 'sincos2d'"):
    stages.StageII(config).load_init(str(tmp_path / "sincos.npz"), {}, {})


def decoy_oracle(oracle_workdir, directory: Path) -> Path:
  """Another oracle of the same settings (its weights perturbed), exported as a run exports
  one: `params.npz` beside its `config.json`."""
  variables = checkpoint.load_variables(str(oracle_workdir))
  rng = np.random.default_rng(0)
  variables["params"] = jax.tree.map(
      lambda x: np.asarray(x) + rng.normal(0, 0.5, np.shape(x)).astype(np.asarray(x).dtype),
      variables["params"])
  directory.mkdir()
  checkpoint.save_npz(directory / "params.npz", variables)
  shutil.copy(oracle_workdir / "config.json", directory / "config.json")
  return directory / "params.npz"


@pytest.mark.slow
def test_predict_cli_writes_each_input_in_its_own_folder_with_the_recorded_oracle(
    toy_data_dir, oracle_workdir, stage2_workdir, tmp_path):
  """predict.py on the README's command: files at each input's size, one folder per input
  (dotted names and names like other inputs' outputs lose nothing), decoded with the oracle
  the run recorded even where --config's file names another."""
  images = tmp_path / "images"
  images.mkdir()
  rng = np.random.default_rng(0)
  sizes = {"wide.jpg": (90, 130), "gray.png": (70, 40), "rgba.png": (33, 33),
           "scan.001.png": (20, 30), "scan.002.png": (21, 30), "scan.003.png": (22, 30),
           "same.jpg": (23, 30), "same.png": (24, 30), "a.png": (25, 30),
           "a_overlay.png": (26, 30), "contact_sheet.png": (27, 30)}
  for name, size in sizes.items():
    channels = {"gray.png": (), "rgba.png": (4,)}.get(name, (3,))
    Image.fromarray(rng.integers(0, 255, (*size, *channels), np.uint8)).save(images / name)
  (images / "broken.jpg").write_bytes(b"not an image")
  (images / "notes.txt").write_text("ignored")
  # --config's file names another oracle (same settings, other weights): the run's holds.
  decoy = decoy_oracle(oracle_workdir, tmp_path / "decoy")
  (tmp_path / "decoy_config.py").write_text(
      "from configs import panoptic_stage2\n\n\ndef get_config(arg=None):\n"
      "  c = panoptic_stage2.get_config(arg)\n"
      f"  c.oracle.model_init = {str(decoy)!r}\n  return c\n")
  common = [sys.executable, "predict.py", "--config", f"{tmp_path / 'decoy_config.py'}:smoke",
            f"--workdir={stage2_workdir}"]
  out = tmp_path / "out"
  result = subprocess.run([*common, f"--input={images}", f"--output={out}"], cwd=ROOT,
                          capture_output=True, text=True)
  assert result.returncode == 1, result.stderr[-2000:]
  assert "broken.jpg" in result.stderr and "1 input(s) failed" in result.stderr
  assert "oracle.model_init" in result.stderr  # the ignored setting is named
  assert sorted(p.name for p in (out / "predictions").iterdir()) == sorted(sizes)
  task = "panoptic_segmentation"
  for name, size in sizes.items():
    folder = out / "predictions" / name
    assert sorted(p.name for p in folder.iterdir()) == [
        f"{task}.json", f"{task}.png", f"{task}_overlay.png"]
    ids = rgb_to_id(np.asarray(Image.open(folder / f"{task}.png")))
    assert ids.shape == size
    info = json.loads((folder / f"{task}.json").read_text())["segments_info"]
    assert {s["id"] for s in info} == set(np.unique(ids)) - {0}
    assert all(s["area"] == np.sum(ids == s["id"]) for s in info)
    assert np.asarray(Image.open(folder / f"{task}_overlay.png")).shape == (*size, 3)
  assert np.asarray(Image.open(out / "contact_sheet.png")).shape[0] > 3 * 160  # 8 rows

  # The files are the recorded model's predictions, not the decoy oracle's.
  image = api.read_image(images / "wide.jpg")
  written = rgb_to_id(np.asarray(Image.open(out / "predictions/wide.jpg" / f"{task}.png")))
  for oracle, same in ((None, True), (str(decoy), False)):
    model = api.load(str(stage2_workdir), oracle=oracle)
    outputs = model.predict([image])
    model.task.save({k: v[0, 0] for k, v in outputs.items()}, image, tmp_path / "ref" / "x",
                    model.categories(task))
    expected = rgb_to_id(np.asarray(Image.open(tmp_path / "ref/x.png")))
    assert np.array_equal(written, expected) == same

  # An --output that holds the inputs would overwrite them (same.png) and feed the outputs to
  # the next run: refused before the model loads, nothing written.
  before = sorted(images.iterdir())
  result = subprocess.run([*common, f"--input={images}", f"--output={images}"], cwd=ROOT,
                          capture_output=True, text=True)
  assert result.returncode == 1 and sorted(images.iterdir()) == before
  assert f"FATAL --output {images} holds the --input images" in result.stderr

  # The README's form: the workdir alone (its config.json says everything, data_dir too).
  out = tmp_path / "tfds"
  result = subprocess.run([sys.executable, "predict.py", f"--workdir={stage2_workdir}",
                           "--input=toy_scenes/tiny:validation[:3]", f"--output={out}",
                           "--num_samples=2", "--temperature=1"],
                          cwd=ROOT, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-2000:]
  assert sorted(str(p.relative_to(out)) for p in out.glob("predictions/*/*.json")) == [
      f"predictions/{i:05d}/{task}{s}.json" for i in range(3) for s in ("", "_s1")]
  sheet = np.asarray(Image.open(out / "contact_sheet.png"))
  assert sheet.shape[0] > 3 * 160  # three rows of 160-px cells


@pytest.mark.slow
def test_gradient_accumulation_matches_the_full_batch(toy_data_dir, oracle_workdir, tmp_path):
  """Stage II has no state or dropout: two micro-batches give the full batch's update."""
  states = {}
  for accum in (1, 2):
    config = stage2_config(toy_data_dir, oracle_workdir, batch_size=16, total_steps=2, evals=[],
                           grad_accum_steps=accum)
    states[accum] = trainer.train_and_evaluate(config, tmp_path / str(accum))
  np.testing.assert_allclose(list(losses(tmp_path / "1").values()),
                             list(losses(tmp_path / "2").values()), rtol=1e-5)
  grad_norms = [[json.loads(x)["l2_grads"] for x in (tmp_path / str(a) / "metrics.jsonl")
                 .read_text().splitlines() if "l2_grads" in x] for a in (1, 2)]
  np.testing.assert_allclose(*grad_norms, rtol=1e-5)  # averaged, not summed
  for (k, a), b in zip(checkpoint.flatten(states[1].params).items(),
                       checkpoint.flatten(states[2].params).values(), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("key, value", [("code_len", 4), ("bottleneck_resize", False),
                                        ("with_decoder_ctx", False),
                                        ("instance_ids", "raster")])
def test_an_oracle_setting_its_parameters_cannot_show_is_compared_with_its_run(
    toy_data_dir, oracle_workdir, tmp_path, key, value):
  """Parameter shapes do not depend on these settings: the oracle's recorded config (its
  workdir's config.json, or the one beside its exported params.npz) is what tells."""
  config = stage2_config(toy_data_dir, oracle_workdir)
  config.oracle.model[key] = value
  recorded = json.loads((oracle_workdir / "config.json").read_text())["model"][key]
  for source in (oracle_workdir, oracle_workdir / "params.npz"):
    config.oracle.model_init = str(source)
    with pytest.raises(UserError, match=rf"config.oracle.model differs from the config .* "
                       rf"trained with \({oracle_workdir}/config.json\): {key} "
                       rf"{json.dumps(value)} here, {json.dumps(recorded)} there"):
      stages.StageII(config).frozen_variables()
  config.oracle.model[key] = recorded
  config.oracle.model.code_dropout = "none"  # training-only settings may differ
  stages.StageII(config).frozen_variables()
  config.oracle.task = "depth"
  with pytest.raises(UserError, match=r"config\.oracle\.task is 'depth'"):
    stages.StageII(config).frozen_variables()


@pytest.mark.slow
def test_stage2_model_init_takes_a_path_as_documented(toy_data_dir, stage2_workdir, tmp_path):
  exported = checkpoint.load_npz(stage2_workdir / "params.npz")
  config = stage2_config(toy_data_dir, stage2_workdir.parent / "unused", total_steps=0, evals=[])
  config.oracle.model_init = api.load_config(str(stage2_workdir)).oracle.model_init
  with config.ignore_type():
    config.model_init = str(stage2_workdir / "params.npz")
  state = trainer.train_and_evaluate(config, tmp_path)
  for (name, a), b in zip(checkpoint.flatten(exported["params"]).items(),
                          checkpoint.flatten(state.params).values(), strict=True):
    np.testing.assert_array_equal(a, b, err_msg=name)
  # A model with a guidance input cannot take it: the error names the setting to change.
  config.model.cond_dropout = 0.1
  with pytest.raises(UserError, match=r"trained without condition dropout.*cond_dropout to 0"):
    trainer.train_and_evaluate(config, tmp_path / "guided")


def test_masked_loss_counts_only_the_hidden_positions(toy_data_dir):
  config = stage2_config(toy_data_dir, "unused")
  config.model.masked = True
  stage = stages.StageII(config)
  images = jax.random.normal(jax.random.key(0), (4, *stage.model.input_size, 3))
  targets = jax.random.randint(jax.random.key(1), (4, stage.model.seq_len), 1,
                               stage.model.vocab_size)
  params = stage.init_variables(jax.random.key(2), {"image": images})["params"]
  params["decoder"]["LogitsDense"]["kernel"] = jax.random.normal(
      jax.random.key(3), params["decoder"]["LogitsDense"]["kernel"].shape)
  hidden = stage._training_mask(jax.random.key(4), 4)
  xent, accuracy = stage._token_losses(params, images, targets, hidden)
  xent, accuracy = stages._mean(xent, hidden), stages._mean(accuracy, hidden, axis=None)
  logits = np.asarray(stage.model.apply({"params": params}, images,
                                        jnp.where(hidden, 0, targets)))
  want, everywhere, correct = [], [], []
  for b in range(4):  # brute force over positions
    per_position = [np.logaddexp.reduce(logits[b, i]) - logits[b, i, targets[b, i]]
                    for i in range(stage.model.seq_len)]
    want.append(np.mean([x for x, h in zip(per_position, hidden[b], strict=True) if h]))
    everywhere.append(np.mean(per_position))
    correct += [logits[b, i].argmax() == targets[b, i] for i in np.flatnonzero(hidden[b])]
  np.testing.assert_allclose(xent, want, rtol=1e-5)
  assert np.abs(np.array(want) - np.array(everywhere)).max() > 1e-2  # the test can tell
  assert accuracy == pytest.approx(np.mean(correct))
  assert 0 < np.asarray(hidden).sum() < hidden.size


@pytest.mark.slow
def test_a_masked_stage2_trains_evaluates_and_predicts_in_parallel(toy_data_dir, oracle_workdir,
                                                                  stage2_workdir,
                                                                  masked_stage2_workdir, tmp_path):
  workdir = masked_stage2_workdir
  final = final_metrics(workdir)
  assert {"val/loss", "coco_panoptic/PQ", "token_accuracy"} <= set(final)

  # The decoding study scores each setting with the run's own evaluator: its AR row and its
  # MaskGIT row at the default 8 steps equal what the trainer logged for the two runs.
  rows = decode_study.run([str(stage2_workdir), str(workdir)], "validation[:8]", tmp_path / "s",
                          schemes=["maskgit"], steps=[1, 8], guidance=[1.0, 2.0],
                          choice_temperature=4.5, speed_batch=1)
  table = list(csv.DictReader((tmp_path / "s" / "decoding.csv").read_text().splitlines()))
  assert [(r["run"], r["scheme"], r["steps"]) for r in table] == [
      (stage2_workdir.name, "ar", "16"), (workdir.name, "maskgit", "1"),
      (workdir.name, "maskgit", "8")]
  assert float(table[0]["PQ"]) == pytest.approx(
      final_metrics(stage2_workdir)["coco_panoptic/PQ"], abs=1e-9)
  assert float(table[2]["PQ"]) == pytest.approx(final["coco_panoptic/PQ"], abs=1e-9)
  assert all(float(r["images_per_s"]) > 0 for r in table)
  assert {p.name for p in rows} == {"decoding.csv", "decoding.md", "decoding.png"}

  model = api.load(str(workdir), oracle=str(oracle_workdir))
  batch = {"image": np.zeros((2, *model.stage.model.input_size, 3), np.float32)}
  batch["image"][1] = 0.5
  for scheme, steps in (("maskgit", 16), ("roar", 4)):
    out = model.predict_batch(batch, scheme=scheme, steps=steps)
    assert out["code"].shape == (2, 1, model.stage.model.seq_len)
  with pytest.raises(UserError, match="masked \\(use maskgit or roar\\)"):
    model.predict_batch(batch, scheme="ar")
  with pytest.raises(UserError, match="steps 17: must be between 1 and the code length 16"):
    model.predict_batch(batch, steps=17)
  with pytest.raises(UserError, match="unknown sampling option"):
    model.predict_batch(batch, step=4)
  # The checkpoint records a masked model: a config that says causal cannot run its weights.
  with pytest.raises(UserError, match=r"config.model differs .*masked false here, true there"):
    api.Model(stage2_config(toy_data_dir, oracle_workdir), str(workdir))


def test_a_resume_that_would_change_the_data_stream_is_refused(toy_data_dir, oracle_workdir,
                                                               tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(oracle_workdir, workdir)
  recorded = (workdir / "config.json").read_text()
  for key, value in (("batch_size", 16), ("seed", 1), ("train_split", "train[:32]")):
    config = tiny_config(toy_data_dir, total_steps=4, evals=[], **{key: value})
    with pytest.raises(UserError, match=rf"another data stream \({key} "):
      trainer.train_and_evaluate(config, workdir)
    assert (workdir / "config.json").read_text() == recorded
  # A change that keeps the stream (a longer run, another lr) resumes; the config it replaces
  # is kept.
  trainer.train_and_evaluate(tiny_config(toy_data_dir, total_steps=5, evals=[], lr=1e-4),
                             workdir)
  assert (workdir / "config.step_4.json").read_text() == recorded
  assert json.loads((workdir / "config.json").read_text())["lr"] == 1e-4
