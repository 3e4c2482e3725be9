"""Multi-host start-up: JAX's distributed runtime from flags or from the cluster's environment.

Each process runs the same command. With `--coordinator_address`, `--num_processes` and
`--process_id` the processes find each other explicitly; on SLURM, Open MPI and Cloud TPU pods
`jax.distributed.initialize()` reads them from the environment. A single process needs nothing.
"""

import os

import jax
from absl import logging

# Environment variables that mark a multi-process launch jax.distributed can configure itself.
CLUSTER_VARIABLES = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                     "JAX_COORDINATOR_ADDRESS")


def _cluster_size_from_environment() -> int:
  for name in CLUSTER_VARIABLES:
    value = os.environ.get(name, "")
    if name == "TPU_WORKER_HOSTNAMES":
      size = len(value.split(",")) if value else 0
    elif name == "JAX_COORDINATOR_ADDRESS":
      size = 2 if value else 0
    else:
      size = int(value) if value.isdigit() else 0
    if size > 1:
      return size
  return 1


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Joins the other processes of this run, if there are any; call before using devices."""
  explicit = coordinator_address is not None
  if not explicit and (num_processes is not None or process_id is not None):
    raise ValueError("--num_processes/--process_id need --coordinator_address")
  if not explicit and _cluster_size_from_environment() == 1:
    return
  # CPU devices need a collectives backend across processes (accelerators bring their own).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address, num_processes, process_id)
  logging.info("Process %d of %d: %d local devices, %d in all.", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
