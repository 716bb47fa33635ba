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


def cli_denoising(engine_args, out, dataset: str = "phantom-small"):
    """`python -m pipelines neuro` on `dataset` with ~17x the denoising work, started in
    its own process group (as a terminal starts a command) and returned once denoising
    has begun (its stderr read up to there), for a test to interrupt or break."""
    import sys
    from pathlib import Path

    from fixtures.datasets import load_dataset

    load_dataset(dataset)  # made (cached) outside the wait
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines", "neuro", *engine_args, "--workers", "2",
         "--dataset", dataset, "--param", "patch_radius=2", "--param", "block_radius=8",
         "--out", str(out)], cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    for line in proc.stderr:
        if line.startswith("noise_sigma: "):  # denoising starts now
            return proc
    raise AssertionError(f"the run ended before denoising: {proc.wait()}")


def finish(proc, timeout: float = 120) -> tuple[int, str]:
    """The exit status and the rest of stderr of a `cli_denoising` run; killed whole if
    it outlives `timeout`."""
    try:
        after = proc.stderr.read()
        return proc.wait(timeout=timeout), after
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
