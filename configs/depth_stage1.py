r"""UViM stage I (restricted oracle) for NYU depth v2.

  python train.py --config configs/depth_stage1.py --workdir runs/depth_stage1

Depth is quantised into 256 bins over [1e-3, 10] m (uvim/tasks/depth.py). The evaluation crop
is a parameter of `nyu_eval_crop`, by default the standard Eigen crop (rows 45:471, cols 41:601;
the original code started at row 54). Variants: smoke (tiny model on the built-in
`toy_scenes`, whose depth follows its scene geometry), cpu (smoke for 40 epochs), singlehost
(batch 128, 50 epochs), res=N (default 512; 64 with smoke).
"""

import ml_collections as mlc

from configs import common

QUANTIZATION_BINS = 256  # 64 with smoke: the one-hot bins dominate the cost of a tiny model


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  """The stage I depth config."""
  arg = common.parse_arg(arg, smoke=False, cpu=False, singlehost=False, res=0)
  toy = arg.smoke or arg.cpu  # the built-in toy scenes
  res = arg.res or (64 if toy else 512)
  patch_size = 8 if toy else 16
  eval_crop = "" if toy else "nyu_eval_crop|"  # toy scenes are not 480x640

  config = mlc.ConfigDict()
  config.seed = 0
  config.task = "depth"
  config.pp_modules = ["ops_general", "ops_image", "proj.uvim.pp_ops"]
  config.dataset = "nyu_depth_v2"
  config.data_dir = mlc.config_dict.placeholder(str)
  config.mesh = (("data", -1),)
  config.train_split = "train"
  config.val_split = "validation"
  config.batch_size = 1024
  common.set_memory_options(config)  # accumulation, dtype, remat, scan, attention
  config.num_epochs = 200
  config.total_steps = mlc.config_dict.placeholder(int)
  config.pp_train = (
      'decode|nyu_depth|'
      'randu("fliplr")|det_fliplr(key="image")|det_fliplr(key="labels")|'
      'inception_box|crop_box(key="image")|crop_box(key="labels")|'
      f'resize({res})|resize({res}, key="labels", method="nearest")|'
      'value_range(-1, 1)|keep("image", "labels")')
  config.pp_eval = (
      f'decode|nyu_depth|{eval_crop}'
      f'resize({res})|resize({res}, key="labels", method="nearest")|'
      'value_range(-1, 1)|keep("image", "labels")')
  config.shuffle_buffer_size = 25_000
  config.log_training_steps = 50
  config.log_eval_steps = 250
  config.checkpoint_steps = 1000
  config.keep_checkpoint_steps = 20_000

  config.model_name = "proj.uvim.vit"
  config.model_init = mlc.config_dict.placeholder(str)  # a *_stageI_params.npz or a workdir
  bins = 64 if toy else QUANTIZATION_BINS
  config.model = common.stage1_model("smoke" if toy else "base", res, patch_size,
                                     {"depth": (bins, patch_size**2)})

  common.set_stage1_optimizer(config, lr=1e-3, wd=1e-5)

  config.evals = [("val", "validation"), ("nyu_depth_val", "nyu_depth")]
  common.add_validation(config)
  config.nyu_depth_val = mlc.ConfigDict(dict(
      pp=(f'nyu_depth|{eval_crop}copy("labels", "ground_truth")|'
          f'resize({res})|resize({res}, key="labels", method="nearest")|'
          'value_range(-1, 1)|keep("image", "labels", "ground_truth")'),
      split="validation", log_steps=2000, prefix="nyu_depth/"))

  if arg.singlehost:
    config.batch_size = 128
    config.num_epochs = 50
  if toy:
    common.apply_smoke(config, cpu=arg.cpu)
    config.nyu_depth_val.log_steps = common.toy_eval_steps(arg.cpu)
  return config
