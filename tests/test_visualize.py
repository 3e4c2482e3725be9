"""uvim.visualize: overlay colours and boundaries, depth colormap, PNG16, contact sheet layout."""

import warnings

import numpy as np
import pytest
from PIL import Image, ImageFont

from uvim import visualize as vis

RED = np.array([255, 0, 0], np.uint8)


def luminance(rgb):
  return rgb.astype(np.float64) @ np.array([0.2126, 0.7152, 0.0722])


# ------------------------------------------------------------------------------------------
# panoptic_overlay


def two_instance_map():
  """An 8x12 map: stuff class 2 everywhere, two instances of thing class 5, a void corner."""
  sem = np.full((8, 12), 2)
  inst = np.zeros((8, 12), int)
  sem[2:6, 1:5], inst[2:6, 1:5] = 5, 1
  sem[2:6, 6:10], inst[2:6, 6:10] = 5, 2
  sem[:2, :2] = 0
  return sem, inst


def test_overlay_instances_of_one_class_differ_and_colours_are_stable():
  image = np.full((8, 12, 3), 100, np.uint8)
  sem, inst = two_instance_map()
  out = vis.panoptic_overlay(image, sem, inst)
  # Interior pixels (not on the boundary lines) of the two instances.
  a, b, stuff = out[3, 2], out[3, 7], out[7, 11]
  assert not np.array_equal(a, b)
  assert not np.array_equal(a, stuff) and not np.array_equal(b, stuff)
  # The blend is exactly round(0.5 * image + 0.5 * segment_color).
  np.testing.assert_array_equal(a, np.round(50 + 0.5 * vis.segment_color(5, 1)))
  np.testing.assert_array_equal(stuff, np.round(50 + 0.5 * vis.segment_color(2, 0)))

  # A different map with (5, 1) elsewhere and other segments around: the same colour.
  sem2 = np.full((6, 6), 9)
  inst2 = np.full((6, 6), 4)
  sem2[1:5, 1:5], inst2[1:5, 1:5] = 5, 1
  out2 = vis.panoptic_overlay(np.full((6, 6, 3), 100, np.uint8), sem2, inst2)
  np.testing.assert_array_equal(out2[2, 2], a)
  # Deterministic: the same call twice gives the same pixels.
  np.testing.assert_array_equal(vis.panoptic_overlay(image, sem, inst), out)


def test_overlay_many_instances_get_distinct_colours():
  for cls in (1, 7, 80):
    colours = {tuple(np.round(vis.segment_color(cls, i)).astype(int)) for i in range(1, 101)}
    assert len(colours) == 100


def test_overlay_stuff_classes_share_one_colour_per_class():
  sem = np.full((4, 8), 3)
  inst = np.zeros((4, 8), int)
  inst[:, 4:] = 1  # two segments of class 3
  image = np.full((4, 8, 3), 100, np.uint8)
  stuff = vis.panoptic_overlay(image, sem, inst, thing_classes=[5])
  np.testing.assert_array_equal(stuff[1, 1], stuff[1, 6])
  assert (stuff[:, 3] == 255).all()  # still two segments: a boundary between them
  thing = vis.panoptic_overlay(image, sem, inst, thing_classes=[3])
  assert not np.array_equal(thing[1, 1], thing[1, 6])


def brute_force_boundaries(sem, inst):
  """The documented rule, pixel by pixel."""
  h, w = sem.shape
  seg = lambda i, j: (sem[i, j], inst[i, j])
  void = lambda i, j: sem[i, j] == 0
  mask = np.zeros((h, w), bool)
  for i in range(h):
    for j in range(w):
      if void(i, j):
        continue
      mask[i, j] = ((j + 1 < w and seg(i, j + 1) != seg(i, j))
                    or (i + 1 < h and seg(i + 1, j) != seg(i, j))
                    or (j > 0 and void(i, j - 1)) or (i > 0 and void(i - 1, j)))
  return mask


def test_overlay_boundaries_and_void_match_brute_force():
  rng = np.random.default_rng(0)
  # Blocky random labels so there are both interiors and boundaries.
  sem = np.kron(rng.integers(0, 4, (5, 6)), np.ones((3, 2), int))[:14, :11]
  inst = np.kron(rng.integers(0, 3, (7, 4)), np.ones((2, 3), int))[:14, :11]
  image = rng.integers(0, 180, (14, 11, 3)).astype(np.uint8)  # blends stay below 255
  out = vis.panoptic_overlay(image, sem, inst)

  expected = brute_force_boundaries(sem, inst)
  assert expected.any() and (~expected & (sem != 0)).any()
  white = (out == 255).all(-1)
  np.testing.assert_array_equal(white, expected)

  void = sem == 0
  assert void.any()
  np.testing.assert_array_equal(out[void], np.round(image[void] * vis.VOID_DIM).astype(np.uint8))
  # Void pixels are darker than the image, never coloured.
  assert (out[void] <= image[void]).all() and (out[void] < image[void]).any()


