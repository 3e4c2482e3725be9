"""What the config files share: the `:arg` parser and the model sizes."""

import ast
from typing import Any

import ml_collections as mlc

from uvim.errors import did_you_mean

# Stage I (`proj.uvim.vit`) and stage II (`proj.uvim.lm`) sizes, each with its code. 'base' and
# 'large' are the paper's; 'smoke' trains in minutes on a CPU.
STAGE_I_MODELS = {
    "base": dict(oracle_depth=6, base_model_depth=12, num_heads=12, mlp_dim=3072, width=768,
                 code_len=256, dict_size=4096, codeword_dim=768, with_encoder_ctx=True),
    # Oracle depth 0: the oracle's encoder is its label embedding alone, so each code word
    # describes its own patch (one word per 8x8 patch), which a small stage II learns to read
    # off the image in minutes (with one attention layer, words carry scene-wide facts and
    # stage II finds few objects). A code of the labels alone (no encoder context): what the
    # image shows needs no word, and stage II can learn to predict it.
    "smoke": dict(oracle_depth=0, base_model_depth=2, num_heads=4, mlp_dim=512, width=128,
                  code_len=64, dict_size=256, codeword_dim=32, with_encoder_ctx=False),
}
LM_MODELS = {
    "base": dict(num_layers=12, num_heads=12, mlp_dim=3072, emb_dim=768),
    "large": dict(num_layers=24, num_heads=16, mlp_dim=4096, emb_dim=1024),
    "smoke": dict(num_layers=2, num_heads=4, mlp_dim=512, emb_dim=128),
}

# The built-in `toy_scenes` dataset (uvim/datasets): its panoptic classes (stuff and things)
# and the most segments a scene can have.
TOY_NUM_CLASSES = 8
TOY_THING_CLASSES = 5  # classes 0..4 are things, as COCO's 80 things come first
TOY_MAX_SEGMENTS = 16


def panoptic_instances(ids: str, toy: bool, patch_size: int) -> dict:
  """The panoptic stage I settings of an instance-id rule (`uvim.tasks.panoptic.INSTANCE_IDS`;
  "" for the default: location on the toy scenes, where it measured better, raster, the
  paper's, elsewhere): `instance_ids`, `thing_classes` and the `instances` input. Raster ids
  need a slot per segment (COCO: 100, 98 at most in train); location ids one per offset in a
  window of R patches each way, and void: R = 3 on the toy scenes (things span at most 4
  patches), 7 on COCO (+-112 pixels at 16 px patches)."""
  ids = ids or ("location" if toy else "raster")
  if ids == "raster":
    slots = TOY_MAX_SEGMENTS if toy else 100
  elif ids == "location":
    slots = (2 * (3 if toy else 7) + 1) ** 2 + 1
  else:
    raise ValueError(f"Config arg 'ids' must be 'raster' or 'location', got {ids!r}")
  things = 0 if ids == "raster" else TOY_THING_CLASSES if toy else 80  # location ids only
  return {"instance_ids": ids, "thing_classes": things, "instances": (slots, patch_size**2)}


def parse_arg(arg: str | None, **spec: Any) -> mlc.ConfigDict:
  """Parses a config's `:arg` string, e.g. `smoke,res=128`, against `spec` (name=default).

  `k=v` sets k to v converted to the type of its default (a None default takes a Python literal
  or a string); a bare word sets a boolean to True. Unknown names are errors naming the closest.
  """
  values = dict(spec)
  for piece in (arg or "").split(","):
    name, has_value, text = (s.strip() for s in piece.partition("="))
    if not name:
      continue
    if name not in spec:
      raise ValueError(f"Unknown config arg {name!r} in {arg!r}: {did_you_mean(name, spec)}"
                       f"valid args: {sorted(spec)}")
    if not has_value:
      if not isinstance(spec[name], bool):
        raise ValueError(f"Config arg {name!r} needs a value ({name}=...), got a bare word")
      values[name] = True
    else:
      values[name] = _convert(name, text, spec[name])
  return mlc.ConfigDict(values)


def stage1_arg(arg: str | None) -> str:
  """A stage II config's `:arg` without what only stage II takes (`masked`): the arg of the
  stage I config whose model is its oracle."""
  pieces = (piece.strip() for piece in (arg or "").split(","))
  return ",".join(p for p in pieces if p and p.partition("=")[0].strip() != "masked")


def _convert(name: str, text: str, default: Any) -> Any:
  """`text` as the type of `default`."""
  if isinstance(default, bool):
    if text.lower() in ("1", "true", "yes", "on"):
      return True
    if text.lower() in ("0", "false", "no", "off"):
      return False
    raise ValueError(f"Config arg {name!r} is a boolean, got {text!r}")
  if default is None:
    try:
      return ast.literal_eval(text)
    except (ValueError, SyntaxError):
      return text
  try:
    return type(default)(text)
  except ValueError:
    raise ValueError(
        f"Config arg {name!r} expects {type(default).__name__}, got {text!r}") from None


