"""The toy recipes learn: short `:smoke` runs of both panoptic stages find the objects.

Pins issue 15: with the earlier recipe (a 16-word code mixed by an attention layer, learned
stage II positions) stage II reached PQ things below 2 on the toy scenes however long it trained.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tensorflow_datasets as tfds

import uvim.datasets  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
# A short oracle: things 46 at 600 steps with location ids (51 at 1488; raster ids 43 and 59).
ORACLE_STEPS, ORACLE_PQ_THINGS_FLOOR = 600, 35
# Stage II runs the `:smoke` schedule's 1488 steps at half its batch (16; half the compute, as
# the suite's budget asks): on that oracle things 21.4 and 28.9 (seeds 0, 1; 3.0-3.5 minutes
# on 2 idle cores); this test's earlier batch of 32 reached 25 in 8-9 minutes.
# Cut to 1000 steps at batch 32, its cosine schedule ends as the objects emerge (7).
# The README's recipe (a 1488-step oracle, batch 32): things 39-41 with location ids (seeds 0, 1),
# 22.8-27.4 with raster ids (seeds 0-2).
STAGE2_STEPS, STAGE2_BATCH, STAGE2_PQ_THINGS_FLOOR = 1488, 16, 15


def train(config: str, workdir: Path, data_dir: Path, steps: int, *overrides: str) -> dict:
  """Runs train.py as a user would (one CPU device, XLA's full optimisation) for `steps`;
  returns its PQ metrics at the end."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "JAX_DISABLE_MOST_OPTIMIZATIONS")}
  args = [sys.executable, "train.py", "--config", config, "--workdir", str(workdir),
          f"--config.data_dir={data_dir}", f"--config.total_steps={steps}",
          "--config.evals=[('panoptic_val', 'coco_panoptic')]",
          "--config.panoptic_val.split=validation[:256]",
          "--config.panoptic_val.log_steps=100000", *overrides]
  result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [x for x in lines if "coco_panoptic/PQ" in x][-1]


@pytest.mark.slow
@pytest.mark.timeout(1500)  # two trainings of minutes each (9.5 on 2 busy cores)
def test_smoke_recipes_find_the_objects(tmp_path):
  data_dir = tmp_path / "tfds"
  tfds.builder("toy_scenes/medium", data_dir=data_dir).download_and_prepare()
  oracle = train("configs/panoptic_stage1.py:smoke", tmp_path / "s1", data_dir, ORACLE_STEPS)
  assert oracle["coco_panoptic/PQ_things"] >= ORACLE_PQ_THINGS_FLOOR, oracle
  stage2 = train("configs/panoptic_stage2.py:smoke", tmp_path / "s2", data_dir, STAGE2_STEPS,
                 f"--config.oracle.model_init={tmp_path / 's1'}",
                 f"--config.batch_size={STAGE2_BATCH}")
  assert stage2["coco_panoptic/PQ_things"] >= STAGE2_PQ_THINGS_FLOOR, stage2