def test_overlay_rejects_bad_inputs():
  image = np.zeros((4, 4, 3), np.uint8)
  with pytest.raises(ValueError, match="HxW"):
    vis.panoptic_overlay(image, np.zeros((4, 5), int), np.zeros((4, 5), int))
  with pytest.raises(ValueError, match="num_classes"):
    vis.panoptic_overlay(image, np.full((4, 4), 7), np.zeros((4, 4), int), num_classes=5)


# ------------------------------------------------------------------------------------------
# colorize_depth


def test_colorize_depth_hits_the_anchors_near_bright_far_dark():
  n = len(vis.VIRIDIS_ANCHORS)
  depth = np.linspace(1.0, 9.0, n)[None, :]
  out = vis.colorize_depth(depth)
  # Nearest = last anchor (bright yellow), farthest = first anchor (dark purple).
  np.testing.assert_array_equal(out[0], vis.VIRIDIS_ANCHORS[::-1].astype(np.uint8))
  np.testing.assert_array_equal(out[0, 0], [253, 231, 37])
  np.testing.assert_array_equal(out[0, -1], [68, 1, 84])


def test_colorize_depth_is_monotone():
  depth = np.linspace(0.5, 20.0, 60)[None, :]
  lum = luminance(vis.colorize_depth(depth)[0])
  assert (np.diff(lum) < 0).all()  # farther = darker, strictly
  # Halfway between two anchors is the average of the two anchors.
  out = vis.colorize_depth(np.array([[1.0, 1.0625, 2.0]]))
  np.testing.assert_array_equal(out[0, 1], np.round(vis.VIRIDIS_ANCHORS[-1] / 2
                                                    + vis.VIRIDIS_ANCHORS[-2] / 2))


def test_colorize_depth_missing_pixels_are_black_and_ignored_for_range():
  depth = np.array([[np.nan, 0.0, -3.0, np.inf], [2.0, 4.0, 3.0, 2.0]])
  out = vis.colorize_depth(depth)
  assert (out[0] == 0).all()
  np.testing.assert_array_equal(out[1, 0], [253, 231, 37])  # 2 m is the nearest valid
  np.testing.assert_array_equal(out[1, 1], [68, 1, 84])  # 4 m is the farthest valid
  np.testing.assert_array_equal(out[1, 2], vis.VIRIDIS_ANCHORS[4].astype(np.uint8))
  assert (vis.colorize_depth(np.full((3, 3), np.nan)) == 0).all()


def test_colorize_depth_constant_and_explicit_range():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    out = vis.colorize_depth(np.full((3, 4), 2.5))
  assert (out == np.array([253, 231, 37], np.uint8)).all()
  # Explicit range: values outside are clipped to its ends.
  out = vis.colorize_depth(np.array([[0.5, 1.0, 3.0, 10.0]]), min_depth=1.0, max_depth=3.0)
  np.testing.assert_array_equal(out[0], [[253, 231, 37], [253, 231, 37], [68, 1, 84], [68, 1, 84]])
  with pytest.raises(ValueError):
    vis.colorize_depth(np.ones((2, 2)), min_depth=3.0, max_depth=1.0)


# ------------------------------------------------------------------------------------------
# 16-bit depth PNGs and file helpers


def test_depth_png16_round_trip_and_clipping(tmp_path):
  rng = np.random.default_rng(1)
  depth = rng.uniform(0.0, 60.0, (7, 9))
  mm = vis.depth_to_png16(depth)
  assert mm.dtype == np.uint16
  back = vis.png16_to_depth(mm)
  assert back.dtype == np.float32
  assert np.abs(back - depth).max() <= 0.0005 + 1e-6

  special = np.array([[np.nan, -0.2, 70.0, 0.0], [np.inf, 1.2344, 1.2346, 65.535]])
  np.testing.assert_array_equal(vis.depth_to_png16(special),
                                [[0, 0, 65535, 0], [0, 1234, 1235, 65535]])
  np.testing.assert_array_equal(vis.png16_to_depth(np.array([[0, 1500]], np.uint16)),
                                np.array([[0.0, 1.5]], np.float32))

  # Through an actual 16-bit PNG file (parent directories are created).
  path = vis.save_png(tmp_path / "a" / "b" / "depth.png", mm)
  np.testing.assert_array_equal(np.asarray(Image.open(path)).astype(np.uint16), mm)


