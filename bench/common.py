"""What every benchmark shares: the record format, timing, the machine and the peaks.

A record is one figure: a dict with `figure` (what is measured), `device`, `devices`,
`config` (the configuration, in words), `value` and `unit` (the headline number), `notes`, and
the measured numbers it derives from (seconds, batch sizes, FLOPs), so that anyone can recompute
the headline from the rest.
"""

import dataclasses
import importlib
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

# Dense bf16 peak FLOP/s per device from the datasheets (no sparsity), matched as substrings of
# `device_kind`, most specific first.
DATASHEET_BF16_PEAK = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12),
                       ("A100", 312e12))


@dataclasses.dataclass(frozen=True)
class ConfigSpec:
  """A training config as `configs/<name>.py:<arg>` plus `--config.<key>=<value>` overrides:
  built here, or passed as flags to a subprocess (scalar values only, for the flags)."""
  name: str
  arg: str = ""
  overrides: tuple[tuple[str, Any], ...] = ()

  def with_overrides(self, overrides: dict[str, Any]) -> "ConfigSpec":
    """This spec with more `{'model.width': 256}`-style overrides."""
    return dataclasses.replace(self, overrides=self.overrides + tuple(overrides.items()))

  def build(self):
    """The config, as train.py would get it from `flags()`."""
    config = importlib.import_module(f"configs.{self.name}").get_config(self.arg)
    for key, value in self.overrides:
      *parents, leaf = key.split(".")
      node = config
      for parent in parents:
        node = node[parent]
      node[leaf] = value
    return config

  def flags(self) -> list[str]:
    arg = f":{self.arg}" if self.arg else ""
    return [f"--config=configs/{self.name}.py{arg}",
            *(f"--config.{k}={v}" for k, v in self.overrides)]


def device_kind() -> str:
  return jax.devices()[0].device_kind


def record(figure: str, config: str, value: float, unit: str, notes: str = "",
           **measured: Any) -> dict:
  """One figure, as printed (a JSON line) and tabulated (a markdown row)."""
  return {"figure": figure, "device": device_kind(), "devices": jax.device_count(),
          "config": config, "value": value, "unit": unit, "notes": notes, **measured}


def si(value: float, unit: str = "") -> str:
  """`value` with three significant digits and an SI prefix: si(1.234e11, "FLOP/s") is
  '123 GFLOP/s'."""
  for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(value) >= scale:
      return f"{value / scale:.3g} {prefix}{unit}"
  return f"{value:.3g} {unit}".strip()


def best_seconds(fn: Callable[[], Any], repeats: int) -> float:
  """The fastest of `repeats` calls of `fn` (its outputs waited for): the least disturbed by
  other work on the machine."""
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best


def cpu_model() -> str:
  """The CPU's name from /proc/cpuinfo (Linux), else what `platform` knows."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine() -> dict:
  """What the figures were measured on."""
  return {"cpu": cpu_model(), "cores": os.cpu_count(), "device": device_kind(),
          "devices": jax.device_count(), "jax": jax.__version__}


def datasheet_peak(kind: str) -> float | None:
  """The datasheet's dense bf16 FLOP/s of one device of this kind, if known."""
  return next((peak for name, peak in DATASHEET_BF16_PEAK if name in kind), None)


def matmul_peak(n: int = 2048, dtype: str = "float32", repeats: int = 5) -> dict:
  """FLOP/s of an n x n x n matmul on one device, best of `repeats`: the practical peak that
  model steps are compared with."""
  a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.dtype(dtype)) for i in range(2))
  matmul = jax.jit(jnp.dot)
  jax.block_until_ready(matmul(a, b))  # compile
  seconds = best_seconds(lambda: matmul(a, b), repeats)
  flops = 2.0 * n**3
  return record("matmul_peak", f"{n}x{n} @ {n}x{n}, {dtype}", flops / seconds, "FLOP/s",
                f"best of {repeats}", n=n, dtype=dtype, seconds=seconds, flops=flops)
