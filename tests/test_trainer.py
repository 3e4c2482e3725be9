"""The trainer end to end on toy scenes: resume equality, 1 vs 8 devices, errors."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from configs import panoptic_stage1
from uvim import checkpoint, input_pipeline, trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(width=32, mlp_dim=64, num_heads=2, oracle_depth=1, base_model_depth=1, code_len=16,
            dict_size=16, codeword_dim=8)


def tiny_config(data_dir, **overrides):
  c = panoptic_stage1.get_config("smoke")
  c.dataset, c.data_dir = "toy_scenes/tiny", str(data_dir)
  c.train_split, c.val_split = "train", "validation"
  c.batch_size, c.total_steps = 8, 6
  c.log_training_steps, c.log_eval_steps, c.checkpoint_steps = 1, 3, 3
  c.model.update(TINY)
  c.panoptic_val.split = "validation[:8]"
  # One PQ evaluator, not the config's three (on other splits of the same data: each evaluation
  # predicts and scores three times); test_images.py tests the images evaluator.
  c.evals = [(name, kind) for name, kind in c.evals if name in ("val", "panoptic_val")]
  c.update(overrides)
  return c


def losses(workdir):
  lines = [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return {x["step"]: x["training_loss"] for x in lines if "training_loss" in x}


@pytest.mark.slow
def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(toy_data_dir, tmp_path,
                                                               monkeypatch):
  straight = trainer.train_and_evaluate(tiny_config(toy_data_dir), tmp_path / "a")
  assert sorted(losses(tmp_path / "a")) == [1, 2, 3, 4, 5, 6]
  final = [json.loads(x) for x in (tmp_path / "a/metrics.jsonl").read_text().splitlines()]
  assert any("coco_panoptic/PQ" in x and x["step"] == 6 for x in final)
  assert (tmp_path / "a/config.json").is_file() and (tmp_path / "a/params.npz").is_file()
  assert list((tmp_path / "a").glob("events.out.tfevents.*"))

  # Kill the second run while it fetches the batch of step 5 (step 3 is checkpointed).
  original, calls = input_pipeline.GlobalBatches.__next__, []

  def dying_next(self):
    calls.append(1)
    if len(calls) == 5:
      raise KeyboardInterrupt("killed")
    return original(self)

  monkeypatch.setattr(input_pipeline.GlobalBatches, "__next__", dying_next)
  with pytest.raises(KeyboardInterrupt):
    trainer.train_and_evaluate(tiny_config(toy_data_dir), tmp_path / "b")
  monkeypatch.setattr(input_pipeline.GlobalBatches, "__next__", original)
  resumed = trainer.train_and_evaluate(tiny_config(toy_data_dir), tmp_path / "b")

  assert int(resumed.step) == 6
  for a, b in zip(checkpoint.flatten(straight.params).values(),
                  checkpoint.flatten(resumed.params).values(), strict=True):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(straight.model_state["dictionary"],
                                resumed.model_state["dictionary"])
  assert losses(tmp_path / "a")[6] == losses(tmp_path / "b")[6]
  steps = [json.loads(x)["step"] for x in (tmp_path / "b/metrics.jsonl").read_text().splitlines()
           if "training_loss" in json.loads(x)]
  assert steps == [1, 2, 3, 4, 5, 6]  # step 4 of the killed run was logged once, not twice

  # Its exported big_vision npz (params and dictionary) initialises a new run exactly.
  imported = trainer.train_and_evaluate(
      tiny_config(toy_data_dir, total_steps=0, model_init=str(tmp_path / "a/params.npz")),
      tmp_path / "c")
  for a, b in zip(checkpoint.flatten(straight.params).values(),
                  checkpoint.flatten(imported.params).values(), strict=True):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(straight.model_state["counts"], imported.model_state["counts"])

  # Rerunning the finished run evaluates again and replaces its final evaluation lines.
  def final_evals():
    return [x for x in map(json.loads, (tmp_path / "a/metrics.jsonl").read_text().splitlines())
            if x["step"] == 6 and "training_loss" not in x]
  before = final_evals()
  trainer.train_and_evaluate(tiny_config(toy_data_dir), tmp_path / "a")
  assert len(final_evals()) == len(before) == len(tiny_config(toy_data_dir).evals)

  # The same workdir with a different model refuses to resume and names the keys and values.
  with pytest.raises(ValueError, match=r"different config \(model\.width: 32 recorded, 64 now"):
    trainer.train_and_evaluate(tiny_config(toy_data_dir, model=dict(TINY, width=64)),
                               tmp_path / "a")


@pytest.mark.slow
def test_divergence_stops_with_the_step_and_keeps_the_last_good_checkpoint(toy_data_dir,
                                                                           tmp_path):
  config = tiny_config(toy_data_dir, lr=1e30, checkpoint_steps=1, grad_clip_norm=0.0,
                       schedule=dict(decay_type="constant", warmup_steps=0))
  with pytest.raises(trainer.TrainingDivergedError, match=r"at step (\d+).*step (\d+)\) is kept"):
    trainer.train_and_evaluate(config, tmp_path)
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps and all(np.isfinite(v) for v in losses(tmp_path).values())


def test_unknown_config_keys_are_rejected(toy_data_dir, tmp_path):
  config = tiny_config(toy_data_dir)
  config.unlock()
  config.num_epoch = 3
  with pytest.raises(ValueError, match="Unknown config key 'num_epoch'; did you mean 'num_epochs'"):
    trainer.train_and_evaluate(config, tmp_path)


def test_total_steps_from_epochs():
  config = panoptic_stage1.get_config()
  assert trainer.total_steps_of(config, 113_287) == 1000 * 113_287 // 1024
  config.total_steps = 7
  assert trainer.total_steps_of(config, 113_287) == 7


def train_args(data_dir, workdir, mesh="(('data', -1),)"):
  return ["--config=configs/panoptic_stage1.py:smoke", f"--workdir={workdir}",
          f"--config.mesh={mesh}",
          "--config.dataset=toy_scenes/tiny", f"--config.data_dir={data_dir}",
          "--config.train_split=train", "--config.val_split=validation",
          "--config.batch_size=8", "--config.total_steps=3", "--config.log_training_steps=1",
          # One PQ evaluation (gathered over the devices and hosts), not the config's three.
          "--config.evals=[('val', 'validation'), ('panoptic_val', 'coco_panoptic')]",
          "--config.panoptic_val.split=validation[:8]",
          *[f"--config.model.{k}={v}" for k, v in TINY.items()]]


def devices_env(devices):
  """The tests' XLA flags (see conftest.py) with `devices` simulated devices."""
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+",
                 f"--xla_force_host_platform_device_count={devices}", os.environ["XLA_FLAGS"])
  return {**os.environ, "XLA_FLAGS": flags}


