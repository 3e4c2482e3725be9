"""Command-line plumbing shared by train.py and predict.py: the --config flag and clear errors.

`--config configs/x.py:arg` loads `get_config(arg)` through ml_collections' config_flags, and
`--config.a.b=value` overrides a key. Mistakes (an unknown key, an unknown `:arg`, a bad value)
end the program with one line that names the key and the closest valid one, not a traceback.
"""

import ast
import dataclasses
import importlib.util
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

import ml_collections as mlc
from absl import flags
from ml_collections import config_flags

from uvim.errors import did_you_mean

CONFIG_FLAG = "config"


def define_config_flag(required: bool = True, help_extra: str = "") -> flags.FlagHolder:
  """Defines the locked `--config` flag (a typo'd key cannot be set by code either)."""
  holder = config_flags.DEFINE_config_file(
      CONFIG_FLAG, None, "Config file and variant, e.g. configs/panoptic_stage1.py:smoke"
      + help_extra, lock_config=True)
  if required:
    flags.mark_flag_as_required(CONFIG_FLAG)
  return holder


def define_sampling_flags(flag_values: flags.FlagValues = flags.FLAGS) -> Callable[[], dict]:
  """A flag per `decoding.Sampling` option (its help and choices; unset by default, so that the
  option's own default, or for `--temperature` the task's, applies); returns a function giving
  the options set on the command line."""
  from uvim.decoding import Sampling

  holders = {}
  for field in dataclasses.fields(Sampling):
    default = "the model's (ar causal, maskgit masked)" if field.default is None else field.default
    if field.name == "temperature":
      default = "the task's (colour 1, others 0)"
    text = f"{field.metadata['help']} Default: {default}."
    choices, kw = field.metadata["choices"], {"flag_values": flag_values}
    if choices:
      holders[field.name] = flags.DEFINE_enum(field.name, None, list(choices), text, **kw)
    elif isinstance(field.default, int):
      holders[field.name] = flags.DEFINE_integer(field.name, None, text, **kw)
    else:
      holders[field.name] = flags.DEFINE_float(field.name, None, text, **kw)
  return lambda: {k: h.value for k, h in holders.items() if h.value is not None}


def quiet_library_logs(prefixes: Sequence[str] = ("orbax", "tensorflow_datasets", "etils")) -> None:
  """Drops INFO logs of chatty libraries (orbax logs every checkpoint step in detail)."""
  import logging

  def keep(record: logging.LogRecord) -> bool:
    chatty = any(f"/{p}/" in record.pathname for p in prefixes)
    return record.levelno >= logging.WARNING or not chatty

  logging.getLogger("absl").addFilter(keep)


# ConfigDict keys that also take a plain string: `model_init` is a path, or a dict of parts.
PATH_OR_DICT_KEYS = ("model_init",)


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl `flags_parser`: parses argv, exiting with one clear line on a config mistake.

  Overrides config_flags cannot parse are applied after it: list-valued keys
  (`--config.evals="[('val', 'validation')]"`) and a path for a key that holds a dict
  (`--config.model_init=params.npz`).
  """
  try:
    argv, late = split_late_overrides(argv)
    late_args = {arg for arg, _, _ in late}
    sys.argv = [a for a in sys.argv if a not in late_args]  # config_flags reads sys.argv too
    if _flag_value(argv, CONFIG_FLAG) is None and explicit_keys(argv):
      raise ValueError(f"--config.{explicit_keys(argv)[0]} is set, but there is no --config "
                       "to set it in: give --config (the run's config file) too")
    rest = flags.FLAGS(list(argv))
    config = flags.FLAGS[CONFIG_FLAG].value
    if config is None:  # no --config (optional where a run's config.json says everything)
      return rest
    config.keys()  # config_flags defers some load errors to first use.
    for arg, path, text in late:
      apply_override(config, path, text, arg)
    return rest
  except Exception as e:  # config_flags raises many types; all end the program here.
    sys.exit(f"FATAL Flags parsing error: {explain_config_error(argv, e)}\n"
             "Pass --helpshort or --helpfull to see help on flags.")


def split_late_overrides(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str, str]]]:
  """argv without the overrides of list-valued keys and of dict keys given a path, and those
  overrides as (arg, dotted path, value text)."""
  spec = _flag_value(argv, CONFIG_FLAG)
  overrides = [a for a in argv if a.startswith(f"--{CONFIG_FLAG}.") and "=" in a]
  if spec is None or not overrides:
    return list(argv), []
  config = load_config(spec)
  keep, late = [], []
  for arg in argv:
    path, _, text = arg[len(CONFIG_FLAG) + 3:].partition("=")
    node = lookup(config, path) if arg in overrides else None
    is_path = (isinstance(node, mlc.ConfigDict) and path.split(".")[-1] in PATH_OR_DICT_KEYS
               and not text.lstrip().startswith(("{", "dict(")))
    if isinstance(node, list) or is_path:
      late.append((arg, path, text))
    else:
      keep.append(arg)
  return keep, late


def apply_override(config: mlc.ConfigDict, path: str, text: str, arg: str) -> None:
  """Sets the list or path override `arg` (`--config.<path>=<text>`) on `config`."""
  if isinstance(lookup(config, path), list):
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      raise ValueError(f"{arg}: config.{path} is a list; give a Python list, e.g. "
                       f"--config.{path}=\"{lookup(config, path)!r}\"") from None
  else:
    value = text
  try:
    set_value(config, path, value)
  except ValueError as e:
    raise ValueError(f"{arg}: {e}") from None


def set_value(config: mlc.ConfigDict, path: str, value) -> None:
  """Sets the dotted `path` of `config` to `value` as an override does: a list key takes a list
  or tuple, a path-or-dict key (`model_init`) a string; other keys keep their type."""
  *parents, key = path.split(".")
  node = config
  for part in parents:
    node = node[part]
  if isinstance(node[key], list):
    if not isinstance(value, list | tuple):
      raise ValueError(f"config.{path} is a list, got {type(value).__name__}")
    node[key] = list(value)
  elif isinstance(node[key], mlc.ConfigDict) and key in PATH_OR_DICT_KEYS and isinstance(
      value, str):
    with node.ignore_type():
      node[key] = value
  else:
    node[key] = value


def explicit_keys(argv: Sequence[str] | None = None) -> list[str]:
  """The dotted config keys the command line sets (`--config.a.b=...`): what a user changed by
  saying so, on top of a recorded run's config."""
  argv = sys.argv if argv is None else argv
  prefix = f"--{CONFIG_FLAG}."
  return [a[len(prefix):].partition("=")[0] for a in argv if a.startswith(prefix)]


