"""TensorFlow: every step re-expressed natively in TensorFlow, the study's rewrite done
to match the reference.

In the study TensorFlow could run no Python kernels, funnelled all data through the
master and came last. Here every step it runs is TensorFlow operations (`tf.function`
graphs, XLA-compiled where the step is heavy); no `py_function` or `numpy_function`.
NumPy appears only at the edges: the pipeline state's arrays in, results out to the
suite's writers (with the few rows they hold: the saturated stars' centres put on the
sky, the catalog's saturated rows), and constants that depend on shapes and parameters
alone (WCS matrices, padding indices, zoom weights). One exception, only when asked for
(`deblend=true`, off in the pinned parameters): detect hands its footprints to
photutils' deblender on the host, between two graphs (scikit-image's watershed breaks
its ties its own way, which a rewrite could not be held to). Workers read their own
inputs: `tf.data` pipelines read NIfTI volumes and FITS planes or bands of rows,
straight from the files by byte offset (`engines/tf/io.py`); headers are parsed on the
host (metadata only), and outputs are written by the suite's own writers, since
TensorFlow has no NIfTI or FITS writer.

One process: TensorFlow's intra-op thread pool has one thread per worker (`--workers`),
its inter-op pool runs the input pipeline beside the compute. A GPU, where TensorFlow sees
one, is used without code changes (its name is recorded). Precision: float64 by default,
where the outputs meet the same bounds as the engines that run the suite's kernels;
`--tf-precision float32` is faster, within the bounds `tolerance` states.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import tempfile
from pathlib import Path

# Before TensorFlow loads: its own log lines stay quiet (errors still reach exceptions),
# and no oneDNN rewrites change float results from run to run.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


@contextlib.contextmanager
def _quiet_stderr():
    """TensorFlow writes lines to the process's stderr as it loads and finds (or misses)
    CUDA, before its log settings apply: kept aside, and shown only if loading fails."""
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield sink
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            os.write(2, sink.read()[-4000:])
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


with _quiet_stderr():
    import tensorflow as tf  # noqa: E402  (missing: "pip install '.[tensorflow]'")

from pipelines.errors import EngineUnavailable, InputError  # noqa: E402

from ..base import RECORDED_PACKAGES, Engine, package_versions  # noqa: E402
from ..tolerances import FLOAT32_RTOL, Tolerance  # noqa: E402
from . import astro, calibrate, detect, neuro  # noqa: E402

PRECISIONS = {"float64": tf.float64, "float32": tf.float32}
STEP_MODULES = (neuro, calibrate, astro, detect)


class TensorFlowEngine(Engine):
    name = "tensorflow"
    # Every step is one of the functions marked @native in the step modules.
    native_steps = {step: fn for module in STEP_MODULES
                    for fn in vars(module).values() for step in getattr(fn, "native_for", ())}
    not_implemented = {}

    def __init__(self, workers: int | None = None, precision: str = "float64"):
        super().__init__(workers)
        if precision not in PRECISIONS:
            raise EngineUnavailable(f"tensorflow: precision must be one of "
                                    f"{', '.join(PRECISIONS)}, not {precision!r}")
        self.precision = precision
        self.dtype = PRECISIONS[precision]
        self.intra_threads = self.inter_threads = None
        self.device = "CPU"

    # -- session ------------------------------------------------------------------------
    def start(self):
        threading = tf.config.threading
        try:
            threading.set_intra_op_parallelism_threads(self.workers)
            threading.set_inter_op_parallelism_threads(2)
        except RuntimeError:
            pass  # the runtime already started in this process: its pools are kept
        with _quiet_stderr():
            gpus = tf.config.list_physical_devices("GPU")
        for gpu in gpus:  # take GPU memory as needed, so peak figures mean something
            with contextlib.suppress(RuntimeError):
                tf.config.experimental.set_memory_growth(gpu, True)
        if gpus:
            details = tf.config.experimental.get_device_details(gpus[0])
            self.device = f"GPU: {details.get('device_name', gpus[0].name)}"
        self.intra_threads = threading.get_intra_op_parallelism_threads() or self.workers
        self.inter_threads = threading.get_inter_op_parallelism_threads() or 2
        self.workers = self.intra_threads
        return self

    def versions(self):
        found = package_versions(RECORDED_PACKAGES)
        found["tensorflow"] = tf.__version__
        return found

    def describe(self):
        facts = super().describe()
        facts.update(precision=self.precision, device=self.device,
                     intra_op_threads=self.intra_threads, inter_op_threads=self.inter_threads,
                     xla="jit_compile on the heavy steps")
        return facts

    def prepare(self, step, state, ctx):
        """Compile the step's XLA kernels for this input's shapes, so that a timed run
        measures the work, not the compiler: a step module's `prepare_<step>`, or else
        the step run on its first partition (a CCD, a patch: the shapes every partition
        of the step shares; the largest group first) in a scratch folder."""
        own = [getattr(m, f"prepare_{step.name}") for m in STEP_MODULES
               if hasattr(m, f"prepare_{step.name}")]
        if own:
            own[0](self, state, ctx)
        else:
            with tempfile.TemporaryDirectory() as scratch:
                ctx = dataclasses.replace(ctx, workdir=Path(scratch))
                plan = step.plan(state, ctx)
                if plan.partitions:
                    plan.partitions = plan.partitions[:1]
                    with contextlib.suppress(InputError):  # a first CCD skipped is no matter
                        self.native_steps[step.name](self, step, state, ctx, plan)
        _release_freed_memory()

    def tolerance(self, step: str, quantity: str) -> Tolerance:
        own = (FLOAT32 if self.precision == "float32" else FLOAT64).get((step, quantity))
        return own or super().tolerance(step, quantity)


def _release_freed_memory():
    """Give the heap that XLA's compiler freed back to the system. glibc keeps freed memory
    in its per-thread arenas, and compiling `calibrate` or `detect` frees 400-600 MB that
    would otherwise stay resident and be counted in every later step's peak memory (what
    stays is the compiled kernels themselves). Not glibc (musl, macOS): nothing to do."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# Bounds that differ from the same-kernel engines' (engines.tolerances), with why.
