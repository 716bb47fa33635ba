"""PySpark's worker daemon, with the suite's kernel modules imported before it forks.

Spark forks a Python worker per task slot from this daemon, and stops a worker that has
been idle for a minute; the next task then forks a new one. Forked from a daemon that has
already imported dipy, astropy and the rest, a new worker starts warm, and a step that
follows a pause (the reference's turn in a benchmark session, say) does not pay ~5 s of
imports inside its timed region. Those objects are also frozen out of the garbage
collector's reach, which makes every task after the first 0.04 s cheaper. The imports
start no threads (one BLAS thread, set in the workers' environment), which is what
PySpark asks of code run before its fork.
"""
from pipelines import prepare_worker

import gc  # noqa: E402

prepare_worker()  # a problem surfaces in the engine's warm-up, which imports again
# A reused worker runs gc.collect() after every task (pyspark/daemon.py): with the
# libraries' objects in its heap that took 43 ms, before its next task could start.
# Frozen here, before the fork, they are skipped by every collection (2 us); what tasks
# allocate is still collected.
gc.freeze()

from pyspark.daemon import manager  # noqa: E402

if __name__ == "__main__":
    manager()