def lookup(config: mlc.ConfigDict, path: str):
  """The value at dotted `path`, or None when there is none."""
  node = config
  for part in path.split("."):
    if not isinstance(node, mlc.ConfigDict) or part not in node:
      return None
    node = node[part]
  return node


def explain_config_error(argv: Sequence[str], error: Exception) -> str:
  """A one-line reason for a flag error, naming the bad key or arg and the closest valid one."""
  spec = _flag_value(argv, CONFIG_FLAG)
  if spec is None:
    return last_line(error)
  try:
    config = load_config(spec)
  except Exception as e:  # The config file itself (or its `:arg`) is bad.
    return f"--{CONFIG_FLAG}={spec}: {last_line(e)}"
  for arg in argv:
    if arg.startswith(f"--{CONFIG_FLAG}."):
      path = arg[len(CONFIG_FLAG) + 3:].partition("=")[0]
      problem = find_unknown_key(config, path)
      if problem:
        return f"{arg}: {problem}"
  return last_line(error)


def load_config(spec: str) -> mlc.ConfigDict:
  """Loads `path.py[:arg]` the way config_flags does: `get_config(arg)` or `get_config()`."""
  path, _, arg = spec.partition(":")
  module = load_config_module(path)
  return module.get_config(arg) if arg else module.get_config()


def load_config_module(path: str) -> ModuleType:
  """The config file at `path`, imported."""
  module_spec = importlib.util.spec_from_file_location("_uvim_config", path)
  if module_spec is None or module_spec.loader is None:
    raise FileNotFoundError(f"cannot load config file {path!r}")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def find_unknown_key(config: mlc.ConfigDict, path: str) -> str | None:
  """Why the dotted `path` names no key of `config` (with the closest key), or None if it does."""
  node, walked = config, []
  for part in path.split("."):
    if isinstance(node, mlc.ConfigDict | dict):
      keys = list(node.keys())
      if part not in keys:
        where = f"config.{'.'.join(walked)}" if walked else "the config"
        hint = did_you_mean(part, keys, prefix="".join(f"{w}." for w in walked))
        return f"{where} has no key {part!r}; {hint}valid keys: {sorted(keys)}"
      node = node[part]
    elif isinstance(node, list | tuple) and part.isdigit() and int(part) < len(node):
      node = node[int(part)]
    else:
      return f"config.{'.'.join(walked)} is a {type(node).__name__}, it has no key {part!r}"
    walked.append(part)
  return None


def _flag_value(argv: Sequence[str], name: str) -> str | None:
  """The value of `--name=v` or `--name v` in argv."""
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
    if arg == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def last_line(error: BaseException) -> str:
  """The informative line of an error whose message may embed a whole traceback."""
  lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
  return lines[-1] if lines else type(error).__name__
