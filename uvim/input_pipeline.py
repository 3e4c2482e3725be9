"""Input pipeline: tfds split -> pp -> per-host batches -> global `jax.Array`s on the mesh.

Training data is an endless, deterministic stream per host: epoch e is the host's even share of
the split, shuffled with a seed made from (seed, host, e), and the example at stream position p
carries the pp seed `[host_seed, p]`. So the stream is a function of its position, the number of
examples this host has consumed: a restarted run rebuilds it at exactly the batch where it
stopped (re-reading at most one epoch of raw records to get there).

Evaluation covers every example of the split exactly once: every host runs the same number of
batches, the last ones padded with zero examples whose `_mask` is False.
"""

import collections
import itertools
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from pp.builder import get_preprocess_fn
from pp.utils import RNG_KEY
from uvim.errors import UserError, did_you_mean

MASK_KEY = "_mask"
BATCH_AXES = ("data", "fsdp")  # mesh axes the batch is split over, where present


class DatasetNotPreparedError(UserError):
  """A catalog dataset that is not in the data dir; says how to prepare it."""


def get_builder(name: str, data_dir: str | None = None,
                key: str = "config.dataset") -> tfds.core.DatasetBuilder:
  """The prepared tfds builder for `name` (e.g. 'toy_scenes', 'coco/2017_panoptic').

  The built-in `toy_scenes` is generated on first use. Nothing is ever downloaded: a catalog
  dataset missing from `data_dir` (default: $TFDS_DATA_DIR or ~/tensorflow_datasets) raises an
  error that says how to prepare it. Errors name `key`, where the name came from.
  """
  from uvim import datasets  # Registers the local builders.

  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    base = name.split("/")[0].split(":")[0]
    hint = did_you_mean(base, tfds.list_builders())
    raise UserError(f"Unknown dataset {name!r} ({key}): {hint}built in: 'toy_scenes', "
                    "'coco_panoptic_folder', others are tfds catalog names") from None
  if builder.is_prepared():
    return builder
  if isinstance(builder, datasets.toy_scenes.ToyScenes):
    logging.info("Generating %s in %s (no download).", name, builder.data_dir)
    builder.download_and_prepare()
    return builder
  if isinstance(builder, datasets.coco_folder.CocoPanopticFolder):
    how = builder.MANUAL_DOWNLOAD_INSTRUCTIONS
  else:
    how = (f"prepare it once where the internet is reachable: python -c \"import "
           f"tensorflow_datasets as tfds; tfds.builder('{name}', data_dir='{data_dir or 'DIR'}')"
           f".download_and_prepare()\" (for COCO downloaded by hand, use the "
           f"'coco_panoptic_folder' dataset instead)")
  raise DatasetNotPreparedError(
      f"Dataset {name!r} ({key}) is not prepared in {builder.data_dir}. Point config.data_dir or "
      f"$TFDS_DATA_DIR at the directory that holds it, or {how}.")


def dataset_categories(config) -> list[dict] | None:
  """The COCO categories of `config.dataset` (what panoptic predictions are written with); None,
  with a warning, where it has none or cannot be read."""
  from uvim.panoptic_format import panoptic_categories

  try:
    return panoptic_categories(get_builder(config.dataset, config.data_dir))
  except Exception as e:  # any reason: the task falls back on its own
    logging.warning("No categories from %s (%s)", config.dataset, e)
    return None


def num_examples(builder: tfds.core.DatasetBuilder, split: str, key: str) -> int:
  """The number of examples of `split`; a split that does not exist or is empty is a UserError
  naming the config `key` it came from."""
  try:
    n = builder.info.splits[split].num_examples
  except (ValueError, KeyError) as e:
    raise UserError(f"{key}={split!r}: {str(e).splitlines()[0]} (dataset "
                    f"{builder.info.full_name}, splits {sorted(builder.info.splits)})") from None
  if n <= 0:
    raise UserError(f"{key}={split!r} has no examples (dataset {builder.info.full_name})")
  return n


def host_split(split: str, process_index: int, process_count: int) -> Any:
  """This host's even share of a tfds split (e.g. 'train[4096:]')."""
  return tfds.even_splits(split, n=process_count)[process_index]


def _read(builder: tfds.core.DatasetBuilder, split: Any, decode: bool = False) -> tf.data.Dataset:
  """Raw examples in a fixed order. For training `image` stays encoded (pp starts with `decode`
  or decodes only a crop); evaluators get it decoded (their pp may omit `decode`)."""
  features = builder.info.features
  skip = not decode and "image" in features and isinstance(features["image"],
                                                              tfds.features.Image)
  decoders = {"image": tfds.decode.SkipDecoding()} if skip else None
  return builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)


