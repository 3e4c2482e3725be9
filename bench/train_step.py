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
import numpy as np
from absl import app, flags

from bench import common
from uvim import cli, sharding
from uvim.tools import plan


def random_inputs(inputs: dict) -> tuple:
  """Arrays for the abstract state, batch and frozen variables, placed by their shardings
  (drawn with numpy: one small jitted draw per shape would cost more than the step)."""
  rng = np.random.default_rng(0)

  def fill(path, x, s):
    if jax.tree_util.keystr(path).endswith("['counts']"):  # stage I word counts: all in use
      value = np.ones(x.shape, x.dtype)
    elif jax.numpy.issubdtype(x.dtype, jax.dtypes.prng_key):
      value = jax.random.key(0)
    elif np.issubdtype(x.dtype, np.floating):
      value = (0.02 * rng.standard_normal(x.shape, np.float32)).astype(x.dtype)
    else:
      value = rng.integers(0, 2, x.shape).astype(x.dtype)
    return jax.device_put(value, s)

  return tuple(jax.tree_util.tree_map_with_path(fill, inputs[k], inputs["shardings"][k])
               for k in ("state", "batch", "frozen"))


def describe(config) -> str:
  """A config's model, sizes and options in a few words, for the figure tables."""
  m = config.model
  if config.model_name == "proj.uvim.lm":
    size = (f"stage II: width {m.emb_dim}, {m.num_layers}+{m.num_layers} layers, "
            f"{m.input_size[0]} px / {m.patches['size'][0]}, code {m.seq_len}, "
            f"vocab {m.vocab_size}")
  else:
    heads = sorted((c for c, _ in m.inputs.values()), reverse=True)
    size = (f"stage I: width {m.width}, {m.oracle_depth}+{m.base_model_depth} layers, "
            f"{m.input_size[0]} px / {m.patch_size[0]}, code {m.code_len}, dict {m.dict_size}, "
            f"heads {'/'.join(map(str, heads))}")
  options = [o for o, on in (("remat", config.remat), ("scan", config.scan_layers),
                             ("fused attention", config.attention == "fused"),
                             (f"accum {config.grad_accum_steps}", config.grad_accum_steps > 1))
             if on]
  dtype = config.compute_dtype
  return ", ".join([size, f"batch {config.batch_size}", dtype, *options])


def measure(config, *, figure: str = "train_step", steps: int = 5,
            peak_flops: float | None = None, notes: str = "") -> dict:
  """Times `steps` training steps of `config` on all devices (after a warm-up one).

  `peak_flops` is one device's measured matmul FLOP/s; the achieved FLOP/s is reported as a
  fraction of it (of it times the device count for accelerators: simulated CPU devices share
  the same cores), and as MFU against the datasheet peak where the device kind is known.
  """
  mesh = sharding.make_mesh(config.mesh)
  start = time.perf_counter()
  compiled, inputs = plan.compile_step(config, mesh)
  compile_seconds = time.perf_counter() - start
  state, batch, frozen = random_inputs(inputs)
  state, metrics = compiled(state, batch, frozen)  # warm-up
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch, frozen)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  seconds = float(np.median(times))
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  # The model's FLOPs (see uvim.tools.plan): XLA's count of the compiled step sees a scanned
  # layer or micro-batch once and counts remat's recomputation.
  flops = plan.model_flops(config, mesh)
  memory = compiled.memory_analysis()
  parallel = 1 if jax.devices()[0].platform == "cpu" else jax.device_count()
  measured = {
      "model": config.model_name, "batch_size": config.batch_size, "mesh": dict(mesh.shape),
      "compute_dtype": config.compute_dtype,
      "remat": config.remat, "grad_accum_steps": config.grad_accum_steps,
      "seconds_per_step": seconds, "images_per_second": config.batch_size / seconds,
      "flops_per_step": flops, "flops_per_second": flops / seconds,
      "xla_flops_per_step": float(cost.get("flops", 0.0)) * mesh.size,
      "temp_bytes_per_device": memory.temp_size_in_bytes, "compile_seconds": compile_seconds}
  derived = [f"{config.batch_size / seconds:.3g} images/s", common.si(flops, "FLOP/step"),
             common.si(flops / seconds, "FLOP/s")]
  if peak_flops:
    measured["fraction_of_peak"] = flops / seconds / (peak_flops * parallel)
    derived.append(f"{measured['fraction_of_peak']:.1%} of the matmul peak")
  datasheet = common.datasheet_peak(common.device_kind())
  if datasheet:
    measured["mfu"] = flops / seconds / (datasheet * jax.device_count())
    derived.append(f"MFU {measured['mfu']:.1%}")
  return common.record(figure, describe(config), seconds, "s/step",
                       "; ".join([*derived, *([notes] if notes else [])]), **measured)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  print(json.dumps(measure(flags.FLAGS.config, steps=flags.FLAGS.steps)), flush=True)


if __name__ == "__main__":
  cli.define_config_flag()
  flags.DEFINE_integer("steps", 5, "Timed steps.")
  app.run(main, flags_parser=cli.parse_flags)
