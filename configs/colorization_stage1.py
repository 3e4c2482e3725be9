r"""UViM stage I (restricted oracle) for ImageNet colorization.

  python train.py --config configs/colorization_stage1.py --workdir runs/colorization_stage1

The oracle sees the colours and the grayscale image (the toy variants: the colours alone); the
code carries what grayscale cannot. Variants: smoke (tiny model on the built-in `toy_scenes`),
cpu (smoke for 40 epochs), singlehost (batch 128, 20 epochs), res=N (default 512; 64 with
smoke).
"""

import ml_collections as mlc

from configs import common


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  """The stage I colorization config."""
  arg = common.parse_arg(arg, smoke=False, cpu=False, singlehost=False, res=0)
  toy = arg.smoke or arg.cpu  # the built-in toy scenes
  res = arg.res or (64 if toy else 512)
  patch_size = 8 if toy else 16

  config = mlc.ConfigDict()
  config.seed = 0
  config.task = "colorization"
  config.pp_modules = ["ops_general", "ops_image", "proj.uvim.pp_ops"]
  config.dataset = "imagenet2012"
  config.data_dir = mlc.config_dict.placeholder(str)
  config.mesh = (("data", -1),)
  config.train_split = "train[4096:]"
  config.val_split = "train[:4096]"
  config.batch_size = 1024
  common.set_memory_options(config)  # accumulation, dtype, remat, scan, attention
  config.num_epochs = 100
  config.total_steps = mlc.config_dict.placeholder(int)
  config.pp_train = (
      f'decode_jpeg_and_inception_crop({res})|flip_lr|'
      'copy(inkey="image", outkey="labels")|'
      'rgb_to_grayscale_to_rgb(inkey="image", outkey="image")|'
      'value_range(-1, 1, key="image")|value_range(-1, 1, key="labels")|'
      'keep("image", "labels")')
  config.pp_eval = (
      f'decode|resize({res})|'
      'copy(inkey="image", outkey="labels")|'
      'rgb_to_grayscale_to_rgb(inkey="image", outkey="image")|'
      'value_range(-1, 1, key="image")|value_range(-1, 1, key="labels")|'
      'keep("image", "labels")')
  config.shuffle_buffer_size = 25_000
  config.log_training_steps = 50
  config.log_eval_steps = 250
  config.checkpoint_steps = 1000
  config.keep_checkpoint_steps = 20_000

  config.model_name = "proj.uvim.vit"
  config.model_init = mlc.config_dict.placeholder(str)  # a *_stageI_params.npz or a workdir
  config.model = common.stage1_model("smoke" if toy else "base", res, patch_size,
                                     {"color": (3, patch_size**2)})

  common.set_stage1_optimizer(config, lr=4e-4, wd=4e-5)

  config.evals = [
      ("val", "validation"),
      ("colorization_val", "psnr"),
      ("colorization_val_fid", "coltran_fid"),
  ]
  common.add_validation(config)
  config.colorization_val = mlc.ConfigDict(dict(
      pp=config.pp_eval.replace("decode|", ""), split="validation", log_steps=2500,
      prefix="colorization/"))
  config.colorization_val_fid = mlc.ConfigDict(dict(
      split="validation[:5000]", ref_split="validation[10000:15000]",
      pp=config.pp_eval.replace("decode|", ""), inception_weights="inception_fid.npz",
      log_steps=100_000, prefix="colorization/"))

  if arg.singlehost:
    config.batch_size = 128
    config.num_epochs = 20
  if toy:
    common.apply_smoke(config, cpu=arg.cpu)
    config.colorization_val.split = "validation"
    config.colorization_val.log_steps = common.toy_eval_steps(arg.cpu)
    config.colorization_val_fid.split = "validation[:128]"  # once, at the end: Inception at
    config.colorization_val_fid.ref_split = "train[:128]"   # 299 px is slow on a CPU
    # No Inception weights offline: a random network (not comparable with published FIDs).
    config.colorization_val_fid.inception_weights = "random:0"
  return config


def get_sweep(add, arg: str | None = None) -> None:
  """The paper's Figure 11: code length x dictionary size (`python -m uvim.sweep`). On the toy
  scenes (64 px, 8 px patches: an 8x8 grid) 16 words are 2x2 patches each, 256 four a patch."""
  parsed = common.parse_arg(arg, smoke=False, cpu=False, singlehost=False, res=0)
  toy = parsed.smoke or parsed.cpu
  code_lens, dict_sizes = ((16, 64, 256), (32, 256)) if toy else ((64, 256, 1024), (1024, 4096))
  for code_len in code_lens:
    for dict_size in dict_sizes:
      add(**{"model.code_len": code_len, "model.dict_size": dict_size})
