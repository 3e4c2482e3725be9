"""Errors a user causes with a config, a flag or a file, and how they are worded.

`UserError` is what train.py and predict.py print as one line (no traceback): its message names
the key or file and what was expected. Anything else is a bug and keeps its traceback.
"""

import difflib
from collections.abc import Iterable


class UserError(ValueError):
  """A mistake in a config, a flag or an input file, explained in one line."""


def did_you_mean(name: str, known: Iterable[str], prefix: str = "") -> str:
  """"did you mean 'X'? " for the known name X closest to `name` (shown after `prefix`), or ""
  when none is close: the one hint every "unknown name" error gives."""
  close = difflib.get_close_matches(name, list(known), n=1)
  return f"did you mean {prefix + close[0]!r}? " if close else ""
