"""Helpers for tests that start real server processes (a Dask scheduler, Spark's master
and workers) on 127.0.0.1."""
import os
import signal
import socket
import subprocess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(procs, timeout: float = 20):
    """By process id, even after a failure: each was started in its own session
    (start_new_session=True), so its group holds what it launched too."""
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