def set_memory_options(config: mlc.ConfigDict) -> None:
  """The memory and speed switches every config has (README, "Scaling out"), at their defaults."""
  config.grad_accum_steps = 1  # split each batch into micro-batches to save memory
  config.compute_dtype = "float32"  # or "bfloat16": activations/matmuls (params stay fp32)
  config.remat = False  # recompute each block's activations in the backward pass
  config.scan_layers = False  # one nn.scan per block stack (faster compiles, less memory)
  config.attention = "einsum"  # or "fused": jax.nn.dot_product_attention (cuDNN on GPUs)


# Epochs of the toy variants: `:smoke` for the quick start (minutes), `:cpu` for ~30 minutes a
# stage on 2 CPU cores.
TOY_EPOCHS = {"smoke": 6, "cpu": 40}


def toy_eval_steps(cpu: bool) -> int:
  """How often the toy variants run their task evaluators (PQ, depth, colour metrics)."""
  return 1000 if cpu else 200


def apply_smoke(config: mlc.ConfigDict, cpu: bool = False) -> None:
  """`:smoke` / `:cpu` settings shared by every config: toy data, small batches, frequent logs."""
  config.dataset = "toy_scenes/medium"  # 8192 scenes, generated once in ~1 minute
  config.train_split = "train[256:]"
  config.val_split = "train[:256]"
  config.batch_size = 32
  config.num_epochs = TOY_EPOCHS["cpu" if cpu else "smoke"]
  config.shuffle_buffer_size = 1_000
  config.log_training_steps = 10
  config.log_eval_steps = 100
  config.checkpoint_steps = 200
  config.keep_checkpoint_steps = 1_000
  config.lr = 1e-3
  config.schedule.warmup_steps = 100
  add_prediction_images(config, "validation[:4]", toy_eval_steps(cpu))


def add_prediction_images(config: mlc.ConfigDict, split: str, log_steps: int) -> None:
  """Lists the `images` evaluator (evaluators/images.py): the predictions on `split` as a
  contact sheet in TensorBoard every `log_steps` and at the end. On in the toy variants; a
  large run adds it with this line (one predict batch per evaluation)."""
  if ("images", "images") not in config.evals:
    config.evals.append(("images", "images"))
  config.images = dict(split=split, pp=config.pp_eval, log_steps=log_steps,
                       prefix="images/")


def set_stage1_optimizer(config: mlc.ConfigDict, lr: float, wd: float) -> None:
  """The paper's stage I optimizer: big_vision's Adafactor, cosine schedule with 4k warmup
  steps, gradient clipping at 1; `lr` and `wd` per task."""
  config.optax_name = "scale_by_adafactor"
  config.optax = dict(beta2_cap=0.95)
  config.lr = lr
  config.wd = wd
  config.schedule = dict(decay_type="cosine", warmup_steps=4_000)
  config.grad_clip_norm = 1.0


def add_validation(config: mlc.ConfigDict) -> None:
  """`config.val`: the validation loss on `val_split` through `pp_eval` every `log_eval_steps`
  (both followed when overridden); the config lists it in `evals` as ("val", "validation")."""
  config.val = mlc.ConfigDict(dict(pp=config.pp_eval, prefix="val/"))
  config.val.split = config.get_ref("val_split")
  config.val.log_steps = config.get_ref("log_eval_steps")


def stage1_model(size: str, res: int, patch_size: int, inputs: dict) -> mlc.ConfigDict:
  """The stage I (`proj.uvim.vit`) model section of the paper, at `size` ('base' or 'smoke')."""
  model = mlc.ConfigDict(STAGE_I_MODELS[size])  # its code too
  model.input_size = (res, res)
  model.patch_size = (patch_size, patch_size)
  model.dict_momentum = 0.995
  model.min_count = 0.1  # a word whose discounted count falls below is replaced by a split
  set_quantizer(model)
  model.with_decoder_ctx = True
  model.code_dropout = "random"
  model.bottleneck_resize = True
  model.inputs = inputs
  model.outputs = inputs
  return model


def set_quantizer(model: mlc.ConfigDict) -> None:
  """Stage I's quantizer: the paper's VQ dictionary, or "fsq" (finite scalar quantization,
  no dictionary) whose `fsq_levels` multiply to `dict_size`; the FSQ paper's levels per size
  are `uvim.models.fsq.RECOMMENDED_LEVELS`, e.g. --config.model.fsq_levels="(8, 5, 5, 5)"
  --config.model.dict_size=1000."""
  model.quantizer = "vq"
  model.fsq_levels = ()