_FA_LOG = Tolerance(
    "dipy takes the log of the float32 signal in float32 (numpy's vectorised logf, whose "
    "rounding differs between CPUs) and so does this engine (TensorFlow's logf): the two "
    "round about 2% of logs to neighbouring floats. dipy's own FA moves by up to 1.3e-6 "
    "when its logs are rounded the other way (phantom-small; tests/correctness/"
    "test_tf_neuro.py measures it), so 4e-6 absolute (FA lies in [0, 1]) plus 4 float32 "
    "ulps", rtol=FLOAT32_RTOL, atol=4e-6)
FLOAT64: dict[tuple[str, str], Tolerance] = {("fit_tensor", "fa"): _FA_LOG}
FLOAT32: dict[tuple[str, str], Tolerance] = {
    **FLOAT64,
    ("denoise", "denoised"): Tolerance(
        "non-local means' weights in float32 (the exponential of float32 patch distances, "
        "each good to a few float32 ulps of the distance); the sums over the 729 offsets "
        "and the Rician correction stay float64. Measured at most 2.1e-6 sigma off "
        "(phantom-small); bound: 4 float32 ulps plus 1e-5 of the volume's largest value "
        "(about 2e-4 sigma at SNR 20), 100 times what was measured", rtol=FLOAT32_RTOL,
        floor=1e-5),
    ("fit_tensor", "fa"): Tolerance(
        f"{_FA_LOG.why}; end to end, the fit also sees the float32 denoiser's output "
        "(within its bound above): FA measured at most 2.6e-6 off on phantom-small, so "
        "1e-5 absolute", rtol=FLOAT32_RTOL, atol=1e-5),
}
