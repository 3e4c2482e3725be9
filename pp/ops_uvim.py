"""UViM's ops (the paper's `proj.uvim.pp_ops`): panoptic and depth labels, joint augmentation."""

import tensorflow as tf

from pp.ops_image import decode_image, sample_inception_box
from pp.registry import PPFn, register
from pp.utils import in_key_out_key, next_seed

EIGEN_CROP = (45, 471, 41, 601)  # NYU depth v2 eval crop: rows 45:471, cols 41:601 of 480x640.


def rgb_to_id(rgb: tf.Tensor) -> tf.Tensor:
  """COCO panoptic PNG colour -> segment id: R + 256 G + 256^2 B, as int32 (H, W)."""
  rgb = tf.cast(rgb, tf.int32)
  return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


@register("coco_panoptic")
def coco_panoptic() -> PPFn:
  """`panoptic_image` + `panoptic_objects` -> `semantics` and `instances`, int32 (H, W, 1).

  A pixel of segment k (its position in `panoptic_objects`) gets instance k + 1 and semantic
  class `label[k] + 1`; pixels of no listed segment (id 0 is COCO's void) get 0 in both.
  """

  def _coco_panoptic(data):
    segment_ids = rgb_to_id(decode_image(data["panoptic_image"]))
    ids = tf.cast(data["panoptic_objects"]["id"], tf.int32)
    labels = tf.cast(data["panoptic_objects"]["label"], tf.int32)
    # Look every pixel's id up in the sorted object ids; a sentinel past the end catches misses.
    order = tf.argsort(ids)
    sorted_ids = tf.concat([tf.gather(ids, order), [tf.int32.max]], axis=0)
    pos = tf.searchsorted(sorted_ids, tf.reshape(segment_ids, [-1]))
    pos = tf.reshape(pos, tf.shape(segment_ids))
    found = tf.gather(sorted_ids, pos) == segment_ids
    index = tf.gather(tf.concat([order, [-1]], axis=0), pos)
    label = tf.gather(tf.concat([tf.gather(labels, order), [-1]], axis=0), pos)
    data["instances"] = tf.where(found, index + 1, 0)[..., None]
    data["semantics"] = tf.where(found, label + 1, 0)[..., None]
    return data

  return _coco_panoptic


@register("make_canonical")
@in_key_out_key(default="labels", with_data=True)
def make_canonical(random: bool = False, main_sort_axis: str = "y"):
  """Renumbers the instance ids (last channel) 1..N by position, so that ids are learnable.

  Ids > 0 are ordered by centre of mass, sorted by `c_major * size_major + c_minor` (the
  original's raster key: top-to-bottom, then left-to-right for the default "y"); `random=True`
  orders them randomly instead. Id 0 stays 0 and negative ids become -1.
  """
  if main_sort_axis not in ("y", "x"):
    raise ValueError(f"main_sort_axis must be 'y' or 'x', got {main_sort_axis!r}")
  major = 0 if main_sort_axis == "y" else 1

  def _make_canonical(labels, data):
    instances = labels[..., -1]
    shape = tf.shape(instances)
    ids, segment = tf.unique(tf.reshape(instances, [-1]))
    n = tf.size(ids)
    yx = tf.cast(tf.reshape(tf.stack(tf.meshgrid(
        tf.range(shape[0]), tf.range(shape[1]), indexing="ij"), -1), [-1, 2]), tf.float64)
    counts = tf.math.unsorted_segment_sum(tf.ones_like(yx[:, 0]), segment, n)
    centres = tf.math.unsorted_segment_sum(yx, segment, n) / counts[:, None]
    if random:
      key = tf.random.stateless_uniform([n], next_seed(data), dtype=tf.float64)
    else:
      key = centres[:, major] * tf.cast(shape[major], tf.float64) + centres[:, 1 - major]
    key = tf.where(ids > 0, key, tf.float64.max)  # non-positive ids sort last
    rank = tf.math.invert_permutation(tf.argsort(key, stable=True))
    new_ids = tf.where(ids > 0, rank + 1, tf.where(ids == 0, 0, -1))
    canonical = tf.reshape(tf.gather(tf.cast(new_ids, labels.dtype), segment), shape)
    return tf.concat([labels[..., :-1], canonical[..., None]], axis=-1)

  return _make_canonical


