"""The errors a user can cause, and how every command reports them: one line `error: ...` and exit status 2.

A `UserError` is bad input (a configuration value, a dataset, a checkpoint, a weights file, a command-line flag)
or a fault of the machine the user must fix (a full disk): its message names the file or key, the value, and
the fix, so a traceback would only hide it. Anything else is a bug in the suite and keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import sys
from contextlib import contextmanager
from typing import Callable

# The write errors that mean "no room": no space on the device, over the disk quota, over the file-size limit.
NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# Refused by the system, not by the suite: a directory the user may not write, a read-only filesystem.
NO_PERMISSION = {errno.EACCES, errno.EPERM, errno.EROFS}
EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input or a machine fault the user must fix; the message says which and what to do."""


class ConfigError(UserError, ValueError):
    """A configuration that cannot work; the message names the config keys, the values and what is allowed."""


class DiskFullError(UserError, OSError):
    """A file could not be written whole for lack of space; the message names it (nothing half-written is left)."""


def disk_full(path, error: OSError) -> DiskFullError:
    return DiskFullError(
        f"{path}: could not be written: {os.strerror(error.errno)} (nothing was left under that name; files "
        "written before are intact). Free space on that disk, or point the output elsewhere (hydra.run.dir=..., "
        "paths.cache_dir=...), and run the same command again")


def user_message(error: BaseException) -> str | None:
    """The one-line report of an error the user can fix, or None for a bug (which keeps its traceback)."""
    from hydra.errors import CompactHydraException

    if isinstance(error, OSError) and not isinstance(error, UserError):
        if error.errno in NO_SPACE:
            error = disk_full(error.filename or "a file", error)
        elif error.errno in NO_PERMISSION:
            return (f"error: {error.filename or 'a file'}: {error.strerror}: this command may not write there. "
                    "Point it at a directory you can write (hydra.run.dir=..., paths.root_dir=..., or CAPTIONER_ROOT)")
    if isinstance(error, (UserError, CompactHydraException)):
        return f"error: {error}"
    return None


@contextmanager
def user_errors_reported():
    """Within: a user error is printed as one line `error: ...` and exits with status 2; a bug raises with its
    full traceback. Used around a Hydra command's task (so that Hydra adds no line of its own) and around the
    whole command (for Hydra's own errors: an unknown key, a missing config group)."""
    try:
        yield
    except Exception as e:
        sys.exit(reported_exit_status(e))


def reported_exit_status(error: Exception) -> int:
    """For a command's `except Exception as e: return reported_exit_status(e)`: a user error printed as one line
    `error: ...` on stderr, and its exit status (2); a bug raised again with its full traceback."""
    message = user_message(error)
    if message is None:
        raise error
    print(message, file=sys.stderr)
    return EXIT_USER_ERROR


def exit_on_user_error(command: Callable[[], object]) -> None:
    """Run a Hydra command (`train.py`, `eval.py`) with user errors reported as one message and exit status 2.
    Hydra is asked to re-raise its own errors (HYDRA_FULL_ERROR) so that they reach here as exceptions."""
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    with user_errors_reported():
        command()
