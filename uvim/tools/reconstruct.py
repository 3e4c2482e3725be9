r"""The oracle's round trip on a split: labels -> code -> labels, as metrics, pictures and the
code's word use.

  python -m uvim.tools.reconstruct --config configs/panoptic_stage1.py:smoke \
      --workdir runs/panoptic_stage1 --input "validation[:256]" --output runs/reconstruct

Writes, in --output: `reconstruct.md` and `reconstruct.json` (the config's end-task metrics of
the reconstruction, by the trainer's own evaluator, and the code's word use: words used of the
dictionary, perplexity), `sheet.png` (ground truth | image | reconstruction | error map) and
`codes.png` (how often each word is used over the split). Works for every task; `--checkpoint`
takes a big_vision `*_stageI_params.npz`.
"""

import json
from pathlib import Path

import jax
import ml_collections as mlc
import numpy as np
from absl import app, flags

from uvim import api, cli, input_pipeline, visualize
from uvim.oracle import context
from uvim.tools import common


def define_flags() -> None:
  cli.define_config_flag()
  flags.DEFINE_string("workdir", None, "Stage I workdir (or --checkpoint).")
  flags.DEFINE_string("checkpoint", None, "Stage I parameters (.npz or workdir).")
  flags.DEFINE_string("input", None, "A split of the config's dataset, or `dataset:split`.",
                      required=True)
  flags.DEFINE_string("output", None, "Directory for the results.", required=True)
  flags.DEFINE_integer("sheet_rows", 8, "Images on the sheet.")


def word_use(codes: np.ndarray, dict_size: int) -> dict[str, float]:
  """How a set of codes (any shape, ints) uses a dictionary: counts per word, words used and
  their fraction, and the perplexity exp(entropy) of the word frequencies."""
  counts = np.bincount(np.asarray(codes).ravel(), minlength=dict_size)
  p = counts / max(counts.sum(), 1)
  entropy = -np.sum(p[p > 0] * np.log(p[p > 0]))
  used = int(np.sum(counts > 0))
  return {"words_used": used, "words_used_fraction": used / dict_size,
          "perplexity": float(np.exp(entropy)), "counts": counts}


def error_image(error_HxW: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """An error map in [0, 1] as a 'magma' picture (uint8 RGB) at `size`."""
  from matplotlib import colormaps
  from PIL import Image

  rgb = (colormaps["magma"](np.clip(error_HxW, 0, 1))[..., :3] * 255).astype(np.uint8)
  return np.asarray(Image.fromarray(rgb).resize(size[::-1], Image.NEAREST))


def plot_word_use(counts: np.ndarray, stats: dict, path: Path, title: str) -> None:
  from matplotlib.figure import Figure

  fig = Figure(figsize=(6, 3.4))
  ax = fig.subplots()
  ordered = np.sort(counts)[::-1]
  ax.bar(np.arange(len(ordered)), ordered, width=1.0)
  ax.set_yscale("log")
  ax.set_xlabel("word, most used first")
  ax.set_ylabel("uses over the split")
  ax.set_title(f"{title}\n{stats['words_used']} of {len(counts)} words used, perplexity "
               f"{stats['perplexity']:.1f}", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def run(config: mlc.ConfigDict, checkpoint: str, source: str, output: Path,
        sheet_rows: int) -> list[Path]:
  """Scores, draws and counts the round trip of `source`; the files written."""
  from uvim import trainer

  split = common.input_split(config, source)
  common.prepare_output(output)
  oracle = mlc.ConfigDict(dict(task=config.task, model_name=config.model_name,
                               model=config.model))
  tokenizer = api.Tokenizer(oracle, checkpoint)
  mesh = trainer.make_mesh(config)
  metrics = api.evaluate(config, tokenizer.reconstruct_batch, tokenizer.variables, split,
                         api.evaluator_of(config))

  batches, _ = input_pipeline.eval_data(config, split, config.pp_eval, config.batch_size, mesh)
  codes, rows = [], []
  for batch in batches:
    batch = jax.device_get(batch)
    ctx = context(batch)
    code = tokenizer.encode(batch["labels"], ctx)
    codes.append(code[batch[input_pipeline.MASK_KEY]])
    if len(rows) < sheet_rows:
      outputs = tokenizer.decode(code, ctx)
      for i in range(min(sheet_rows - len(rows), int(batch[input_pipeline.MASK_KEY].sum()))):
        image = common.to_uint8(batch["image"][i])
        one = {k: v[i] for k, v in outputs.items()}
        rows.append([tokenizer.task.render_labels(batch["labels"][i], image), image,
                     tokenizer.task.render(one, image),
                     error_image(tokenizer.task.error_map(one, batch["labels"][i]),
                                 image.shape[:2])])
  use = word_use(np.concatenate(codes), tokenizer.model.dict_size)
  counts = use.pop("counts")

  title = f"{config.task} oracle, {config.dataset}:{split}"
  summary = {"metrics": metrics, "code": use, "split": split, "dataset": config.dataset,
             "checkpoint": checkpoint, "images": int(sum(len(c) for c in codes))}
  (output / "reconstruct.json").write_text(json.dumps(summary, indent=1))
  lines = [f"# {title}", "", f"{summary['images']} images; checkpoint {checkpoint}", "",
           "| metric | value |", "| --- | --- |",
           *(f"| {k} | {v:.4g} |" for k, v in {**metrics, **use}.items())]
  (output / "reconstruct.md").write_text("\n".join(lines) + "\n")
  plot_word_use(counts, use, output / "codes.png", title)
  written = [output / "reconstruct.md", output / "reconstruct.json", output / "codes.png"]
  if rows:
    sheet = visualize.contact_sheet(rows, ["ground truth", "image", "reconstruction",
                                           "error"], cell_size=128)
    written.append(visualize.save_png(output / "sheet.png", sheet))
  print(*lines[4:], sep="\n")
  return written


def main(argv: list[str]) -> None:
  config, source = common.config_and_checkpoint(
      argv, "proj.uvim.vit", "a stage I config (the oracle's; it needs the labels)",
      "stage I model")
  f = flags.FLAGS
  common.report_written(lambda: run(config, source, f.input, Path(f.output), f.sheet_rows))


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
