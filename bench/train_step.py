r"""Training-step time of a config on this machine, with the memory and speed options.

  python -m bench.train_step --config configs/panoptic_stage1.py:smoke \
      [--config.remat=True] [--config.compute_dtype=bfloat16] [--config.grad_accum_steps=2]

Compiles the real step (`uvim.tools.plan.compile_step`: same model, loss, optimizer, shardings
and donation as train.py) for the config's mesh over this process's devices, feeds it random
inputs of the right shapes, and prints one JSON line: seconds per step (median of `--steps`
after one warm-up), images/s, XLA's FLOPs per step, achieved FLOP/s and the memory analysis.
"""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from uvim import cli, sharding
from uvim.tools import plan

_CONFIG = cli.define_config_flag()
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps.")


def random_inputs(inputs: dict) -> tuple:
  """Arrays for the abstract state, batch and frozen variables, placed by their shardings."""
  keys = iter(jax.random.split(jax.random.key(0), 10_000))

  def fill(path, x, s):
    if jax.tree_util.keystr(path).endswith("['counts']"):  # stage I word counts: all in use
      value = jnp.ones(x.shape, x.dtype)
    elif jnp.issubdtype(x.dtype, jnp.floating):
      value = 0.02 * jax.random.normal(next(keys), x.shape, x.dtype)
    elif jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      value = jax.random.key(0)
    else:
      value = jax.random.randint(next(keys), x.shape, 0, 2).astype(x.dtype)
    return jax.device_put(value, s)

  return tuple(jax.tree_util.tree_map_with_path(fill, inputs[k], inputs["shardings"][k])
               for k in ("state", "batch", "frozen"))


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  mesh = sharding.make_mesh(config.get("mesh") or [("data", -1)])
  start = time.perf_counter()
  compiled, inputs = plan.compile_step(config, mesh)
  compile_seconds = time.perf_counter() - start
  state, batch, frozen = random_inputs(inputs)
  state, metrics = compiled(state, batch, frozen)  # warm-up
  jax.block_until_ready(metrics)
  times = []
  for _ in range(_STEPS.value):
    start = time.perf_counter()
    state, metrics = compiled(state, batch, frozen)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  seconds = float(np.median(times))
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  flops = float(cost.get("flops", 0.0)) * jax.device_count()
  memory = compiled.memory_analysis()
  print(json.dumps({
      "figure": "train_step", "model": config.model_name, "batch_size": config.batch_size,
      "mesh": dict(mesh.shape), "compute_dtype": config.get("compute_dtype") or "float32",
      "remat": bool(config.get("remat")), "grad_accum_steps": config.get("grad_accum_steps") or 1,
      "device": jax.devices()[0].device_kind, "seconds_per_step": seconds,
      "images_per_second": config.batch_size / seconds, "flops_per_step": flops,
      "flops_per_second": flops / seconds, "temp_bytes_per_device": memory.temp_size_in_bytes,
      "compile_seconds": compile_seconds}), flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
