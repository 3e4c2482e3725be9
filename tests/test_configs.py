"""Config files, `:arg` parsing, and command-line overrides with their errors."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from configs import (
    colorization_stage1,
    colorization_stage2,
    common,
    depth_stage1,
    depth_stage2,
    multitask_stage2,
    panoptic_stage1,
    panoptic_stage2,
)
from evaluators import common as evaluators
from pp.builder import get_preprocess_fn
from uvim import checkpoint, cli
from uvim.models import TRAINING_ONLY

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [panoptic_stage1, panoptic_stage2, colorization_stage1, colorization_stage2,
           depth_stage1, depth_stage2]
VARIANTS = [None, "smoke", "cpu", "singlehost", "smoke,res=32", "res=256"]

# The paper's Listing 1 pp_train at RES = 512, verbatim.
LISTING1_PP_TRAIN = (
    'decode|coco_panoptic|concat(["semantics","instances"], "labels")|randu("fliplr")|'
    'det_fliplr(key="image")|det_fliplr(key="labels")|inception_box|'
    'crop_box(key="image")|crop_box(key="labels")|resize(512)|'
    'resize(512, key="labels", method="nearest")|value_range(-1, 1)|make_canonical|'
    'keep("image","labels")')


def test_parse_arg_types_and_bare_words():
  arg = common.parse_arg("smoke,res=128,lr=0.5,name=abc,flag=false",
                         smoke=False, res=512, lr=1.0, name="x", flag=True, other=None)
  assert arg.smoke is True and arg.res == 128 and arg.lr == 0.5
  assert arg.name == "abc" and arg.flag is False and arg.other is None
  assert common.parse_arg(None, smoke=False).smoke is False
  assert common.parse_arg("other=3", other=None).other == 3
  assert common.parse_arg("other=abc", other=None).other == "abc"


@pytest.mark.parametrize("arg, message", [
    ("smok", r"Unknown config arg 'smok'.*did you mean 'smoke'\?"),
    ("rez=3", r"Unknown config arg 'rez'.*did you mean 'res'\?"),
    ("res", r"'res' needs a value"),
    ("res=big", r"'res' expects int, got 'big'"),
    ("smoke=maybe", r"'smoke' is a boolean"),
])
def test_parse_arg_errors(arg, message):
  with pytest.raises(ValueError, match=message):
    common.parse_arg(arg, smoke=False, res=512)


@pytest.mark.parametrize("module", CONFIGS, ids=lambda m: m.__name__)
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_config_variant_builds_its_pp_strings(module, variant):
  config = module.get_config(variant)
  specs = [config.pp_train, config.pp_eval] + ([config.pp_predict] if "pp_predict" in config
                                                else [])
  specs += [config[name].pp for name, _ in config.evals if "pp" in config[name]]
  for spec in specs:
    get_preprocess_fn(spec)
  evaluators.register_all()
  for name, kind in config.evals:
    assert {"log_steps", "prefix", "split"} <= set(config[name])
    assert kind in evaluators.EVALUATORS, kind


@pytest.mark.parametrize("stage1, stage2, workdir", [
    (panoptic_stage1, panoptic_stage2, "runs/panoptic_stage1"),
    (colorization_stage1, colorization_stage2, "runs/colorization_stage1"),
    (depth_stage1, depth_stage2, "runs/depth_stage1"),
])
@pytest.mark.parametrize("variant", [None, "smoke", "cpu"])
def test_stage2_oracle_is_the_stage1_model(stage1, stage2, workdir, variant):
  """The stage II oracle section describes exactly the model its stage I config trains, and
  `:smoke` (`:cpu`) chains to the stage I `:smoke` (`:cpu`) workdir of the README."""
  oracle, trained = stage2.get_config(variant).oracle, stage1.get_config(variant).model
  ignore = set(TRAINING_ONLY)  # training-time only
  mine = {k: v for k, v in oracle.model.to_dict().items() if k not in ignore}
  theirs = {k: v for k, v in trained.to_dict().items() if k not in ignore and k in mine}
  assert {k: (tuple(v) if isinstance(v, list) else v) for k, v in mine.items()} == {
      k: (tuple(v) if isinstance(v, list) else v) for k, v in theirs.items()}
  assert set(trained.to_dict()) - ignore - set(mine) <= {"bottleneck_resize"}
  model = stage2.get_config(variant).model
  assert model.seq_len == trained.code_len and model.vocab_size == trained.dict_size + 1
  if variant == "smoke":
    assert oracle.model_init == workdir
  if variant == "cpu":
    assert oracle.model_init == f"{workdir}_cpu"


@pytest.mark.parametrize("variant", ["smoke", "cpu"])
def test_multitask_config_holds_the_toy_oracles_and_builds_its_pp(variant):
  config = multitask_stage2.get_config(variant)
  suffix = "_cpu" if variant == "cpu" else ""
  assert {k: o.model_init for k, o in config.oracles.items()} == {
      name: f"runs/{name}_stage1{suffix}" for name in ("colorization", "depth", "panoptic")}
  assert (config.model.seq_len, config.model.vocab_size) == (192, 769) and config.model.masked
  for spec in [config.pp_train, config.pp_eval, config.pp_predict,
               *(config[n].pp for n, _ in config.evals)]:
    get_preprocess_fn(spec)
  assert [kind for _, kind in config.evals] == ["validation", "psnr", "coco_panoptic",
                                                "nyu_depth", "images"]
  two = multitask_stage2.get_config(f"{variant},tasks=panoptic+depth")
  assert sorted(two.oracles) == ["depth", "panoptic"] and two.model.seq_len == 128
  assert "grayscale" not in two.pp_eval and "grayscale" in config.pp_eval
  with pytest.raises(ValueError, match="needs a dataset with both tasks' labels"):
    multitask_stage2.get_config(None)
  with pytest.raises(ValueError, match=r"tasks=panoptic\+colour: unknown task\(s\) \['colour'\]"):
    multitask_stage2.get_config(f"{variant},tasks=panoptic+colour")


@pytest.mark.parametrize("module", CONFIGS, ids=lambda m: m.__name__.split(".")[-1])
def test_cpu_is_the_smoke_recipe_trained_longer(module):
  """`:cpu` differs from `:smoke` only in length, evaluation frequency and the oracle's run."""
  smoke, cpu = (checkpoint.flatten_json(module.get_config(v).to_dict())
                for v in ("smoke", "cpu"))
  assert smoke.keys() == cpu.keys()
  differ = {k for k in smoke if smoke[k] != cpu[k]}
  assert "num_epochs" in differ and cpu["num_epochs"] > smoke["num_epochs"]
  assert differ - {"num_epochs", "oracle.model_init"} == {
      k for k in differ if k.endswith(".log_steps") and k != "val.log_steps"}


