r"""Guiding-code sampling speed: tokens/s and seconds per image, KV-cached vs recomputed.

  python -m bench.decoding [--size bench|smoke|large] [--batch_sizes 1,8] [--code_len 256] \
      [--modes cached,uncached]

"bench" is a CPU-sized stage II model (width 256, 4 layers, 256-px images with 16-px patches,
dictionary 1024); "large" is the paper's (ViT-L, 512 px). Both decoders run the whole code in
one compiled loop; the uncached one recomputes the full decoder at every step (what a decoder
without a cache does). Prints one JSON line per (batch size, mode), compile time excluded; at
temperature 0 the uncached line also says whether both decoders chose the same tokens.
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
            repeats: int = 2, temperature: float = 0.0, dtype: str = "float32",
            notes: str = "") -> list[dict]:
  """One record per (batch size, mode) for a random model of `size` (see SIZES): tokens/s, the
  best of `repeats` (>= 1) calls after compiling. With both modes (cached first), the uncached
  record has the cache's speed-up and, at temperature 0, whether the two chose identical tokens
  (they compute the same logits)."""
  dims = dict(SIZES[size])
  res, patch = dims.pop("res"), dims.pop("patch")
  model = lm.Model(patches={"size": (patch, patch)}, vocab_size=dict_size + 1, seq_len=code_len,
                   input_size=(res, res), dtype=dtype, **dims)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, res, res, 3)),
                               jnp.zeros((1, code_len), jnp.int32))["params"]
  records = []
  for batch in batch_sizes:
    images = jax.random.uniform(jax.random.key(1), (batch, res, res, 3), minval=-1, maxval=1)
    keys = jax.random.split(jax.random.key(2), batch)
    tokens = {}
    for mode in modes:
      fn = jax.jit(lambda p, i, k, c=mode == "cached": decoding.sample(
          model, p, i, k, temperature=temperature, cached=c)[0])
      start = time.perf_counter()
      fn = fn.lower(params, images, keys).compile()
      compile_seconds = time.perf_counter() - start
      start = time.perf_counter()
      tokens[mode] = np.asarray(fn(params, images, keys))
      seconds = min(time.perf_counter() - start,
                    common.best_seconds(partial(fn, params, images, keys), repeats - 1))
      measured = {"size": size, "batch": batch, "code_len": code_len, "cached": mode == "cached",
                  "temperature": temperature, "compute_dtype": dtype, "seconds": seconds,
                  "seconds_per_image": seconds / batch,
                  "tokens_per_second": batch * code_len / seconds,
                  "compile_seconds": compile_seconds}
      details = [f"{seconds / batch:.3g} s per image"]
      if mode == "uncached" and "cached" in tokens:
        cached_seconds = records[-1]["seconds"]
        measured["cached_speedup"] = seconds / cached_seconds
        details.append(f"the cache is x{seconds / cached_seconds:.2f} faster")
        if temperature == 0:
          measured["same_tokens_as_cached"] = bool((tokens["cached"] == tokens[mode]).all())
          details.append("same tokens" if measured["same_tokens_as_cached"]
                         else "tokens differ from the cached decoder's")
      config = (f"{size} ({dims['emb_dim']} wide, {dims['num_layers']} layers, {res} px), "
                f"code {code_len}, batch {batch}, {mode}")
      records.append(common.record("decoding", config, batch * code_len / seconds, "tokens/s",
                                   "; ".join([*details, *([notes] if notes else [])]),
                                   **measured))
  return records


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  for r in measure(f.size, batch_sizes=tuple(map(int, f.batch_sizes)), code_len=f.code_len,
                   dict_size=f.dict_size, modes=tuple(f.modes), repeats=f.repeats,
                   temperature=f.temperature):
    print(json.dumps(r), flush=True)


if __name__ == "__main__":
  flags.DEFINE_enum("size", "bench", list(SIZES), "Model size.")
  flags.DEFINE_list("batch_sizes", ["1", "8"], "Images per call.")
  flags.DEFINE_integer("code_len", 256, "Tokens per code.")
  flags.DEFINE_integer("dict_size", 1024, "Dictionary size (vocabulary - 1).")
  flags.DEFINE_list("modes", ["cached", "uncached"], "Decoders to time.")
  flags.DEFINE_integer("repeats", 2, "Timed calls per figure (the best is kept).")
  flags.DEFINE_float("temperature", 0.0, "Sampling temperature (0: greedy).")
  app.run(main)