def stage2_from_stage1(stage1: mlc.ConfigDict, arg: mlc.ConfigDict, oracle_init: str,
                       predict_pp: str) -> mlc.ConfigDict:
  """A stage II config whose oracle is the model of the stage I config `stage1` (same data and
  pp), with the paper's stage II model, optimizer and schedule (as in Listing 2). `arg` holds
  the parsed `smoke`, `cpu`, `singlehost` and `masked` switches."""
  toy = arg.smoke or arg.cpu
  config = mlc.ConfigDict(stage1.to_dict())
  # to_dict drops the placeholders' types: `--config.total_steps=0` must still parse.
  for key, kind in (("total_steps", int), ("data_dir", str)):
    config[key] = mlc.config_dict.placeholder(kind)
    config[key] = stage1[key]
  task, oracle_model = config.task, stage1.model
  del config["task"], config["grad_clip_norm"]  # stage II trains without clipping
  config.pp_predict = predict_pp
  config.batch_size = 512
  config.num_epochs = 50
  config.optax_name = "scale_by_adafactor"
  config.optax = dict(beta2_cap=0.95)
  config.lr = 0.001
  config.wd = 0.000001
  config.lr_mults = [("pos_embedding_encoder.*", 0.1), ("EmbedPatches.*", 0.1),
                     ("encoder.*", 0.1), ("decoder.*", 1.0)]
  config.schedule = dict(decay_type="cosine", warmup_steps=4_000)

  config.oracle = mlc.ConfigDict()
  config.oracle.task = task
  config.oracle.model_init = oracle_init
  config.oracle.model_name = "proj.uvim.vit"
  config.oracle.model = oracle_model

  config.model_name = "proj.uvim.lm"
  config.model_init = {"encoder": "howto-i21k-L/16"}
  config.model = mlc.ConfigDict(LM_MODELS["smoke" if toy else "large"])
  config.model.patches = dict(size=tuple(oracle_model.patch_size))
  # References: `--config.oracle.model.code_len=16` resizes the code stage II writes too.
  config.model.vocab_size = config.oracle.model.get_ref("dict_size") + 1
  config.model.posemb_type = "learn"
  set_decoder_options(config.model, arg.masked)
  config.model.input_size = tuple(oracle_model.input_size)
  config.model.seq_len = config.oracle.model.get_ref("code_len")
  if arg.singlehost:
    config.batch_size = 32  # as Listing 2's singlehost
  if toy:
    apply_toy_stage2(config, cpu=arg.cpu)
  return config


def set_decoder_options(model: mlc.ConfigDict, masked: bool = False) -> None:
  """Stage II's decoder beyond the paper's, off by default (big_vision's parameters); `masked`
  (the configs' `:masked` arg) for the parallel decoder with its neighbour view."""
  # > 0 trains for classifier-free guidance (predict.py --guidance); 0 keeps big_vision's
  # parameters (its released models have no "no image" input).
  model.cond_dropout = 0.0
  # True: a bidirectional decoder trained to fill in masked tokens, decoded in a few parallel
  # steps (predict.py --scheme maskgit|roar --steps N); False: the paper's causal decoder.
  model.masked = masked
  model.min_mask_ratio = 0.1  # the fewest tokens a masked training example hides
  # Masked: each position also sees its grid neighbours' tokens (docs/decoding.md), which made
  # the toy masked models use the words decided so far (without it they ignored them).
  model.neighbour_tokens = masked


def apply_toy_stage2(config: mlc.ConfigDict, cpu: bool) -> None:
  """Stage II on the toy scenes: `apply_smoke`, and an image encoder trained from scratch."""
  apply_smoke(config, cpu)
  # No ViT checkpoint offline: the encoder starts from scratch unless one is given, so it
  # trains at the full rate; fixed sin-cos positions shared by image and code let the decoder's
  # cross-attention find each word's patch from the first step (learned positions take longer
  # than a toy run: PQ things 0.1 instead of 23 after 1000 steps).
  config.model_init = mlc.ConfigDict({"encoder": mlc.config_dict.placeholder(str)})
  config.lr_mults = [(".*", 1.0)]
  config.model.posemb_type = "sincos2d"


def oracle_init(arg: mlc.ConfigDict, toy_run: str, released: str) -> str:
  """Stage II's default oracle: the stage I run of the same toy variant (`toy_run`, with
  `_cpu` for `:cpu`), else the `released` big_vision file."""
  if arg.cpu:
    return f"{toy_run}_cpu"
  return toy_run if arg.smoke else released
