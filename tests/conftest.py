"""Test setup: 8 simulated CPU devices, quiet TF, and helpers to run pp eagerly and in tf.data."""

import faulthandler
import os
import sys
from pathlib import Path

# Before any import of jax (TF imports it through keras): simulate 8 devices on the CPU. On a
# loaded 2-core machine a device thread can wait minutes for the others at a collective; XLA
# would abort after its default timeout, so tests allow 30 minutes (a hung test fails long
# before: see pytest_runtest_protocol).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_cpu_collective_call_terminate_timeout_seconds=1800"
                           " --xla_cpu_collective_timeout_seconds=1800"
                           # Collectives in one order on every device thread: with XLA's
                           # concurrency-optimised schedule, resuming on an FSDP mesh hung
                           # under load, each thread at a different all-reduce.
                           " --xla_cpu_enable_concurrency_optimized_scheduler=false"
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Repeated runs of the same step (resume tests, subprocesses) reuse compiled executables.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/uvim-tests-jax-cache")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# The tests' models are tiny: compiling them with XLA's full optimisation costs more than it
# saves (a third of the suite's time on a cold cache). The learning test, which trains for
# minutes, runs train.py without this (see test_learning.py).
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import numpy as np
import pytest
import tensorflow as tf

tf.config.set_visible_devices([], "GPU")


def pytest_collection_modifyitems(config, items):
  """The learning test first: it trains for minutes in its own processes, and started late the
  whole suite would wait for it. (Moving more slow tests forward made the suite slower: they
  then compete with it for the cores.)"""
  items.sort(key=lambda item: not item.nodeid.startswith("tests/test_learning.py::"))


NATIVE_GRACE_S = 60  # after a test's timeout, before its process is ended from outside Python


def pytest_configure(config):
  # Where a stuck worker's stacks go: the stderr the run started with (a test's own is captured
  # and would die with the worker).
  config.stash[_STDERR] = os.fdopen(os.dup(sys.__stderr__.fileno()), "w")


_STDERR = pytest.StashKey()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
  """pytest-timeout fails a test at its limit with a signal, which cannot reach Python while the
  main thread is stuck in native code (an XLA collective): such a test ends its process with
  every thread's stack `NATIVE_GRACE_S` later, and the run stops naming it."""
  marker = item.get_closest_marker("timeout")
  limit = (marker.args[0] if marker and marker.args else
           marker.kwargs.get("timeout") if marker else item.config.getini("timeout"))
  faulthandler.dump_traceback_later(float(limit) + NATIVE_GRACE_S, exit=True,
                                    file=item.config.stash[_STDERR])
  yield
  faulthandler.cancel_dump_traceback_later()


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops JAX's compiled programs and traces after each test module: a worker otherwise
  grows to ~6 GB over the suite."""
  yield
  import gc

  import jax

  jax.clear_caches()
  gc.collect()


def _to_numpy(tree):
  return tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, tree)


def run_pp_both(fn, example):
  """Runs `fn` on `example` eagerly and inside tf.data.Dataset.map; returns both as numpy."""
  eager = _to_numpy(fn(dict(example)))
  dataset = tf.data.Dataset.from_tensors(example).map(fn)
  graph = _to_numpy(next(iter(dataset)))
  return eager, graph


@pytest.fixture
def run_pp():
  """Fixture: `run_pp(fn, example)` -> result, asserting eager and tf.data agree exactly."""

  def run(fn, example):
    eager, graph = run_pp_both(fn, example)
    assert sorted(eager) == sorted(graph)
    for k in eager:
      tf.nest.map_structure(np.testing.assert_array_equal, eager[k], graph[k])
    return eager

  return run



def built_once(tmp_path_factory, worker_id: str, name: str, build) -> Path:
  """The folder `name`, filled by `build(folder)` once per test run: the first xdist worker to
  ask builds it (the others wait on a lock, then reuse it), so session fixtures that train
  cost one worker's time, not each worker's."""
  import fcntl
  import shutil

  base = Path(tmp_path_factory.getbasetemp())
  root = base if worker_id == "master" else base.parent  # the run's folder, shared by workers
  folder = root / name
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (root / f"{name}.built").exists():
      shutil.rmtree(folder, ignore_errors=True)  # a build that failed part-way
      folder.mkdir()
      build(folder)
      (root / f"{name}.built").touch()
  return folder


@pytest.fixture(scope="session")
def toy_data_dir(tmp_path_factory, worker_id):
  """A tfds data dir holding `toy_scenes/tiny` (64 train / 16 validation), built once."""

  def build(data_dir):
    import tensorflow_datasets as tfds

    import uvim.datasets  # noqa: F401

    tfds.builder("toy_scenes/tiny", data_dir=data_dir).download_and_prepare()

  return built_once(tmp_path_factory, worker_id, "tfds", build)


@pytest.fixture(scope="session")
def oracle_workdir(toy_data_dir, tmp_path_factory, worker_id):
  """A tiny panoptic stage I run (4 steps), shared by the stage II and code-tool tests."""
  from test_trainer import tiny_config

  from uvim import trainer

  return built_once(tmp_path_factory, worker_id, "stage1", lambda workdir: (
      trainer.train_and_evaluate(tiny_config(toy_data_dir, total_steps=4, evals=[]), workdir)))


@pytest.fixture(scope="session")
def stage2_workdir(toy_data_dir, oracle_workdir, tmp_path_factory, worker_id):
  """A tiny stage II run (4 steps) on `oracle_workdir`."""
  from test_stage2 import stage2_config

  from uvim import trainer

  return built_once(tmp_path_factory, worker_id, "stage2", lambda workdir: (
      trainer.train_and_evaluate(stage2_config(toy_data_dir, oracle_workdir), workdir)))


@pytest.fixture(scope="session")
def masked_stage2_workdir(toy_data_dir, oracle_workdir, tmp_path_factory, worker_id):
  """`stage2_workdir`'s run with a masked decoder (parallel decoding)."""
  from test_stage2 import stage2_config

  from uvim import trainer

  def build(workdir):
    config = stage2_config(toy_data_dir, oracle_workdir)
    config.model.masked = True
    trainer.train_and_evaluate(config, workdir)

  return built_once(tmp_path_factory, worker_id, "masked", build)


def run_notebook(name: str, timeout: int = 600, **parameters):
  """Executes notebooks/<name>.ipynb top to bottom in a real Jupyter kernel (ipykernel, from the
  repository root) with its `parameters` cell set to `parameters`; returns the executed
  notebook. A failing cell raises nbclient's CellExecutionError, naming the cell and the error."""
  from pathlib import Path

  import nbclient
  import nbformat

  root = Path(__file__).resolve().parents[1]
  notebook = nbformat.read(root / "notebooks" / f"{name}.ipynb", as_version=4)
  (cell,) = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
  cell.source = "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
  client = nbclient.NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                                   resources={"metadata": {"path": str(root)}})
  return client.execute()
