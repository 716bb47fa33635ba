"""The errors a user of the suite is meant to read: each carries one line that says what is
wrong and where, so the CLI and the test fixtures can show it without a traceback."""


class InputError(ValueError):
    """The input data is unusable (corrupt or truncated file, mismatched gradients, NaNs...)."""


class EngineUnavailable(RuntimeError):
    """An engine cannot run here: its packages are missing or its cluster is unreachable."""


class DiskFull(OSError):
    """A run's outputs do not fit where they are written: the path, and the bytes."""


def size_text(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def check_room(folder, needed: int, what: str) -> None:
    """DiskFull, one line, when `folder`'s disk has less than `needed` bytes free."""
    import shutil

    free = shutil.disk_usage(folder).free
    if free < needed:
        raise DiskFull(f"{folder}: {what} needs about {size_text(needed)}; its disk has "
                       f"{size_text(free)} free ({size_text(needed - free)} missing)")
