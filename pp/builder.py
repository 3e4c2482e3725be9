"""Builds a preprocessing function from an op string like `decode|resize(512)|value_range(-1, 1)`.

Pieces are separated by `|`. Each piece is `name` or `name(args)`, where the arguments are
Python literals (`resize(512, key="labels", method="nearest")`). Ops are looked up in the
registry (`pp/registry.py`) after importing the op modules.
"""

import ast
import inspect
from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from pp import registry
from pp.registry import PPFn


class PPSpecError(ValueError):
  """A pp string that cannot be parsed or built; the message points at the piece."""


class PPKeyError(KeyError):
  """An op asked for a key the example does not have."""

  def __str__(self) -> str:  # KeyError's str() would quote the whole message.
    return str(self.args[0])


def get_preprocess_fn(spec: str, modules: Sequence[str] = registry.DEFAULT_MODULES) -> PPFn:
  """Parses `spec` into one `dict -> dict` function that applies its ops in order.

  The function works eagerly (numpy arrays and bytes are converted to tensors) and inside
  `tf.data.Dataset.map`. It copies the input dict, so the caller's dict is never modified.
  """
  registry.import_modules(modules)
  ops = [(piece, _build_op(spec, start, piece)) for start, piece in split_spec(spec)]

  @tf.autograph.experimental.do_not_convert  # Ops use tf.cond explicitly; keeps errors as is.
  def preprocess(data: dict[str, Any]) -> dict[str, Any]:
    data = tf.nest.map_structure(tf.convert_to_tensor, dict(data))
    for piece, op in ops:
      data = _apply(op, piece, data)
    return data

  return preprocess


def split_spec(spec: str, sep: str = "|") -> list[tuple[int, str]]:
  """Splits `spec` on the `sep`s outside brackets and quotes; returns (offset, piece) pairs."""
  if not spec.strip():
    return []
  pieces, depth, quote, start = [], 0, None, 0
  for i, c in enumerate(spec):
    if quote:
      quote = None if c == quote and spec[i - 1] != "\\" else quote
    elif c in "\"'":
      quote = c
    elif c in "([{":
      depth += 1
    elif c in ")]}":
      depth -= 1
    elif c == sep and depth == 0:
      pieces.append((start, spec[start:i]))
      start = i + 1
  pieces.append((start, spec[start:]))
  return pieces


def parse_piece(piece: str) -> tuple[str, tuple, dict[str, Any]]:
  """`name(1, k="v")` -> ("name", (1,), {"k": "v"}); raises SyntaxError or ValueError."""
  node = ast.parse(piece.strip(), mode="eval").body
  if isinstance(node, ast.Name):
    return node.id, (), {}
  if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
    raise ValueError("expected `name` or `name(args)`")
  if any(kw.arg is None for kw in node.keywords):
    raise ValueError("`**kwargs` is not supported")
  args = tuple(_literal(a) for a in node.args)
  kwargs = {kw.arg: _literal(kw.value) for kw in node.keywords}
  return node.func.id, args, kwargs


def _literal(node: ast.AST) -> Any:
  try:
    return ast.literal_eval(node)
  except ValueError:
    raise ValueError(
        f"argument `{ast.unparse(node)}` is not a Python literal (quote strings)") from None


def _build_op(spec: str, start: int, piece: str) -> PPFn:
  try:
    name, args, kwargs = parse_piece(piece)
  except (SyntaxError, ValueError) as e:
    reason = e.msg if isinstance(e, SyntaxError) else str(e)
    raise PPSpecError(_point_at(spec, start, piece, f"cannot parse pp op: {reason}")) from None
  try:
    factory = registry.lookup(name)
  except ValueError as e:
    raise PPSpecError(_point_at(spec, start, piece, str(e))) from None
  try:
    return factory(*args, **kwargs)
  except (TypeError, ValueError) as e:
    signature = f"{name}{inspect.signature(factory)}"
    raise PPSpecError(_point_at(
        spec, start, piece, f"bad arguments for pp op: {e}; expected {signature}")) from None


def _point_at(spec: str, start: int, piece: str, message: str) -> str:
  """`message` followed by the spec with the piece underlined."""
  stripped = piece.strip() or piece
  offset = start + (piece.index(stripped) if piece.strip() else 0)
  underline = " " * offset + "^" * max(1, len(stripped))
  return f"{message}\n  in piece {piece.strip()!r}:\n    {spec}\n    {underline}"


def _apply(op: PPFn, piece: str, data: dict[str, Any]) -> dict[str, Any]:
  """Runs one op, turning a KeyError for a missing key into one that names the op and keys."""
  try:
    return op(data)
  except KeyError as e:
    key = e.args[0] if e.args else None
    if isinstance(e, PPKeyError) or not isinstance(key, str) or key in data:
      raise
    raise PPKeyError(
        f"pp op {piece.strip()!r} needs key {key!r}, but the example only has keys "
        f"{sorted(data)}") from None
