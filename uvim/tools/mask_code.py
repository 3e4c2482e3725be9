r"""Masks a growing region of the guiding code and decodes it: the paper's Figure 10.

  python -m uvim.tools.mask_code --config configs/panoptic_stage2.py:smoke \
      --workdir runs/panoptic_stage2 --input "validation[:256]" --output runs/mask_code

The code of each image (stage II's, at the task's temperature, or with --codes=oracle the
oracle's code of the ground truth) is masked over a bottom-right square of the code grid that
grows from 0% to 100% in --steps steps, three ways, and decoded by the stage I base model with
the image:
  zeros   the masked words' vectors are zeros (a continuous edit);
  random  each masked word is replaced by a random word of the dictionary;
  same    every masked word is replaced by one and the same random word.
Writes, in --output: `sheet_<i>.png` per image (rows: the modes; columns: the masked fraction;
left: image, ground truth and the code's words), and the task metric (PQ, RMSE, PSNR, by the
config's own evaluator) on the split for every mode and fraction: `masking.md`, `masking.csv`
and `masking.png`.
"""

import csv
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from PIL import Image, ImageDraw

from uvim import api, cli, decoding, input_pipeline, visualize
from uvim.models import vqvae
from uvim.oracle import context
from uvim.tools import common

MODES = ("zeros", "random", "same")


def define_flags() -> None:
  cli.define_config_flag()
  flags.DEFINE_string("workdir", None, "Stage II workdir (or --checkpoint).")
  flags.DEFINE_string("checkpoint", None, "Stage II parameters (.npz or workdir).")
  flags.DEFINE_string("input", None, "A split of the config's dataset, or `dataset:split` "
                      "(e.g. toy_scenes/medium:validation[:256]).", required=True)
  flags.DEFINE_string("output", None, "Directory for the sheets, table and plot.",
                      required=True)
  flags.DEFINE_enum("codes", "stage2", ["stage2", "oracle"],
                    "Mask stage II's predicted codes or the oracle's codes of the labels.")
  flags.DEFINE_integer("steps", 6, "Masked region sizes, from none to the whole grid.",
                       lower_bound=2)
  flags.DEFINE_integer("sheets", 4, "Images drawn as Figure 10 sheets.")
  flags.DEFINE_float("temperature", None, "Stage II sampling temperature; default the "
                     "task's (colour 1, others 0).")
  flags.DEFINE_integer("seed", decoding.Sampling.seed, "Seed of the sampler and the random "
                       "words (each image also hashes its pixels).")


def region_sides(code_side: int, steps: int) -> list[int]:
  """Sides of the masked squares: `steps` sizes from 0 to `code_side` words (distinct)."""
  return sorted({round(x) for x in np.linspace(0, code_side, steps)})


def masked_region(code_side: int, side: int) -> np.ndarray:
  """(code_len,) bool, raster order: the bottom-right `side` x `side` words of the grid."""
  grid = np.zeros((code_side, code_side), bool)
  if side:
    grid[-side:, -side:] = True
  return grid.ravel()


def masked_vectors(codewords_NxD: jnp.ndarray, code_BxL: jnp.ndarray, mask_L: jnp.ndarray,
                   mode: str, rng: jax.Array) -> jnp.ndarray:
  """The decoder's input (B, L, D): the code's words, with the masked positions replaced as
  `mode` says (zeros, a random word each, one random word for all; `rng`: one key per image)."""
  words = codewords_NxD[code_BxL]
  num_words, length = codewords_NxD.shape[0], code_BxL.shape[1]
  if mode == "zeros":
    replaced = jnp.zeros_like(words)
  elif mode == "random":
    ids = jax.vmap(lambda r: jax.random.randint(r, (length,), 0, num_words))(rng)
    replaced = codewords_NxD[ids]
  elif mode == "same":
    ids = jax.vmap(lambda r: jax.random.randint(r, (1,), 0, num_words))(rng)
    replaced = jnp.broadcast_to(codewords_NxD[ids], words.shape)
  else:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  return jnp.where(mask_L[None, :, None], replaced, words)


