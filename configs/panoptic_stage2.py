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

from configs import common, panoptic_stage1


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  """The stage II panoptic config."""
  parsed = common.parse_arg(arg, smoke=False, cpu=False, singlehost=False, res=0, ids="",
                            masked=False)
  stage1 = panoptic_stage1.get_config(common.stage1_arg(arg))
  res = stage1.model.input_size[0]
  # The oracle decodes with the image at the labels' resolution (`image_ctx`), as stage I saw
  # it, beside the model's own `image`.
  context = f'resize({res}, inkey="image", outkey="image_ctx")|'
  in_range = 'value_range(-1, 1, key="image_ctx")|value_range(-1, 1)|'
  config = common.stage2_from_stage1(
      stage1, parsed, common.oracle_init(parsed, "runs/panoptic_stage1", "oracle.npz"),
      predict_pp=f'{context}resize({res})|{in_range}keep("image", "image_ctx", "image/id")')
  for key in ("pp_train", "pp_eval"):
    config[key] = stage1[key].replace(f"resize({res})|", f"{context}resize({res})|", 1).replace(
        "value_range(-1, 1)|", in_range).replace('keep("image","labels")',
                                                 'keep("image", "image_ctx", "labels")')
  config.val.pp, config.val.split = config.pp_eval, config.get_ref("val_split")
  config.val.log_steps = config.get_ref("log_eval_steps")
  config.shuffle_buffer_size = 50_000
  config.num_epochs = 200
  config.log_eval_steps = 1000
  config.keep_checkpoint_steps = 5000
  for name in ("panoptic_train", "panoptic_holdout", "panoptic_val"):
    config[name].pp = config.pp_predict  # the evaluator reads the labels itself
    config[name].log_steps = 10_000
  if parsed.singlehost:
    config.num_epochs = 50
  if parsed.smoke or parsed.cpu:
    common.apply_toy_stage2(config, cpu=parsed.cpu)
    for name in ("panoptic_train", "panoptic_holdout", "panoptic_val"):
      config[name].log_steps = common.toy_eval_steps(parsed.cpu)
  return config
