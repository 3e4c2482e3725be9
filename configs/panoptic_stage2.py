r"""UViM stage II (language model over guiding codes) for COCO panoptic: the paper's Listing 2.

  python train.py --config configs/panoptic_stage2.py --workdir runs/panoptic_stage2 \
      --config.oracle.model_init=runs/panoptic_stage1

Variants (after `:`, comma-separated):
  smoke       tiny model on the built-in `toy_scenes` data, using the stage I `:smoke` run in
              runs/panoptic_stage1 as its oracle; ~4.5 minutes on a 2-core CPU to PQ 60.4
              (things 40.8, stuff 92.9) from greedy codes (ids=raster: 46.1, things 25.5).
  cpu         the smoke recipe for 40 epochs, oracle runs/panoptic_stage1_cpu (PQ 71.2 with
              ids=raster; location ids not measured at this length).
  singlehost  batch 32 for 50 epochs, for one 8-accelerator host (the original reports 39.4 PQ
              on the holdout with it, against 43.7 for the full config).
  res=N       image and label resolution (default 512; 64 with smoke).
  ids=RULE    the oracle's instance-id rule (panoptic_stage1.py): raster, or location (the
              default of smoke and cpu).
  masked      the masked decoder, written in a few parallel steps (predict.py --scheme
              maskgit --steps 8), each code position seeing its grid neighbours' tokens; with
              smoke 57.5 PQ at 8 steps against the causal model's 61.1 (seeds 0, 1).
"""

import ml_collections as mlc

