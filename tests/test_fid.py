"""FID: the Frechet distance against scipy, the Inception port on random weights, the evaluator."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from configs import colorization_stage1
from evaluators import colorization, inception
from uvim import checkpoint, sharding


def scipy_frechet(mu1, s1, mu2, s2):
  covmean = scipy.linalg.sqrtm(s1 @ s2).real
  return (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def test_frechet_distance_matches_scipy_sqrtm():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(400, 12))
  b = rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12)) * 0.5 + 0.3
  stats = [(x.mean(0), np.cov(x, rowvar=False)) for x in (a, b)]
  np.testing.assert_allclose(colorization.frechet_distance(*stats[0], *stats[1]),
                             scipy_frechet(*stats[0], *stats[1]), rtol=1e-8)
  assert abs(colorization.frechet_distance(*stats[0], *stats[0])) < 1e-8
  few = rng.normal(size=(5, 64))  # fewer samples than dimensions: still finite and real
  s = (few.mean(0), np.cov(few, rowvar=False))
  assert np.isfinite(colorization.frechet_distance(*s, np.zeros(64), np.eye(64)))


def test_average_pool_does_not_count_padding():
  x = jnp.arange(16, dtype=jnp.float32).reshape(1, 4, 4, 1)
  out = np.asarray(inception.avg_pool_no_pad_count(x))[0, ..., 0]
  xn = np.asarray(x)[0, ..., 0]
  for i in range(4):
    for j in range(4):
      window = xn[max(i - 1, 0):i + 2, max(j - 1, 0):j + 2]
      assert out[i, j] == pytest.approx(window.mean())


def test_quantize_and_center_crop():
  np.testing.assert_allclose(colorization.quantize_8bit(jnp.array([-1.0, 0.0, 0.999, 1.0])),
                             [-1, 0, 255 / 128 - 1, 255 / 128 - 1])
  assert colorization.center_crop_square(np.zeros((4, 10, 3))).shape == (4, 4, 3)


@pytest.mark.slow
def test_inception_loads_converted_weights_and_gives_pool_features(tmp_path):
  model = inception.InceptionV3()
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 64, 80, 3)), jnp.float32)
  variables = model.init(jax.random.key(0), images)
  variables = jax.tree.map(lambda x: x + 0.1 * jnp.abs(x.mean()), variables)  # non-trivial BN
  expected = model.apply(variables, images)
  assert expected.shape == (2, 2048) and np.isfinite(expected).all() and (expected >= 0).all()
  # The same weights as pytorch-fid names and lays them out (conv kernels OIHW).
  torch_state = {"fc.weight": np.zeros((1008, 2048)), "fc.bias": np.zeros(1008)}
  for path, leaf in checkpoint.flatten(variables).items():
    _, *modules, layer, name = path.split("/")
    prefix = ".".join(modules)
    if layer == "conv":
      torch_state[f"{prefix}.conv.weight"] = np.transpose(leaf, (3, 2, 0, 1))
    else:
      torch_name = {"scale": "weight", "bias": "bias", "mean": "running_mean",
                    "var": "running_var"}[name]
      torch_state[f"{prefix}.bn.{torch_name}"] = leaf
      torch_state[f"{prefix}.bn.num_batches_tracked"] = np.array(7)
  checkpoint.save_npz(tmp_path / "w.npz", inception.convert_torch_state_dict(torch_state))
  features = inception.InceptionFeatures(str(tmp_path / "w.npz"))(images)
  np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_coltran_fid_evaluator_runs_on_toy_scenes(toy_data_dir):
  config = colorization_stage1.get_config("smoke")
  config.dataset, config.data_dir = "toy_scenes/tiny", str(toy_data_dir)
  options = dict(split="validation", ref_split="train[:16]", pp=config.colorization_val.pp,
                 batch_size=8, inception_weights="random:0")
  perfect = {"predict": lambda state, batch: {"color": batch["labels"]}}
  gray = {"predict": lambda state, batch: {"color": batch["image"]}}
  mesh = sharding.make_mesh([("data", -1)])
  fid = {name: colorization.ColtranFid("fid", config, options, mesh=mesh, fns=fns).run(None)["fid"]
         for name, fns in (("perfect", perfect), ("gray", gray))}
  assert all(np.isfinite(v) and v > 0 for v in fid.values())
  assert fid["perfect"] < fid["gray"]  # true colours are closer to real images than gray ones
