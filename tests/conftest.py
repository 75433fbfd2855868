import os
import signal

import pytest

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True, scope="session")
def _user_conf(tmp_path_factory):
    """Exported presets go to the user's config folder (on Hydra's search path): one of the
    session's own, so that a test neither writes to nor composes from the real one."""
    folder = tmp_path_factory.mktemp("user-conf")
    before = os.environ.get("WORKBENCH_USER_CONF")
    os.environ["WORKBENCH_USER_CONF"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("WORKBENCH_USER_CONF", None)
    else:
        os.environ["WORKBENCH_USER_CONF"] = before


@pytest.fixture
def store(tmp_path):
    """An empty embedded MLflow store for one test: (tracking.dir override, sqlite uri)."""
    from workbench.tracking import embedded_uri

    d = tmp_path / "mlruns"
    return d, embedded_uri(d)


@pytest.fixture
def one_torch_thread():
    """Run a test's tensor ops on one intra-op thread, then restore the setting.

    For tests of tiny networks (a few thousand weights) that do thousands of small ops:
    there torch's thread pool only adds synchronisation, and on a loaded machine or under
    xdist each op gets many times slower (param-noise adaptation: 40 ms a step, not 1 ms).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _signal_handlers_restored():
    """``workbench.cli.main`` installs SIGTERM and SIGHUP handlers; in-process calls must not
    leave them to the tests after."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.fixture(autouse=True)
def _no_run_left_open():
    """The process's one MLflow writer thread lives while any run it serves is open: a test
    that leaves a run open (e.g. by patching ``end``) would keep it alive for every test
    after it in this worker, so the test that does it fails, by name."""
    import sys

    yield
    writer = sys.modules.get("workbench.tracking.writer")
    if writer is None:
        return
    with writer._WRITER.cv:
        left = [t.run_id for t in writer._WRITER._trackers if not t._stopping]
    assert not left, f"MLflow run(s) {left} left open: end() them"


def pytest_collection_modifyitems(config, items):
    """Tests on the Ray cluster run first: its one long fixture then overlaps the rest of
    the suite on the other worker instead of becoming the run's tail."""
    items.sort(key=lambda item: "cluster_run" not in getattr(item, "fixturenames", ()))