def make_for_train(builder: tfds.core.DatasetBuilder, split: str, pp_fn: Callable,
                   local_batch_size: int, *, shuffle_buffer_size: int, seed: int,
                   position: int = 0, process_index: int | None = None,
                   process_count: int | None = None) -> tf.data.Dataset:
  """This host's rows of an endless stream of global batches, from global example `position`.

  Every host shuffles the whole split the same way (a seed per epoch) and keeps the examples of
  its rows of each global batch (`local_batch_size` consecutive ones per host) before any
  preprocessing; each example's pp seed is (seed, its global position). So the global batches,
  and training, are the same whatever the number of hosts, and resuming needs only the step.
  Hosts read every record (not decode it): I/O grows with the hosts, decoding does not.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  n = builder.info.splits[split].num_examples
  if n < local_batch_size * process_count:
    raise ValueError(f"{builder.name} {split!r} has {n} examples, fewer than one global batch "
                     f"of {local_batch_size * process_count}")
  raw = _read(builder, split)
  global_seed = (seed % 2**31) * 65_537
  buffer = min(shuffle_buffer_size, n)

  def epoch(e):
    return raw.shuffle(buffer, seed=global_seed + e * 1_000_003, reshuffle_each_iteration=False)

  def is_mine(p, example):
    return (p // local_batch_size) % process_count == process_index

  def with_rng(p, example):
    return {**example, RNG_KEY: tf.stack([tf.constant(global_seed, tf.int64), p])}

  start_epoch, offset = divmod(position, n)
  stream = (tf.data.Dataset.range(start_epoch, tf.int64.max).flat_map(epoch).skip(offset)
            .enumerate(start=position).filter(is_mine).map(with_rng))
  return _batch(stream.map(pp_fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
                .map(_drop_rng), local_batch_size)


def make_for_inference(builder: tfds.core.DatasetBuilder, split: str, pp_fn: Callable,
                       local_batch_size: int, *, process_index: int | None = None,
                       process_count: int | None = None) -> tuple[tf.data.Dataset, int]:
  """This host's batches covering its share of `split` once, padded; and the batch count.

  Every host gets the same number of batches. Padding examples are zeros with `_mask` False.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  splits = [host_split(split, i, process_count) for i in range(process_count)]
  most = max(builder.info.splits[s].num_examples for s in splits)
  num_batches = math.ceil(most / local_batch_size)
  examples = (_read(builder, splits[process_index], decode=True)
              .map(pp_fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
              .map(lambda ex: {**_drop_rng(ex), MASK_KEY: True}))
  unknown = {k: s.shape for k, s in examples.element_spec.items()
             if not s.shape.is_fully_defined()}
  if unknown:
    raise ValueError(f"Evaluation pp must give fixed shapes (add a resize); got {unknown}")
  padding = tf.data.Dataset.from_tensors(
      {k: _zeros(s) for k, s in examples.element_spec.items()} | {MASK_KEY: False}).repeat()
  padded = examples.concatenate(padding).take(num_batches * local_batch_size)
  return _batch(padded, local_batch_size), num_batches


def _zeros(spec: tf.TensorSpec) -> tf.Tensor:
  if spec.dtype == tf.string:
    return tf.fill(spec.shape, "")
  return tf.zeros(spec.shape, spec.dtype)


def _drop_rng(example: dict) -> dict:
  return {k: v for k, v in example.items() if k != RNG_KEY}


def _batch(ds: tf.data.Dataset, local_batch_size: int) -> tf.data.Dataset:
  options = tf.data.Options()
  options.deterministic = True
  return ds.batch(local_batch_size, drop_remainder=True).prefetch(2).with_options(options)


def batch_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """Batches split their leading axis over the mesh's batch axes ('data', then 'fsdp')."""
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axes or None))


def batch_shards(mesh: jax.sharding.Mesh) -> int:
  """Into how many parts a batch is split: the size of the mesh's batch axes."""
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.axis_names]))


def to_global(batch: dict[str, np.ndarray],
              sharding: jax.sharding.NamedSharding) -> dict[str, Any]:
  """Host-local numpy batch -> global `jax.Array`s; strings stay host-local numpy arrays."""

  def put(x):
    if x.dtype.kind in "SUO":
      return x
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree.map(put, batch)


