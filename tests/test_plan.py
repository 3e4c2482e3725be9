"""The planner: compiles the real training step from shapes and reports per-device figures."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from configs import panoptic_stage2
from uvim import sharding
from uvim.tools import plan

ROOT = Path(__file__).resolve().parents[1]


def small_stage2(batch_size):
  config = panoptic_stage2.get_config("smoke")
  config.batch_size = batch_size
  return config


@pytest.mark.slow
def test_fsdp_divides_parameters_and_batch_scales_flops():
  data = plan.plan(small_stage2(16), sharding.make_mesh([("data", 8)]))
  fsdp = plan.plan(small_stage2(16), sharding.make_mesh([("data", 2), ("fsdp", 4)]))
  double = plan.plan(small_stage2(32), sharding.make_mesh([("data", 2), ("fsdp", 4)]))
  assert data["parameters"] == fsdp["parameters"] > 0
  assert data["param_bytes_per_device"] == 4 * data["parameters"]  # float32, replicated
  assert fsdp["param_bytes_per_device"] < 0.3 * data["param_bytes_per_device"]
  assert fsdp["frozen_bytes_per_device"] < 0.3 * data["frozen_bytes_per_device"]
  assert 1.8 < double["flops_per_device_step"] / fsdp["flops_per_device_step"] < 2.2
  assert double["temp_bytes"] > fsdp["temp_bytes"]


def test_cli_simulates_the_mesh_and_prints_json():
  result = subprocess.run(
      [sys.executable, "-m", "uvim.tools.plan", "--config", "configs/panoptic_stage1.py:smoke",
       "--mesh", "data=2,fsdp=2", "--config.batch_size=8"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  figures = json.loads(result.stdout.strip().splitlines()[-1])
  assert figures["mesh"] == {"data": 2, "fsdp": 2} and figures["batch_size"] == 8
  assert figures["flops_per_device_step"] > 0 and figures["peak_bytes_estimate"] > 0
  assert "params / device" in result.stdout


@pytest.mark.slow
def test_model_flops_count_every_layer_and_micro_batch_once():
  """The planner's FLOPs are those of the plain step whatever scan/remat/accumulation do to the
  compiled program, in which XLA counts a loop body once."""
  mesh = sharding.make_mesh([("data", 8)])
  base = plan.model_flops(small_stage2(16), mesh)
  compiled, _ = plan.compile_step(small_stage2(16), mesh)
  # The partitioned program adds a little (collectives, per-device reductions).
  assert compiled.cost_analysis()["flops"] * mesh.size == pytest.approx(base, rel=0.1)
  looped = small_stage2(16)
  looped.scan_layers, looped.remat, looped.grad_accum_steps = True, True, 2
  assert plan.model_flops(looped, mesh) == base
  compiled, _ = plan.compile_step(looped, mesh)
  assert compiled.cost_analysis()["flops"] * mesh.size < 0.8 * base
