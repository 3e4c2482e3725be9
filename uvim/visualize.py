"""Human-viewable outputs for predict.py: panoptic overlays, depth colormaps, contact sheets, PNGs.

Pure numpy + PIL, deterministic (the same inputs always give the same pixels), no plotting library.

Conventions:
  * Panoptic maps are (semantics, instances) int maps as in `uvim.tasks.panoptic`: semantics 0 is
    void, a segment is a distinct (class, instance) pair.
  * Depth is in metres; missing depth is NaN, +-inf or <= 0.
  * Images are uint8 HxWx3 RGB (HxW grayscale is accepted where noted).
"""

import functools
import math
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from uvim import files

VOID_DIM = 0.6  # void pixels of a panoptic overlay are the image times this factor
BOUNDARY_RGB = (255, 255, 255)
BACKGROUND = 255  # contact sheet background (padding, letterbox, empty cells): white
TEXT_RGB = (0, 0, 0)
TITLE_HEIGHT = 16  # height in pixels of the column-title band at the top of a contact sheet

_PHI = 0.6180339887498949  # golden-ratio conjugate: successive multiples spread hues evenly
_SQRT2_FRAC = 0.41421356237309515

# Viridis at 9 evenly spaced anchors (t = 0, 1/8, ..., 1). Luminance increases monotonically
# along the anchors; `colorize_depth` maps the NEAREST depth to t = 1 (bright yellow) and the
# FARTHEST to t = 0 (dark purple).
VIRIDIS_ANCHORS = np.array([
    [68, 1, 84],
    [71, 44, 122],
    [59, 81, 139],
    [44, 113, 142],
    [33, 144, 141],
    [39, 173, 129],
    [92, 200, 99],
    [170, 220, 50],
    [253, 231, 37],
], dtype=np.float64)


# ------------------------------------------------------------------------------------------
# Panoptic overlay.


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
  """One HSV colour (all in [0, 1], hue wraps) as float RGB in [0, 255]."""
  h = (h % 1.0) * 6.0
  i = int(h) % 6
  f = h - int(h)
  p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
  rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
  return np.array(rgb, dtype=np.float64) * 255.0


