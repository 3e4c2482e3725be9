"""The code as an object of study: the tokenizer API, Figure 10's masking, the round trip."""

import json

import flax.linen as nn
import jax
import numpy as np
import pytest
from test_stage2 import stage2_config
from test_trainer import tiny_config

from uvim import api, input_pipeline, stages, trainer
from uvim.errors import UserError
from uvim.tasks import colorization, depth, panoptic
from uvim.tools import mask_code, reconstruct


def first_batch(config, pp):
  mesh = trainer.make_mesh(config)
  batches, _ = input_pipeline.eval_data(config, "validation[:8]", pp, 8, mesh)
  return jax.device_get(next(iter(batches)))


def test_tokenizer_round_trip_is_the_trainers_eval_path(toy_data_dir, oracle_workdir):
  config = tiny_config(toy_data_dir)
  batch = first_batch(config, config.pp_eval)
  tok = api.load_tokenizer(str(oracle_workdir))
  code = tok.encode(batch["labels"], batch["image"])
  assert code.shape == (8, 16) and code.dtype.kind == "i"
  assert code.min() >= 0 and code.max() < tok.model.dict_size

  stage = stages.StageI(config)
  expected = jax.jit(stage.eval_fns()["predict"])(tok.variables, batch)
  decoded = tok.decode(code, batch["image"])
  for key in expected:
    np.testing.assert_array_equal(decoded[key], np.asarray(expected[key]))
  # Codes are the oracle's (stage II's targets), vectors are its dictionary's words.
  oracle_code = stages.StageII(stage2_config(toy_data_dir, oracle_workdir)).targets(
      tok.variables, batch)[0] - 1
  np.testing.assert_array_equal(code, oracle_code)
  words = np.asarray(tok.variables["state"]["dictionary"]) / np.asarray(
      tok.variables["state"]["counts"])[:, None]
  np.testing.assert_allclose(tok.embed(code)[0, 3],
                             words[code[0, 3]] / np.linalg.norm(words[code[0, 3]]), rtol=1e-6)
  # The same model from its exported big_vision npz; an npz of another model is refused.
  with pytest.raises(UserError, match=r"config.oracle.model differs from the config "
                                      r".*params\.npz was trained with"):
    api.load_tokenizer("configs/panoptic_stage1.py:smoke",
                       checkpoint=str(oracle_workdir / "params.npz"))
  for leaf_a, leaf_b in zip(jax.tree.leaves(tok.variables), jax.tree.leaves(
      api.load_tokenizer(str(oracle_workdir), str(oracle_workdir / "params.npz")).variables),
      strict=True):
    np.testing.assert_array_equal(leaf_a, leaf_b)


def test_masked_regions_grow_from_the_bottom_right():
  assert mask_code.region_sides(8, 6) == [0, 2, 3, 5, 6, 8]
  assert mask_code.region_sides(4, 10) == [0, 1, 2, 3, 4]  # distinct sizes only
  grid = mask_code.masked_region(4, 2).reshape(4, 4)
  assert grid[2:, 2:].all() and grid.sum() == 4
  assert not mask_code.masked_region(4, 0).any() and mask_code.masked_region(4, 4).all()


@pytest.fixture(scope="module")
def stage2_model(stage2_workdir, toy_data_dir, oracle_workdir):
  config = stage2_config(toy_data_dir, oracle_workdir)
  return config, api.Model(config, str(stage2_workdir))


def test_decoder_receives_exactly_the_declared_inputs(stage2_model):
  config, model = stage2_model
  stage, batch = model.stage, first_batch(config, config.pp_eval)
  mask = mask_code.masked_region(4, 3)  # 9 of 16 words
  seen = []

  def record_decoder_input(next_fun, args, kwargs, context):
    if context.method_name == "decode":
      seen.append(np.asarray(args[0]))
    return next_fun(*args, **kwargs)

  codewords = np.asarray(stage.oracle().codewords(model.variables["oracle"][stage.names[0]]))
  for mode in mask_code.MODES:
    seen.clear()
    predict = mask_code.masked_predict(stage, mode, mask, "stage2", 0.0, seed=0)
    with nn.intercept_methods(record_decoder_input):
      out = predict(model.variables, batch)
    vectors, code = seen[-1], np.asarray(out["code"])
    np.testing.assert_array_equal(vectors[:, ~mask], codewords[code[:, ~mask]])
    masked = vectors[:, mask]  # (B, 9, D)
    if mode == "zeros":
      assert not masked.any()
      continue
    # Each masked vector is a word of the dictionary: find which.
    ids = np.argmax((masked[..., None, :] == codewords).all(-1), -1)
    np.testing.assert_array_equal(codewords[ids], masked)
    if mode == "same":
      assert (ids == ids[:, :1]).all()  # one word for the whole region
    else:
      assert len(np.unique(ids)) > 9  # random words, not one
    assert not np.array_equal(ids, code[:, mask])


def test_nothing_masked_is_the_unmasked_prediction_in_every_mode(stage2_model):
  config, model = stage2_model
  stage, batch = model.stage, first_batch(config, config.pp_eval)
  unmasked = jax.device_get(jax.jit(stage.eval_fns()["predict"])(model.variables, batch))
  oracle_code = np.asarray(stage.targets(model.variables["oracle"], batch)[0]) - 1
  nothing = mask_code.masked_region(4, 0)
  for mode in mask_code.MODES:
    out = jax.device_get(jax.jit(mask_code.masked_predict(stage, mode, nothing, "stage2", 0.0,
                                                          seed=0))(model.variables, batch))
    for key in ("semantics", "instances", "code"):
      np.testing.assert_array_equal(out[key], unmasked[key])
    oracle = jax.jit(mask_code.masked_predict(stage, mode, nothing, "oracle", 0.0, seed=0))(
        model.variables, batch)
    np.testing.assert_array_equal(oracle["code"], oracle_code)


