"""Nothing a local engine starts listens beyond this machine: every listening socket of
this process and of every process under it (Dask's scheduler and workers, Spark's JVM and
its Python daemon, anything TensorFlow starts) is on a loopback address."""
import ipaddress

import psutil
import pytest

from fixtures.datasets import load_dataset
from fixtures.reference import reference_run
from pipelines import neuro
from pipelines.steps import RunContext

pytestmark = pytest.mark.correctness


def listening_sockets():
    """(process name, pid, address, port) of every listening TCP socket of this process
    and its descendants."""
    found = []
    for proc in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            connections = proc.net_connections(kind="tcp")
            name = proc.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue  # gone meanwhile: it listens no more
        found += [(name, proc.pid, c.laddr.ip, c.laddr.port) for c in connections
                  if c.status == psutil.CONN_LISTEN]
    return found


def loopback(address: str) -> bool:
    """127.0.0.0/8 or ::1, also as the JVM writes IPv4 on a dual-stack socket
    (::ffff:127.0.0.1)."""
    ip = ipaddress.ip_address(address)
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


def test_a_local_engine_listens_on_loopback_only(engine, request, tmp_path):
    if request.config.getoption("dask_scheduler") or request.config.getoption("spark_master"):
        pytest.skip("an existing cluster listens where its owner chose")
    # a step first, so that every process the engine starts lazily is up (Spark's Python
    # daemon and workers, Dask's worker connections)
    run = reference_run(load_dataset("phantom-tiny").inputs[0])
    engine.run_step(neuro.MEAN_B0, run.state_before("mean_b0"),
                    RunContext(tmp_path, neuro.NeuroParams(), neuro.NeuroPartitioning()))
    sockets = listening_sockets()
    beyond = [s for s in sockets if not loopback(s[2])]
    assert not beyond, f"{engine.name} listens beyond this machine: {beyond}"