def _class_hsv(cls: int, num_classes: int | None) -> tuple[float, float, float]:
  """The class colour: spread-out hue, alternating saturation and value for extra contrast."""
  if num_classes is not None and num_classes > 1:
    # A permutation of num_classes evenly spaced hues, so classes never share a hue.
    stride = max(1, round(num_classes * _PHI * _PHI))
    while math.gcd(stride, num_classes) != 1:
      stride += 1
    hue = (cls * stride % num_classes) / num_classes
  else:
    hue = (cls * _PHI) % 1.0
  sat = (0.85, 0.6)[cls % 2]
  val = (0.95, 0.75)[(cls // 2) % 2]
  return hue, sat, val


def segment_color(cls: int, instance: int, num_classes: int | None = None,
                  is_thing: bool = True) -> np.ndarray:
  """Deterministic float RGB (0..255) of segment (cls, instance); stuff uses the class colour."""
  hue, sat, val = _class_hsv(int(cls), num_classes)
  instance = int(instance)
  if is_thing and instance != 0:
    # Hue within +-0.09 of the class hue and value in [0.55, 1] x class value, both from
    # low-discrepancy sequences so instances 1..N of one class stay apart.
    hue += 0.18 * (((instance * _PHI) % 1.0) - 0.5)
    val *= 0.55 + 0.45 * ((instance * _SQRT2_FRAC + 0.5) % 1.0)
  return _hsv_to_rgb(hue, sat, val)


def segment_boundaries(segments_HxW: np.ndarray, void_HxW: np.ndarray | None = None) -> np.ndarray:
  """Bool HxW mask of 1-px boundaries between different segment ids (never on void pixels).

  A non-void pixel is a boundary pixel iff its right or bottom neighbour has a different id, or
  its left or top neighbour is void; so a line between two segments lies in the left/top one and
  a line between a segment and void lies in the segment. Void pixels are never boundaries.
  """
  seg = np.asarray(segments_HxW)
  void = np.zeros(seg.shape, bool) if void_HxW is None else np.asarray(void_HxW, bool)
  edge = np.zeros(seg.shape, bool)
  edge[:, :-1] |= seg[:, :-1] != seg[:, 1:]
  edge[:-1, :] |= seg[:-1, :] != seg[1:, :]
  edge[:, 1:] |= void[:, :-1]
  edge[1:, :] |= void[:-1, :]
  return edge & ~void


def panoptic_overlay(image: np.ndarray, semantics: np.ndarray, instances: np.ndarray,
                     alpha: float = 0.5, num_classes: int | None = None,
                     thing_classes: Collection[int] | None = None) -> np.ndarray:
  """Blends a colour per (class, instance) segment into the image, with white 1-px boundaries.

  Segment colours come from `segment_color` (independent of the rest of the map, so a segment
  has the same colour in every call). A segment is "stuff" (class colour, all instances alike)
  if its class is not in `thing_classes`, or, when `thing_classes` is None, if its instance is
  0. Non-void pixels are round((1 - alpha) * image + alpha * colour), boundary pixels (see
  `segment_boundaries`) are white, void pixels (semantics == 0) are round(image * VOID_DIM).
  `num_classes`, if given, spreads class hues evenly and checks that semantics < num_classes.
  """
  image = np.asarray(image)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  semantics = np.asarray(semantics).astype(np.int64)
  instances = np.asarray(instances).astype(np.int64)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"image must be uint8 HxWx3, got {image.dtype} {image.shape}")
  if semantics.shape != image.shape[:2] or instances.shape != image.shape[:2]:
    raise ValueError(f"semantics {semantics.shape} and instances {instances.shape} must be "
                     f"HxW = {image.shape[:2]}")
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha must be in [0, 1], got {alpha}")
  if semantics.size and semantics.min() < 0:
    raise ValueError("semantics must be >= 0 (0 is void)")
  if num_classes is not None and semantics.size and semantics.max() >= num_classes:
    raise ValueError(f"semantics max {semantics.max()} >= num_classes {num_classes}")
  things = None if thing_classes is None else {int(c) for c in thing_classes}

  if instances.size and (instances.min() < 0 or instances.max() >= 2**32):
    raise ValueError("instances must be in [0, 2**32)")

  keys = (semantics << 32) | instances  # one int per (class, instance) segment
  unique, inverse = np.unique(keys.ravel(), return_inverse=True)
  palette = np.zeros((len(unique), 3), np.float64)
  for k, key in enumerate(unique.tolist()):
    cls, inst = key >> 32, key & 0xFFFFFFFF
    is_thing = inst != 0 if things is None else cls in things
    palette[k] = segment_color(cls, inst if is_thing else 0, num_classes, is_thing)
  segment_ids = inverse.reshape(semantics.shape)
  # Stuff instances share one colour but are still distinct segments for boundaries.
  colors = palette[segment_ids]

  img = image.astype(np.float64)
  out = np.round((1.0 - alpha) * img + alpha * colors)
  void = semantics == 0
  out[void] = np.round(img[void] * VOID_DIM)
  out[segment_boundaries(segment_ids, void)] = BOUNDARY_RGB
  return np.clip(out, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------
# Depth.


def _valid_depth(depth: np.ndarray) -> np.ndarray:
  """Mask of usable depth: finite and positive."""
  with np.errstate(invalid="ignore"):
    return np.isfinite(depth) & (depth > 0)


def colorize_depth(depth: np.ndarray, min_depth: float | None = None,
                   max_depth: float | None = None) -> np.ndarray:
  """Viridis-coloured depth, near = bright yellow, far = dark purple, missing = black.

  Depth is clipped to [min_depth, max_depth] (default: min/max of the finite positive values)
  and mapped linearly to t = (max_depth - d) / (max_depth - min_depth), then looked up by linear
  interpolation in `VIRIDIS_ANCHORS` (t = 0 far, t = 1 near). A constant depth (max == min) is
  drawn in the near colour. NaN, +-inf and non-positive pixels are black (0, 0, 0).
  """
  depth = np.asarray(depth, dtype=np.float64)
  if depth.ndim != 2:
    raise ValueError(f"depth must be HxW, got shape {depth.shape}")
  valid = _valid_depth(depth)
  out = np.zeros((*depth.shape, 3), np.uint8)
  if not valid.any():
    return out
  values = depth[valid]
  lo = float(values.min()) if min_depth is None else float(min_depth)
  hi = float(values.max()) if max_depth is None else float(max_depth)
  if hi < lo:
    raise ValueError(f"max_depth {hi} < min_depth {lo}")
  span = hi - lo
  t = np.ones_like(values) if span <= 0 else (hi - np.clip(values, lo, hi)) / span
  x = t * (len(VIRIDIS_ANCHORS) - 1)
  rgb = np.stack([np.interp(x, np.arange(len(VIRIDIS_ANCHORS)), VIRIDIS_ANCHORS[:, c])
                  for c in range(3)], axis=-1)
  out[valid] = np.clip(np.round(rgb), 0, 255).astype(np.uint8)
  return out


def depth_to_png16(depth_m: np.ndarray) -> np.ndarray:
  """Depth in metres -> uint16 millimetres for 16-bit PNG (rounded, clipped; missing -> 0).

  NaN, +-inf and negative depths become 0 (missing); finite depths above 65.535 m saturate.
  """
  depth_m = np.asarray(depth_m, dtype=np.float64)
  mm = np.where(np.isfinite(depth_m) & (depth_m >= 0), depth_m, 0.0) * 1000.0
  return np.clip(np.round(mm), 0, 65535).astype(np.uint16)


def png16_to_depth(arr: np.ndarray) -> np.ndarray:
  """uint16 millimetres (as written by `depth_to_png16`) -> float32 metres; 0 stays 0."""
  return (np.asarray(arr).astype(np.float32) / np.float32(1000.0)).astype(np.float32)


def show(image: np.ndarray, title: str | None = None, width: float = 10) -> None:
  """One picture in a notebook (matplotlib), `width` inches wide."""
  import matplotlib.pyplot as plt

  height, w = image.shape[:2]
  plt.figure(figsize=(width, width * height / w))
  plt.imshow(image)
  plt.axis("off")
  if title:
    plt.title(title)
  plt.show()


def from_model_range(pixels: np.ndarray) -> np.ndarray:
  """A model input image (values in [-1, 1], HxWx1 or HxWx3) as uint8 HxWx3 RGB."""
  pixels = np.round((np.asarray(pixels, np.float32) + 1) * 127.5).clip(0, 255).astype(np.uint8)
  return _to_rgb_cell(pixels, "from_model_range")


# ------------------------------------------------------------------------------------------
# Files.


def beside(stem: Path, suffix: str) -> Path:
  """`stem`'s name with `suffix` appended (`Path.with_suffix` would replace a dotted part of the
  name: 'scan.001' + '.png' -> 'scan.png')."""
  return stem.with_name(stem.name + suffix)


def save_png(path: str | Path, array: np.ndarray) -> Path:
  """Writes a uint8 HxW / HxWx3 / HxWx4 or uint16 HxW array as PNG (atomically), creating
  parent dirs."""
  array = np.asarray(array)
  if array.dtype == np.uint16:
    if array.ndim != 2:
      raise ValueError(f"uint16 PNGs must be HxW, got shape {array.shape}")
    img = Image.fromarray(array)
  elif array.dtype == np.uint8 and (array.ndim == 2 or (array.ndim == 3
                                                          and array.shape[-1] in (1, 3, 4))):
    img = Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array)
  else:
    raise ValueError(f"cannot save {array.dtype} {array.shape} as PNG")
  with files.atomic_path(path) as tmp:
    img.save(tmp, format="PNG")
  return Path(path)


def save_jpeg(path: str | Path, array: np.ndarray, quality: int = 95) -> Path:
  """Writes a uint8 HxW or HxWx3 array as JPEG at `quality` (atomically), creating parent
  dirs."""
  array = np.asarray(array)
  if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3
                                                           and array.shape[-1] in (1, 3))):
    raise ValueError(f"cannot save {array.dtype} {array.shape} as JPEG")
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  with files.atomic_path(path) as tmp:
    Image.fromarray(array).save(tmp, format="JPEG", quality=quality)
  return Path(path)


