"""examples/tour.ipynb: executes without errors (nbclient, a python3 kernel running this interpreter, in a temporary
directory), its printed checks hold, and the stored copy carries its rendered outputs."""

import json
import os
import re
import sys
from pathlib import Path

import nbclient
import nbformat
import pytest

import jaxlrp

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "tour.ipynb"
N_FIGURES = 9  # the notebook's `show(...)` pictures


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
  """The notebook, run top to bottom; its stdout as one string and its PNG outputs."""
  tmp = tmp_path_factory.mktemp("tour")
  # A kernel spec named like the notebook's ("python3") that runs this interpreter: JUPYTER_PATH comes first in the
  # kernel search, so a python3 kernel installed elsewhere (another venv, the user's) cannot be picked instead.
  spec = tmp / "jupyter" / "kernels" / "python3"
  spec.mkdir(parents=True)
  spec.joinpath("kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "Python 3 (tests)", "language": "python"}))
  src = str(Path(jaxlrp.__file__).resolve().parent.parent)  # the kernel imports the jaxlrp under test
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("JUPYTER_PATH", str(tmp / "jupyter"))
    mp.setenv("JUPYTER_RUNTIME_DIR", str(tmp / "jupyter" / "runtime"))  # connection files: not in the home dir
    mp.setenv("IPYTHONDIR", str(tmp / "jupyter" / "ipython"))  # nor IPython's history
    mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])))
    mp.delenv("JAXLRP_TOUR_FIGURE", raising=False)  # never write the README figure from a test
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", record_timing=False,
                                     resources={"metadata": {"path": str(tmp)}})
    client.execute()  # raises CellExecutionError (with the cell and traceback) if a cell fails
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  text = "".join(o.text for o in outputs if o.output_type == "stream" and o.name == "stdout")
  pngs = [o for o in outputs if "data" in o and "image/png" in o.data]
  return text, pngs, tmp


def _number(pattern, text):
  match = re.search(pattern, text)
  assert match, f"{pattern!r} not in the notebook's output:\n{text}"
  return [float(g) for g in match.groups()]


def test_runs_and_renders_every_figure(executed):
  text, pngs, tmp = executed
  assert len(pngs) == N_FIGURES
  assert _number(r"test accuracy ([\d.]+)%", text)[0] > 90
  assert [p.name for p in tmp.iterdir()] == ["jupyter"]  # the notebook wrote nothing (the kernel spec is ours)


def test_printed_checks_hold(executed):
  text, _, _ = executed
  assert "conservation check passed: every hidden layer sums to the score" in text
  pattern = r"\[B, K\] targets vs K separate calls: max difference ([\d.e+-]+) \(max \|R\| ([\d.]+)\)"
  diff, scale = _number(pattern, text)
  assert diff <= 1e-6 * scale
  assert _number(r"contrast vs difference of the two maps: max difference ([\d.e+-]+)", text)[0] < 1e-5
  assert _number(r"sum over channels vs unconditional relevance: max difference ([\d.e+-]+)", text)[0] < 1e-5
  ratio = _number(r"relevance sum / score = ([\d.]+)", text)[0]
  assert 0.9 < ratio <= 1.01  # EpsilonPlusFlat: the biases absorb a little
  completeness = re.search(r"IG completeness, sum / \(score - baseline score\): ([\d. ]+)", text).group(1).split()
  assert len(completeness) == 8 and all(abs(float(c) - 1) < 0.05 for c in completeness)


def test_stored_notebook_has_its_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert [c.execution_count for c in code] == list(range(1, len(code) + 1))  # run top to bottom, once
  assert not [o for c in code for o in c.outputs if o.output_type == "error"]
  assert sum("image/png" in o.get("data", {}) for c in code for o in c.outputs) == N_FIGURES
