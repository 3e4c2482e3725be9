r"""UViM stage II for NYU depth v2: a language model over the stage I guiding code.

  python train.py --config configs/depth_stage2.py --workdir runs/depth_stage2 \
      --config.oracle.model_init=depth_stageI_params.npz

Data, pp and evaluators are those of `depth_stage1.py`; the oracle is its model. Predictions use
T = 0 (argmax). Variants: smoke (tiny model on `toy_scenes`, oracle = the stage I `:smoke` run in
runs/depth_stage1), cpu (40 epochs, oracle runs/depth_stage1_cpu), singlehost, res=N, masked
(the parallel decoder with its neighbour view, as in panoptic_stage2.py).
"""

import ml_collections as mlc

from configs import common, depth_stage1


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  """The stage II depth config."""
  parsed = common.parse_arg(arg, smoke=False, cpu=False, singlehost=False, res=0,
                            masked=False)
  stage1 = depth_stage1.get_config(common.stage1_arg(arg))
  res = stage1.model.input_size[0]
  return common.stage2_from_stage1(
      stage1, parsed, common.oracle_init(parsed, "runs/depth_stage1", "depth_stageI_params.npz"),
      predict_pp=f'resize({res})|value_range(-1, 1)|keep("image")')
