"""SciDB, the study's array database, as an engine for a server the user already runs
(`--scidb-url`; SciDB cannot be installed from this project's package registries, and CI
has never run this engine against a server).

- `engine`: the SciDBEngine; the steps of both pipelines;
- `afl`: the steps compiled to AFL (pinned by tests/snapshots/scidb/);
- `binary`: SciDB's binary cell format, how arrays go in and out;
- `shim`: a client of shim, SciDB's HTTP service (SciDB-Py cannot be imported beside
  NumPy 2);
- `stream_child`: what `stream()` runs on the server: the suite's own kernels (and the
  co-add's clipping, which AFL cannot express: it has no median).
"""
from .engine import SciDBEngine

__all__ = ["SciDBEngine"]
