"""What is computed: the study's pipelines as ordered steps, each with pinned parameters,
a partitioning and a per-partition kernel in plain NumPy/dipy. See `steps.py`."""
