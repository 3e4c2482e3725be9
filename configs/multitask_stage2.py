r"""Multi-task UViM stage II: one masked model over the codes of the panoptic and depth oracles.

  python train.py --config configs/multitask_stage2.py:smoke --workdir runs/multitask_stage2

Needs a dataset with every task's labels for the same images: the built-in `toy_scenes` (its
scenes carry panoptic labels and depth). Variants: smoke (the `:smoke` stage II recipe and
budget, oracles runs/panoptic_stage1 and runs/depth_stage1), cpu (40 epochs, oracles
runs/*_stage1_cpu). Each training example makes each task a condition (code visible) with
probability `condition_rate`, else a target (`stages.MultiTaskStageII`). Evaluations score the
chains image -> panoptic and image -> depth; `python -m uvim.tools.chain_study` scores the
others (image -> depth -> panoptic, ground-truth depth code -> panoptic, ...).
"""

import ml_collections as mlc

from configs import common, depth_stage2, panoptic_stage2

TASKS = ("depth", "panoptic")  # the sequence holds their codes in sorted order


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  """The multi-task stage II config (toy scenes only)."""
  parsed = common.parse_arg(arg, smoke=False, cpu=False)
  if not (parsed.smoke or parsed.cpu):
    raise ValueError("multitask_stage2 needs a dataset with both tasks' labels: use :smoke or "
                     ":cpu (the built-in toy scenes)")
  panoptic = panoptic_stage2.get_config(arg)
  depth = depth_stage2.get_config(arg)
  config = panoptic.copy_and_resolve_references()  # unlinked from the oracle's sizes
  config.total_steps = mlc.config_dict.placeholder(int)
  config.data_dir = mlc.config_dict.placeholder(str)
  config.model_init.encoder = mlc.config_dict.placeholder(str)
  del config["oracle"]
  config.oracles = {"panoptic": panoptic.oracle, "depth": depth.oracle}
  config.condition_rate = 0.5
  res = panoptic.model.input_size[0]
  config.pp_train = (
      'decode|coco_panoptic|concat(["semantics","instances"], "labels_panoptic")|'
      'nyu_depth(outkey="labels_depth")|randu("fliplr")|'
      + "".join(f'det_fliplr(key="{k}")|' for k in ("image", "labels_panoptic", "labels_depth"))
      + 'inception_box|'
      + "".join(f'crop_box(key="{k}")|' for k in ("image", "labels_panoptic", "labels_depth"))
      + _resized(res) + 'make_canonical(key="labels_panoptic")|'
      'keep("image", "image_ctx", "labels_panoptic", "labels_depth")')
  config.pp_eval = (
      'decode|coco_panoptic|concat(["semantics","instances"], "labels_panoptic")|'
      f'nyu_depth(outkey="labels_depth")|{_resized(res)}make_canonical(key="labels_panoptic")|'
      'keep("image", "image_ctx", "labels_panoptic", "labels_depth")')

  config.model.num_tasks = len(TASKS)
  config.model.masked = True
  config.model.seq_len = sum(config.oracles[k].model.code_len for k in TASKS)
  config.model.vocab_size = 1 + sum(config.oracles[k].model.dict_size for k in TASKS)

  # Evaluations: image -> each task. Their pp give every task's labels, so that a chain can
  # start from the oracle's code of one (`chain_study`, `predict_kwargs` given=(...)).
  config.evals = [("val", "validation"), ("panoptic_val", "coco_panoptic"),
                  ("nyu_depth_val", "nyu_depth")]
  config.val.pp = config.pp_eval
  config.val.split = config.get_ref("val_split")
  config.val.log_steps = config.get_ref("log_eval_steps")
  labels = ('coco_panoptic|concat(["semantics","instances"], "labels_panoptic")|'
            'nyu_depth(outkey="labels_depth")|')
  keep = '"image", "image_ctx", "labels_panoptic", "labels_depth"'
  config.panoptic_val.pp = (f'{labels}{_resized(res)}make_canonical(key="labels_panoptic")|'
                            f'keep({keep}, "image/id")')
  config.panoptic_val.predict_kwargs = {"chain": ("panoptic",)}
  config.nyu_depth_val = depth.nyu_depth_val
  config.nyu_depth_val.pp = (f'{labels}copy("labels_depth", "ground_truth")|{_resized(res)}'
                             f'make_canonical(key="labels_panoptic")|keep({keep}, "ground_truth")')
  config.nyu_depth_val.predict_kwargs = {"chain": ("depth",)}
  for name in ("panoptic_train", "panoptic_holdout"):
    del config[name]
  return config


def _resized(res: int) -> str:
  """The pp ops that bring the image, its context copy and both labels to `res` pixels."""
  return (f'resize({res}, inkey="image", outkey="image_ctx")|resize({res})|'
          f'resize({res}, key="labels_panoptic", method="nearest")|'
          f'resize({res}, key="labels_depth", method="nearest")|'
          'value_range(-1, 1, key="image_ctx")|value_range(-1, 1)|')
