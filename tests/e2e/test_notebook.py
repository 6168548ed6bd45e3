"""notebooks/results.ipynb: stored without outputs, and it executes on a tiny-profile lake."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "results.ipynb"


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "the notebook has no code cells"
    assert all(c.outputs == [] and c.execution_count is None for c in code)


@pytest.mark.slow
def test_notebook_executes_on_the_tiny_lake(refreshed, monkeypatch):
    monkeypatch.setenv("SLIMREC_LAKE", str(refreshed["lake"].root))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # the kernel inherits this process's environment, SLIMREC_LAKE included
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "\n".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert "user_sequences" in text  # the tables listing
    assert "sasrec" in text and "ndcg" in text.lower()  # the metrics table
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2  # NDCG@10 and HR@10 charts
