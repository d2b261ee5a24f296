"""The `--nproc` launcher (peftkit.launch) with stub workers (plain Python, no model): a worker's
failure stops the others and its words are shown; a terminal's Ctrl-C reaches each worker once;
no worker outlives a killed launcher."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from peftkit.launch import launch

# Each stub worker marks itself ready, records every SIGINT / SIGTERM it gets in a file of its
# rank, and exits 128 + the signal one second after the first (as a training worker checkpoints).
STUB = """
import os, signal, sys, time
from pathlib import Path
rank, out = os.environ["RANK"], Path(sys.argv[1])
got = []
def handle(signum, frame):
    got.append(signum)
    (out / f"signals-{rank}").write_text(" ".join(map(str, got)))
signal.signal(signal.SIGINT, handle)
signal.signal(signal.SIGTERM, handle)
if rank == "1" and len(sys.argv) > 2:
    print("peftkit: error: rank 1 cannot go on", file=sys.stderr)
    sys.exit(3)
(out / f"ready-{rank}").touch()
deadline = time.time() + 60
while time.time() < deadline and not got:
    time.sleep(0.02)
time.sleep(1)
sys.exit(128 + got[0] if got else 0)
"""


def wait_for(condition, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def driver(tmp_path: Path) -> subprocess.Popen:
    """The launcher in a process of its own, in a new session (as a terminal runs a command)."""
    code = (f"import sys; from peftkit.launch import launch; "
            f"sys.exit(launch([sys.executable, '-c', {STUB!r}, {str(tmp_path)!r}], 2))")
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (tmp_path / "ready-0").exists() and (tmp_path / "ready-1").exists())
    return proc


def test_a_failing_worker_stops_the_others_and_its_words_are_shown(tmp_path, capsys):
    code = launch([sys.executable, "-c", STUB, str(tmp_path), "fail"], 2)
    assert code == 3
    assert capsys.readouterr().err.strip().splitlines()[-1] == "peftkit: error: rank 1 cannot go on"
    assert (tmp_path / "signals-0").read_text() == str(int(signal.SIGTERM))  # stopped, not left waiting


def test_a_terminals_ctrl_c_reaches_each_worker_once(tmp_path):
    proc = driver(tmp_path)
    os.killpg(proc.pid, signal.SIGINT)  # the terminal signals the launcher's whole process group
    assert proc.wait(timeout=60) == 128 + signal.SIGINT
    assert [(tmp_path / f"signals-{rank}").read_text() for rank in "01"] == [str(int(signal.SIGINT))] * 2
    assert proc.stderr.read() == ""  # the workers' own line is theirs to print (the stubs print none)


def test_no_worker_outlives_a_killed_launcher(tmp_path):
    proc = driver(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    wait_for(lambda: all((tmp_path / f"signals-{rank}").exists() for rank in "01"))
    assert [(tmp_path / f"signals-{rank}").read_text() for rank in "01"] == [str(int(signal.SIGTERM))] * 2
