"""Writing the suite's files so that each appears whole or not at all, and never through a planted link.

`atomic_write_text(path, text)`: a temp file beside `path` (created exclusively, not following links), fsynced,
then renamed over `path`; a crash or a full disk leaves the old file (or none), never half of the new one, and a
symbolic link at `path` is replaced, not written through. Used for the feature cache's JSON files and for every
run's metrics.json and predictions.jsonl.
"""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write_text(path: Path, text: str) -> None:
    """Temp file + fsync + rename: readers and a run after a crash see the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: two writers never share a temp file
    tmp.unlink(missing_ok=True)  # a left-over temp file, or a planted link: never written through
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666), "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


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
