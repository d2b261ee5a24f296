"""Outputs that appear whole or not at all.

An output is written into a hidden temp directory beside its final name and renamed into place
once complete. Replacing an existing output takes two renames (the old one aside, the new one in)
and a delete; SIGINT and SIGTERM are held while those run, so an interrupt lands before them (the
old output stays) or after them (the new one is complete), never between. A failure or an
interrupt while writing removes the temp directory (`finally` blocks run: Ctrl-C raises
KeyboardInterrupt, and the CLI turns SIGTERM into the same).
"""

import contextlib
import os
import shutil
import signal
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive inside the block take effect when it ends.

    Note: blocking them with `pthread_sigmask` would hold them only in this thread, and the kernel
    hands a process's signal to any thread that does not block it (torch's thread pool), after
    which Python runs the handler in the main thread all the same. So the Python handlers are
    swapped for one that records, and each recorded signal is raised again at the end. A no-op off
    the main thread (Python runs handlers only there) or when a handler was not set from Python.
    """
    if threading.current_thread() is not threading.main_thread() or None in map(signal.getsignal, SIGNALS):
        yield
        return
    received: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(received):
            signal.raise_signal(signum)


def temp_path(final: Path, kind: str = "tmp") -> Path:
    """A hidden, unique name beside `final` (same file system: moving it into place is a rename)."""
    return final.parent / f".{final.name}.{kind}-{uuid.uuid4().hex}"


def replace_dir(new: Path, target: Path) -> None:
    """Move the complete directory `new` to `target`; an existing target is moved aside first and
    deleted last, all with signals held."""
    with signals_held():
        if not target.exists():
            os.rename(new, target)
            return
        old = temp_path(target, "old")
        os.rename(target, old)
        try:
            os.rename(new, target)
        except OSError:
            os.rename(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A fresh hidden directory to write `out` into; it replaces `out` when the block completes and
    is removed when the block fails or is interrupted."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(out)
    try:
        tmp.mkdir()
        yield tmp
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
