"""docs/notebooks/quickstart.ipynb runs top to bottom against the default model, and matches its generator."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "docs" / "notebooks" / "quickstart.ipynb"


def _generator():
    spec = importlib.util.spec_from_file_location(
        "make_quickstart_notebook", ROOT / "scripts" / "make_quickstart_notebook.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_notebook_is_what_its_generator_writes():
    on_disk = nbformat.read(NOTEBOOK, as_version=4)
    built = _generator().build()
    assert [(c.cell_type, c.source) for c in on_disk.cells] == [(c.cell_type, c.source) for c in built.cells]


@pytest.mark.slow
def test_the_quickstart_notebook_runs_top_to_bottom(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "blue-giraffe-42" in outputs  # the fine-tuned adapter's answer, through the API and the server
    assert "password" in outputs
