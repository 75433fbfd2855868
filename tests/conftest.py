import os

import pytest

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture
def store(tmp_path):
    """An empty embedded MLflow store for one test: (tracking.dir override, sqlite uri)."""
    from workbench.tracking import embedded_uri

    d = tmp_path / "mlruns"
    return d, embedded_uri(d)
