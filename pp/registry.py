"""The registry of preprocessing ops: op names -> factories of `dict -> dict` functions.

An op module registers its ops when imported. Config files name op modules in
`config.pp_modules` with the paper's names (`ops_general`, `ops_image`, `proj.uvim.pp_ops`),
which resolve to this package's modules.
"""

import importlib
from collections.abc import Callable, Iterable
from typing import Any

from uvim.errors import did_you_mean

PPFn = Callable[[dict[str, Any]], dict[str, Any]]

DEFAULT_MODULES = ("ops_general", "ops_image", "proj.uvim.pp_ops")

# The paper's module names (big_vision's) -> ours.
MODULE_ALIASES = {
    "ops_general": "pp.ops_general",
    "ops_image": "pp.ops_image",
    "proj.uvim.pp_ops": "pp.ops_uvim",
}

_OPS: dict[str, Callable[..., PPFn]] = {}


def register(name: str) -> Callable[[Callable[..., PPFn]], Callable[..., PPFn]]:
  """Decorator registering an op factory under `name`; a name can be registered once."""

  def decorator(factory: Callable[..., PPFn]) -> Callable[..., PPFn]:
    if name in _OPS and _OPS[name] is not factory:
      raise ValueError(f"pp op {name!r} is already registered by {_OPS[name].__module__}")
    _OPS[name] = factory
    return factory

  return decorator


def lookup(name: str) -> Callable[..., PPFn]:
  """The factory registered under `name`; an unknown name suggests the closest one."""
  if name not in _OPS:
    raise ValueError(f"Unknown pp op {name!r}; {did_you_mean(name, _OPS)}known ops: "
                     f"{sorted(_OPS)}")
  return _OPS[name]


def names() -> list[str]:
  """All registered op names."""
  return sorted(_OPS)


def import_modules(modules: Iterable[str] = DEFAULT_MODULES) -> None:
  """Imports op modules (registering their ops), accepting the paper's module names."""
  for module in modules:
    try:
      importlib.import_module(MODULE_ALIASES.get(module, module))
    except ModuleNotFoundError as e:
      raise ValueError(
          f"pp module {module!r} (from config.pp_modules) cannot be imported: {e}. "
          f"Known modules: {sorted(MODULE_ALIASES)}, or a dotted module path.") from e
