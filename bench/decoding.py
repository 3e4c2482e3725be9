r"""Guiding-code sampling speed: tokens/s and seconds per image, KV-cached vs recomputed.

  python -m bench.decoding [--size bench|smoke|large] [--batch_sizes 1,8] [--code_len 256]

"bench" is a CPU-sized stage II model (width 256, 4 layers, 256-px images with 16-px patches,
dictionary 1024); "large" is the paper's (ViT-L, 512 px). Both decoders run the whole code in
one compiled loop; the uncached one recomputes the full decoder at every step (what a decoder
without a cache does). Prints one JSON line per (batch size, mode), compile time excluded.
"""

import json
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from uvim import decoding
from uvim.models import lm

SIZES = {
    "smoke": dict(num_layers=2, num_heads=4, mlp_dim=512, emb_dim=128, res=64, patch=8),
    "bench": dict(num_layers=4, num_heads=4, mlp_dim=1024, emb_dim=256, res=256, patch=16),
    "large": dict(num_layers=24, num_heads=16, mlp_dim=4096, emb_dim=1024, res=512, patch=16),
}
_SIZE = flags.DEFINE_enum("size", "bench", list(SIZES), "Model size.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "8"], "Images per call.")
_CODE_LEN = flags.DEFINE_integer("code_len", 256, "Tokens per code.")
_DICT_SIZE = flags.DEFINE_integer("dict_size", 1024, "Dictionary size (vocabulary - 1).")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed calls per figure (the best is kept).")


def main(argv: list[str]) -> None:
  del argv
  size = dict(SIZES[_SIZE.value])
  res, patch = size.pop("res"), size.pop("patch")
  model = lm.Model(patches={"size": (patch, patch)}, vocab_size=_DICT_SIZE.value + 1,
                   seq_len=_CODE_LEN.value, input_size=(res, res), **size)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, res, res, 3)),
                               jnp.zeros((1, _CODE_LEN.value), jnp.int32))["params"]
  for batch in map(int, _BATCH_SIZES.value):
    images = jax.random.uniform(jax.random.key(1), (batch, res, res, 3), minval=-1, maxval=1)
    keys = jax.random.split(jax.random.key(2), batch)
    for cached in (True, False):
      fn = jax.jit(lambda p, i, k, c=cached: decoding.sample(model, p, i, k, temperature=1.0,
                                                              cached=c)[0])
      start = time.perf_counter()
      fn(params, images, keys).block_until_ready()
      compile_s = time.perf_counter() - start
      best = float("inf")
      for _ in range(_REPEATS.value):
        start = time.perf_counter()
        fn(params, images, keys).block_until_ready()
        best = min(best, time.perf_counter() - start)
      print(json.dumps({
          "figure": "decoding", "size": _SIZE.value, "device": jax.devices()[0].device_kind,
          "batch": batch, "code_len": _CODE_LEN.value, "cached": cached,
          "seconds_per_image": best / batch, "tokens_per_second": batch * _CODE_LEN.value / best,
          "compile_seconds": compile_s}), flush=True)


if __name__ == "__main__":
  app.run(main)
