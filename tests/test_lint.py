"""The code base is ruff-clean (the rules are in pyproject.toml)."""

import subprocess
import sys
from pathlib import Path


def test_ruff_clean():
  root = Path(__file__).resolve().parents[1]
  result = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=root,
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stdout + result.stderr