@register("inception_box")
def inception_box(area: tuple[float, float] = (0.05, 1.0),
                  aspect: tuple[float, float] = (0.75, 1.33),
                  outkey: str = "box", inkey: str = "image") -> PPFn:
  """Samples an Inception-style crop window of `inkey` into `outkey` as relative (begin, size).

  Relative coordinates let `crop_box` cut the same region from image and labels.
  """

  def _inception_box(data):
    shape = tf.shape(data[inkey])
    begin, size = sample_inception_box(shape, next_seed(data), area, aspect)
    hw = tf.cast(shape[:2], tf.float32)
    data[outkey] = (tf.cast(begin, tf.float32) / hw, tf.cast(size, tf.float32) / hw)
    return data

  return _inception_box


@register("crop_box")
@in_key_out_key(with_data=True)
def crop_box(boxkey: str = "box"):
  """Crops the relative (begin, size) window in `boxkey`; same window for image and labels."""

  def _crop_box(x, data):
    begin, size = data[boxkey]
    hw = tf.shape(x)[:2]
    hw_f = tf.cast(hw, tf.float32)
    y0x0 = tf.cast(tf.round(begin * hw_f), tf.int32)
    y1x1 = tf.minimum(tf.cast(tf.round((begin + size) * hw_f), tf.int32), hw)
    crop_size = tf.maximum(y1x1 - y0x0, 1)
    crop = tf.slice(x, tf.concat([y0x0, [0]], 0), tf.concat([crop_size, [-1]], 0))
    crop.set_shape([None, None, x.shape[-1]])
    return crop

  return _crop_box


@register("randu")
def randu(key: str) -> PPFn:
  """Draws one uniform float in [0, 1) into `key` (shared by later `det_*` ops)."""

  def _randu(data):
    data[key] = tf.random.stateless_uniform([], next_seed(data))
    return data

  return _randu


@register("det_fliplr")
@in_key_out_key(with_data=True)
def det_fliplr(randkey: str = "fliplr"):
  """Flips left-right when `data[randkey] > 0.5`, so several keys flip together."""
  return lambda x, data: tf.cond(
      data[randkey] > 0.5, lambda: tf.image.flip_left_right(x), lambda: tf.identity(x))


@register("rgb_to_grayscale_to_rgb")
@in_key_out_key()
def rgb_to_grayscale_to_rgb():
  """Grayscale copy of an RGB image, kept with 3 channels (the colorization input)."""
  return lambda x: tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(x))


@register("nyu_depth")
@in_key_out_key(default="depth", out_default="labels")
def nyu_depth():
  """NYU depth map (H, W) in metres -> float32 labels (H, W, 1)."""
  return lambda x: tf.cast(x if x.shape.rank == 3 else x[..., None], tf.float32)


@register("nyu_eval_crop")
def nyu_eval_crop(crop: tuple[int, int, int, int] = EIGEN_CROP,
                  keys: tuple[str, ...] = ("image", "labels")) -> PPFn:
  """Crops `keys` to rows crop[0]:crop[1], cols crop[2]:crop[3] (default: Eigen's crop)."""
  y0, y1, x0, x1 = crop

  def _nyu_eval_crop(data):
    for k in keys:
      x = data[k]
      tf.debugging.assert_greater_equal(
          tf.shape(x)[:2], [y1, x1],
          message=f"nyu_eval_crop: {k!r} is smaller than the crop rows {y0}:{y1}, cols {x0}:{x1}")
      data[k] = x[y0:y1, x0:x1]
    return data

  return _nyu_eval_crop


@register("strong_hash")
@in_key_out_key(default="tfds_id")
def strong_hash():
  """Hashes a string (e.g. `tfds_id`) to an int64, since strings cannot go to the device."""
  return lambda x: tf.strings.to_hash_bucket_strong(
      x, tf.int64.max, [0x5EED_0F_0717_0001, 0x0C0DE_0F_0717_0002])
