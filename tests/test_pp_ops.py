"""Each pp op on hand-made examples with exact expected values, eagerly and inside tf.data."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from pp import ops_image, ops_uvim
from pp.builder import PPSpecError, get_preprocess_fn
from pp.utils import next_seed


def png(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


def jpeg(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="JPEG", quality=95)
  return buf.getvalue()


def rng(seed: int) -> tf.Tensor:
  return tf.constant([seed, 7], tf.int64)


def random_image(h=6, w=5, seed=0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# --- ops_image -------------------------------------------------------------------------------

def test_decode_png_exact_and_grayscale_to_rgb(run_pp):
  image = random_image()
  out = run_pp(get_preprocess_fn("decode"), {"image": png(image)})
  np.testing.assert_array_equal(out["image"], image)

  gray = image[..., 0]
  out = run_pp(get_preprocess_fn("decode(channels=3)"), {"image": png(gray)})
  np.testing.assert_array_equal(out["image"], np.repeat(gray[..., None], 3, axis=-1))


def test_decode_passes_decoded_images_through(run_pp):
  image = random_image()
  out = run_pp(get_preprocess_fn('decode(key="x")'), {"x": image})
  np.testing.assert_array_equal(out["x"], image)


def test_decode_precise_jpeg_matches_pil_closely(run_pp):
  image = np.tile(np.linspace(0, 255, 32, dtype=np.uint8)[None, :, None], (16, 1, 3))
  out = run_pp(get_preprocess_fn("decode(precise=True)"), {"image": jpeg(image)})
  reference = np.asarray(Image.open(io.BytesIO(jpeg(image))).convert("RGB"))
  assert np.abs(out["image"].astype(int) - reference.astype(int)).max() <= 1


def test_resize_nearest_labels_exact(run_pp):
  labels = np.array([[1, 2], [3, 4]], np.int32)[..., None]
  out = run_pp(get_preprocess_fn('resize(4, key="labels", method="nearest")'),
               {"labels": labels})
  expected = np.repeat(np.repeat(labels, 2, axis=0), 2, axis=1)
  np.testing.assert_array_equal(out["labels"], expected)
  assert out["labels"].dtype == np.int32


def test_resize_bilinear_keeps_uint8_and_rounds(run_pp):
  # A 1x2 image [0, 255] upsampled to 1x4 with half-pixel centres: 0, 63.75, 191.25, 255.
  image = np.array([[[0, 0, 0], [255, 255, 255]]], np.uint8)
  out = run_pp(get_preprocess_fn("resize((1, 4))"), {"image": image})
  assert out["image"].dtype == np.uint8
  np.testing.assert_array_equal(out["image"][0, :, 0], [0, 64, 191, 255])


def test_resize_inkey_outkey_leaves_input(run_pp):
  image = random_image(8, 8)
  out = run_pp(get_preprocess_fn('resize(4, inkey="image", outkey="image_ctx")'),
               {"image": image})
  np.testing.assert_array_equal(out["image"], image)
  assert out["image_ctx"].shape == (4, 4, 3)
  expected = tf.cast(tf.round(tf.image.resize(image, (4, 4))), tf.uint8).numpy()
  np.testing.assert_array_equal(out["image_ctx"], expected)


def test_resize_rejects_unknown_method():
  with pytest.raises(PPSpecError, match="Unknown resize method 'nearst'"):
    get_preprocess_fn('resize(4, method="nearst")')


def test_flip_lr_flips_half_the_time_deterministically(run_pp):
  image = random_image(4, 6)
  flipped = 0
  for seed in range(20):
    out = run_pp(get_preprocess_fn("flip_lr"), {"image": image, "_rng": rng(seed)})
    if np.array_equal(out["image"], image[:, ::-1]):
      flipped += 1
    else:
      np.testing.assert_array_equal(out["image"], image)
  assert 3 <= flipped <= 17


@pytest.mark.parametrize("encode", [jpeg, png])
def test_decode_jpeg_and_inception_crop_matches_full_decode_then_crop(run_pp, encode):
  image = np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (48, 1, 3))
  image[:, :, 1] = np.linspace(0, 255, 48, dtype=np.uint8)[:, None]
  data = encode(image)
  full = tf.io.decode_image(data, channels=3).numpy()
  for seed in range(3):
    out = run_pp(get_preprocess_fn("decode_jpeg_and_inception_crop"),
                 {"image": data, "_rng": rng(seed)})
    # The crop window the op draws: the first seed split off the example's rng.
    seed_op = next_seed({"_rng": rng(seed)})
    begin, size = ops_image.sample_inception_box(tf.shape(full), seed_op, (0.05, 1.0),
                                                 (3 / 4, 4 / 3))
    (y, x), (h, w) = begin.numpy(), size.numpy()
    # Partial JPEG decoding upsamples chroma differently at the crop edges (by <= 2 levels).
    tolerance = 2 if encode is jpeg else 0
    np.testing.assert_allclose(out["image"], full[y:y + h, x:x + w], atol=tolerance, rtol=0)
    assert 0.05 * 48 * 64 * 0.9 <= h * w <= 48 * 64


def test_decode_jpeg_and_inception_crop_resizes(run_pp):
  out = run_pp(get_preprocess_fn("decode_jpeg_and_inception_crop(16)"),
               {"image": jpeg(random_image(40, 40)), "_rng": rng(0)})
  assert out["image"].shape == (16, 16, 3) and out["image"].dtype == np.uint8


# --- ops_general -----------------------------------------------------------------------------

def test_value_range_maps_uint8_linearly(run_pp):
  x = np.array([0, 51, 127.5, 255], np.float32)
  out = run_pp(get_preprocess_fn("value_range(-1, 1)"), {"image": x})
  np.testing.assert_allclose(out["image"], [-1, -0.6, 0, 1], atol=1e-6)
  out = run_pp(get_preprocess_fn('value_range(0, 1, 10, 20, True, key="d")'),
               {"d": np.array([5, 15, 25], np.float32)})
  np.testing.assert_allclose(out["d"], [0, 0.5, 1])


def test_keep_copy_concat(run_pp):
  a = np.ones((2, 2, 1), np.int32)
  b = np.full((2, 2, 1), 5, np.int32)
  spec = 'copy("a", "c")|concat(["a", "b"], "ab")|keep("ab", "c")'
  out = run_pp(get_preprocess_fn(spec), {"a": a, "b": b, "junk": np.zeros(3)})
  assert sorted(out) == ["ab", "c"]
  np.testing.assert_array_equal(out["ab"], np.concatenate([a, b], -1))
  np.testing.assert_array_equal(out["c"], a)


# --- ops_uvim --------------------------------------------------------------------------------

def panoptic_example():
  """A 3x4 COCO-style panoptic image: ids 1001 (label 5), 2000000 (label 0), 55 (label 132);
  id 0 is void and id 77 is in the PNG but not in the objects list (treated as void)."""
  ids = np.array([[1001, 1001, 0, 55],
                  [2000000, 1001, 55, 55],
                  [2000000, 77, 0, 2000000]])
  rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
  objects = {"id": np.array([2000000, 1001, 55], np.int64),
             "label": np.array([0, 5, 132], np.int64)}
  return {"panoptic_image": rgb, "panoptic_objects": objects}


def test_coco_panoptic_exact(run_pp):
  out = run_pp(get_preprocess_fn("coco_panoptic"), panoptic_example())
  np.testing.assert_array_equal(out["instances"][..., 0], [[2, 2, 0, 3],
                                                           [1, 2, 3, 3],
                                                           [1, 0, 0, 1]])
  np.testing.assert_array_equal(out["semantics"][..., 0], [[6, 6, 0, 133],
                                                           [1, 6, 133, 133],
                                                           [1, 0, 0, 1]])


def test_coco_panoptic_reads_png_bytes_and_empty_objects(run_pp):
  example = panoptic_example()
  example["panoptic_image"] = png(example["panoptic_image"])
  out = run_pp(get_preprocess_fn("coco_panoptic"), example)
  assert out["instances"][0, 0, 0] == 2
  empty = {"panoptic_image": panoptic_example()["panoptic_image"],
           "panoptic_objects": {"id": np.zeros([0], np.int64), "label": np.zeros([0], np.int64)}}
  out = run_pp(get_preprocess_fn("coco_panoptic"), empty)
  assert not out["instances"].any() and not out["semantics"].any()


def test_coco_panoptic_matches_brute_force(run_pp):
  gen = np.random.default_rng(1)
  ids = gen.choice(2**24 - 1, size=12, replace=False) + 1
  labels = gen.integers(0, 133, size=12)
  pixel_ids = gen.choice(np.concatenate([ids, [0, 12345]]), size=(9, 11))
  rgb = np.stack([pixel_ids % 256, pixel_ids // 256 % 256, pixel_ids // 65536], -1)
  out = run_pp(get_preprocess_fn("coco_panoptic"),
               {"panoptic_image": rgb.astype(np.uint8),
                "panoptic_objects": {"id": ids, "label": labels}})
  for (y, x), pid in np.ndenumerate(pixel_ids):
    k = list(ids).index(pid) if pid in ids else -1
    assert out["instances"][y, x, 0] == k + 1
    assert out["semantics"][y, x, 0] == (labels[k] + 1 if k >= 0 else 0)


def test_make_canonical_hand_made(run_pp):
  instances = np.array([[0, 5, 5, 0],
                        [3, 3, 0, 0],
                        [0, 0, 0, 7],
                        [-1, 0, 7, 7]], np.int32)
  # Centres (y, x): id 5 (0, 1.5), id 3 (1, 0.5), id 7 (2.67, 2.67): raster order 5, 3, 7.
  semantics = np.arange(16, dtype=np.int32).reshape(4, 4)
  labels = np.stack([semantics, instances], -1)
  out = run_pp(get_preprocess_fn("make_canonical"), {"labels": labels})
  np.testing.assert_array_equal(out["labels"][..., 1], [[0, 1, 1, 0],
                                                        [2, 2, 0, 0],
                                                        [0, 0, 0, 3],
                                                        [-1, 0, 3, 3]])
  np.testing.assert_array_equal(out["labels"][..., 0], semantics)


def canonical_reference(instances: np.ndarray, major: int) -> np.ndarray:
  """Brute force: order ids > 0 by centre key c_major * size_major + c_minor."""
  ids = [i for i in np.unique(instances) if i > 0]
  keys = []
  for i in ids:
    yx = np.argwhere(instances == i).mean(0)
    keys.append(yx[major] * instances.shape[major] + yx[1 - major])
  out = np.where(instances < 0, -1, 0)
  for rank, k in enumerate(np.argsort(keys, kind="stable")):
    out[instances == ids[k]] = rank + 1
  return out


@pytest.mark.parametrize("axis", ["y", "x"])
def test_make_canonical_matches_brute_force(run_pp, axis):
  gen = np.random.default_rng(2)
  for _ in range(3):
    instances = gen.integers(-1, 9, size=(7, 10)).astype(np.int32) * 3
    out = run_pp(get_preprocess_fn(f'make_canonical(main_sort_axis="{axis}")'),
                 {"labels": instances[..., None]})
    np.testing.assert_array_equal(out["labels"][..., 0],
                                  canonical_reference(instances, "yx".index(axis)))


def test_make_canonical_random_is_a_relabelling(run_pp):
  instances = np.array([[1, 1, 4], [9, 0, 4]], np.int32)[..., None]
  out = run_pp(get_preprocess_fn("make_canonical(random=True)"),
               {"labels": instances, "_rng": rng(3)})["labels"][..., 0]
  assert out[1, 1] == 0
  assert sorted({out[0, 0], out[0, 2], out[1, 0]}) == [1, 2, 3]
  assert out[0, 0] == out[0, 1] and out[0, 2] == out[1, 2]


def test_randu_is_deterministic_given_rng_and_advances_it(run_pp):
  a = run_pp(get_preprocess_fn('randu("u")|randu("v")'), {"_rng": rng(0)})
  b = run_pp(get_preprocess_fn('randu("u")'), {"_rng": rng(0)})
  c = run_pp(get_preprocess_fn('randu("u")'), {"_rng": rng(1)})
  assert 0 <= a["u"] < 1 and 0 <= a["v"] < 1
  assert a["u"] == b["u"] and a["u"] != a["v"] and a["u"] != c["u"]


@pytest.mark.parametrize("u, flipped", [(0.7, True), (0.3, False)])
def test_det_fliplr_flips_every_key_alike(run_pp, u, flipped):
  image, labels = random_image(3, 4), np.arange(12, dtype=np.int32).reshape(3, 4, 1)
  spec = 'det_fliplr(key="image")|det_fliplr(key="labels")'
  out = run_pp(get_preprocess_fn(spec), {"image": image, "labels": labels, "fliplr": u})
  np.testing.assert_array_equal(out["image"], image[:, ::-1] if flipped else image)
  np.testing.assert_array_equal(out["labels"], labels[:, ::-1] if flipped else labels)


def test_inception_box_and_crop_box_cut_the_same_window(run_pp):
  h, w = 30, 40
  coords = np.arange(h * w, dtype=np.int32).reshape(h, w, 1)  # pixel value = its position
  image = np.repeat(coords, 3, -1)
  spec = 'inception_box|crop_box(key="image")|crop_box(key="labels")'
  for seed in range(10):
    out = run_pp(get_preprocess_fn(spec), {"image": image, "labels": coords, "_rng": rng(seed)})
    crop = out["labels"][..., 0]
    y0, x0 = divmod(int(crop[0, 0]), w)
    ch, cw = crop.shape
    np.testing.assert_array_equal(crop, coords[y0:y0 + ch, x0:x0 + cw, 0])
    np.testing.assert_array_equal(out["image"], image[y0:y0 + ch, x0:x0 + cw])
    begin, size = out["box"]
    np.testing.assert_allclose(begin * [h, w], [y0, x0], atol=1e-3)
    np.testing.assert_allclose(size * [h, w], [ch, cw], atol=1e-3)
    assert 0.05 * h * w * 0.8 <= ch * cw <= h * w


def test_crop_box_scales_to_a_smaller_label_map(run_pp):
  box = (np.array([0.5, 0.25], np.float32), np.array([0.5, 0.5], np.float32))
  labels = np.arange(16, dtype=np.int32).reshape(4, 4, 1)
  out = run_pp(get_preprocess_fn('crop_box(key="labels")'), {"labels": labels, "box": box})
  np.testing.assert_array_equal(out["labels"], labels[2:4, 1:3])


def test_rgb_to_grayscale_to_rgb(run_pp):
  image = random_image(5, 5).astype(np.float32)
  out = run_pp(get_preprocess_fn("rgb_to_grayscale_to_rgb"), {"image": image})["image"]
  gray = image @ np.array([0.2989, 0.5870, 0.1140], np.float32)
  for c in range(3):
    np.testing.assert_allclose(out[..., c], gray, rtol=1e-5)


def test_nyu_depth_and_eval_crop(run_pp):
  depth = (np.arange(480 * 640).reshape(480, 640) / 1e5).astype(np.float16)
  image = np.zeros((480, 640, 3), np.uint8)
  image[..., 0] = np.arange(640) % 256
  out = run_pp(get_preprocess_fn("nyu_depth|nyu_eval_crop"), {"depth": depth, "image": image})
  np.testing.assert_array_equal(out["labels"], depth.astype(np.float32)[45:471, 41:601, None])
  np.testing.assert_array_equal(out["image"], image[45:471, 41:601])
  out = run_pp(get_preprocess_fn('nyu_depth|nyu_eval_crop((54, 480, 41, 601))'),
               {"depth": depth, "image": image})
  assert out["labels"].shape == (426, 560, 1)
  np.testing.assert_array_equal(out["labels"][0, 0, 0], np.float32(depth[54, 41]))


def test_nyu_eval_crop_rejects_small_inputs():
  fn = get_preprocess_fn("nyu_eval_crop")
  with pytest.raises(tf.errors.InvalidArgumentError, match="smaller than the crop"):
    fn({"image": np.zeros((100, 100, 3), np.uint8), "labels": np.zeros((100, 100, 1))})


def test_strong_hash_is_a_deterministic_int64(run_pp):
  out = run_pp(get_preprocess_fn("strong_hash"), {"tfds_id": np.array([b"a", b"b", b"a"])})
  h = out["tfds_id"]
  assert h.dtype == np.int64 and h[0] == h[2] and h[0] != h[1]
  again = get_preprocess_fn("strong_hash")({"tfds_id": tf.constant(b"a")})["tfds_id"]
  assert int(again) == h[0]


def test_rgb_to_id():
  rgb = np.array([[[1, 2, 3]]], np.uint8)
  assert int(ops_uvim.rgb_to_id(rgb)[0, 0]) == 1 + 2 * 256 + 3 * 65536