class GlobalBatches:
  """Iterates a host-local tf.data pipeline as global batches, a few transfers ahead.

  `position` counts the global examples handed out, for resuming (see make_for_train).
  """

  def __init__(self, dataset: tf.data.Dataset, sharding: jax.sharding.NamedSharding,
               local_batch_size: int, position: int = 0, prefetch: int = 2):
    self._source = dataset.as_numpy_iterator()
    self._sharding, self._local_batch_size = sharding, local_batch_size
    self._queue: collections.deque = collections.deque()
    self._prefetch = prefetch
    self.position = position

  def __iter__(self) -> Iterator[dict[str, Any]]:
    return self

  def __next__(self) -> dict[str, Any]:
    for batch in itertools.islice(self._source, self._prefetch + 1 - len(self._queue)):
      self._queue.append(to_global(batch, self._sharding))
    if not self._queue:
      raise StopIteration
    self.position += self._local_batch_size * jax.process_count()
    return self._queue.popleft()


def host_examples(builder: tfds.core.DatasetBuilder, split: str) -> Iterator[dict]:
  """This host's raw examples of `split` as numpy, in the order of `make_for_inference`."""
  share = host_split(split, jax.process_index(), jax.process_count())
  return iter(tfds.as_numpy(_read(builder, share, decode=True)))


def local_rows(x: jax.Array) -> np.ndarray:
  """This host's rows of a global batch array, as numpy."""
  if jax.process_count() == 1:
    return np.asarray(x)
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  return np.concatenate([np.asarray(s.data) for s in shards])


def local_batch_size(batch_size: int) -> int:
  """This host's share of the global batch."""
  if batch_size % jax.process_count():
    raise ValueError(f"batch_size {batch_size} is not divisible by the number of hosts "
                     f"({jax.process_count()})")
  return batch_size // jax.process_count()


def train_data(config, mesh: jax.sharding.Mesh, position: int = 0) -> GlobalBatches:
  """Global training batches from `config` (dataset, data_dir, train_split, pp_train, pp_modules,
  batch_size, shuffle_buffer_size, seed), starting at global example `position`."""
  builder = get_builder(config.dataset, config.data_dir)
  local = local_batch_size(config.batch_size)
  pp_fn = get_preprocess_fn(config.pp_train, config.pp_modules)
  ds = make_for_train(builder, config.train_split, pp_fn, local,
                      shuffle_buffer_size=config.shuffle_buffer_size, seed=config.seed,
                      position=position)
  return GlobalBatches(ds, batch_sharding(mesh), local, position)


def check_train_input(config, expected: dict) -> None:
  """Traces `config.pp_train` on the training split and compares what it gives with the model's
  inputs `expected` (shapes; the first axis is the batch): a pp error, a missing key or a size
  the model does not take is a UserError naming config.pp_train, before anything compiles."""
  builder = get_builder(config.dataset, config.data_dir)
  try:
    spec = _read(builder, config.train_split).map(
        get_preprocess_fn(config.pp_train, config.pp_modules)).element_spec
  except Exception as e:  # any pp error: parse, unknown op, wrong argument, missing key
    raise UserError(f"config.pp_train: {' '.join(str(e).split())[:500]}") from e
  for key, want in expected.items():
    got = spec.get(key, spec.get("image") if key == "image_ctx" else None)  # ctx defaults to image
    if got is None:
      raise UserError(f"config.pp_train gives no {key!r} (it gives {sorted(spec)}); the model "
                      f"takes {key} of shape {tuple(want.shape[1:])}")
    if tuple(got.shape) != tuple(want.shape[1:]):
      raise UserError(f"config.pp_train gives {key} of shape {tuple(got.shape)}; the model "
                      f"(config.model / config.oracle.model sizes) takes {tuple(want.shape[1:])}")


def check_eval_input(config, split: str, pp: str, key: str) -> None:
  """Builds an evaluator's input (`split`, the pp string, fixed shapes) as `eval_data` will,
  without reading it, so that a bad split, a typo'd op, a wrong argument or a missing feature
  is a UserError naming `key` before training starts."""
  builder = get_builder(config.dataset, config.data_dir)
  num_examples(builder, split, f"{key}.split")
  try:
    make_for_inference(builder, split, get_preprocess_fn(pp, config.pp_modules), 1)
  except Exception as e:  # any pp error: parse, unknown op, wrong argument, missing key
    raise UserError(f"{key}.pp: {' '.join(str(e).split())[:500]}") from e


def eval_data(config, split: str, pp: str, batch_size: int,
              mesh: jax.sharding.Mesh) -> tuple[GlobalBatches, int]:
  """Global evaluation batches of `split` of `config.dataset` (with `_mask`), and their count."""
  builder = get_builder(config.dataset, config.data_dir)
  local = local_batch_size(batch_size)
  ds, num_batches = make_for_inference(builder, split, get_preprocess_fn(pp, config.pp_modules),
                                       local)
  return GlobalBatches(ds, batch_sharding(mesh), local), num_batches
