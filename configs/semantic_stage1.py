r"""UViM stage I (restricted oracle) for semantic segmentation (the classes of COCO panoptic).

  python train.py --config configs/semantic_stage1.py:smoke --workdir runs/semantic_stage1

The labels are the panoptic annotation's classes (class + 1, 0 void; uvim/tasks/semantic.py),
scored by mean IoU (`miou`). Variants: smoke (tiny model on the built-in `toy_scenes`, minutes
on a CPU), cpu (the smoke recipe for 40 epochs), singlehost (batch 128, 100 epochs), res=N
(default 512; 64 with smoke).
"""

import ml_collections as mlc

from configs import common


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  """The stage I semantic segmentation config."""
  arg = common.parse_arg(arg, smoke=False, cpu=False, singlehost=False, res=0)
  toy = arg.smoke or arg.cpu  # the built-in toy scenes
  res = arg.res or (64 if toy else 512)
  patch_size = 8 if toy else 16
  labels = 'coco_panoptic|copy("semantics", "labels")|'

  config = mlc.ConfigDict()
  config.seed = 0
  config.task = "semantic_segmentation"
  config.pp_modules = ["ops_general", "ops_image", "proj.uvim.pp_ops"]
  config.dataset = "coco/2017_panoptic"
  config.data_dir = mlc.config_dict.placeholder(str)
  config.mesh = (("data", -1),)
  config.total_steps = mlc.config_dict.placeholder(int)
  config.train_split = "train[4096:]"
  config.val_split = "train[:4096]"
  config.batch_size = 1024
  common.set_memory_options(config)  # accumulation, dtype, remat, scan, attention
  config.num_epochs = 1000
  config.pp_train = (
      f'decode|{labels}randu("fliplr")|det_fliplr(key="image")|det_fliplr(key="labels")|'
      'inception_box|crop_box(key="image")|crop_box(key="labels")|'
      f'resize({res})|resize({res}, key="labels", method="nearest")|'
      'value_range(-1, 1)|keep("image", "labels")')
  config.pp_eval = (
      f'decode|{labels}resize({res})|resize({res}, key="labels", method="nearest")|'
      'value_range(-1, 1)|keep("image", "labels")')
  config.shuffle_buffer_size = 25_000
  config.log_training_steps = 50
  config.log_eval_steps = 250
  config.checkpoint_steps = 1000
  config.keep_checkpoint_steps = 20_000

  config.model_name = "proj.uvim.vit"
  config.model_init = mlc.config_dict.placeholder(str)  # a *_stageI_params.npz or a workdir
  classes = common.TOY_NUM_CLASSES if toy else 133
  config.model = common.stage1_model("smoke" if toy else "base", res, patch_size,
                                     {"semantics": (classes + 1, patch_size**2)})  # + void

  common.set_stage1_optimizer(config, lr=4e-4, wd=4e-5)

  config.evals = [("val", "validation"), ("semantic_val", "miou")]
  common.add_validation(config)
  config.semantic_val = mlc.ConfigDict(dict(
      pp=config.pp_eval.replace("decode|", ""), split="validation", log_steps=10_000,
      prefix="semantic/"))

  if arg.singlehost:
    config.batch_size = 128
    config.num_epochs = 100
  if toy:
    common.apply_smoke(config, cpu=arg.cpu)
    config.lr = 2e-3  # as the panoptic oracle's toy recipe
    config.model.code_dropout = "none"
    config.semantic_val.log_steps = common.toy_eval_steps(arg.cpu)
  return config