from configs import common


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  """The stage II panoptic config."""
  arg = common.parse_arg(arg, smoke=False, cpu=False, singlehost=False, res=0, ids="",
                         masked=False)
  toy = arg.smoke or arg.cpu  # the built-in toy scenes
  res = label_res = arg.res or (64 if toy else 512)
  patch_size = label_patch_size = 8 if toy else 16

  config = mlc.ConfigDict()
  config.seed = 0
  config.pp_modules = ["ops_general", "ops_image", "proj.uvim.pp_ops"]
  config.pp_train = (
      'decode|coco_panoptic|'
      'concat(["semantics","instances"], "labels")|'
      'randu("fliplr")|'
      'det_fliplr(key="image")|det_fliplr(key="labels")|'
      'inception_box|'
      'crop_box(key="image")|crop_box(key="labels")|'
      f'resize({label_res}, inkey="image", outkey="image_ctx")|'
      f'resize({res})|'
      f'resize({label_res}, key="labels", method="nearest")|'
      'value_range(-1, 1, key="image_ctx")|'
      'value_range(-1, 1)|make_canonical|'
      'keep("image", "image_ctx", "labels")')
  config.pp_eval = (
      'decode|coco_panoptic|'
      'concat(["semantics","instances"], "labels")|'
      f'resize({label_res}, inkey="image", outkey="image_ctx")|'
      f'resize({res})|'
      f'resize({label_res}, key="labels", method="nearest")|'
      'value_range(-1, 1, key="image_ctx")|'
      'value_range(-1, 1)|make_canonical|'
      'keep("image", "image_ctx", "labels")')
  # From a decoded image to the model inputs: evaluators and predict.py.
  config.pp_predict = (
      f'resize({label_res}, inkey="image", outkey="image_ctx")|'
      f'resize({res})|'
      'value_range(-1, 1, key="image_ctx")|'
      'value_range(-1, 1)|'
      'keep("image", "image_ctx", "image/id")')

  config.dataset = "coco/2017_panoptic"
  config.data_dir = mlc.config_dict.placeholder(str)  # default: $TFDS_DATA_DIR
  config.mesh = (("data", -1),)  # (axis, size): all devices on the data axis
  config.total_steps = mlc.config_dict.placeholder(int)  # overrides num_epochs when set
  config.train_split = "train[4096:]"
  config.val_split = "train[:4096]"
  config.shuffle_buffer_size = 50_000
  config.batch_size = 512
  common.set_memory_options(config)  # accumulation, dtype, remat, scan, attention
  config.num_epochs = 200
  config.log_training_steps = 50
  config.log_eval_steps = 1000
  config.checkpoint_steps = 1000
  config.keep_checkpoint_steps = 5000

  # Optimizer section.
  config.optax_name = "scale_by_adafactor"
  config.optax = dict(beta2_cap=0.95)
  config.lr = 0.001
  config.wd = 0.000001
  config.lr_mults = [
      ("pos_embedding_encoder.*", 0.1),
      ("EmbedPatches.*", 0.1),
      ("encoder.*", 0.1),
      ("decoder.*", 1.0),
  ]
  config.schedule = dict(decay_type="cosine", warmup_steps=4_000)

  # Restricted oracle section: the frozen stage I model that turns labels into codes.
  config.oracle = mlc.ConfigDict()
  config.oracle.task = "panoptic_segmentation"
  config.oracle.model_init = "oracle.npz"
  config.oracle.model_name = "proj.uvim.vit"
  config.oracle.model = mlc.ConfigDict(common.STAGE_I_MODELS["smoke" if toy else "base"])
  config.oracle.model.input_size = (label_res, label_res)
  config.oracle.model.patch_size = (label_patch_size, label_patch_size)
  config.oracle.model.code_len = 256
  config.oracle.model.dict_size = 4096
  config.oracle.model.codeword_dim = 768
  common.set_quantizer(config.oracle.model)
  config.oracle.model.with_encoder_ctx = True
  config.oracle.model.with_decoder_ctx = True
  instances = common.panoptic_instances(arg.ids, toy, label_patch_size)
  config.oracle.model.instance_ids = instances["instance_ids"]
  config.oracle.model.thing_classes = instances["thing_classes"]
  config.oracle.model.inputs = {
      "semantics": (133 + 1, label_patch_size**2),  # +1 for the void label.
      "instances": instances["instances"],
  }
  config.oracle.model.outputs = config.oracle.model.inputs

  # Model section.
  config.model_name = "proj.uvim.lm"
  config.model_init = {"encoder": "howto-i21k-L/16"}
  config.model = mlc.ConfigDict(common.LM_MODELS["smoke" if toy else "large"])
  config.model.patches = dict(size=(patch_size, patch_size))
  config.model.vocab_size = config.oracle.model.get_ref("dict_size") + 1
  config.model.posemb_type = "learn"
  common.set_decoder_options(config.model, arg.masked)
  config.model.input_size = (res, res)
  config.model.seq_len = config.oracle.model.get_ref("code_len")

  # Evaluation section: (name, evaluator type) pairs, each configured by `config.<name>`.
  config.evals = [
      ("val", "validation"),
      ("panoptic_train", "coco_panoptic"),
      ("panoptic_holdout", "coco_panoptic"),
      ("panoptic_val", "coco_panoptic"),
  ]
  base_eval = dict(pp=config.pp_predict, log_steps=10_000)
  config.val = mlc.ConfigDict(dict(pp=config.pp_eval, prefix="val/"))
  config.val.split = config.get_ref("val_split")
  config.val.log_steps = config.get_ref("log_eval_steps")
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
    config.batch_size = 32
    config.num_epochs = 50
  if toy:
    common.apply_toy_stage2(config, cpu=arg.cpu)
    config.oracle.model_init = common.oracle_init(arg, "runs/panoptic_stage1",
                                                  config.oracle.model_init)
    config.oracle.model.code_len = 64
    config.oracle.model.dict_size = 256
    config.oracle.model.codeword_dim = 32
    config.oracle.model.with_encoder_ctx = False
    config.oracle.model.inputs = {
        "semantics": (common.TOY_NUM_CLASSES + 1, label_patch_size**2),
        "instances": instances["instances"],
    }
    config.oracle.model.outputs = config.oracle.model.inputs
    for name in ("panoptic_train", "panoptic_holdout", "panoptic_val"):
      config[name].log_steps = common.toy_eval_steps(arg.cpu)
    config.panoptic_train.split = "train[256:512]"
    config.panoptic_holdout.split = "train[:256]"
  return config
