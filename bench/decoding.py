r"""Guiding-code sampling speed: tokens/s and seconds per image, KV-cached vs recomputed
autoregressive decoding, and parallel decoding (MaskGIT, ROAR) in a few steps.

  python -m bench.decoding [--size bench|smoke|large] [--batch_sizes 1,8] [--code_len 256] \
      [--modes cached,uncached,maskgit,roar] [--steps 1,2,4,8,16] [--plot decoding.png]

"bench" is a CPU-sized stage II model (width 256, 4 layers, 256-px images with 16-px patches,
dictionary 1024); "large" is the paper's (ViT-L, 512 px). Both decoders run the whole code in
one compiled loop; the uncached one recomputes the full decoder at every step (what a decoder
without a cache does). Prints one JSON line per (batch size, mode), compile time excluded; at
temperature 0 the uncached line also says whether both decoders chose the same tokens.
`maskgit` / `roar` time the `:masked` configs' model of the same size (the same parameters and
the neighbour view's kernel) at each of --steps,
with the speed-up over the cached autoregressive decoder of the same batch; --plot draws seconds
per image against steps, a line per batch size, the autoregressive time dashed.
"""

import json
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from bench import common
from uvim import decoding
from uvim.models import lm

SIZES = {
    "tiny": dict(num_layers=1, num_heads=2, mlp_dim=128, emb_dim=64, res=32, patch=8),
    "smoke": dict(num_layers=2, num_heads=4, mlp_dim=512, emb_dim=128, res=64, patch=8),
    "bench": dict(num_layers=4, num_heads=4, mlp_dim=1024, emb_dim=256, res=256, patch=16),
    "large": dict(num_layers=24, num_heads=16, mlp_dim=4096, emb_dim=1024, res=512, patch=16),
}


def measure(size: str = "bench", *, batch_sizes: tuple[int, ...] = (1, 8), code_len: int = 256,
            dict_size: int = 1024, modes: tuple[str, ...] = ("cached", "uncached"),
            steps: tuple[int, ...] = (1, 4, 8), repeats: int = 2, temperature: float = 0.0,
            dtype: str = "float32", notes: str = "") -> list[dict]:
  """One record per (batch size, mode[, steps]) for a random model of `size` (see SIZES):
  tokens/s, the best of `repeats` (>= 1) calls after compiling. With both modes (cached first),
  the uncached record has the cache's speed-up and, at temperature 0, whether the two chose
  identical tokens (they compute the same logits); parallel records (`maskgit`, `roar`, after
  `cached`) have their speed-up over it."""
  dims = dict(SIZES[size])
  res, patch = dims.pop("res"), dims.pop("patch")
  model = lm.Model(patches={"size": (patch, patch)}, vocab_size=dict_size + 1, seq_len=code_len,
                   input_size=(res, res), dtype=dtype, **dims)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, res, res, 3)),
                               jnp.zeros((1, code_len), jnp.int32))["params"]
  # The `:masked` configs' model, decoded in parallel: the same parameters and the neighbour
  # view's kernel (a square code).
  masked = model.clone(masked=True, neighbour_tokens=True)
  masked_params = {**params, "decoder": {**params["decoder"], "NeighbourTokens": {
      "kernel": jnp.zeros((3, 3, dims["emb_dim"], dims["emb_dim"]))}}}
  records = []
  for batch in batch_sizes:
    images = jax.random.uniform(jax.random.key(1), (batch, res, res, 3), minval=-1, maxval=1)
    keys = jax.random.split(jax.random.key(2), batch)
    tokens, ar_seconds = {}, None
    runs = [(mode, model, params, dict(cached=mode == "cached"))
            if mode in ("cached", "uncached")
            else (mode, masked, masked_params, dict(scheme=mode, steps=n)) for mode in modes
            for n in (steps if mode in ("maskgit", "roar") else (None,))]
    for mode, run_model, run_params, options in runs:
      fn = jax.jit(lambda p, i, k, m=run_model, o=options: decoding.sample(
          m, p, i, k, temperature=temperature, **o)[0])
      start = time.perf_counter()
      fn = fn.lower(run_params, images, keys).compile()
      compile_seconds = time.perf_counter() - start
      start = time.perf_counter()
      tokens[mode] = np.asarray(fn(run_params, images, keys))
      seconds = min(time.perf_counter() - start,
                    common.best_seconds(partial(fn, run_params, images, keys), repeats - 1))
      measured = {"size": size, "batch": batch, "code_len": code_len, "cached": mode == "cached",
                  "scheme": "ar" if "cached" in options else mode,
                  "steps": options.get("steps", code_len),
                  "temperature": temperature, "compute_dtype": dtype, "seconds": seconds,
                  "seconds_per_image": seconds / batch,
                  "tokens_per_second": batch * code_len / seconds,
                  "compile_seconds": compile_seconds}
      details = [f"{seconds / batch:.3g} s per image"]
      if mode == "cached":
        ar_seconds = seconds
      if mode == "uncached" and ar_seconds:
        measured["cached_speedup"] = seconds / ar_seconds
        details.append(f"the cache is x{seconds / ar_seconds:.2f} faster")
        if temperature == 0 and "cached" in tokens:
          measured["same_tokens_as_cached"] = bool((tokens["cached"] == tokens[mode]).all())
          details.append("same tokens" if measured["same_tokens_as_cached"]
                         else "tokens differ from the cached decoder's")
      if "steps" in options and ar_seconds:
        measured["speedup_vs_ar"] = ar_seconds / seconds
        details.append(f"x{ar_seconds / seconds:.2f} the cached autoregressive decoder")
      name = mode if "steps" not in options else f"{mode} {options['steps']} steps"
      config = (f"{size} ({dims['emb_dim']} wide, {dims['num_layers']} layers, {res} px), "
                f"code {code_len}, batch {batch}, {name}")
      records.append(common.record("decoding", config, batch * code_len / seconds, "tokens/s",
                                   "; ".join([*details, *([notes] if notes else [])]),
                                   **measured))
  return records


