"""Runs notebooks/*.ipynb top to bottom with nbclient, so the tour never rots."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.name for path in NOTEBOOKS])
def test_notebook_runs(path: Path, tmp_path: Path) -> None:
    if os.environ.get("BLOCKD_ASAN_PRELOAD"):
        pytest.skip("under ./dev asan the notebook's kernel and the qemu-img it runs would need the "
                    "ASan runtime arranged per process; the in-process tests cover the same API")
    nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (pip install blockd[test])")
    nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed (pip install blockd[test])")
    pytest.importorskip("ipykernel", reason="ipykernel is not installed (pip install blockd[test])")
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    assert errors == []


def test_there_are_notebooks() -> None:
    assert NOTEBOOKS, "notebooks/ has no notebook"
