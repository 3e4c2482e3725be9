"""Mesh and FSDP partitioning: the rule, memory per device, and restoring on another mesh."""

import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from test_trainer import ROOT, devices_env, losses, tiny_config

from uvim import checkpoint, optim, sharding, trainer
from uvim.errors import UserError


def mesh_of(**axes):
  return sharding.make_mesh(list(axes.items()))


def test_fsdp_spec_shards_the_largest_divisible_dimension():
  mesh = mesh_of(data=2, fsdp=4)
  assert sharding.fsdp_spec((768, 3072), mesh) == P(None, "fsdp")
  assert sharding.fsdp_spec((3072, 768), mesh) == P("fsdp")
  assert sharding.fsdp_spec((6, 8, 12), mesh) == P(None, None, "fsdp")
  assert sharding.fsdp_spec((10, 7), mesh) == P()  # no dimension divisible by 4
  assert sharding.fsdp_spec((2,), mesh) == P()  # smaller than the axis
  assert sharding.fsdp_spec((), mesh) == P()
  assert sharding.fsdp_spec((768, 3072), mesh_of(data=8)) == P()  # no fsdp axis


def test_tensor_axis_splits_heads_and_mlp_units_then_fsdp_takes_the_largest_other_dim():
  mesh = mesh_of(data=1, fsdp=2, tensor=4)
  attention = "encoder/encoderblock_0/MultiHeadDotProductAttention_0"
  assert sharding.fsdp_spec((768, 12, 64), mesh, f"{attention}/query/kernel") == P("fsdp", "tensor")
  assert sharding.fsdp_spec((12, 64), mesh, f"{attention}/value/bias") == P("tensor", "fsdp")
  assert sharding.fsdp_spec((12, 64, 768), mesh, f"{attention}/out/kernel") == P(
      "tensor", None, "fsdp")
  # Scanned layers: the rule counts from the end, past the leading depth axis.
  assert sharding.fsdp_spec((6, 768, 3072), mesh, "encoder/encoderblock/MlpBlock_0/Dense_0/kernel"
                            ) == P(None, "fsdp", "tensor")
  assert sharding.fsdp_spec((3072, 768), mesh, "decoder/EncDecBlock3/MLP/Dense_1/kernel") == P(
      "tensor", "fsdp")
  assert sharding.fsdp_spec((3072,), mesh, "MlpBlock_0/Dense_0/bias") == P("tensor")
  # Not a rule's parameter, or the axis does not divide the heads: FSDP alone.
  assert sharding.fsdp_spec((768, 3072), mesh, "monkey/kernel") == P(None, "fsdp")
  assert sharding.fsdp_spec((768, 6, 64), mesh, f"{attention}/key/kernel") == P("fsdp")
  # Optimizer states follow their parameters' paths.
  tree = {"mu": {"MlpBlock_0": {"Dense_1": {"kernel": np.zeros((64, 32))}}}}
  spec = sharding.tree_shardings(tree, mesh)["mu"]["MlpBlock_0"]["Dense_1"]["kernel"].spec
  assert spec == P("tensor", "fsdp")


def test_mesh_sizes_and_errors():
  assert dict(mesh_of(data=-1, fsdp=2).shape) == {"data": 4, "fsdp": 2}
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    mesh_of(data=-1, fsdp=-1)
  with pytest.raises(ValueError, match="does not divide 8 devices"):
    mesh_of(data=-1, fsdp=3)


