"""The tutorial notebook: shipped without outputs, copied out by `gemma-eqx tutorial`, and
(with the `notebook` extra) executed top to bottom on the real 270M."""

from __future__ import annotations

import json

import pytest

from gemma_eqx.cli import main
from interp.cli import TUTORIAL, tutorial_path


def test_the_notebook_ships_without_outputs():
    notebook = json.loads(tutorial_path().read_text())
    code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert len(code) >= 10
    assert all(c["outputs"] == [] and c["execution_count"] is None for c in code)


def test_the_tutorial_command_copies_it_and_keeps_a_users_edits(tmp_path, capsys):
    assert main(["tutorial", str(tmp_path / "nb")]) == 0
    copied = tmp_path / "nb" / TUTORIAL
    assert copied.read_bytes() == tutorial_path().read_bytes()
    assert main(["tutorial", str(tmp_path / "nb")]) == 0  # the same file again: fine
    copied.write_text("my edits")
    assert main(["tutorial", str(tmp_path / "nb")]) == 2
    assert "exists and differs from the tutorial" in capsys.readouterr().err
    assert copied.read_text() == "my edits"


def test_the_notebook_runs_top_to_bottom_on_the_real_model(gemma270m, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    notebook = nbformat.read(tutorial_path(), as_version=4)
    nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs)
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(figures) >= 4
    treescope_views = [o for o in outputs if "treescope" in o.get("data", {}).get("text/html", "")]
    assert len(treescope_views) == 2  # the block and the named-axis attention figure
    assert "layer 5 head 2: induction score 0.7" in text  # the study's top head
    assert "heads: ((11, 2),)" in text  # its smallest breaking set
    assert (tmp_path / "induction-report" / "report.html").is_file()
