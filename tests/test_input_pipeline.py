"""The input pipeline on 8 simulated devices: sharding, host shards, coverage, exact resume."""

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import panoptic_stage1
from pp.builder import get_preprocess_fn
from uvim import input_pipeline as ip

IDS = get_preprocess_fn('keep("image/id")')


@pytest.fixture(scope="module")
def toy(toy_data_dir):
  return ip.get_builder("toy_scenes/tiny", toy_data_dir)


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() == 8
  return jax.sharding.Mesh(np.array(jax.devices()), ("data",))


def ids_of(dataset, num_batches):
  return [b["image/id"].tolist() for b in dataset.take(num_batches).as_numpy_iterator()]


def smoke_config(toy_data_dir, **overrides):
  config = panoptic_stage1.get_config("smoke")
  config.dataset, config.data_dir = "toy_scenes/tiny", str(toy_data_dir)
  config.train_split = "train"
  config.update(overrides)
  return config


def test_global_batches_are_sharded_over_the_data_axis(toy_data_dir, mesh):
  batches = ip.train_data(smoke_config(toy_data_dir, batch_size=16), mesh)
  batch = next(batches)
  assert batch["image"].shape == (16, 64, 64, 3) and batch["labels"].shape == (16, 64, 64, 2)
  assert batch["image"].sharding == jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
      ("data",)))
  shards = batch["labels"].addressable_shards
  assert len(shards) == 8 and all(s.data.shape == (2, 64, 64, 2) for s in shards)
  assert batches.position == 16
  next(batches)
  assert batches.position == 32


def test_hosts_take_their_rows_of_the_same_global_batches(toy):
  """Two hosts' local batches, side by side, are the one-host stream's global batches; each
  epoch is a permutation of the split, reshuffled the next epoch."""
  def stream(host, hosts):
    ds = ip.make_for_train(toy, "train", IDS, 16 // hosts, shuffle_buffer_size=100, seed=0,
                           process_index=host, process_count=hosts)
    return np.array(ids_of(ds, 8))

  one = stream(0, 1)
  two = np.concatenate([stream(0, 2), stream(1, 2)], axis=1)
  np.testing.assert_array_equal(one, two)
  epochs = one.reshape(2, 64)  # 2 epochs of the 64 examples
  all_ids = {int(x["image/id"]) for x in tfds.as_numpy(toy.as_dataset(split="train"))}
  assert set(epochs[0]) == all_ids == set(epochs[1]) and len(set(epochs[0])) == 64
  assert not np.array_equal(epochs[0], epochs[1]), "epochs should be reshuffled"


def test_stream_is_deterministic_given_the_seed(toy):
  def stream(seed):
    ds = ip.make_for_train(toy, "train", IDS, 8, shuffle_buffer_size=64, seed=seed,
                           process_index=0, process_count=1)
    return ids_of(ds, 10)

  assert stream(0) == stream(0)
  assert stream(0) != stream(1)


def test_resume_from_position_gives_the_same_next_batches(toy):
  """Across an epoch boundary, with the random Listing-1 pp: the same images and labels."""
  pp_fn = get_preprocess_fn(panoptic_stage1.get_config("smoke").pp_train)

  def stream(position):
    return ip.make_for_train(toy, "train[:40]", pp_fn, 8, shuffle_buffer_size=16, seed=3,
                             position=position, process_index=0, process_count=1)

  straight = list(stream(0).take(8).as_numpy_iterator())  # 8 batches = 64 examples > 1 epoch
  resumed = list(stream(3 * 8).take(5).as_numpy_iterator())
  for a, b in zip(straight[3:], resumed, strict=True):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["labels"], b["labels"])
  assert not np.array_equal(straight[0]["image"], straight[5]["image"])


def test_evaluation_covers_every_example_exactly_once_with_padding(toy):
  seen, counts = [], set()
  for host in range(3):
    ds, num_batches = ip.make_for_inference(toy, "validation", IDS, 4, process_index=host,
                                            process_count=3)
    batches = list(ds.as_numpy_iterator())
    counts.add((num_batches, len(batches)))
    for b in batches:
      assert b["image/id"].shape == (4,)
      seen += b["image/id"][b["_mask"]].tolist()
      assert (b["image/id"][~b["_mask"]] == 0).all()
  assert counts == {(2, 2)}  # 16 examples over 3 hosts: 6, 5, 5 -> 2 batches of 4 each
  all_ids = [int(x["image/id"]) for x in tfds.as_numpy(toy.as_dataset(split="validation"))]
  assert sorted(seen) == sorted(all_ids)


def test_eval_data_on_the_mesh(toy_data_dir, mesh):
  config = smoke_config(toy_data_dir)
  batches, num_batches = ip.eval_data(config, "validation", "decode|" + config.panoptic_val.pp,
                                      24, mesh)
  masks = [np.asarray(b["_mask"]) for b in batches]
  assert num_batches == len(masks) == 1 and masks[0].sum() == 16


def test_evaluation_pp_without_fixed_shapes_is_rejected(toy):
  with pytest.raises(ValueError, match="fixed shapes"):
    ip.make_for_inference(toy, "validation", get_preprocess_fn('decode|keep("image")'), 4,
                          process_index=0, process_count=1)


def test_catalog_dataset_not_prepared_says_how_instead_of_downloading(tmp_path):
  with pytest.raises(ip.DatasetNotPreparedError, match=r"download_and_prepare.*coco_panoptic_fold"):
    ip.get_builder("coco/2017_panoptic", str(tmp_path))
  with pytest.raises(ip.DatasetNotPreparedError, match="manual_dir"):
    ip.get_builder("coco_panoptic_folder", str(tmp_path))


def test_toy_scenes_is_prepared_on_first_use(tmp_path):
  builder = ip.get_builder("toy_scenes/tiny", str(tmp_path))
  assert builder.is_prepared()
  example = next(iter(builder.as_dataset(split="validation")))
  assert example["depth"].dtype == tf.float32