# ------------------------------------------------------------------------------------------
# Contact sheet.


@functools.cache
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
  """PIL's default font, loaded once."""
  return ImageFont.load_default()


def text_width(text: str) -> int:
  """Width in pixels of `text` in the contact sheet's font (PIL's default)."""
  return math.ceil(_font().getlength(text)) if text else 0


def row_title_width(row_titles: Sequence[str] | None, pad: int = 4) -> int:
  """Width of the contact sheet's row-title band: 0 without titles, else max text width + 2*pad."""
  if not row_titles:
    return 0
  return max(text_width(t) for t in row_titles) + 2 * pad


def _to_rgb_cell(cell: np.ndarray, where: str) -> np.ndarray:
  """A cell image as uint8 HxWx3 (HxW / HxWx1 gray replicated, HxWx4 alpha dropped)."""
  cell = np.asarray(cell)
  if cell.dtype == bool:
    cell = cell.astype(np.uint8) * 255
  if cell.dtype != np.uint8:
    raise ValueError(f"{where}: cells must be uint8, got {cell.dtype}")
  if cell.ndim == 3 and cell.shape[-1] == 1:
    cell = cell[..., 0]
  if cell.ndim == 2:
    cell = np.repeat(cell[..., None], 3, axis=-1)
  if cell.ndim != 3 or cell.shape[-1] not in (3, 4) or cell.shape[0] == 0 or cell.shape[1] == 0:
    raise ValueError(f"{where}: cells must be HxW or HxWx3, got shape {cell.shape}")
  return cell[..., :3]


