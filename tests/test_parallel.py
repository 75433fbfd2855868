"""workbench.parallel: K spawned processes, exit codes, signal propagation with clean-up."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from workbench.parallel import INTERRUPTED, run_processes


def _ok(path):
    with open(path, "w") as f:
        f.write(str(os.getpid()))


def _code(n):
    return n


def _boom():
    raise RuntimeError("boom")


def _exit(n):
    sys.exit(n)


def test_workers_are_separate_processes_and_exit_codes_come_back(tmp_path):
    files = [tmp_path / f"w{i}" for i in range(2)]
    assert run_processes(_ok, [(str(f),) for f in files]) == [0, 0]
    pids = {f.read_text() for f in files}
    assert len(pids) == 2 and str(os.getpid()) not in pids
    assert run_processes(_code, [(0,), (3,)]) == [0, 3]
    assert run_processes(_boom, [()]) == [1]
    assert run_processes(_exit, [(4,)]) == [4]


SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from workbench.parallel import run_processes

    def work(path):
        Path(path + ".started").touch()
        try:
            time.sleep(60)
        except KeyboardInterrupt:
            time.sleep(0.5)  # clean-up a second signal must not cut short
            Path(path + ".cleaned").touch()
            raise

    if __name__ == "__main__":
        base = sys.argv[1]
        try:
            run_processes(work, [(f"{base}/a",), (f"{base}/b",)], grace_s=20)
        except KeyboardInterrupt as err:
            print(err)
            sys.exit(130)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_parent_stops_every_worker_cleanly(tmp_path, sig):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"{w}.started").exists() for w in "ab"):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert f"worker exit codes [{INTERRUPTED}, {INTERRUPTED}]" in out
    assert all((tmp_path / f"{w}.cleaned").exists() for w in "ab")
