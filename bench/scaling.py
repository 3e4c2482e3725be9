"""How the cost of a training step grows with devices, image resolution and code length.

Simulated CPU devices are fixed when XLA starts, so each device count runs `bench.train_step`
in its own process (same config and global batch); resolution and code length run in this one.
Each record says how its FLOPs and time compare with the sweep's first point.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from bench import common, train_step

ROOT = Path(__file__).resolve().parents[1]


def _with_ratios(records: list[dict], what: str) -> list[dict]:
  """Adds each point's FLOPs and time relative to the first point to its record and notes."""
  first = records[0]
  for r in records:
    r["flops_vs_first"] = r["flops_per_step"] / first["flops_per_step"]
    r["time_vs_first"] = r["seconds_per_step"] / first["seconds_per_step"]
    r["notes"] = (f"x{r['flops_vs_first']:.2f} FLOPs, x{r['time_vs_first']:.2f} time vs "
                  f"{what}; " + r["notes"])
  return records


def device_count_flags(devices: int) -> str:
  """XLA_FLAGS of this process with `devices` simulated CPU devices instead of any count set."""
  kept = [f for f in os.environ.get("XLA_FLAGS", "").split()
          if not f.startswith("--xla_force_host_platform_device_count")]
  return " ".join([*kept, f"--xla_force_host_platform_device_count={devices}"])


def devices(spec: common.ConfigSpec, counts: tuple[int, ...] = (1, 2, 4, 8), *,
            steps: int = 3, timeout: float = 600) -> list[dict]:
  """The step of `spec` on each count of simulated CPU devices (data parallel, same global
  batch): one subprocess each."""
  records = []
  for n in counts:
    env = {**os.environ, "XLA_FLAGS": device_count_flags(n), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-m", "bench.train_step", *spec.flags(),
                             f"--steps={steps}"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=timeout, check=False)
    if result.returncode:
      raise RuntimeError(f"bench.train_step on {n} devices failed:\n{result.stderr[-3000:]}")
    r = json.loads(result.stdout.strip().splitlines()[-1])
    r.update(figure="device_scaling", config=f"{n} simulated CPU devices; {r['config']}")
    records.append(r)
  return _with_ratios(records, f"{counts[0]} device(s)")


def sweep(figure: str, specs: list[common.ConfigSpec], *, steps: int = 3,
          peak_flops: float | None = None) -> list[dict]:
  """The step of each spec (one setting growing along `specs`), in this process."""
  records = [train_step.measure(s.build(), figure=figure, steps=steps, peak_flops=peak_flops)
             for s in specs]
  return _with_ratios(records, "the first")
