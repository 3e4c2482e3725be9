"""Result files written whole or not at all: each goes to a temporary name beside it and is
renamed when complete, so a full disk or a killed run never leaves a truncated or 0-byte file
under the real name; a write that fails is one UserError naming the file."""

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from uvim.errors import UserError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
  """Yields a temporary path in `path`'s folder (created if needed) to write; renames it to
  `path` when the block ends, removes it when the block fails."""
  path = Path(path)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    yield tmp
    os.replace(tmp, path)
  except OSError as e:
    raise UserError(f"cannot write {path}: {e.strerror or e}") from None
  finally:
    tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
  """`text` into `path`, atomically."""
  with atomic_path(path) as tmp:
    tmp.write_text(text)
  return Path(path)
