r"""Trains a UViM model (stage I or stage II, chosen by the config's model).

  python train.py --config configs/panoptic_stage1.py:smoke --workdir runs/panoptic_stage1 \
      --config.lr=3e-4

On several hosts, run the same command on each (SLURM, Open MPI and TPU pods are detected), or
add --coordinator_address=HOST:PORT --num_processes=N --process_id=I.
"""

import os
import sys

from absl import app, flags

from uvim import checkpoint, cli, distributed, trainer
from uvim.errors import UserError

_CONFIG = cli.define_config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and config.")
flags.mark_flag_as_required("workdir")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "HOST:PORT of process 0, for a multi-process run.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (0 logs).")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  cli.quiet_library_logs()
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  try:
    trainer.train_and_evaluate(config, _WORKDIR.value)
  except trainer.TrainingInterruptedError as e:  # SIGTERM/SIGINT: saved, exit as the signal says
    print(e, file=sys.stderr)
    sys.exit(128 + e.signum)
  except checkpoint.CheckpointSaveError as e:
    # orbax's writer threads die with the failed save and would print a traceback each at exit.
    print(f"FATAL {e}", file=sys.stderr, flush=True)
    os._exit(1)
  except (UserError, trainer.TrainingDivergedError) as e:
    sys.exit(f"FATAL {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
