"""README's test command is the one CI runs, and its main command uses a real config."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
  blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
  return [b.strip() for b in blocks if b.strip().startswith("python3 -m venv")]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
  main, test = readme_commands()
  assert "train.py --config configs/" in main
  assert "pytest" in test
  ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
  assert test in ci_lines


def test_main_command_configs_exist():
  main, _ = readme_commands()
  configs = re.findall(r"--config (\S+?)(?::\S+)? ", main)
  assert configs and all((ROOT / c).is_file() for c in configs)


def test_readme_links_to_docs_pages_that_exist_and_stays_short():
  text = (ROOT / "README.md").read_text()
  links = re.findall(r"\]\((docs/[^)#]+)", text)
  assert {Path(x).name for x in links} >= {p.name for p in (ROOT / "docs").glob("*.md")}
  assert all((ROOT / x).is_file() for x in links)
  assert len(text.splitlines()) < 180
