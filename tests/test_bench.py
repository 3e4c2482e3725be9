"""`python -m bench`: every kind of figure, each headline recomputable from its measured numbers,
one markdown row per figure; the gpu suite's full-size configs build."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"figure", "device", "devices", "config", "value", "unit", "notes"}
STEP_FIGURES = ("train_step", "device_scaling", "resolution_scaling")


def run_bench(*args: str) -> subprocess.CompletedProcess:
  """`python -m bench ARGS` on one simulated device (the suite adds devices where it needs)."""
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                 os.environ.get("XLA_FLAGS", ""))
  result = subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=900,
                          env={**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-3000:]
  return result


@pytest.mark.slow
def test_quick_suite_figures_are_consistent_and_tabulated(tmp_path):
  table = tmp_path / "bench.md"
  result = run_bench("--suite=quick", f"--markdown={table}")
  records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
  assert all(set(r) >= KEYS and "error" not in r for r in records)
  by_figure = {}
  for r in records:
    by_figure.setdefault(r["figure"], []).append(r)
  assert set(by_figure) == {"matmul_peak", *STEP_FIGURES, "decoding", "input_pipeline",
                            "panoptic_quality", "label_embedding"}

  (peak,) = by_figure["matmul_peak"]
  assert peak["value"] == pytest.approx(2 * peak["n"] ** 3 / peak["seconds"], rel=1e-9)
  for r in (r for name in STEP_FIGURES for r in by_figure[name]):
    assert r["value"] == r["seconds_per_step"] > 0 and r["flops_per_step"] > 0
    assert r["images_per_second"] == pytest.approx(r["batch_size"] / r["seconds_per_step"])
    assert r["flops_per_second"] == pytest.approx(r["flops_per_step"] / r["seconds_per_step"])
    if r["figure"] != "device_scaling":  # measured with the suite's peak, in this process
      assert r["fraction_of_peak"] == pytest.approx(r["flops_per_second"] / peak["value"])
  (scaled,) = by_figure["device_scaling"]
  assert scaled["devices"] == 2 and scaled["mesh"] == {"data": 2}
  low, high = by_figure["resolution_scaling"]
  assert low["flops_vs_first"] == 1 and 3 < high["flops_vs_first"] < 5  # 4x the pixels

  (embedding,) = by_figure["label_embedding"]  # the indexing removes the one-hot matmuls
  assert embedding["value"] == pytest.approx(
      embedding["one_hot_seconds_per_step"] / embedding["seconds_per_step"])
  removed = embedding["one_hot_xla_flops_per_step"] - embedding["xla_flops_per_step"]
  assert removed == pytest.approx(embedding["removed_flops_formula"], rel=0.05)

  decoding = by_figure["decoding"]
  assert [(r["batch"], r["scheme"], r["steps"]) for r in decoding] == [
      (b, scheme, steps) for b in (1, 4) for scheme, steps in (("ar", 16), ("ar", 16),
                                                                ("maskgit", 2))]
  for r in decoding:
    assert r["value"] == pytest.approx(r["batch"] * r["code_len"] / r["seconds"])
    assert r["seconds_per_image"] == pytest.approx(r["seconds"] / r["batch"])
  for cached, uncached, maskgit in zip(decoding[::3], decoding[1::3], decoding[2::3],
                                       strict=True):
    assert cached["cached"] and not uncached["cached"] and uncached["same_tokens_as_cached"]
    assert uncached["cached_speedup"] == pytest.approx(uncached["seconds"] / cached["seconds"])
    assert maskgit["speedup_vs_ar"] == pytest.approx(cached["seconds"] / maskgit["seconds"])

  pipeline = by_figure["input_pipeline"]
  assert len(pipeline) == 4 and all(
      r["value"] == pytest.approx(r["images"] / r["seconds"]) for r in pipeline)
  ours, theirs = by_figure["panoptic_quality"]
  assert (ours["implementation"], theirs["implementation"]) == ("uvim", "panopticapi")
  assert ours["pq"] == pytest.approx(theirs["pq"], abs=1e-9) and 0 < ours["pq"] < 1

  lines = table.read_text().splitlines()
  assert "cores" in lines[0] and "jax" in lines[0]
  rows = [line.split(" | ") for line in lines if line.startswith("| ")][2:]  # after the header
  assert [row[0][2:] for row in rows] == [r["figure"] for r in records]
  assert all(len(row) == 5 for row in rows)  # figure | configuration | value | unit | notes


def test_gpu_suite_builds_its_full_size_configs():
  result = run_bench("--suite=gpu", "--dry_run")
  built = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
  train = [b for b in built if b["group"] == "train_step"]
  assert len(train) == 4 and all("--config.compute_dtype=bfloat16" in b["flags"] for b in train)
  assert [next(f for f in b["flags"] if "attention" in f) for b in train] == [
      "--config.attention=einsum", "--config.attention=fused"] * 2
  stage1, _, stage2, _ = (b["parameters"] for b in train)
  assert 200e6 < stage1 < 250e6 and 650e6 < stage2 < 750e6  # the paper's sizes (README)
  assert {b["group"] for b in built} >= {"resolution_scaling", "code_length_scaling"}
