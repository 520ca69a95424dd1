"""Faults every layer must tell apart, and the test hook that injects the worst one.

A full or unwritable disk (ENOSPC, EROFS, EDQUOT) is not a crash: retrying cannot help until a
person frees space, so the recipe and the supervisor report it in one line and stop. Libraries
often wrap the OSError (torch.save raises a RuntimeError whose context is the ENOSPC), so the
whole exception chain is searched.

`kill_point(name)`: the process SIGKILLs itself at a named step when `SPOTUNE_KILL_AT` names it.
Tests use it to kill a launch in each of its windows (after the job is recorded, after the run
dir is written, after the supervisor started, ...); unset, it is one dictionary lookup.
"""
from __future__ import annotations

import errno
import os
import signal
from typing import Optional

DISK_ERRNOS = {errno.ENOSPC: "ENOSPC", errno.EROFS: "EROFS", errno.EDQUOT: "EDQUOT"}
# What the C++ side of a library says when it drops the errno (torch's file writer, sqlite).
_DISK_MESSAGES = {"no space left on device": errno.ENOSPC, "read-only file system": errno.EROFS,
                  "disk quota exceeded": errno.EDQUOT, "database or disk is full": errno.ENOSPC}

KILL_AT_ENV = "SPOTUNE_KILL_AT"


def disk_error(exc: Optional[BaseException]) -> Optional[OSError]:
    """The full- or read-only-disk OSError behind `exc` (itself, its cause or its context), if any."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
            return exc
        text = str(exc).lower()
        for words, code in _DISK_MESSAGES.items():
            if words in text:
                return OSError(code, os.strerror(code))
        exc = exc.__cause__ or exc.__context__
    return None


def describe_disk_error(err: OSError) -> str:
    """'disk full: /run/checkpoints/x: No space left on device (ENOSPC)', in one line."""
    what = "disk full" if err.errno in (errno.ENOSPC, errno.EDQUOT) else "disk not writable"
    where = f"{err.filename}: " if getattr(err, "filename", None) else ""
    return f"{what}: {where}{err.strerror or os.strerror(err.errno)} ({DISK_ERRNOS.get(err.errno, err.errno)})"


def kill_point(name: str) -> None:
    if os.environ.get(KILL_AT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
