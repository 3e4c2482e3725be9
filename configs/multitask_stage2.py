r"""Multi-task UViM stage II: one masked model over the codes of the colour, depth and panoptic
oracles.

  python train.py --config configs/multitask_stage2.py:smoke --workdir runs/multitask_stage2

Needs a dataset with every task's labels for the same images: the built-in `toy_scenes` (its
scenes carry panoptic labels and depth; colour is the image). Variants: smoke (the `:smoke`
stage II recipe and budget, oracles runs/<task>_stage1), cpu (40 epochs, oracles
runs/<task>_stage1_cpu), tasks=a+b (a subset of TASKS, e.g. `tasks=panoptic+depth`). Each
training example makes each task a condition (code visible) with probability
`condition_rate`, else a target (`stages.StageII`). Evaluations score the chains image -> each
task; `python -m uvim.tools.chain_study` scores the others (image -> depth -> panoptic,
ground-truth depth code -> panoptic, ...).

The image: with colorization among the tasks the model reads the grayscale image (else colour
would be read off its input), for every task; each oracle decodes with the context it was
trained with (panoptic and depth: the RGB `image_ctx`, as predict.py gives it from the input
photo; colour: the grayscale image). docs/multitask.md measures what grayscale costs panoptic
and depth.

A task takes part through its module's MULTITASK (uvim/tasks/, docs/extending.md): its
single-task stage II config (the oracle section and the evaluator), the pp ops that put its
labels in `labels_<name>`, and those that finish them at the model's resolution; the model's
sequence follows from the oracles.
"""

import functools
import importlib
import operator

import ml_collections as mlc

from configs import common
from uvim import tasks


def task_entries() -> dict[str, dict]:
  """Each task's part of a multi-task model, from its module's MULTITASK (uvim/tasks/), by
  its name here: `stage2` (its single-task stage II config module: the `oracle` section and
  the evaluator `evaluator`, scoring the chain image -> this task); `labels`: pp ops giving
  `labels_<name>` from a decoded example; `finish`: pp ops on the labels at the model's
  resolution (after flips, crops, resizes); `eval_labels` / `eval_keep`: what the evaluator's
  pp adds before resizing / keeps (evaluator None: no end-task evaluator, the task is scored by
  its loss); optional `resize`: how its labels are resized (default nearest); `gray_input`: the
  model reads the grayscale image; `context`: the batch key of its oracle's context image
  (default `image_ctx`)."""
  entries = {}
  for task in tasks.all_tasks().values():
    entry = dict(task.MULTITASK)
    entries[entry.pop("name")] = {**entry, "stage2": importlib.import_module(entry["config"])}
  return entries


TASKS = task_entries()
DEFAULT_TASKS = ("colorization", "panoptic", "depth")  # the README's model, in its order


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  """The multi-task stage II config (toy scenes only); `tasks=a+b` picks some of TASKS."""
  pieces = [p.strip() for p in (arg or "").split(",") if p.strip()]
  chosen = [p.partition("=")[2] for p in pieces if p.partition("=")[0].strip() == "tasks"]
  names = chosen[-1].split("+") if chosen else list(DEFAULT_TASKS)
  unknown = sorted(set(names) - set(TASKS))
  twice = sorted({n for n in names if names.count(n) > 1})
  if unknown or twice or len(names) < 2:
    why = (f"unknown task(s) {unknown}" if unknown else f"{twice} named twice" if twice
           else "one task")
    raise ValueError(f"tasks={'+'.join(names)}: {why}; name two or more different tasks of "
                     f"{sorted(TASKS)}, joined by +")
  rest = ",".join(p for p in pieces if p.partition("=")[0].strip() != "tasks")
  return build({name: TASKS[name] for name in names}, rest)