def test_stage1_has_the_papers_values():
  c = panoptic_stage1.get_config()
  assert c.pp_train.replace(" ", "") == LISTING1_PP_TRAIN.replace(" ", "")
  assert (c.task, c.dataset, c.train_split, c.val_split) == (
      "panoptic_segmentation", "coco/2017_panoptic", "train[4096:]", "train[:4096]")
  assert (c.batch_size, c.num_epochs, c.shuffle_buffer_size) == (1024, 1000, 25_000)
  m = c.model
  assert (m.width, m.oracle_depth, m.base_model_depth, m.mlp_dim, m.num_heads) == (
      768, 6, 12, 3072, 12)
  assert (m.code_len, m.dict_size, m.codeword_dim, m.dict_momentum) == (256, 4096, 768, 0.995)
  assert m.inputs.to_dict() == {"semantics": (134, 256), "instances": (100, 256)}
  assert m.outputs == m.inputs
  assert (c.optax_name, c.optax.beta2_cap, c.lr, c.wd, c.grad_clip_norm) == (
      "scale_by_adafactor", 0.95, 4e-4, 4e-5, 1.0)
  assert c.schedule.to_dict() == {"decay_type": "cosine", "warmup_steps": 4000}
  assert [n for n, _ in c.evals] == ["val", "panoptic_train", "panoptic_holdout", "panoptic_val"]
  assert c.val.split == c.val_split and c.val.log_steps == c.log_eval_steps == 250
  assert c.panoptic_val.split == "validation" and "decode" not in c.panoptic_val.pp


def test_stage2_has_the_papers_values_and_linked_vocab():
  c = panoptic_stage2.get_config()
  assert c.pp_modules == ["ops_general", "ops_image", "proj.uvim.pp_ops"]
  assert (c.model.num_layers, c.model.num_heads, c.model.mlp_dim, c.model.emb_dim) == (
      24, 16, 4096, 1024)
  assert c.model_init.to_dict() == {"encoder": "howto-i21k-L/16"}
  assert (c.batch_size, c.num_epochs, c.lr, c.wd) == (512, 200, 0.001, 0.000001)
  assert c.lr_mults[0] == ("pos_embedding_encoder.*", 0.1)
  assert c.model.vocab_size == 4097 and c.model.seq_len == 256
  c.oracle.model.dict_size = 1024  # vocab_size and seq_len follow the oracle's by reference.
  c.oracle.model.code_len = 64
  assert c.model.vocab_size == 1025 and c.model.seq_len == 64


