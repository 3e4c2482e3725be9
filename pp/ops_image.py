"""Image ops: decoding, resizing, flips and Inception-style crops."""

import tensorflow as tf

from pp.registry import register
from pp.utils import in_key_out_key, maybe_repeat, next_seed

RESIZE_METHODS = ("bilinear", "nearest", "bicubic", "area", "lanczos3", "lanczos5", "gaussian",
                  "mitchellcubic")


def decode_image(x: tf.Tensor, channels: int = 3, precise: bool = False) -> tf.Tensor:
  """Decodes encoded image bytes (JPEG, PNG, GIF, BMP); already-decoded images pass through."""
  if x.dtype != tf.string:
    return x
  if precise:
    image = tf.cond(
        tf.io.is_jpeg(x),
        lambda: tf.io.decode_jpeg(x, channels=channels, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_image(x, channels=channels, expand_animations=False))
  else:
    image = tf.io.decode_image(x, channels=channels, expand_animations=False)
  image.set_shape([None, None, channels])
  return image


def sample_inception_box(shape: tf.Tensor, seed: tf.Tensor, area: tuple[float, float],
                         aspect: tuple[float, float]) -> tuple[tf.Tensor, tf.Tensor]:
  """An Inception-style random window of an image of `shape`: (begin [y, x], size [h, w]).

  The window covers a fraction `area` of the image with aspect ratio (w/h) in `aspect`; after
  100 failed attempts it is the whole image (TF's sample_distorted_bounding_box).
  """
  image_size = tf.concat([tf.cast(shape[:2], tf.int32), [1]], axis=0)
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      image_size, bounding_boxes=tf.zeros([1, 0, 4]), seed=seed, min_object_covered=0.0,
      aspect_ratio_range=aspect, area_range=area, max_attempts=100,
      use_image_if_no_bounding_boxes=True)
  return begin[:2], size[:2]


def resize_image(x: tf.Tensor, size: tuple[int, int], method: str = "bilinear",
                 antialias: bool = False) -> tf.Tensor:
  """Resizes (H, W, C) to `size`, keeping the dtype (integers are rounded and clipped)."""
  y = tf.image.resize(x, size, method=method, antialias=antialias)
  if x.dtype.is_integer and y.dtype != x.dtype:
    y = tf.clip_by_value(tf.round(y), x.dtype.min, x.dtype.max)
  return tf.cast(y, x.dtype)


def _check_method(method: str) -> None:
  if method not in RESIZE_METHODS:
    raise ValueError(f"Unknown resize method {method!r}; expected one of {RESIZE_METHODS}")


@register("decode")
@in_key_out_key()
def decode(channels: int = 3, precise: bool = False):
  """Decodes an encoded image to uint8 (H, W, channels); `precise` uses exact JPEG IDCT."""
  return lambda x: decode_image(x, channels, precise)


@register("resize")
@in_key_out_key()
def resize(size: int | tuple[int, int], method: str = "bilinear", antialias: bool = False):
  """Resizes to `size` (int: square), keeping the dtype (integers are rounded and clipped)."""
  size = maybe_repeat(size, 2)
  _check_method(method)
  return lambda x: resize_image(x, size, method, antialias)


@register("flip_lr")
@in_key_out_key(with_data=True)
def flip_lr():
  """Flips left-right with probability 1/2."""
  return lambda x, data: tf.image.stateless_random_flip_left_right(x, next_seed(data))


@register("decode_jpeg_and_inception_crop")
@in_key_out_key(with_data=True)
def decode_jpeg_and_inception_crop(resize_size: int | tuple[int, int] | None = None,
                                   area_min: float = 5, area_max: float = 100,
                                   ratio_min: float = 3 / 4, ratio_max: float = 4 / 3,
                                   resize_method: str = "bilinear"):
  """Decodes only an Inception crop of a JPEG (area in percent), then optionally resizes.

  Non-JPEG or already-decoded images are decoded fully and cropped the same way.
  """
  area, aspect = (area_min / 100, area_max / 100), (ratio_min, ratio_max)
  resize_size = maybe_repeat(resize_size, 2) if resize_size else None
  _check_method(resize_method)

  def _crop_decoded(image, seed):
    begin, size = sample_inception_box(tf.shape(image), seed, area, aspect)
    return tf.slice(image, tf.concat([begin, [0]], 0), tf.concat([size, [-1]], 0))

  def _decode_and_crop(x, data):
    seed = next_seed(data)
    if x.dtype != tf.string:
      image = _crop_decoded(x, seed)
    else:
      def jpeg():
        begin, size = sample_inception_box(tf.image.extract_jpeg_shape(x), seed, area, aspect)
        return tf.image.decode_and_crop_jpeg(x, tf.concat([begin, size], 0), channels=3)
      image = tf.cond(tf.io.is_jpeg(x), jpeg, lambda: _crop_decoded(decode_image(x), seed))
    image.set_shape([None, None, 3])
    return resize_image(image, resize_size, resize_method) if resize_size else image

  return _decode_and_crop
