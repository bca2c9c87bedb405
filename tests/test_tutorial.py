"""docs/tutorial.ipynb runs end to end in a fresh kernel (nbclient), on the real SmolLM2-135M and
the project's corpus, and every result it displays renders as HTML: the notebook never rots."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "docs" / "tutorial.ipynb"
CORPUS = ROOT.parent / "shared" / "data" / "corpora"


def _real_model() -> bool:
    from featopt.models.loading import available_models

    return any(name.lower().startswith("smollm2-135m-instruct") for name in available_models())


@pytest.mark.slow
def test_the_tutorial_notebook_runs_end_to_end(tmp_path):
    if not _real_model():
        pytest.skip("needs SmolLM2-135M-Instruct under FEATOPT_MODEL_PATH (e.g. FEATOPT_MODEL_PATH=../shared/models)")
    if not CORPUS.is_dir():
        pytest.skip(f"needs the project's corpus at {CORPUS}")
    nbformat = pytest.importorskip("nbformat", reason="the notebook test needs nbformat (pip install -e '.[dev]')")
    nbclient = pytest.importorskip("nbclient", reason="the notebook test needs nbclient (pip install -e '.[dev]')")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    env = {"FEATOPT_CORPUS": str(CORPUS), "FEATOPT_MODEL_PATH": str(Path(os.environ["FEATOPT_MODEL_PATH"]).resolve()),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process' environment
    try:
        client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                         resources={"metadata": {"path": str(tmp_path)}})
        client.execute()
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    displayed = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
                 if out.get("output_type") == "execute_result"]
    html = [out["data"]["text/html"] for out in displayed if "text/html" in out.get("data", {})]
    assert len(html) >= 4, "the sweep, GCG, the SAE and the latent's page render as HTML"
    assert any("<iframe" in page for page in html), "the latent's dashboard page is shown inline"
    assert (tmp_path / "featopt-runs" / "tutorial" / "dashboard" / "index.html").is_file()
