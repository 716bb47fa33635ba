"""The errors a user of the suite is meant to read: each carries one line that says what is
wrong and where, so the CLI and the test fixtures can show it without a traceback."""
import errno
import os
from pathlib import Path

# What a full disk looks like from a write: no space, a file-size limit, a quota.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


class InputError(ValueError):
    """The input data is unusable (corrupt or truncated file, mismatched gradients, NaNs...)."""


class EngineUnavailable(RuntimeError):
    """An engine cannot run here: its packages are missing or its cluster is unreachable."""


class EngineLost(RuntimeError):
    """An engine's cluster, JVM or workers went away mid-run: what, and its address."""


class WorkersKeptDying(EngineLost):
    """A task killed every worker it ran on, over the engine's retries; the engine itself
    lives on (its workers replaced), so only this step is lost."""


class DiskFull(OSError):
    """A run's outputs do not fit where they are written: the path, and the bytes."""


def size_text(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def allocate(fh, size: int, shown_as=None) -> None:
    """Reserve the first `size` bytes of the open file `fh` for real (not sparse) before
    it is written: a full disk is then DiskFull here, naming the file (`shown_as`, else
    its own name) and its size, instead of a bus error behind a memory map or a
    half-written file. A system or filesystem without fallocate: a sparse file."""
    if not hasattr(os, "posix_fallocate"):  # macOS
        fh.truncate(size)
        return
    try:
        os.posix_fallocate(fh.fileno(), 0, size)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            fh.truncate(size)
            return
        if exc.errno not in DISK_FULL_ERRNOS:
            raise
        fh.close()
        Path(fh.name).unlink(missing_ok=True)
        raise DiskFull(f"{shown_as or fh.name}: no room for its {size_text(size)} "
                       f"({os.strerror(exc.errno)})") from None


def check_room(folder, needed: int, what: str) -> None:
    """DiskFull, one line, when `folder`'s disk has less than `needed` bytes free."""
    import shutil

    free = shutil.disk_usage(folder).free
    if free < needed:
        raise DiskFull(f"{folder}: {what} needs about {size_text(needed)}; its disk has "
                       f"{size_text(free)} free ({size_text(needed - free)} missing)")