def test_save_png_and_jpeg(tmp_path):
  rgb = np.random.default_rng(2).integers(0, 256, (5, 6, 3)).astype(np.uint8)
  path = vis.save_png(tmp_path / "x" / "rgb.png", rgb)
  np.testing.assert_array_equal(np.asarray(Image.open(path)), rgb)
  flat = np.full((16, 16, 3), 120, np.uint8)
  path = vis.save_jpeg(tmp_path / "y" / "flat.jpg", flat, quality=90)
  loaded = np.asarray(Image.open(path))
  assert loaded.shape == (16, 16, 3) and np.abs(loaded.astype(int) - 120).max() <= 2
  with pytest.raises(ValueError):
    vis.save_png(tmp_path / "bad.png", np.zeros((2, 2), np.float32))


# ------------------------------------------------------------------------------------------
# contact_sheet


def test_contact_sheet_size_formula():
  img = np.zeros((30, 40, 3), np.uint8)
  rows = [[img, None, img], [img], []]
  titles = ["ground truth", "input", "T=0", "T=1 #1", "T=1 #2"]
  out = vis.contact_sheet(rows, titles, cell_size=50, pad=3)
  assert out.dtype == np.uint8
  assert out.shape == (vis.TITLE_HEIGHT + 3 + 3 * (50 + 3), 3 + 5 * (50 + 3), 3)

  row_titles = ["a", "a much longer row title", "b"]
  out = vis.contact_sheet(rows, titles, row_titles=row_titles, cell_size=50, pad=3)
  font = ImageFont.load_default()
  left = int(np.ceil(font.getlength("a much longer row title"))) + 2 * 3
  assert vis.row_title_width(row_titles, 3) == left
  assert out.shape == (vis.TITLE_HEIGHT + 3 + 3 * 53, left + 3 + 5 * 53, 3)
  # Row titles are drawn in the left band, column titles in the top band.
  assert (out[vis.TITLE_HEIGHT + 3:, :left] < 128).any()
  for c in range(5):
    x0 = left + 3 + c * 53
    assert (out[:vis.TITLE_HEIGHT + 3, x0:x0 + 50] < 128).any(), c


def test_contact_sheet_places_resized_cells():
  red = np.zeros((10, 20, 3), np.uint8)
  red[..., 0] = 255
  tall_gray = np.full((300, 100), 77, np.uint8)
  out = vis.contact_sheet([[None, red], [tall_gray]], ["a", "b", "c"], cell_size=192, pad=4)
  assert out.shape == (16 + 4 + 2 * 196, 4 + 3 * 196, 3)

  # Cell (0, 1): top-left (x, y) = (4 + 196, 16 + 4) = (200, 20). 10x20 -> 96x192, centred.
  cell = out[20:212, 200:392]
  expected = np.full((192, 192, 3), 255, np.uint8)
  expected[48:144, :] = RED
  np.testing.assert_array_equal(cell, expected)

  # Cell (0, 0) is None: all background.
  assert (out[20:212, 4:196] == 255).all()
  # Cells (0, 2), (1, 1), (1, 2) are missing from short rows: background too.
  assert (out[20:212, 396:588] == 255).all()
  assert (out[216:408, 200:588] == 255).all()

  # Cell (1, 0): gray 300x100 -> 192x64 at x offset 64, replicated to RGB.
  cell = out[216:408, 4:196]
  expected = np.full((192, 192, 3), 255, np.uint8)
  expected[:, 64:128] = 77
  np.testing.assert_array_equal(cell, expected)
  # Padding between cells stays background.
  assert (out[212:216] == 255).all() and (out[:, 196:200] == 255).all()


def test_contact_sheet_too_many_cells_names_the_row():
  img = np.zeros((4, 4, 3), np.uint8)
  with pytest.raises(ValueError, match=r"row 1\b"):
    vis.contact_sheet([[img], [img, img, img]], ["a", "b"])
  with pytest.raises(ValueError, match="row titles"):
    vis.contact_sheet([[img]], ["a"], row_titles=["x", "y"])