def test_variants_change_what_they_say():
  assert panoptic_stage1.get_config("singlehost").batch_size == 128
  assert panoptic_stage2.get_config("singlehost").batch_size == 32
  smoke = panoptic_stage1.get_config("smoke")
  assert smoke.dataset == "toy_scenes/medium" and smoke.model.input_size == (64, 64)
  assert smoke.model.inputs["semantics"] == (common.TOY_NUM_CLASSES + 1, 64)
  assert panoptic_stage1.get_config("smoke,res=32").model.input_size == (32, 32)
  assert "resize(256)" in panoptic_stage1.get_config("res=256").pp_train


@pytest.mark.parametrize("stage1,stage2", [
    (panoptic_stage1, panoptic_stage2), (depth_stage1, depth_stage2),
    (colorization_stage1, colorization_stage2)])
def test_masked_variant_is_the_parallel_decoder_with_its_neighbour_view(stage1, stage2):
  plain, masked = stage2.get_config("smoke"), stage2.get_config("smoke,res=32,masked")
  assert (plain.model.masked, plain.model.neighbour_tokens) == (False, False)
  assert (masked.model.masked, masked.model.neighbour_tokens) == (True, True)
  # `masked` is stage II's alone: the oracle is that of the variant without it.
  assert masked.oracle.model.to_dict() == stage2.get_config("smoke,res=32").oracle.model.to_dict()
  assert masked.oracle.model.input_size == stage1.get_config("smoke,res=32").model.input_size
  assert common.stage1_arg(" smoke, masked=true,res=32") == "smoke,res=32"


def test_locked_config_rejects_typos_in_code():
  config = panoptic_stage1.get_config()
  config.lock()
  with pytest.raises(AttributeError, match="lrr"):
    config.lrr = 1.0


@pytest.mark.parametrize("path, problem", [
    ("lr", None),
    ("model.code_len", None),
    ("model.input_size.0", None),
    ("lrr", r"the config has no key 'lrr'; did you mean 'lr'\?"),
    ("model.code_lne", r"config.model has no key 'code_lne'; did you mean 'model.code_len'\?"),
    ("lr.x", r"config.lr is a float, it has no key 'x'"),
])
def test_find_unknown_key(path, problem):
  found = cli.find_unknown_key(panoptic_stage1.get_config(), path)
  if problem is None:
    assert found is None
  else:
    assert found is not None
    assert re.search(problem, found), found


def train(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "train.py", "--workdir", "/tmp/unused", *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_predict_sets_config_keys_only_on_a_config():
  """predict.py needs no --config (a run's config.json says everything), but a --config.<key>
  without one has nothing to set: one line, before any work."""
  result = subprocess.run([sys.executable, "predict.py", "--workdir=/tmp/unused",
                           "--input=x.png", "--output=/tmp/unused_out", "--config.lr=1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert "--config.lr is set, but there is no --config to set it in" in result.stderr
  assert "Traceback" not in result.stderr


def test_config_flag_applies_arg_and_overrides():
  from absl import flags
  from ml_collections import config_flags

  argv = ["train.py", f"--config={ROOT}/configs/panoptic_stage1.py:smoke",
          "--config.batch_size=2", "--config.lr=3e-4", "--config.model.input_size=(32, 32)",
          "--config.log_eval_steps=7"]
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", flag_values=values, lock_config=True,
                                           sys_argv=argv)
  values(argv)
  config = holder.value
  assert (config.dataset, config.batch_size, config.lr) == ("toy_scenes/medium", 2, 3e-4)
  assert config.model.input_size == (32, 32)
  assert config.val.log_steps == 7  # follows log_eval_steps by reference


@pytest.mark.parametrize("args, message", [
    (["--config", "configs/panoptic_stage1.py:smoke", "--config.model.code_lne=3"],
     "--config.model.code_lne=3: config.model has no key 'code_lne'; did you mean "
     "'model.code_len'?"),
    (["--config", "configs/panoptic_stage1.py:smok"],
     "Unknown config arg 'smok' in 'smok': did you mean 'smoke'?"),
    (["--config", "configs/panoptic_stage2.py", "--config.oracle.model.dict_sise=5"],
     "did you mean 'oracle.model.dict_size'?"),
    (["--config", "configs/panoptic_stage1.py", "--config.lr=fast"],
     "could not convert string to float: 'fast'"),
    (["--config", "configs/nope.py"], "No such file or directory"),
])
def test_train_cli_errors_are_one_clear_line(args, message):
  result = train(*args)
  assert result.returncode != 0
  assert message in result.stderr
  assert "Traceback" not in result.stderr