def build(tasks: dict[str, dict], arg: str | None = None) -> mlc.ConfigDict:
  """A stage II config over the oracles of `tasks` (entries as in TASKS)."""
  parsed = common.parse_arg(arg, smoke=False, cpu=False)
  if not (parsed.smoke or parsed.cpu):
    raise ValueError("multitask_stage2 needs a dataset with both tasks' labels: use :smoke or "
                     ":cpu (the built-in toy scenes)")
  singles = {name: task["stage2"].get_config(arg) for name, task in tasks.items()}
  config = next(iter(singles.values())).copy_and_resolve_references()  # unlinked from its oracle
  config.total_steps = mlc.config_dict.placeholder(int)
  config.data_dir = mlc.config_dict.placeholder(str)
  config.model_init.encoder = mlc.config_dict.placeholder(str)
  del config["oracle"]
  config.oracles = {name: single.oracle for name, single in singles.items()}
  for name, task in tasks.items():
    if "context" in task:
      config.oracles[name].context = task["context"]
  config.condition_rate = 0.5
  res = config.model.input_size[0]
  methods = {f"labels_{name}": task.get("resize", "nearest") for name, task in tasks.items()}
  keys = list(methods)
  labels = "".join(task["labels"] for task in tasks.values())
  finish = "".join(task["finish"] for task in tasks.values())
  if any(task.get("gray_input") for task in tasks.values()):
    finish += 'rgb_to_grayscale_to_rgb(inkey="image", outkey="image")|'
  keep = ", ".join(f'"{k}"' for k in ("image", "image_ctx", *keys))
  config.pp_train = (
      f'decode|{labels}randu("fliplr")|'
      + "".join(f'det_fliplr(key="{k}")|' for k in ("image", *keys)) + 'inception_box|'
      + "".join(f'crop_box(key="{k}")|' for k in ("image", *keys))
      + f'{_resized(res, methods)}{finish}keep({keep})')
  config.pp_eval = f'decode|{labels}{_resized(res, methods)}{finish}keep({keep})'
  gray = ('rgb_to_grayscale_to_rgb(inkey="image", outkey="image")|'
          if any(task.get("gray_input") for task in tasks.values()) else "")
  config.pp_predict = f'{_resized(res, {})}{gray}keep("image", "image_ctx", "image/id")'

  config.model.num_tasks = len(tasks)
  config.model.masked = True
  config.model.neighbour_tokens = True  # each word sees its neighbours (docs/decoding.md)
  # Guidance: 10% of examples see no image, 10% none of their condition codes
  # (`StageII._dropped_conditions`), so chains can be guided (docs/multitask.md).
  config.model.cond_dropout = 0.1
  # References: the sequence follows the oracles' code_len and dict_size.
  oracles = config.oracles.values()
  config.model.seq_len = functools.reduce(operator.add, [o.model.get_ref("code_len")
                                                         for o in oracles])
  config.model.vocab_size = functools.reduce(operator.add, [o.model.get_ref("dict_size")
                                                            for o in oracles], 1)

  # Evaluations: image -> each task. Their pp give every task's labels, so that a chain can
  # start from the oracle's code of one (`chain_study`, `predict_kwargs` given=(...)).
  config.evals = [("val", "validation")]
  config.val.pp = config.pp_eval
  config.val.split = config.get_ref("val_split")
  config.val.log_steps = config.get_ref("log_eval_steps")
  for name in ("panoptic_train", "panoptic_holdout", "panoptic_val", "nyu_depth_val"):
    if name in config:
      del config[name]
  for name, task in tasks.items():
    evaluator = task["evaluator"]
    if evaluator is None:  # a task scored by its validation loss alone
      continue
    config.evals.append((evaluator, dict(singles[name].evals)[evaluator]))
    config[evaluator] = singles[name][evaluator]
    config[evaluator].pp = (f'{labels}{task["eval_labels"]}{_resized(res, methods)}{finish}'
                            f'keep({keep}, {task["eval_keep"]})')
    config[evaluator].predict_kwargs = {"chain": (name,)}
  common.add_prediction_images(config, "validation[:4]", common.toy_eval_steps(parsed.cpu))
  return config


def _resized(res: int, methods: dict[str, str]) -> str:
  """The pp ops that bring the image, its context copy and the labels (key -> resize method)
  to `res` pixels, the images (and colour labels) in [-1, 1]."""
  return (f'resize({res}, inkey="image", outkey="image_ctx")|resize({res})|'
          + "".join(f'resize({res}, key="{k}", method="{m}")|' for k, m in methods.items())
          + "".join(f'value_range(-1, 1, key="{k}")|' for k, m in methods.items()
                    if m == "bilinear")
          + 'value_range(-1, 1, key="image_ctx")|value_range(-1, 1)|')
