r"""UViM stage II for semantic segmentation: a language model over the stage I guiding code.

  python train.py --config configs/semantic_stage2.py:smoke --workdir runs/semantic_stage2

Data, pp and evaluators are those of `semantic_stage1.py`; the oracle is its model. Variants:
smoke (tiny model on `toy_scenes`, oracle = the stage I `:smoke` run in runs/semantic_stage1),
cpu (40 epochs, oracle runs/semantic_stage1_cpu), singlehost, res=N, masked (the parallel
decoder with its neighbour view, as in panoptic_stage2.py).
"""

import ml_collections as mlc

from configs import common, semantic_stage1


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  """The stage II semantic segmentation config."""
  parsed = common.parse_arg(arg, smoke=False, cpu=False, singlehost=False, res=0,
                            masked=False)
  stage1 = semantic_stage1.get_config(common.stage1_arg(arg))
  res = stage1.model.input_size[0]
  return common.stage2_from_stage1(
      stage1, parsed,
      common.oracle_init(parsed, "runs/semantic_stage1", "semantic_stageI_params.npz"),
      predict_pp=f'resize({res})|value_range(-1, 1)|keep("image")')
