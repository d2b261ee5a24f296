"""`peftkit train --nproc N`: the same command in N processes on this machine, one process group
(gloo on CPU, NCCL on GPUs), as torch.distributed.run starts them, without its elastic agent.

Why not torch.distributed.run: its agent answers a worker's failure with a traceback of its own,
and a SIGTERM sent to it alone ends the workers without their checkpoint. Here the parent
forwards SIGTERM and SIGINT to every worker (each finishes its step and checkpoints, as one process
does), shows only the main worker's output (another's when it failed first, after which the rest
are stopped), and exits with that failure's code.
Each worker runs in its own process group (a terminal's Ctrl-C reaches the parent alone, which
passes it on once) and gets SIGTERM if the parent dies.
"""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

SIGNAL_GRACE_S = 60  # a worker stopped by a signal: how long the others get to finish the step and checkpoint
ERROR_GRACE_S = 3  # a worker failed: the others are stopped (SIGTERM, then SIGKILL after this)
INTERRUPTED = (128 + signal.SIGINT, 128 + signal.SIGTERM)  # a worker's exit after a signal's checkpoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(rank: int, nproc: int, port: int) -> dict[str, str]:
    env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
           "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))  # no oversubscribed cores
    return env


def _detach() -> None:
    """In each worker, before it starts: a process group of its own, so a terminal's Ctrl-C reaches
    the launcher alone, which passes it on once (twice would mean "quit now"); and SIGTERM when
    the launcher dies, so no worker outlives it (Linux's PR_SET_PDEATHSIG)."""
    os.setpgid(0, 0)
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def launch(command: Sequence[str], nproc: int) -> int:
    """Run `command` (`python -m peftkit ...`) in `nproc` processes; returns the exit code (0, or
    that of the worker that failed first)."""
    port = free_port()
    logs = [tempfile.TemporaryFile() for _ in range(1, nproc)]  # the other workers' stdout + stderr
    procs = [subprocess.Popen(list(command), env=worker_env(rank, nproc, port),
                              stdout=None if rank == 0 else logs[rank - 1],
                              stderr=None if rank == 0 else subprocess.STDOUT, preexec_fn=_detach)
             for rank in range(nproc)]

    previous = {s: signal.signal(s, lambda signum, frame: _signal_all(procs, signum))
                for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        failed = _wait(procs)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if failed is None:
        return 0
    code = procs[failed].returncode
    if failed > 0:  # a worker's own error: show what it said
        logs[failed - 1].seek(0)
        sys.stderr.write(logs[failed - 1].read().decode(errors="replace"))
    if code < 0:  # killed by the signal itself (before training installed its handler): nobody said so
        name = signal.Signals(-code).name
        print(f"peftkit: train interrupted by {name} before training started: no checkpoint was written",
              file=sys.stderr)
        return 128 - code  # the shell's 128 + N
    return code


def _wait(procs: list[subprocess.Popen]) -> int | None:
    """Wait for every worker; the rank whose failure the user should see, or None when all succeeded.

    That is the first to fail; the main worker when all were stopped alike by a signal (each then
    says the same, the main one has said it). After a failure that is not a signal's, the others
    are stopped at once: they would wait for the failed one in their next collective.
    """
    failed, deadline = None, None
    while any(p.poll() is None for p in procs):
        if failed is None:
            failed = next((rank for rank, p in enumerate(procs) if p.poll() not in (None, 0)), None)
            if failed is not None:
                signalled = procs[failed].returncode in INTERRUPTED or procs[failed].returncode < 0
                deadline = time.monotonic() + (SIGNAL_GRACE_S if signalled else ERROR_GRACE_S)
                if not signalled:
                    _signal_all(procs, signal.SIGTERM)
        elif time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if failed is None:
        return next((rank for rank, p in enumerate(procs) if p.returncode != 0), None)
    if procs[failed].returncode in INTERRUPTED and procs[0].returncode == procs[failed].returncode:
        return 0
    return failed


def _signal_all(procs: list[subprocess.Popen], signum: int) -> None:
    """`signum` to every worker still running."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signum)
