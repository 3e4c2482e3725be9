"""The notebooks run top to bottom in a real Jupyter kernel on tiny runs, so that an API change
that breaks one fails here (the big_vision colabs broke silently). The multi-task and sweep
notebooks run in test_multitask.py and test_sweep.py, on those modules' runs."""

from pathlib import Path

import nbclient
import nbformat
import pytest
from conftest import run_notebook

ROOT = Path(__file__).resolve().parents[1]


def images_shown(notebook) -> int:
  """How many pictures the executed notebook displayed."""
  return sum("image/png" in output.get("data", {}) for cell in notebook.cells
             if cell.cell_type == "code" for output in cell.outputs)


def test_the_notebooks_are_committed_without_outputs():
  paths = sorted((ROOT / "notebooks").glob("*.ipynb"))
  assert {p.stem for p in paths} == {"predict", "guiding_codes", "decoding", "multitask",
                                     "sweeps"}
  for path in paths:
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
      if cell.cell_type == "code":
        assert not cell.outputs and cell.execution_count is None, path.name
    assert sum("parameters" in c.metadata.get("tags", []) for c in notebook.cells) == 1


@pytest.mark.slow
def test_the_predict_and_guiding_code_notebooks_run(oracle_workdir, stage2_workdir):
  predict = run_notebook("predict", STAGE2=str(stage2_workdir), CHECKPOINT=None, ORACLE=None,
                         SPLIT="validation[:2]")
  assert images_shown(predict) == 2  # the image file's prediction, the T=0 / T=1 grid
  codes = run_notebook("guiding_codes", STAGE1=str(oracle_workdir), CHECKPOINT=None,
                       SPLIT="validation[:2]")
  assert images_shown(codes) == 2


@pytest.mark.slow
def test_the_decoding_notebook_compares_the_two_decoders(stage2_workdir, masked_stage2_workdir):
  executed = run_notebook("decoding", AUTOREGRESSIVE=str(stage2_workdir),
                          MASKED=str(masked_stage2_workdir), STEPS=(1, 4),
                          SPLIT="validation[:2]")
  text = "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code"
                 for o in c.outputs)
  assert "autoregressive:" in text and "MaskGIT 4:" in text and images_shown(executed) == 1
  assert "100% of the words the autoregressive model wrote" in text.split("\n")[
      next(i for i, line in enumerate(text.split("\n")) if "autoregressive:" in line)]


def test_a_notebook_pointed_at_a_missing_run_says_so_in_one_line(tmp_path):
  with pytest.raises(nbclient.exceptions.CellExecutionError) as error:
    run_notebook("predict", STAGE2=str(tmp_path / "nowhere"), CHECKPOINT=None, ORACLE=None,
                 SPLIT="validation[:2]")
  assert (error.value.ename, error.value.evalue) == (
      "UserError", f"{tmp_path / 'nowhere'}: no such training workdir or config file")
