r"""UViM stage I (restricted oracle) for COCO panoptic segmentation: the paper's Listing 1.

  python train.py --config configs/panoptic_stage1.py --workdir runs/panoptic_stage1

Variants (after `:`, comma-separated):
  smoke       tiny model on the built-in `toy_scenes` data; ~3 minutes on a 2-core CPU to
              PQ 67.0 (things 51.2, stuff 93.4) on the toy validation split (ids=raster:
              71.6, things 59.5, stuff 91.9, but its stage II reaches 14 PQ less).
  cpu         the smoke recipe for 40 epochs (~30 minutes): PQ 82.7 (things 75.3) with
              ids=raster (location ids not measured at this length).
  singlehost  batch 128 for 100 epochs, for one 8-accelerator host (the original reports
              67.8 PQ on the holdout with it, against 75.7 for the full config).
  res=N       input and label resolution (default 512; 64 with smoke).
  ids=RULE    how the oracle numbers instances: raster (the paper's, by centre of mass top to
              bottom; the default of the full-size variants) or location (each thing by the
              patch of its centre, as an offset from each pixel's patch; the default of smoke
              and cpu, see docs/decoding.md#instance-ids).
"""

import ml_collections as mlc

from configs import common


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  """The stage I panoptic config."""
  arg = common.parse_arg(arg, smoke=False, cpu=False, singlehost=False, res=0, ids="")
  toy = arg.smoke or arg.cpu  # the built-in toy scenes
  res = arg.res or (64 if toy else 512)
  patch_size = 8 if toy else 16

  config = mlc.ConfigDict()
  config.seed = 0
  config.task = "panoptic_segmentation"
  config.pp_modules = ["ops_general", "ops_image", "proj.uvim.pp_ops"]
  config.dataset = "coco/2017_panoptic"
  config.data_dir = mlc.config_dict.placeholder(str)  # default: $TFDS_DATA_DIR
  config.mesh = (("data", -1),)  # (axis, size): all devices on the data axis
  config.total_steps = mlc.config_dict.placeholder(int)  # overrides num_epochs when set
  config.val_split = "train[:4096]"
  config.train_split = "train[4096:]"
  config.batch_size = 1024
  common.set_memory_options(config)  # accumulation, dtype, remat, scan, attention
  config.num_epochs = 1000
  config.pp_train = (
      'decode|coco_panoptic|'
      'concat(["semantics","instances"], "labels")|'
      'randu("fliplr")|'
      'det_fliplr(key="image")|det_fliplr(key="labels")|'
      'inception_box|'
      'crop_box(key="image")|crop_box(key="labels")|'
      f'resize({res})|'
      f'resize({res}, key="labels", method="nearest")|'
      'value_range(-1, 1)|make_canonical|'
      'keep("image","labels")')
  config.pp_eval = (
      'decode|coco_panoptic|'
      'concat(["semantics","instances"], "labels")|'
      f'resize({res})|'
      f'resize({res}, key="labels", method="nearest")|'
      'value_range(-1, 1)|make_canonical|'
      'keep("image","labels")')
  config.shuffle_buffer_size = 25_000
  config.log_training_steps = 50
  config.log_eval_steps = 250
  config.checkpoint_steps = 1000
  config.keep_checkpoint_steps = 20_000

  # Model section.
  config.model_name = "proj.uvim.vit"
  config.model_init = mlc.config_dict.placeholder(str)  # a *_stageI_params.npz or a workdir
  instances = common.panoptic_instances(arg.ids, toy, patch_size)
  classes = common.TOY_NUM_CLASSES if toy else 133
  config.model = common.stage1_model("smoke" if toy else "base", res, patch_size, {
      "semantics": (classes + 1, patch_size**2),  # +1 for the void label.
      "instances": instances["instances"],
  })
  config.model.instance_ids = instances["instance_ids"]
  config.model.thing_classes = instances["thing_classes"]

  # Optimizer section.
  common.set_stage1_optimizer(config, lr=4e-4, wd=4e-5)

  # Evaluation section: (name, evaluator type) pairs, each configured by `config.<name>`.
  config.evals = [
      ("val", "validation"),
      ("panoptic_train", "coco_panoptic"),
      ("panoptic_holdout", "coco_panoptic"),
      ("panoptic_val", "coco_panoptic"),
  ]
  base_eval = dict(pp=config.pp_eval.replace("decode|", ""), log_steps=10_000)
  common.add_validation(config)
  config.panoptic_train = mlc.ConfigDict(base_eval)
  config.panoptic_train.prefix = "coco_panoptic_train/"
  config.panoptic_train.split = "train[4096:8192]"
  config.panoptic_holdout = mlc.ConfigDict(base_eval)
  config.panoptic_holdout.prefix = "coco_panoptic_holdout/"
  config.panoptic_holdout.split = "train[:4096]"
  config.panoptic_val = mlc.ConfigDict(base_eval)
  config.panoptic_val.prefix = "coco_panoptic/"
  config.panoptic_val.split = "validation"

  if arg.singlehost:
    config.batch_size = 128
    config.num_epochs = 100
  if toy:
    common.apply_smoke(config, cpu=arg.cpu)
    config.lr = 2e-3
    # In minutes of training the decoder needs the whole code to learn the things; code
    # dropout (which teaches it to fall back on the image) pays off over longer runs.
    config.model.code_dropout = "none"
    for name in ("panoptic_train", "panoptic_holdout", "panoptic_val"):
      config[name].log_steps = common.toy_eval_steps(arg.cpu)
    config.panoptic_train.split = "train[256:512]"
    config.panoptic_holdout.split = "train[:256]"
  return config
