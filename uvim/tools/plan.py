r"""Sizes a training run before renting hardware: memory and FLOPs per device on a mesh.

  python -m uvim.tools.plan --config configs/panoptic_stage2.py --mesh data=16,fsdp=4 \
      [--config.batch_size=512] [--config.grad_accum_steps=4]

Simulates the mesh's devices on this machine's CPU, builds the config's training step exactly as
train.py does (same shardings, donation, model and optimizer) from shapes only — no data, no
checkpoints — and compiles it. Prints per-device parameter and optimizer bytes (from the
shardings), XLA's memory analysis (arguments, outputs, temporaries: the activations) and FLOPs
per step, as a table and one JSON line.

FLOPs are the model's: XLA's cost analysis of the same step lowered unscanned, without remat or
gradient accumulation (XLA counts a loop body once, so the compiled step's own figure undercounts
scanned layers and micro-batches; remat's recomputation is not useful work). `xla_flops` is the
compiled step's count, as XLA sees it.
"""

import os
import sys


def _mesh_from_argv(argv: list[str]) -> list[tuple[str, int]]:
  """`--mesh data=8,fsdp=4` -> [('data', 8), ('fsdp', 4)] (read before JAX starts)."""
  value = next((a.split("=", 1)[1] for a in argv if a.startswith("--mesh=")), None)
  if value is None and "--mesh" in argv:
    value = argv[argv.index("--mesh") + 1]
  axes = []
  for piece in (value or "data=1").split(","):
    name, _, size = piece.partition("=")
    if not size.lstrip("-").isdigit():
      sys.exit(f"--mesh: expected name=size pairs like data=8,fsdp=4, got {value!r}")
    axes.append((name.strip(), int(size)))
  return axes


if __name__ == "__main__":  # as a command: simulate the mesh's devices (JAX not started yet)
  _devices = 1
  for _, _size in _mesh_from_argv(sys.argv):
    _devices *= max(_size, 1)
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={_devices}")

import json  # noqa: E402  (JAX must see XLA_FLAGS first)
import time  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from uvim import cli, sharding, stages, trainer  # noqa: E402


def sharded_bytes(tree, shardings) -> int:
  """Bytes one device holds of `tree` (shapes) under `shardings`."""
  return sum(int(np.prod(s.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
             for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True))


def lower_step(config, mesh) -> tuple[Any, dict]:
  """The training step of `config` on `mesh` (`trainer.build_step`, as train.py runs it),
  lowered from shapes; and the abstract inputs {'state', 'batch', 'frozen'} with their
  shardings."""
  stage = stages.get_stage(config)
  step = trainer.build_step(config, stage, mesh, total_steps=10_000)
  state, frozen = step.abstract_state, stage.frozen_shapes()
  batch = stage.abstract_batch(config.batch_size)
  shardings = {"state": step.state_sharding,
               "batch": jax.tree.map(lambda _: step.batch_sharding, batch),
               "frozen": step.frozen_sharding}
  inputs = {"state": state, "batch": batch, "frozen": frozen, "shardings": shardings}
  return step.fn.lower(state, batch, frozen), inputs


def compile_step(config, mesh) -> tuple[Any, dict]:
  """`lower_step`, compiled."""
  lowered, inputs = lower_step(config, mesh)
  return lowered.compile(), inputs


def model_flops(config, mesh) -> float:
  """FLOPs of one training step over the whole mesh (see the module docstring): the step
  lowered without scan, remat or gradient accumulation (not compiled)."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.scan_layers, config.remat, config.grad_accum_steps = False, False, 1
  lowered, _ = lower_step(config, mesh)
  return float(lowered.cost_analysis()["flops"])


def plan(config, mesh) -> dict:
  """Compiles the training step of `config` on `mesh` from shapes; returns the figures."""
  start = time.perf_counter()
  compiled, inputs = compile_step(config, mesh)
  compile_seconds = time.perf_counter() - start
  state, frozen, shardings = inputs["state"], inputs["frozen"], inputs["shardings"]
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  return {
      "model": config.model_name, "mesh": dict(mesh.shape), "batch_size": config.batch_size,
      "parameters": params,
      "param_bytes_per_device": sharded_bytes(state.params, shardings["state"].params),
      "optimizer_bytes_per_device": sharded_bytes(state.opt_state,
                                                  shardings["state"].opt_state),
      "frozen_bytes_per_device": sharded_bytes(frozen, shardings["frozen"]),
      "argument_bytes": memory.argument_size_in_bytes,
      "output_bytes": memory.output_size_in_bytes,
      "temp_bytes": memory.temp_size_in_bytes,
      "peak_bytes_estimate": (memory.argument_size_in_bytes + memory.output_size_in_bytes
                              + memory.temp_size_in_bytes - memory.alias_size_in_bytes),
      "flops_per_device_step": model_flops(config, mesh) / mesh.size,
      "xla_flops_per_device_step": float(cost.get("flops", 0.0)),
      "compile_seconds": compile_seconds,
  }


def _gib(n: float) -> str:
  """Bytes in the largest binary unit that keeps a leading digit."""
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{n:.0f} B"


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  mesh = sharding.make_mesh(_mesh_from_argv(sys.argv))
  try:
    trainer.grad_accum_steps(flags.FLAGS.config, mesh)
  except ValueError as e:
    sys.exit(f"--config.batch_size: {e}")
  figures = plan(flags.FLAGS.config, mesh)
  rows = [("parameters", f"{figures['parameters'] / 1e6:.1f} M"),
          ("params / device", _gib(figures["param_bytes_per_device"])),
          ("optimizer / device", _gib(figures["optimizer_bytes_per_device"])),
          ("frozen oracle / device", _gib(figures["frozen_bytes_per_device"])),
          ("temporaries (activations) / device", _gib(figures["temp_bytes"])),
          ("peak estimate / device", _gib(figures["peak_bytes_estimate"])),
          ("model TFLOPs / device / step", f"{figures['flops_per_device_step'] / 1e12:.3g}"),
          ("XLA TFLOPs / device / step", f"{figures['xla_flops_per_device_step'] / 1e12:.3g}"),
          ("compile", f"{figures['compile_seconds']:.0f} s")]
  print(f"{figures['model']} on mesh {figures['mesh']}, global batch {figures['batch_size']}")
  for name, value in rows:
    print(f"  {name:<36} {value}")
  print(json.dumps(figures))


if __name__ == "__main__":  # flags only for the command: bench.train_step imports this module
  cli.define_config_flag()
  flags.DEFINE_string("mesh", "data=1", "Mesh axes and sizes, e.g. data=8,fsdp=4.")
  app.run(main, flags_parser=cli.parse_flags)
