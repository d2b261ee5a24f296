"""One writer per output directory: a lock file beside it holding the writer's pid and host.

`peftkit train` started twice on the same output (by accident, or by a scheduler retrying) would
interleave checkpoints and overwrite each other's adapter. The lock is `.<name>.lock` in the
output's parent (so clearing the output with --overwrite keeps it). A second writer refuses at
once, naming the holder; a lock whose process is gone (killed, machine rebooted) is taken over
with a warning.
"""

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from peftkit.errors import ConfigError

logger = logging.getLogger(__name__)


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _holder(path: Path) -> tuple[int | None, str]:
    try:
        pid, _, host = path.read_text().partition("\n")
        return int(pid), host.strip()
    except (OSError, ValueError):
        return None, ""  # unreadable or half-written: treated as stale


def acquire(out: Path) -> Path:
    """Create the lock for `out`; a ConfigError if a live process holds it."""
    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pid, host = _holder(path)
            if pid is not None and (host != socket.gethostname() or _alive(pid)):
                raise ConfigError(f"{out} is being written by another peftkit process (pid {pid} on {host}): wait for "
                                  f"it to finish, or set output=another/dir (if that process is gone, delete {path})")
            logger.warning("taking over the stale lock %s of pid %s, which is no longer running", path, pid)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n{socket.gethostname()}\n")
        return path
    raise ConfigError(f"could not take the lock {path}: another process keeps recreating it; check what writes {out}")


def release(path: Path) -> None:
    """Remove the lock if it is still ours."""
    if _holder(path)[0] == os.getpid():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def locked(out: Path, enabled: bool = True) -> Iterator[None]:
    """Hold the lock for `out` inside the block (a no-op when not `enabled`, e.g. on non-main ranks)."""
    if not enabled:
        yield
        return
    path = acquire(out)
    try:
        yield
    finally:
        release(path)
