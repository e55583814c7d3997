"""Writing the suite's files so that each appears whole or not at all, and never through a planted link.

`atomic_write_bytes(path, data)` / `atomic_write_text(path, text)`: a temp file beside `path` (created exclusively,
not following links), fsynced, then renamed over `path`; a crash or a full disk leaves the old file (or none),
never half of the new one, and a symbolic link at `path` is replaced, not written through. A full disk is one
`DiskFullError` naming `path`. Used for every file a command writes: the feature cache's JSON files, checkpoints,
the CSV history, metrics.json, predictions.jsonl, attention maps and the comparison report.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Temp file + fsync + rename: readers and a run after a crash see the old file or the new one, never half."""
    from .errors import NO_SPACE, disk_full

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: two writers never share a temp file
    tmp.unlink(missing_ok=True)  # a left-over temp file, or a planted link: never written through
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in NO_SPACE:
            raise disk_full(path, e) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def fsync_dir(path: Path) -> None:
    """Make a rename durable (a power cut could otherwise undo it); not possible on every OS/filesystem."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def exclusive_use(directory: Path, command: str):
    """Hold `directory` for one command (a training run or an evaluation) for the block: a second process pointed at
    the same directory is refused at once instead of interleaving its checkpoints, metrics and history with this
    one's. An flock: the kernel releases it when the holder exits, kill -9 included, so it never goes stale."""
    import fcntl

    from .errors import ConfigError

    lock = directory / ".in_use.lock"
    if lock.is_symlink():  # planted: never open (or truncate) whatever it points at
        lock.unlink()
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise ConfigError(
                f"{directory} is in use by {holder}: two commands writing one run directory would mix their "
                "checkpoints and results. Wait for it to finish, or give this one its own hydra.run.dir=...") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{command} (pid {os.getpid()})".encode(), 0)
        yield
    finally:
        os.close(fd)
