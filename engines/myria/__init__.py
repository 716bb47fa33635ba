"""Myria, the study's shared-nothing relational engine with Python UDFs, as an engine for
a cluster the user already runs (`--myria-url`; Myria cannot be installed here, and CI
has never run this engine against a server).

- `engine`: the MyriaEngine; the neuroscience steps (the astronomy steps are declared not
  implemented yet);
- `myrial`: each step as a MyriaL program and the JSON plan that implements it (pinned by
  tests/snapshots/myria/);
- `blob`: the bytes of a BLOB that holds arrays;
- `rest`: a client of Myria's REST server;
- `udf`: the Python UDF shipped to the workers (loadable by Python 2's cPickle);
- `udf_child`: what it runs there under Python 3: the suite's own kernels.
"""
from .engine import MyriaEngine

__all__ = ["MyriaEngine"]