@pytest.mark.slow
def test_mask_code_reports_figure_10_and_its_0_percent_row_is_the_trainers_pq(
    stage2_model, stage2_workdir, tmp_path):
  config, _ = stage2_model
  written = mask_code.run(config, str(stage2_workdir), "validation[:8]", tmp_path, codes="stage2",
                          steps=3, sheet_count=2, temperature=None, seed=0)
  assert {p.name for p in written} == {"sheet_0.png", "sheet_1.png", "masking.md",
                                       "masking.csv", "masking.png"}
  rows = (tmp_path / "masking.csv").read_text().splitlines()
  assert len(rows) == 1 + 3 * 3  # header, modes x {0, 50%... , 100%}
  header = rows[0].split(",")
  first = dict(zip(header, rows[1].split(","), strict=True))
  final = {k: v for x in map(json.loads, (stage2_workdir / "metrics.jsonl").read_text()
                             .splitlines()) for k, v in x.items() if x["step"] == 4}
  assert float(first["PQ"]) == pytest.approx(final["coco_panoptic/PQ"], abs=1e-9)


def test_word_use_counts_like_a_loop():
  codes = np.array([[0, 0, 3], [3, 3, 7]])
  use = reconstruct.word_use(codes, dict_size=8)
  counts = [sum(int(c == w) for c in codes.ravel()) for w in range(8)]
  assert list(use["counts"]) == counts and use["words_used"] == 3
  p = np.array([2, 3, 1]) / 6
  assert use["perplexity"] == pytest.approx(np.exp(-np.sum(p * np.log(p))))


def test_error_maps_flag_what_is_wrong():
  truth = np.zeros((4, 4, 2), np.int32)
  truth[:, 2:] = (1, 1)  # two segments: class 0 left, class 1 (instance 1) right
  truth[3, 3] = (1, 2)   # and a one-pixel segment of class 1
  pred = {"semantics": truth[..., 0].copy(), "instances": truth[..., 1].copy()}
  assert not panoptic.error_map(pred, truth).any()
  pred["instances"][3, 3] = 1  # merged into its neighbour: its pixel is wrong
  pred["semantics"][0, 0] = 1  # wrong class
  assert set(zip(*np.nonzero(panoptic.error_map(pred, truth)), strict=True)) == {(3, 3), (0, 0)}

  depth_truth = np.array([[[1.0], [2.0]], [[0.0], [5.0]]])
  error = depth.error_map({"depth": np.array([[1.5, 2.0], [9.0, 1.0]])}, depth_truth)
  np.testing.assert_allclose(error, [[0.5 / depth.ERROR_SCALE, 0], [0, 1]])  # 0: no depth

  color = np.zeros((1, 2, 3))
  error = colorization.error_map({"color": np.array([[[1.0, 1, 1], [0, 0, 2]]])}, color)
  np.testing.assert_allclose(error, [[0.5, np.sqrt(4 / 3) / 2]])


def test_tools_check_their_flags_before_any_work(toy_data_dir, oracle_workdir,
                                                 stage2_workdir, tmp_path, monkeypatch):
  """Each mistake is one line naming the flag, before a model loads or a split is encoded:
  loading anything would fail these (`api.Tokenizer` / `api.Model` are replaced to say so)."""
  stage1 = tiny_config(toy_data_dir)
  stage2 = stage2_config(toy_data_dir, oracle_workdir)
  a_file = tmp_path / "taken"
  a_file.write_text("keep me")

  def reconstruct_run(source, output):
    return reconstruct.run(stage1, str(oracle_workdir), source, output, sheet_rows=0)

  def mask_run(source, output):
    return mask_code.run(stage2, str(stage2_workdir), source, output, codes="stage2",
                         steps=2, sheet_count=0, temperature=0.0, seed=0)

  for run in (reconstruct_run, mask_run):
    with monkeypatch.context() as m:
      m.setattr(api, "Tokenizer", None)
      m.setattr(api, "Model", None)
      with pytest.raises(UserError, match=rf"^--output {a_file} is a file"):
        run("validation[:4]", a_file)
      with pytest.raises(UserError, match=r"^--input='validaton\[:4\]': .*splits \['train', "
                                          r"'validation'\]"):
        run("validaton[:4]", tmp_path / "out")
      with pytest.raises(UserError, match=r"^--input='validation\[:0\]' has no examples"):
        run("validation[:0]", tmp_path / "out")
      with pytest.raises(UserError, match=r"^Unknown dataset 'toy_scene' \(--input\)"):
        run("toy_scene:validation", tmp_path / "out")
  assert a_file.read_text() == "keep me"
  # A stage I run given where a stage II is expected (and the reverse): one line.
  with pytest.raises(UserError, match=r"is a stage I 'proj.uvim.vit' run .*not the stage II"):
    api.Model(stage2, str(oracle_workdir))
  with pytest.raises(UserError, match=r"is a stage II 'proj.uvim.lm' run .*not the stage I"):
    api.load_tokenizer("configs/panoptic_stage1.py:smoke", checkpoint=str(stage2_workdir))
