r"""UViM stage II for ImageNet colorization: a language model over the stage I guiding code.

  python train.py --config configs/colorization_stage2.py --workdir runs/colorization_stage2 \
      --config.oracle.model_init=color_stageI_params.npz

Data, pp and evaluators are those of `colorization_stage1.py`; the oracle is its model. Colour
predictions are sampled at the task's temperature, 1 (uvim/tasks/colorization.py).
Variants: smoke (tiny model on `toy_scenes`, oracle = the stage I `:smoke` run in
runs/colorization_stage1), cpu (40 epochs, oracle runs/colorization_stage1_cpu), singlehost,
res=N, masked (the parallel decoder with its neighbour view, as in panoptic_stage2.py).
"""

import ml_collections as mlc

from configs import colorization_stage1, common


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  """The stage II colorization config."""
  parsed = common.parse_arg(arg, smoke=False, cpu=False, singlehost=False, res=0,
                            masked=False)
  stage1 = colorization_stage1.get_config(common.stage1_arg(arg))
  res = stage1.model.input_size[0]
  return common.stage2_from_stage1(
      stage1, parsed,
      common.oracle_init(parsed, "runs/colorization_stage1", "color_stageI_params.npz"),
      predict_pp=(f'resize({res})|rgb_to_grayscale_to_rgb|value_range(-1, 1)|keep("image")'))
