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


def run_step_tests_on_tiny(*engine_args: str) -> str:
    """`tests/correctness/test_steps.py` on both tiny datasets, in a fresh pytest with
    `engine_args` (e.g. an engine and its cluster's address); asserts that every test
    ran and passed, and returns pytest's output."""
    import re
    import sys
    from pathlib import Path

    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/correctness/test_steps.py", "-q",
         "-p", "no:cacheprovider", "--no-history", *engine_args,
         "--dataset", "tiny"],  # both pipelines: phantom-tiny and survey-tiny
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
        timeout=900)
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    passed = re.search(r"(\d+) passed", proc.stdout)
    # neuro: 5 steps and the pipeline; astro: 4 steps and the pipeline
    assert passed and int(passed.group(1)) == 11, tail
    assert "skipped" not in proc.stdout and "failed" not in proc.stdout, tail
    return proc.stdout


class CliRun:
    """`python -m pipelines ...` started in its own process group (as a terminal starts a
    command), its stderr read by a thread, so that no wait on it can hang a test: one
    that outlives its timeout is killed whole."""

    def __init__(self, args, timeout: float = 300):
        import queue
        import sys
        import threading
        from pathlib import Path

        self.timeout = timeout
        self.lines = queue.Queue()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipelines", *args], cwd=Path(__file__).resolve().parents[1],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.put(line)
        self.lines.put(None)  # the pipe closed

    def wait_for(self, prefix: str) -> None:
        """Until a stderr line starts with `prefix`."""
        import queue
        import time

        deadline = time.monotonic() + self.timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise AssertionError(f"no {prefix!r} on stderr in {self.timeout} s") from None
            if line is None:
                raise AssertionError(f"the run ended ({self.proc.wait()}) before {prefix!r}")
            if line.startswith(prefix):
                return

    def finish(self, timeout: float = 120) -> tuple[int, str]:
        """The exit status and the rest of stderr (what came within a few seconds of the
        exit: a process left behind holding the pipe does not hang the test)."""
        import queue

        try:
            status = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the run did not end within {timeout} s") from None
        text = []
        while True:
            try:
                line = self.lines.get(timeout=10)
            except queue.Empty:
                break
            if line is None:
                break
            text.append(line)
        return status, "".join(text)

    def kill(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def cli_denoising(engine_args, out, dataset: str = "phantom-small") -> CliRun:
    """`python -m pipelines neuro` on `dataset` with ~17x the denoising work, returned
    once denoising has begun, for a test to interrupt or break."""
    from fixtures.datasets import load_dataset

    load_dataset(dataset)  # made (cached) outside the wait
    run = CliRun(["neuro", *engine_args, "--workers", "2", "--dataset", dataset,
                  "--param", "patch_radius=2", "--param", "block_radius=8",
                  "--out", str(out)])
    run.wait_for("noise_sigma: ")  # denoising starts now
    return run


def kill_soon(procs, after: float = 1.0):
    """Kills `procs` (their process groups) `after` seconds from now, from a thread;
    join the thread it returns."""
    import threading
    import time

    def kill():
        time.sleep(after)
        for proc in procs:
            os.killpg(proc.pid, signal.SIGKILL)
    killer = threading.Thread(target=kill, daemon=True)
    killer.start()
    return killer


def serving(handler):
    """A context manager: `handler` (an http.server request handler class) served on
    127.0.0.1 from a thread; yields the base URL."""
    import contextlib
    import http.server
    import threading

    @contextlib.contextmanager
    def served():
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()
            server.server_close()
    return served()