def plot(records: list[dict], path: str) -> None:
  """Seconds per image against parallel steps, a line per scheme and batch size; the cached
  autoregressive decoder of each batch size dashed."""
  import matplotlib
  from matplotlib.figure import Figure

  fig = Figure(figsize=(6.5, 4.2))
  ax = fig.subplots()
  batches = sorted({r["batch"] for r in records})
  palette = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
  colors = dict(zip(batches, palette, strict=False))
  for batch in batches:
    for scheme, style in (("maskgit", "o-"), ("roar", "s:")):
      points = [(r["steps"], r["seconds_per_image"]) for r in records
                if r["batch"] == batch and r["scheme"] == scheme]
      if points:
        ax.plot(*zip(*points, strict=True), style, color=colors[batch],
                label=f"{scheme}, batch {batch}")
    for r in records:
      if r["batch"] == batch and r["scheme"] == "ar" and r["cached"]:
        ax.axhline(r["seconds_per_image"], linestyle="--", color=colors[batch],
                   label=f"autoregressive ({r['code_len']} steps), batch {batch}")
  first = records[0]
  ax.set_xscale("log", base=2)
  steps = sorted({r["steps"] for r in records if r["scheme"] != "ar"})
  ax.set_xticks(steps, [str(n) for n in steps])
  ax.set_yscale("log")
  ax.set_xlabel("parallel decoding steps")
  ax.set_ylabel("seconds per image")
  ax.set_title(f"Sampling a {first['code_len']}-token code, {first['size']} model "
               f"({jax.devices()[0].platform})", fontsize=10)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  records = measure(f.size, batch_sizes=tuple(map(int, f.batch_sizes)), code_len=f.code_len,
                    dict_size=f.dict_size, modes=tuple(f.modes),
                    steps=tuple(map(int, f.steps)), repeats=f.repeats,
                    temperature=f.temperature)
  for r in records:
    print(json.dumps(r), flush=True)
  if f.plot:
    plot(records, f.plot)


if __name__ == "__main__":
  flags.DEFINE_enum("size", "bench", list(SIZES), "Model size.")
  flags.DEFINE_list("batch_sizes", ["1", "8"], "Images per call.")
  flags.DEFINE_integer("code_len", 256, "Tokens per code.")
  flags.DEFINE_integer("dict_size", 1024, "Dictionary size (vocabulary - 1).")
  flags.DEFINE_list("modes", ["cached", "uncached"],
                    "Decoders to time: cached, uncached, maskgit, roar.")
  flags.DEFINE_list("steps", ["1", "4", "8"], "Steps of the parallel decoders.")
  flags.DEFINE_string("plot", None, "Write a PNG of seconds per image against steps here.")
  flags.DEFINE_integer("repeats", 2, "Timed calls per figure (the best is kept).")
  flags.DEFINE_float("temperature", decoding.Sampling.temperature,
                     "Sampling temperature (0: greedy).")
  app.run(main)