def masked_predict(stage, mode: str, mask_L: np.ndarray, codes: str,
                   temperature: float | None, seed: int) -> Callable:
  """(variables, batch) -> the task outputs decoded from each image's masked code (and the
  `code` before masking): what the evaluators run. `temperature` None: the task's."""
  oracle = stage.oracle()
  plan = stage.plan({"seed": seed} if temperature is None
                    else {"temperature": temperature, "seed": seed})

  def predict(variables: dict, batch: dict) -> dict:
    oracle_variables = stage.by_name(variables["oracle"])[stage.names[0]]
    if codes == "oracle":
      code = oracle.encode(oracle_variables, batch)[0]
    else:
      code = stage.predict_samples(variables, batch, plan)["code"][:, 0]
    codewords = oracle.codewords(oracle_variables)
    # One key per image from its pixels, apart from the sampler's stream.
    rngs = jax.vmap(jax.random.fold_in, (0, None))(
        decoding.image_rngs(batch["image"], seed), 1)
    vectors = masked_vectors(codewords, code, jnp.asarray(mask_L), mode, rngs)
    return {**oracle.decode(oracle_variables, vectors, context(batch)), "code": code}

  return predict


def code_image(code_L: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """A code as a grid of colours (a hue per word id), at `size` (uint8 RGB)."""
  side = vqvae.grid_side(len(code_L))
  hue = (np.asarray(code_L).reshape(side, side) * 0.618034) % 1.0
  hsv = np.stack([hue, np.full_like(hue, 0.65), np.full_like(hue, 0.95)], -1)
  rgb = np.asarray(Image.fromarray((hsv * 255).astype(np.uint8), "HSV").convert("RGB"))
  return np.asarray(Image.fromarray(rgb).resize(size[::-1], Image.NEAREST))


def outline(image: np.ndarray, code_side: int, side: int) -> np.ndarray:
  """`image` with the masked bottom-right square of `side` words outlined."""
  if not side:
    return image
  pil = Image.fromarray(image)
  height, width = image.shape[:2]
  top, left = height * (code_side - side) // code_side, width * (code_side - side) // code_side
  ImageDraw.Draw(pil).rectangle([left, top, width - 1, height - 1], outline=(255, 230, 0),
                                 width=max(1, height // 64))
  return np.asarray(pil)

def sheets(outputs: dict, batch: dict, task, code_side: int, sides: list[int],
           count: int) -> list[np.ndarray]:
  """A Figure 10 sheet per image: `outputs[mode][side]` are batched task outputs."""
  columns = ["image | truth | code", *(f"{s * s / code_side**2:.0%} masked" for s in sides)]
  result = []
  for i in range(min(count, len(batch["image"]))):
    image = common.to_uint8(batch["image"][i])
    first = [image, task.render_labels(np.asarray(batch["labels"][i]), image),
             code_image(outputs[MODES[0]][sides[0]]["code"][i], image.shape[:2])]
    rows = [[first[r]] + [outline(task.render({k: np.asarray(v[i]) for k, v in
                                               outputs[mode][s].items() if k != "code"}, image),
                                  code_side, s) for s in sides]
            for r, mode in enumerate(MODES)]
    result.append(visualize.contact_sheet(rows, columns, list(MODES), cell_size=128))
  return result


def write_results(rows: list[dict], metric: str, output: Path, title: str) -> list[Path]:
  """masking.md, masking.csv and masking.png (`metric` against the masked fraction)."""
  from matplotlib.figure import Figure

  keys = [k for k in rows[0] if k not in ("mode", "fraction")]
  md = ["| mode | masked | " + " | ".join(keys) + " |", "|" + " --- |" * (len(keys) + 2)]
  md += [f"| {r['mode']} | {r['fraction']:.0%} | " + " | ".join(f"{r[k]:.4g}" for k in keys)
         + " |" for r in rows]
  (output / "masking.md").write_text(f"# {title.replace(chr(10), ': ')}\n\n" + "\n".join(md)
                                    + "\n")
  with open(output / "masking.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, ["mode", "fraction", *keys])
    writer.writeheader()
    writer.writerows(rows)
  fig = Figure(figsize=(5, 3.6))
  ax = fig.subplots()
  for mode in MODES:
    points = [(r["fraction"], r[metric]) for r in rows if r["mode"] == mode]
    ax.plot(*zip(*points, strict=True), "o-", label=mode)
  ax.set_xlabel("fraction of the code masked (bottom-right square)")
  ax.set_ylabel(metric)
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(output / "masking.png", dpi=110)
  return [output / "masking.md", output / "masking.csv", output / "masking.png"]

def run(config, checkpoint: str, source: str, output: Path, *, codes: str, steps: int,
        sheet_count: int, temperature: float | None, seed: int) -> list[Path]:
  """Masks, decodes and scores every mode and region size; the files written."""
  from uvim import trainer

  split = common.input_split(config, source)
  if temperature is not None:
    decoding.Sampling.of(temperature=temperature)  # its domain, before any work
  common.prepare_output(output)
  model = api.Model(config, checkpoint)
  stage = model.stage
  mesh = trainer.make_mesh(config)
  code_side = stage.oracle().code_side
  # Oracle codes need labels, which panoptic's evaluator pp leaves out (it reads its own).
  labelled_pp = config.pp_eval if codes == "oracle" else None
  sides = region_sides(code_side, steps)
  metric, evaluator = model.task.METRIC, api.evaluator_of(config)
  predicts = {mode: {s: masked_predict(stage, mode, masked_region(code_side, s), codes,
                                       temperature, seed) for s in sides} for mode in MODES}
  written = []
  if sheet_count:  # the validation pp: images and labels at the model's resolution
    batches, _ = input_pipeline.eval_data(config, split, config.pp_eval, config.batch_size,
                                          mesh)
    batch = jax.device_get(next(iter(batches)))
    outputs = {m: {s: jax.device_get(jax.jit(p)(model.variables, batch)) for s, p in ps.items()}
               for m, ps in predicts.items()}
    for i, sheet in enumerate(sheets(outputs, batch, model.task, code_side, sides,
                                     sheet_count)):
      written.append(visualize.save_png(output / f"sheet_{i}.png", sheet))
  rows, start, done = [], time.perf_counter(), 0
  total = len(MODES) * (len(sides) - 1) + 1
  for mode in MODES:
    for s in sides:
      if s == 0 and rows:  # nothing masked: every mode decodes the same code
        rows.append({**rows[0], "mode": mode})
        continue
      metrics = api.evaluate(config, predicts[mode][s], model.variables, split, evaluator,
                             pp=labelled_pp)
      rows.append({"mode": mode, "fraction": s * s / code_side**2, **metrics})
      done += 1
      elapsed = time.perf_counter() - start
      print(f"\r{done}/{total} {mode} {rows[-1]['fraction']:.0%}: {metric} "
            f"{metrics[metric]:.4g}; ETA {elapsed / done * (total - done):.0f}s", end="",
            file=sys.stderr, flush=True)
  print(file=sys.stderr)
  title = f"{config.oracle.task}, {config.dataset}:{split}\n{codes} codes masked"
  return written + write_results(rows, metric, output, title)


def main(argv: list[str]) -> None:
  config, source = common.config_and_checkpoint(
      argv, "proj.uvim.lm", "a stage II config (it masks the codes stage II predicts; "
      "--codes=oracle masks its oracle's codes)", "stage II model")
  f = flags.FLAGS
  common.report_written(lambda: run(
      config, source, f.input, Path(f.output), codes=f.codes, steps=f.steps,
      sheet_count=f.sheets, temperature=f.temperature, seed=f.seed))


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