def run_train(data_dir, workdir, devices, mesh="(('data', -1),)"):
  result = subprocess.run([sys.executable, "train.py", *train_args(data_dir, workdir, mesh)],
                          cwd=ROOT, env=devices_env(devices), capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return checkpoint.load_npz(Path(workdir) / "params.npz")


@pytest.fixture(scope="module")
def one_device(toy_data_dir, tmp_path_factory):
  """(params, losses) of the 1-device run that the multi-device runs are compared with."""
  workdir = tmp_path_factory.mktemp("one_device")
  return run_train(toy_data_dir, workdir, 1), losses(workdir)


# The multi-device runs share one xdist worker (`--dist loadgroup`): several of them at once
# (up to 16 simulated devices on 2 cores) starve XLA:CPU's collective rendezvous.
multi_device = pytest.mark.xdist_group("multi_device")


@multi_device
def test_multi_device_tests_share_a_worker(request):
  """Guards the grouping above: a pytest/xdist pair that drops it (pytest 9.2 with xdist 3.8)
  runs the multi-device tests side by side, and they hang at their collectives."""
  if os.environ.get("PYTEST_XDIST_WORKER") and request.config.getvalue("loadgroup"):
    assert request.node.nodeid.endswith("@multi_device"), request.node.nodeid


@pytest.mark.slow
@multi_device
def test_two_processes_train_like_one(toy_data_dir, tmp_path, one_device):
  """2 processes x 4 CPU devices (JAX's distributed runtime, gloo collectives, one shared
  workdir, FSDP over hosts) give the losses and parameters of one device."""
  mesh = "(('data', 2), ('fsdp', 4))"
  one, one_losses = one_device
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  processes = [subprocess.Popen(
      [sys.executable, "train.py", *train_args(toy_data_dir, tmp_path / "two", mesh),
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=ROOT, env=devices_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outputs = [p.communicate(timeout=600) for p in processes]
  for p, (_, err) in zip(processes, outputs, strict=True):
    assert p.returncode == 0, err[-3000:]
  assert "Process 1 of 2: 4 local devices, 8 in all" in outputs[1][1]
  np.testing.assert_allclose(list(one_losses.values()),
                             list(losses(tmp_path / "two").values()), rtol=1e-5)
  two = checkpoint.load_npz(tmp_path / "two" / "params.npz")
  for (k, a), b in zip(checkpoint.flatten(one).items(), checkpoint.flatten(two).values(),
                       strict=True):
    if not k.endswith("key/bias"):  # zero gradient up to rounding (below)
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=k)


@pytest.mark.slow
@multi_device
@pytest.mark.parametrize("mesh", ["(('data', -1),)", "(('data', 2), ('fsdp', 4))",
                                  "(('data', 2), ('fsdp', 2), ('tensor', 2))"])
def test_eight_devices_train_like_one(toy_data_dir, tmp_path, mesh, one_device):
  """Data parallel; data + FSDP (parameters and optimizer state sharded 4 ways); and with tensor
  parallelism (heads and MLP units split 2 ways) on top."""
  one, one_losses = one_device
  eight = run_train(toy_data_dir, tmp_path / "eight", 8, mesh)
  np.testing.assert_allclose(list(one_losses.values()),
                             list(losses(tmp_path / "eight").values()), rtol=1e-5)
  for (k, a), b in zip(checkpoint.flatten(one).items(), checkpoint.flatten(eight).values(),
                       strict=True):
    if k.endswith("key/bias"):
      # Its gradient is zero up to rounding (softmax ignores a per-query constant), and
      # Adafactor scales that noise to a full step of either sign: only the size is defined.
      assert np.abs(a).max() < 1e-4 and np.abs(b).max() < 1e-4, k
      continue
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=k)


@pytest.mark.slow
def test_scanned_layers_train_like_unrolled_ones_and_export_big_vision_layout(toy_data_dir,
                                                                              tmp_path):
  """From the same big_vision-layout start, `scan_layers` (+ remat) gives the same losses and
  writes params.npz in the unscanned layout."""
  trainer.train_and_evaluate(tiny_config(toy_data_dir, total_steps=0, evals=[]), tmp_path / "0")
  start = str(tmp_path / "0" / "params.npz")
  for name, options in (("plain", {}), ("scan", dict(scan_layers=True, remat=True))):
    trainer.train_and_evaluate(
        tiny_config(toy_data_dir, total_steps=3, evals=[], model_init=start, **options),
        tmp_path / name)
  np.testing.assert_allclose(list(losses(tmp_path / "plain").values()),
                             list(losses(tmp_path / "scan").values()), rtol=1e-5)
  plain = checkpoint.flatten(checkpoint.load_npz(tmp_path / "plain" / "params.npz"))
  scan = checkpoint.flatten(checkpoint.load_npz(tmp_path / "scan" / "params.npz"))
  assert plain.keys() == scan.keys() and any("encoderblock_0" in k for k in plain)
  for k in plain:
    if not k.endswith("key/bias"):  # zero gradient up to rounding (see above)
      np.testing.assert_allclose(plain[k], scan[k], rtol=1e-4, atol=1e-5, err_msg=k)