def fit_size(height: int, width: int, cell_size: int) -> tuple[int, int]:
  """(h, w) of an image scaled to fit cell_size x cell_size keeping aspect (each side >= 1)."""
  scale = min(cell_size / width, cell_size / height)
  return (min(cell_size, max(1, round(height * scale))),
          min(cell_size, max(1, round(width * scale))))


def _fit(cell: np.ndarray, cell_size: int) -> np.ndarray:
  """Resizes to fit the cell: area averaging when shrinking, nearest when enlarging (crisp)."""
  h, w = cell.shape[:2]
  nh, nw = fit_size(h, w, cell_size)
  if (nh, nw) == (h, w):
    return cell
  resample = Image.Resampling.BOX if nh <= h and nw <= w else Image.Resampling.NEAREST
  return np.asarray(Image.fromarray(cell).resize((nw, nh), resample=resample))


def _truncate(text: str, max_width: int) -> str:
  """`text`, shortened with '...' until it fits in max_width pixels."""
  if text_width(text) <= max_width:
    return text
  while text and text_width(text + "...") > max_width:
    text = text[:-1]
  return text + "..." if text else ""


def contact_sheet(rows: Sequence[Sequence[np.ndarray | None]], column_titles: Sequence[str],
                  row_titles: Sequence[str] | None = None, cell_size: int = 192,
                  pad: int = 4) -> np.ndarray:
  """A titled grid of images like the UViM paper's Figures 7-9 (one row per example).

  Layout (L = `row_title_width(row_titles, pad)`, C = len(column_titles), R = len(rows)):
    width  = L + pad + C * (cell_size + pad)
    height = TITLE_HEIGHT + pad + R * (cell_size + pad)
  and cell (r, c) has its top-left corner at
    x = L + pad + c * (cell_size + pad),  y = TITLE_HEIGHT + pad + r * (cell_size + pad).
  Each image is scaled to fit cell_size x cell_size keeping its aspect (`fit_size`) and centred
  at offset ((cell_size - h) // 2, (cell_size - w) // 2) in its cell; everything else, including
  None cells and the cells missing from short rows, is white. Column titles are centred above
  their column, row titles left-aligned in the left band, both in PIL's default font (titles too
  wide for a cell are cut with '...'). A row with more cells than titles is a ValueError.
  """
  if not column_titles:
    raise ValueError("column_titles must not be empty")
  if cell_size < 1 or pad < 0:
    raise ValueError(f"need cell_size >= 1 and pad >= 0, got {cell_size}, {pad}")
  if row_titles is not None and len(row_titles) != len(rows):
    raise ValueError(f"{len(row_titles)} row titles for {len(rows)} rows")
  ncols = len(column_titles)
  for r, row in enumerate(rows):
    if len(row) > ncols:
      raise ValueError(f"row {r} has {len(row)} cells but there are only {ncols} column titles")

  left = row_title_width(row_titles, pad)
  step = cell_size + pad
  width = left + pad + ncols * step
  height = TITLE_HEIGHT + pad + len(rows) * step
  sheet = np.full((height, width, 3), BACKGROUND, np.uint8)
  for r, row in enumerate(rows):
    y0 = TITLE_HEIGHT + pad + r * step
    for c, cell in enumerate(row):
      if cell is None:
        continue
      fitted = _fit(_to_rgb_cell(cell, f"row {r}, column {c}"), cell_size)
      h, w = fitted.shape[:2]
      y = y0 + (cell_size - h) // 2
      x = left + pad + c * step + (cell_size - w) // 2
      sheet[y:y + h, x:x + w] = fitted

  img = Image.fromarray(sheet)
  draw = ImageDraw.Draw(img)
  for c, title in enumerate(column_titles):
    text = _truncate(str(title), cell_size)
    x = left + pad + c * step + (cell_size - text_width(text)) / 2
    _draw_text(draw, text, x, (TITLE_HEIGHT + pad) / 2)
  for r, title in enumerate(row_titles or ()):
    _draw_text(draw, str(title), pad, TITLE_HEIGHT + pad + r * step + cell_size / 2)
  return np.asarray(img).copy()


def _draw_text(draw: ImageDraw.ImageDraw, text: str, x: float, y_middle: float) -> None:
  """Draws `text` with its left edge at x and its ink vertically centred on y_middle."""
  if not text:
    return
  x0, y0, _, y1 = draw.textbbox((0, 0), text, font=_font())
  draw.text((round(x - x0), round(y_middle - (y0 + y1) / 2)), text, fill=TEXT_RGB, font=_font())