def train_part(part: str, data_dir: str, workdir: str) -> None:
  """One process's part of the FSDP resume test: `straight` (4 steps on the data mesh, in
  `a`), `first` (2 of them, in `b`) or `resume` (`b` continued on a data x fsdp mesh, checked
  against `a`: the same loss and parameters, ~1/4 of the state per device)."""
  tmp_path = Path(workdir)
  data_mesh = tiny_config(data_dir, total_steps=4, evals=[])
  if part == "straight":
    state = trainer.train_and_evaluate(data_mesh, tmp_path / "a")
    (tmp_path / "replicated_bytes").write_text(
        str(sharding.bytes_per_device((state.params, state.opt_state))))
  elif part == "first":
    trainer.train_and_evaluate(tiny_config(data_dir, total_steps=2, evals=[]), tmp_path / "b")
  else:
    fsdp = tiny_config(data_dir, total_steps=4, evals=[], mesh=(("data", 2), ("fsdp", 4)))
    resumed = trainer.train_and_evaluate(fsdp, tmp_path / "b")
    np.testing.assert_allclose(losses(tmp_path / "a")[4], losses(tmp_path / "b")[4], rtol=1e-5)
    straight = checkpoint.flatten(checkpoint.load_npz(tmp_path / "a" / "params.npz")["params"])
    ours = checkpoint.flatten(resumed.params)
    assert straight.keys() == ours.keys()
    for k, a in straight.items():
      if not k.endswith("key/bias"):  # zero gradient up to rounding (see test_trainer)
        np.testing.assert_allclose(a, ours[k], rtol=1e-4, atol=1e-5, err_msg=k)
    kernel = resumed.params["encoder"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"]
    assert kernel.sharding.spec == P(None, "fsdp")
    sharded = sharding.bytes_per_device((resumed.params, resumed.opt_state))
    replicated = int((tmp_path / "replicated_bytes").read_text())
    assert sharded < 0.35 * replicated, (sharded, replicated)
  assert jax.device_count() == 8


@pytest.mark.slow
def test_fsdp_shrinks_state_per_device_and_restores_on_another_mesh(toy_data_dir, tmp_path):
  """A run on a data-parallel mesh resumes on a data x fsdp mesh, ends like an uninterrupted
  run, and holds ~1/4 of the parameters and optimizer state per device. Each part runs in its
  own process with 8 simulated devices, as a preempted run resumes. (The resume hung under load
  with XLA:CPU's concurrency-optimised schedule, every device thread at an all-reduce: see
  conftest.py's XLA flags.)"""
  for part in ("straight", "first", "resume"):
    code = (f"from test_sharding import train_part; "
            f"train_part({part!r}, {str(toy_data_dir)!r}, {str(tmp_path)!r})")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, env={**devices_env(8), "PYTHONPATH": str(ROOT / "tests")},
                            timeout=600)
    assert result.returncode == 0, (part, result.stderr[-3000:])


def test_adafactor_factored_states_keep_their_parameters_tensor_dimension():
  """v_row averages a parameter's largest axis away, v_col its second largest: the tensor axis
  splits what is left of the parameter's split dimension (the MLP's hidden units), or nothing
  where that dimension went; the same-shaped states follow the parameter."""
  mesh = mesh_of(fsdp=2, tensor=4)
  params = {"MlpBlock_0": {"Dense_0": {"kernel": np.zeros((64, 256))},  # hidden: axis 1
                           "Dense_1": {"kernel": np.zeros((256, 64))}}}  # hidden: axis 0
  state = optim.scale_by_factored_rms().init(params)
  specs = jax.tree.map(lambda s: s.spec, sharding.tree_shardings(
      {"params": params, "opt": state}, mesh, params=params))
  for layer in ("Dense_0", "Dense_1"):
    assert specs["opt"].v_row["MlpBlock_0"][layer]["kernel"] == P("fsdp")  # hidden went
    assert specs["opt"].v_col["MlpBlock_0"][layer]["kernel"] == P("tensor")  # hidden kept
  assert specs["params"]["MlpBlock_0"]["Dense_0"]["kernel"] == P("fsdp", "tensor")


def test_a_config_states_its_own_tensor_rules():
  mesh = mesh_of(fsdp=2, tensor=4)
  config = ml_collections.ConfigDict({"tensor_rules": [("(^|/)monkey/kernel$", -2)]})
  rules = sharding.config_rules(config)
  assert sharding.fsdp_spec((768, 3072), mesh, "monkey/kernel", rules) == P("tensor", "fsdp")
  assert sharding.config_rules(ml_collections.ConfigDict()) == sharding.TENSOR_RULES
  for bad in ([("monkey", 1)], [("(", -1)], ["monkey"]):
    config.tensor_rules = bad
    with pytest.raises(UserError, match=r"config\.tensor_rules"):
      sharding.config_rules(config)
