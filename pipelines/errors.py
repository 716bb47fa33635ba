"""The two errors a user of the suite is meant to read: each carries one line that says what
is wrong and where, so the CLI and the test fixtures can show it without a traceback."""


class InputError(ValueError):
    """The input data is unusable (corrupt or truncated file, mismatched gradients, NaNs...)."""


class EngineUnavailable(RuntimeError):
    """An engine cannot run here: its packages are missing or its cluster is unreachable."""
