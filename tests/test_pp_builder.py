"""Parsing op strings, the registry, and the errors a user sees for bad input."""

import numpy as np
import pytest
import tensorflow as tf

from pp import registry
from pp.builder import PPKeyError, PPSpecError, get_preprocess_fn, parse_piece, split_spec


def test_parse_piece_forms():
  assert parse_piece("decode") == ("decode", (), {})
  assert parse_piece(" resize(512) ") == ("resize", (512,), {})
  assert parse_piece('resize(512, key="labels", method="nearest")') == (
      "resize", (512,), {"key": "labels", "method": "nearest"})
  assert parse_piece('concat(["semantics","instances"], "labels")') == (
      "concat", (["semantics", "instances"], "labels"), {})
  assert parse_piece("x(a=(1, 2.5), b=None, c=-1e-3)") == (
      "x", (), {"a": (1, 2.5), "b": None, "c": -1e-3})


def test_split_spec_ignores_bars_in_strings_and_brackets():
  spec = 'a|b("x|y")|c([1, 2])'
  assert [p for _, p in split_spec(spec)] == ["a", 'b("x|y")', "c([1, 2])"]
  assert [o for o, _ in split_spec(spec)] == [0, 2, 11]
  assert split_spec("  ") == []


def test_empty_spec_is_identity():
  out = get_preprocess_fn("")({"a": np.int32(3)})
  assert int(out["a"]) == 3


def test_unknown_op_suggests_closest():
  with pytest.raises(PPSpecError, match=r"Unknown pp op 'reszie'; did you mean 'resize'\?"):
    get_preprocess_fn("decode|reszie(512)")


def test_malformed_piece_is_pointed_at():
  spec = 'decode|concat(["a", "b"] "labels")|keep("labels")'
  with pytest.raises(PPSpecError) as e:
    get_preprocess_fn(spec)
  message = str(e.value)
  assert "cannot parse pp op" in message
  assert "in piece 'concat([\"a\", \"b\"] \"labels\")'" in message
  spec_line, caret_line = message.splitlines()[-2:]
  start = spec_line.index("concat")
  assert caret_line.index("^") == start
  assert caret_line.count("^") == len('concat(["a", "b"] "labels")')


def test_non_literal_argument_is_an_error():
  with pytest.raises(PPSpecError, match="not a Python literal"):
    get_preprocess_fn("resize(res)")
  with pytest.raises(PPSpecError, match="expected `name` or `name\\(args\\)`"):
    get_preprocess_fn("a.b(1)")


def test_bad_arguments_name_the_op_and_its_signature():
  with pytest.raises(PPSpecError, match=r"bad arguments for pp op.*expected resize\(size"):
    get_preprocess_fn("resize(512, methd='nearest')")
  with pytest.raises(PPSpecError, match="either key= or inkey="):
    get_preprocess_fn("resize(4, key='a', inkey='b')")


@pytest.mark.parametrize("in_dataset", [False, True])
def test_missing_key_names_op_key_and_present_keys(in_dataset):
  fn = get_preprocess_fn('decode|resize(4, key="labels")')
  example = {"image": np.zeros((2, 2, 3), np.uint8), "label": np.zeros((2, 2, 1), np.uint8)}
  expected = (r"pp op 'resize\(4, key=\"labels\"\)' needs key 'labels', "
              r"but the example only has keys \['image', 'label'\]")
  with pytest.raises(PPKeyError, match=expected):
    if in_dataset:
      tf.data.Dataset.from_tensors(example).map(fn)
    else:
      fn(example)


def test_input_dict_is_not_modified():
  example = {"image": np.zeros((2, 2, 3), np.uint8)}
  out = get_preprocess_fn('resize(4)|copy("image", "x")')(example)
  assert list(example) == ["image"] and example["image"].shape == (2, 2, 3)
  assert out["image"].shape == (4, 4, 3)


def test_paper_module_names_resolve_and_unknown_modules_fail():
  registry.import_modules(["ops_general", "ops_image", "proj.uvim.pp_ops"])
  assert {"decode", "coco_panoptic", "value_range", "make_canonical"} <= set(registry.names())
  with pytest.raises(ValueError, match=r"'ops_nope'.*cannot be imported"):
    registry.import_modules(["ops_nope"])


def test_every_listed_op_is_registered():
  registry.import_modules()
  ops = {"decode", "coco_panoptic", "concat", "randu", "det_fliplr", "inception_box",
         "crop_box", "resize", "value_range", "make_canonical", "keep", "copy", "nyu_depth",
         "nyu_eval_crop", "rgb_to_grayscale_to_rgb", "decode_jpeg_and_inception_crop",
         "flip_lr", "strong_hash"}
  assert ops <= set(registry.names())


def test_registering_a_name_twice_fails():
  registry.register("_test_op_once")(lambda: (lambda d: d))
  with pytest.raises(ValueError, match="already registered"):
    registry.register("_test_op_once")(lambda: (lambda d: d))
