"""Colorization metrics: `psnr` on [-1, 1] images, and `coltran_fid` (FID with the ColTran
protocol: predictions area-resized to 256 and quantised to 8 bits; reference images centre-cropped
and area-resized to 256; Inception pool features; Frechet distance in float64)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from evaluators.common import Evaluator, MeanEvaluator, register
from uvim import input_pipeline

FID_SIZE = 256


def psnr(pred_BxHxWx3: jnp.ndarray, target_BxHxWx3: jnp.ndarray) -> jnp.ndarray:
  """Per image: 20 log10(2) - 10 log10(MSE)."""
  mse = jnp.mean((pred_BxHxWx3 - target_BxHxWx3) ** 2, axis=(1, 2, 3))
  return 20 * jnp.log10(2.0) - 10 * jnp.log10(jnp.maximum(mse, 1e-12))


@register("psnr")
class Psnr(MeanEvaluator):
  """Mean PSNR of the predicted colours against `labels`."""

  def per_example(self, fns, options):
    return lambda variables, batch: {"psnr": psnr(fns["predict"](variables, batch)["color"],
                                              batch["labels"])}


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
  """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2), in float64.

  The trace of the matrix square root is the sum of the square roots of the eigenvalues of
  S1 S2 (real and non-negative for covariances; rounding noise is clipped). This equals the
  usual `scipy.linalg.sqrtm` route but stays finite and real when there are fewer samples than
  feature dimensions, where that route needs an epsilon retry and may still fail.
  """
  mu1, mu2, sigma1, sigma2 = (np.asarray(a, np.float64) for a in (mu1, mu2, sigma1, sigma2))
  eigenvalues = np.linalg.eigvals(sigma1 @ sigma2).real
  trace_sqrt = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def quantize_8bit(images: jnp.ndarray) -> jnp.ndarray:
  """[-1, 1] -> round((x + 1) * 128) clipped to 0..255 -> x / 128 - 1 (ColTran's protocol)."""
  return jnp.clip(jnp.round((images + 1) * 128), 0, 255) / 128 - 1


def area_resize(images: jnp.ndarray, size: int) -> jnp.ndarray:
  """Area (antialiased box) resize of (B, H, W, C) images to size x size."""
  return jax.image.resize(images, (images.shape[0], size, size, images.shape[-1]),
                          method="linear", antialias=True)


def center_crop_square(image: np.ndarray) -> np.ndarray:
  h, w = image.shape[:2]
  s = min(h, w)
  return image[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]


@register("coltran_fid")
class ColtranFid(Evaluator):
  """FID between colorised `split` and real `ref_split` images.

  `inception_weights`: an npz made by `python -m evaluators.inception` (see there), or
  `random:<seed>` for a randomly initialised network (tests and smoke runs only: such numbers
  are not comparable with published FIDs).
  """

  OPTIONS = Evaluator.OPTIONS | {"ref_split", "inception_weights"}

  def __init__(self, name: str, config, options: dict, *, mesh, fns):
    super().__init__(name, config, options, mesh=mesh, fns=fns)
    if "inception_weights" not in options or "ref_split" not in options:
      raise ValueError(f"config.{name}: coltran_fid needs `ref_split` and `inception_weights`")
    self.ref_split, self.weights = options["ref_split"], options["inception_weights"]
    self.inception = _inception(self.weights)

    def fid_images(variables, batch):
      return quantize_8bit(area_resize(self.fns["predict"](variables, batch)["color"], FID_SIZE))

    self._fid_images = jax.jit(fid_images)

  def run(self, variables) -> dict[str, float]:
    fake = []
    for batch in self.batches():
      mask = input_pipeline.local_rows(batch[input_pipeline.MASK_KEY])
      features = self.inception(self._fid_images(variables, batch))
      fake.append(input_pipeline.local_rows(features)[mask])
    real = _reference_features(self.config.dataset, self.config.data_dir, self.ref_split,
                               self.weights, self.batch_size)
    fake = np.concatenate(fake)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      fake = np.concatenate(list(multihost_utils.process_allgather(fake, tiled=False)))
      real = np.concatenate(list(multihost_utils.process_allgather(real, tiled=False)))
    stats = [(x.mean(0), np.cov(x.astype(np.float64), rowvar=False)) for x in (fake, real)]
    return {"fid": frechet_distance(*stats[0], *stats[1])}



@functools.lru_cache(maxsize=4)
def _reference_features(dataset: str, data_dir: str | None, ref_split: str, weights: str,
                        batch_size: int) -> np.ndarray:
  """Inception features of this host's real `ref_split` images, computed once per process:
  every evaluation of a run (and every FID evaluator on the same reference) reuses them."""
  inception = _inception(weights)
  builder = input_pipeline.get_builder(dataset, data_dir)
  features, images = [], []

  def flush():
    padded = images + images[:1] * (batch_size - len(images))  # one compiled shape
    features.append(np.asarray(inception(jnp.stack(padded)))[:len(images)])
    images.clear()

  for example in input_pipeline.host_examples(builder, ref_split):
    square = center_crop_square(example["image"]).astype(np.float32) / 128 - 1
    images.append(area_resize(jnp.asarray(square)[None], FID_SIZE)[0])
    if len(images) == batch_size:
      flush()
  if images:
    flush()
  return np.concatenate(features)


@functools.lru_cache
def _inception(weights: str):
  """One jitted network per weights file, shared by every evaluator instance."""
  from evaluators import inception

  if weights.startswith("random:"):
    model = inception.InceptionV3()
    variables = model.init(jax.random.key(int(weights.split(":")[1])),
                           jnp.zeros((1, 299, 299, 3)))
    return jax.jit(lambda x: model.apply(variables, x))
  return inception.InceptionFeatures(weights)


