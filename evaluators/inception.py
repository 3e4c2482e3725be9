r"""The InceptionV3 of the standard FID (TF's 2015-12-05 graph, as ported by pytorch-fid), in Flax.

FID compares the 2048-d pool features of this network. Its weights cannot be downloaded from
here; get them once on a machine with internet and convert them to an npz:

  pip install torch pytorch-fid   # anywhere; only the conversion needs them
  python -c "from pytorch_fid.inception import fid_inception_v3; import torch; \
      torch.save(fid_inception_v3().state_dict(), 'pt_inception.pth')"
  python -m evaluators.inception --convert pt_inception.pth --out inception_fid.npz

and pass `inception_weights=inception_fid.npz` to the `coltran_fid` evaluator. Differences from
torchvision's InceptionV3 that FID depends on: average pools in the A, C and first E blocks do not
count padding, and the last E block max-pools.
"""

import dataclasses
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uvim import checkpoint


class BasicConv(nn.Module):
  """Conv (no bias) -> BatchNorm (eps 1e-3, inference statistics) -> ReLU."""
  features: int
  kernel: Sequence[int]
  strides: int = 1
  padding: Sequence[int] | str = (0, 0)

  @nn.compact
  def __call__(self, x):
    pad = self.padding if isinstance(self.padding, str) else [(p, p) for p in self.padding]
    # He initialisation keeps a random network's features informative (tests, smoke runs);
    # real weights replace it.
    x = nn.Conv(self.features, tuple(self.kernel), strides=self.strides, padding=pad,
                use_bias=False, kernel_init=nn.initializers.he_normal(), name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


def avg_pool_no_pad_count(x):
  """3x3 stride-1 average pool over the valid pixels only (count_include_pad=False)."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def max_pool(x, stride=2, pad=0):
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, (1, 1), name="branch1x1")(x)
    b5 = BasicConv(48, (1, 1), name="branch5x5_1")(x)
    b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = BasicConv(self.pool_features, (1, 1), name="branch_pool")(avg_pool_no_pad_count(x))
    return jnp.concatenate([b1, b5, b3, bp], -1)


class InceptionB(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, (3, 3), strides=2, name="branch3x3")(x)
    bd = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = BasicConv(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, max_pool(x)], -1)


class InceptionC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c = self.channels_7x7
    b1 = BasicConv(192, (1, 1), name="branch1x1")(x)
    b7 = BasicConv(c, (1, 1), name="branch7x7_1")(x)
    b7 = BasicConv(c, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv(c, (1, 1), name="branch7x7dbl_1")(x)
    bd = BasicConv(c, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = BasicConv(c, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = BasicConv(c, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = BasicConv(192, (1, 1), name="branch_pool")(avg_pool_no_pad_count(x))
    return jnp.concatenate([b1, b7, bd, bp], -1)


class InceptionD(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, (1, 1), name="branch3x3_1")(x)
    b3 = BasicConv(320, (3, 3), strides=2, name="branch3x3_2")(b3)
    b7 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, max_pool(x)], -1)


class InceptionE(nn.Module):
  max_pool_branch: bool = False  # The last block max-pools (FID's graph), the first averages.

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(320, (1, 1), name="branch1x1")(x)
    b3 = BasicConv(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                          BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], -1)
    bd = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                          BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)],
                         -1)
    pooled = max_pool(x, stride=1, pad=1) if self.max_pool_branch else avg_pool_no_pad_count(x)
    bp = BasicConv(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], -1)


class InceptionV3(nn.Module):
  """Images in [-1, 1], (B, H, W, 3) -> 2048-d pool features (B, 2048), at 299 x 299."""

  @nn.compact
  def __call__(self, images):
    x = jax.image.resize(images, (images.shape[0], 299, 299, 3), method="bilinear",
                         antialias=False)
    x = BasicConv(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = max_pool(x)
    x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = max_pool(x)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    for name, c in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(c, name=name)(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE(name="Mixed_7b")(x)
    x = InceptionE(max_pool_branch=True, name="Mixed_7c")(x)
    return jnp.mean(x, axis=(1, 2))


@dataclasses.dataclass
class InceptionFeatures:
  """Pool features of images in [-1, 1] with weights from an npz file (see module docstring)."""
  weights: str

  def __post_init__(self):
    tree = checkpoint.load_npz(self.weights)
    self.model = InceptionV3()
    self.variables = {"params": tree["params"], "batch_stats": tree["batch_stats"]}
    self._apply = jax.jit(self.model.apply)

  def __call__(self, images: jnp.ndarray) -> jnp.ndarray:
    return self._apply(self.variables, images)


def convert_torch_state_dict(state: dict[str, np.ndarray]) -> dict:
  """pytorch-fid's state dict (numpy arrays) -> {'params', 'batch_stats'} of `InceptionV3`."""
  params, stats = {}, {}
  for name, value in state.items():
    *path, layer, leaf = name.split(".")
    if leaf == "num_batches_tracked" or layer == "fc":
      continue
    if layer == "conv" and leaf == "weight":
      _put(params, [*path, "conv", "kernel"], np.transpose(value, (2, 3, 1, 0)))
    elif layer == "bn" and leaf in ("weight", "bias"):
      _put(params, [*path, "bn", "scale" if leaf == "weight" else "bias"], value)
    elif layer == "bn" and leaf in ("running_mean", "running_var"):
      _put(stats, [*path, "bn", "mean" if leaf == "running_mean" else "var"], value)
  return {"params": params, "batch_stats": stats}


def _put(tree: dict, path: list[str], value: np.ndarray) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = np.asarray(value, np.float32)


def main(argv: list[str]) -> None:
  del argv
  import torch  # Only the one-off conversion needs torch.

  state = {k: v.numpy() for k, v in torch.load(flags.FLAGS.convert, map_location="cpu").items()}
  checkpoint.save_npz(flags.FLAGS.out, convert_torch_state_dict(state))
  print(f"Wrote {flags.FLAGS.out}")


if __name__ == "__main__":
  from absl import app, flags

  flags.DEFINE_string("convert", None, "pytorch-fid state dict (.pth).", required=True)
  flags.DEFINE_string("out", None, "Output npz.", required=True)
  app.run(main)
