"""A sweep as files a cluster runs: a plain list of train.py commands, or SLURM job arrays.

The commands are the ones `python -m uvim.sweep` would run, with the same workdirs, so
`python -m uvim.sweep report DIR` reads their results. Run them from the directory the sweep
was planned in (paths are relative to it, as given).
"""

import os
import re
import shlex
from pathlib import Path

from uvim.errors import UserError
from uvim.sweep.plan import TRAIN_PY, Run


def train_py() -> str:
  """train.py as the emitted commands name it: relative to here when it lies below."""
  return os.path.relpath(TRAIN_PY) if TRAIN_PY.is_relative_to(Path.cwd()) else str(TRAIN_PY)


def commands(runs: list[Run], sweep_dir: Path) -> list[Path]:
  """`<sweep_dir>/commands.sh`: one train.py command per line, chained runs after the runs
  they need (run in order, or give the lines to any job queue in two waves)."""
  path = sweep_dir / "commands.sh"
  first = [r.command(train_py=train_py()) for r in runs if r.after is None]
  then = [r.command(train_py=train_py()) for r in runs if r.after is not None]
  lines = ["# One train.py run per line; rerunning a line resumes (or re-evaluates) its run.",
           *first]
  if then:
    lines += ["# Each run below needs the run above with the same name finished.", *then]
  path.write_text("\n".join(lines) + "\n")
  return [path]


SBATCH_SAFE = re.compile(r"[\w./:@+=,%-]+")


def check_sbatch_option(line: str) -> None:
  """An `--sbatch` option is one option (`--gres=gpu:8`, `-p gpu`) on one #SBATCH line: a
  newline or another control character would start a line of shell in the script."""
  if not line.startswith("-") or any(not c.isprintable() for c in line):
    raise UserError(f"--sbatch {line!r}: give one sbatch option on one line, starting with '-' "
                    "(e.g. --gres=gpu:8), without newlines or control characters")


def slurm(runs: list[Run], sweep_dir: Path, sbatch_lines: list[str]) -> list[Path]:
  """`<sweep_dir>/slurm/`: a job array per stage (one task a run; a task whose run finished
  exits at once) and `submit.sh`, which submits them with each chained task waiting for its
  counterpart (`--dependency=aftercorr`)."""
  out = sweep_dir / "slurm"
  for line in sbatch_lines:
    check_sbatch_option(line)
  if not SBATCH_SAFE.fullmatch(str(out)):
    raise UserError(f"sweep folder {sweep_dir}: the #SBATCH lines name it unquoted (sbatch reads "
                    "them without a shell), so it must be letters, digits and ._/:@+=,- only; "
                    "plan the sweep in a folder without spaces or quotes")
  (out / "logs").mkdir(parents=True, exist_ok=True)
  stages = list(dict.fromkeys(r.stage for r in runs))
  scripts = []
  for stage in stages:
    batch = [r for r in runs if r.stage == stage]
    script = out / f"{stage}.sbatch"
    script.write_text("\n".join([
        "#!/bin/bash",
        f"#SBATCH --job-name={sweep_dir.name}-{stage}",
        f"#SBATCH --array=0-{len(batch) - 1}",
        f"#SBATCH --output={out / 'logs'}/{stage}_%a.out",
        *(f"#SBATCH {line}" for line in sbatch_lines),
        "# One train.py run per array task; submitting again resumes the unfinished ones.",
        "set -euo pipefail",
        f"cd {shlex.quote(os.getcwd())}",
        "WORKDIRS=(", *(f"  {shlex.quote(str(r.workdir))}" for r in batch), ")",
        "COMMANDS=(", *(f"  {shlex.quote(r.command(train_py=train_py()))}" for r in batch), ")",
        'if [ -f "${WORKDIRS[$SLURM_ARRAY_TASK_ID]}/params.npz" ]; then',
        '  echo "finished earlier: ${WORKDIRS[$SLURM_ARRAY_TASK_ID]}"; exit 0',
        "fi",
        'eval "${COMMANDS[$SLURM_ARRAY_TASK_ID]}"',
    ]) + "\n")
    scripts.append(script)
  submit = out / "submit.sh"
  lines = ["#!/bin/bash", "set -euo pipefail",
           f"job=$(sbatch --parsable {shlex.quote(str(scripts[0]))})", 'echo "submitted $job"']
  for script in scripts[1:]:
    lines += [f"job=$(sbatch --parsable --dependency=aftercorr:${{job%%;*}} "
              f"{shlex.quote(str(script))})", 'echo "submitted $job"']
  submit.write_text("\n".join(lines) + "\n")
  submit.chmod(0o755)
  return [*scripts, submit]
