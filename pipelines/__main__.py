"""Run a pipeline on your own files (or a suite dataset) with any engine.

    python -m pipelines neuro --dwi dwi.nii.gz --bvals bvals --bvecs bvecs \\
        --engine dask --workers 8 --out results/
    python -m pipelines astro --ccds raw/ --engine dask --workers 8 --out results/

    python -m pipelines astro --images m13.fits --patch-inner 128 --patch-border 16 \
        --out results/

neuro writes mask.nii.gz, denoised.nii, fa.nii.gz, md.nii.gz; astro writes the
calibrated CCDs, warps and coadds (FITS with WCS) and catalog.fits (and, for plain
images, the CCD files made of them); both write run.json
(engine, versions, parameters, seconds per step, skipped inputs). Errors in the input or
the engine are one line on stderr and exit status 2 (README, "When things go wrong", has
every status). Stderr is this command's progress and errors only (none with --quiet): an
engine's own processes log to a file in the output directory (Spark's JVM: spark.log;
Dask: dask.log; what this process's threads print: driver.log), named in run.json;
--debug leaves this process's output on stderr, adds an error's traceback, and keeps a
failed run's folder with those logs.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one BLAS thread per process; engines parallelise


# Exit statuses (README: When things go wrong)
EXIT_ERROR = 2  # the input, a parameter or the engine: one line on stderr says which
EXIT_ENGINE_LOST = 3  # the engine's cluster, JVM or workers went away mid-run
EXIT_DISK_FULL = 4  # the outputs do not fit: the path and the bytes
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)


def _parser() -> argparse.ArgumentParser:
    from engines import ENGINES, engine_options

    p = argparse.ArgumentParser(prog="python -m pipelines", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="pipeline", required=True)
    n = sub.add_parser("neuro", help="diffusion MRI: mask, denoise, DTI fit -> FA, MD")
    src = n.add_argument_group("input: --dwi/--bvals/--bvecs, or --dataset")
    src.add_argument("--dwi", type=Path, help="4D diffusion image (NIfTI, .nii or .nii.gz)")
    src.add_argument("--bvals", type=Path, help="b-values, FSL format")
    src.add_argument("--bvecs", type=Path, help="gradient directions, FSL format (3 x N)")
    src.add_argument("--dataset", help="a suite dataset instead (e.g. phantom-small)")
    a = sub.add_parser("astro", help="survey: calibrate, warp, coadd, detect -> catalog")
    src = a.add_argument_group("input: --ccds, or --dataset")
    src.add_argument("--ccds", "--images", type=Path, nargs="+", metavar="PATH",
                     help="FITS files, or directories of them: CCD files (IMAGE, MASK and "
                          "VARIANCE planes, VISIT and CCDNUM keywords) or plain images (one "
                          "image HDU with a celestial WCS), which are first made into CCD "
                          "files in OUT/ccds/, what was assumed for each written to run.json")
    src.add_argument("--dataset", help="a suite dataset instead (e.g. survey-small)")
    sky = a.add_argument_group("sky map (for --ccds; a suite dataset brings its own)")
    sky.add_argument("--pixel-scale", type=float, default=None,
                     help="arcsec per sky pixel (default: the images' own, their median)")
    sky.add_argument("--patch-inner", type=int, default=2000, help="patch size, pixels")
    sky.add_argument("--patch-border", type=int, default=100, help="patch border, pixels")
    n.add_argument("--b0-threshold", type=float, metavar="B",
                   help="b-values up to B are b0 volumes (default 10, the study's; scanners "
                        "write b0 as 0 to 50): --param b0_threshold=B")
    a.add_argument("--deblend", action="store_true",
                   help="split blended footprints (photutils' deblend_sources; off in the "
                        "study's pipeline): --param deblend=true")
    for parser, params in ((n, "NeuroParams"), (a, "AstroParams")):
        parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                            help=f"set one of the pipeline's parameters (repeatable; the "
                                 f"fields of {params} in pipelines/, pinned to the study's "
                                 f"by default); written to run.json")
    for parser in (n, a):
        parser.add_argument("--engine", default="reference", choices=list(ENGINES))
        parser.add_argument("--workers", type=int, default=None,
                            help="workers of a local engine cluster (default: one per core)")
        for option in engine_options():  # each engine's own (engines/__init__.py)
            option.add_to(parser.add_argument)
        parser.add_argument("--out", type=Path, required=True,
                            help="output directory: made when the run has succeeded (the "
                                 "run writes beside it, then moves it into place)")
        parser.add_argument("--overwrite", action="store_true",
                            help="replace an earlier run's --out folder whole")
        parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
        parser.add_argument("--debug", action="store_true",
                            help="an error's traceback, this process's own output on "
                                 "stderr, and a failed run's folder kept with the engines' "
                                 "logs (otherwise: one line)")
    return p


def suite_dataset(name: str, pipeline: str):
    from fixtures.datasets import load_dataset
    from pipelines.errors import InputError

    dataset = load_dataset(name, pipeline=pipeline)
    if dataset.pipeline != pipeline:
        raise InputError(f"{name} is a dataset of the {dataset.pipeline} pipeline")
    return dataset.inputs[0]


def load_neuro(args, params):
    from pipelines import neuro
    from pipelines.errors import InputError

    if args.dataset:
        files = suite_dataset(args.dataset, "neuro").files()
    elif args.dwi and args.bvals and args.bvecs:
        files = (args.dwi, args.bvals, args.bvecs)
    else:
        raise InputError("give --dwi, --bvals and --bvecs, or --dataset")
    return [str(f) for f in files], neuro.load_subject(*files, params=params)


def load_astro(args, params):
    from pipelines import astro
    from pipelines.errors import InputError

    if args.dataset:
        survey = suite_dataset(args.dataset, "astro")
        return [str(survey.directory)], survey.load_state()
    if not args.ccds:
        raise InputError("give --ccds FILES or DIRECTORIES, or --dataset")
    # a run's own products (an --out inside an input folder) are never its input
    outs = {args.out.resolve(), Path(getattr(args, "final_out", args.out)).resolve()}
    files = [f for source in args.ccds for f in astro.ccd_files(source)
             if not outs & set(f.resolve().parents)]
    if not files:
        raise InputError(f"{args.ccds[0]}: no FITS files outside the output folder "
                         f"{getattr(args, 'final_out', args.out)}")
    state = astro.load_survey(files, ingest_dir=args.out / "ccds",
                              pixel_scale_arcsec=args.pixel_scale, patch_inner=args.patch_inner,
                              patch_border=args.patch_border)
    for made in state["ingested"]:
        if not args.quiet:
            print(f"{made.source}: visit {made.visit} ({made.visit_from}), CCD {made.ccd}, "
                  f"variance from {made.variance_from}", file=sys.stderr)
        if made.warning:  # a warning is shown even with --quiet
            print(f"warning: {made.source}: {made.warning}", file=sys.stderr)
    return [str(s) for s in args.ccds], state


def write_neuro(final, out: Path) -> list[str]:
    from pipelines import nifti

    for name in ("mask", "fa", "md"):
        nifti.save(out / f"{name}.nii.gz", final[name], final["affine"])
    return ["mask.nii.gz", "denoised.nii", "fa.nii.gz", "md.nii.gz"]


def write_astro(final, out: Path) -> list[str]:
    from astropy.io import fits
    from astropy.table import Table

    from pipelines import astro, fitsio

    table = Table(final["catalog"])
    for bit, meaning in astro.FLAGS.items():  # what each bit of `flags` means, in the file
        table.meta[f"FLAG{bit}"] = meaning
    fitsio.write_hdus(out / "catalog.fits",
                      fits.HDUList([fits.PrimaryHDU(), fits.table_to_hdu(table)]))
    made = ["ccds/"] if final.get("ingested") else []  # plain images made into CCD files
    return made + ["calexp/", "warp/", "coadd/", "catalog.fits"]


PIPELINE_IO = {"neuro": (load_neuro, write_neuro), "astro": (load_astro, write_astro)}


def staged(args):
    """The folder the run writes into, beside --out; it becomes --out only when the run
    has succeeded (`put_in_place`), so a failed or interrupted run leaves nothing that
    looks finished. An --out that holds files is refused unless --overwrite, and then
    only if it is an earlier run's (its run.json): another folder is never replaced."""
    from pipelines.errors import InputError

    out = args.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not args.overwrite:
            raise InputError(f"{out}: holds an earlier run's files; --overwrite replaces "
                             f"it whole, or choose another folder")
        if not (out / "run.json").is_file():
            raise InputError(f"{out}: not an earlier run's folder (no run.json), so "
                             f"--overwrite does not replace it")
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def put_in_place(staging: Path, out: Path) -> None:
    """The finished run's folder as --out; an earlier run's folder there goes."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def execute(args) -> dict:
    """The run, written into a staging folder that becomes --out when it succeeded; a
    failed run's is removed (with --debug, kept: its engines' logs)."""
    final_out = args.out
    args.out = args.staging = staged(args)
    args.final_out = final_out
    succeeded = False
    try:
        run = execute_in(args)
        put_in_place(args.out, final_out)
        succeeded = True
        return run
    finally:
        if not succeeded and args.debug:
            print(f"kept the failed run's folder: {args.out}", file=sys.stderr)
        else:
            shutil.rmtree(args.out, ignore_errors=True)  # what a failed run left: nothing
        args.out = final_out


def execute_in(args) -> dict:
    from engines import create_engine, engine_options
    from engines.base import print_progress
    from pipelines import PIPELINES
    from pipelines.errors import check_room
    from pipelines.steps import RunContext, override

    pipeline = PIPELINES[args.pipeline]
    load, write = PIPELINE_IO[args.pipeline]
    named = [f"b0_threshold={args.b0_threshold}"] \
        if getattr(args, "b0_threshold", None) is not None else []
    named += ["deblend=true"] if getattr(args, "deblend", False) else []
    params, changed = override(pipeline.Params(), named + args.param, args.pipeline)
    options = {opt.dest: getattr(args, opt.dest) for opt in engine_options()}
    engine = create_engine(args.engine, workers=args.workers, **options)
    engine.check_implements(pipeline.STEPS)  # before any work, not after minutes of it
    engine.check_params(pipeline.STEPS, params)
    seconds = {}
    start = time.perf_counter()
    inputs, state = load(args, params)
    if state.get("ingested"):  # plain images made into CCD files: part of the run's time
        seconds["ingest"] = round(time.perf_counter() - start, 3)
    skipped = state.get("skipped", ())
    partitioning = pipeline.Partitioning()
    args.out.mkdir(parents=True, exist_ok=True)
    check_room(args.out, pipeline.planned_output_bytes(state), "this run's output")

    console = sys.stderr  # this command's progress and errors

    def on_step(name, s):
        seconds[name] = round(s, 3)
        if not args.quiet:
            print(f"{name}: {s:.2f} s", file=console)

    engine.log_dir = args.out  # stderr is this command's progress and errors only
    with engine_output(args.out, args.debug), engine:
        if not args.debug:
            quiet_after_ctrl_c()  # after the engine's start: Spark installs its own handler
        if not args.quiet:
            engine.progress = functools.partial(print_progress, stream=console)
            print(f"{engine.name} with {engine.workers} worker(s) on {inputs[0]}",
                  file=console)
        start = time.perf_counter()
        final = pipeline.run_pipeline(engine, state, RunContext(args.out, params, partitioning),
                                      on_step=on_step)
        total = time.perf_counter() - start
        facts = engine.describe()
    outputs = write(final, args.out)
    skipped = final.get("skipped", skipped)
    for _, reason in skipped:
        print(f"skipped: {reason}", file=sys.stderr)
    run = {**facts, "pipeline": args.pipeline, "input": inputs, "seconds": seconds,
           "total_seconds": round(total, 3), "params": dataclasses.asdict(params),
           "params_changed": changed,  # from the pinned ones, by --param or its named forms
           "partitioning": dataclasses.asdict(partitioning), "outputs": outputs,
           "skipped": [{"input": path, "reason": reason} for path, reason in skipped],
           # plain images made into CCD files (OUT/ccds/), and what was assumed for each
           "ingested": [i.as_json() for i in state.get("ingested", ())],
           "logs": sorted(p.name for p in args.out.glob("*.log"))}  # engines' own output
    (args.out / "run.json").write_text(json.dumps(run, indent=1))  # last: the run is whole
    return run


@contextlib.contextmanager
def engine_output(out: Path, debug: bool):
    """While the engine is open, what its Python threads and loggers print (a cancelled
    task's traceback, a dropped connection's retries) goes to OUT/driver.log, not to this
    command's stderr; --debug leaves it on stderr. Kept only when something was said."""
    if debug:
        yield
        return
    path = out / "driver.log"
    with open(path, "w") as log, contextlib.redirect_stderr(log):
        yield
    if path.stat().st_size == 0:
        path.unlink()


class _CurrentStderr(logging.StreamHandler):
    """The root logger's handler: writes to whatever sys.stderr is when a record comes
    (the driver's log while an engine is open), where logging's own default would keep
    the stderr of the moment a library first logged."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


INTERRUPTED = threading.Event()  # a Ctrl-C came: whatever error follows is its doing


def quiet_after_ctrl_c() -> None:
    """From a Ctrl-C on, this process's stderr goes nowhere until `main` says
    "interrupted": what an engine's threads print while it is torn down (Dask's
    cancelled tasks, Spark's cancelled jobs) is not the user's to read. The handler that
    was there (Spark's cancels its jobs) still runs."""
    previous = signal.getsignal(signal.SIGINT)

    def silenced(signum, frame):
        INTERRUPTED.set()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        if callable(previous):
            previous(signum, frame)
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGINT, silenced)
    except ValueError:  # not the main thread (a test calling execute): nothing to do
        pass


def main(argv=None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the suite's root
    from engines.base import StepNotImplemented
    from pipelines.errors import (DISK_FULL_ERRNOS, DiskFull, EngineLost, EngineUnavailable,
                                  InputError)

    args = _parser().parse_args(argv)
    logging.basicConfig(handlers=[_CurrentStderr()], format="%(levelname)s:%(name)s: "
                        "%(message)s")
    stderr = os.dup(2)  # restored after a Ctrl-C silenced it
    try:
        run = execute(args)
    except BaseException as exc:
        if args.debug and not isinstance(exc, SystemExit):
            import traceback

            traceback.print_exc()
        if INTERRUPTED.is_set() or isinstance(exc, KeyboardInterrupt):
            # an engine torn down by a Ctrl-C may raise its own error instead (a
            # cancelled future, a cancelled job): the interrupt is what happened
            sys.stderr.flush()
            os.dup2(stderr, 2)
            print("interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        if isinstance(exc, (InputError, EngineUnavailable, StepNotImplemented)):
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_ERROR
        if isinstance(exc, EngineLost):
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_ENGINE_LOST
        # a file of the run is named where it would have been, in --out
        staging = str(getattr(args, "staging", args.out))
        if isinstance(exc, DiskFull):
            print(f"error: disk full: {str(exc).replace(staging, str(args.out))}",
                  file=sys.stderr)
            return EXIT_DISK_FULL
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            where = str(exc.filename or args.out).replace(staging, str(args.out))
            print(f"error: disk full: {where}: {exc.strerror}", file=sys.stderr)
            return EXIT_DISK_FULL
        raise
    print(f"wrote {', '.join(run['outputs'])} to {args.out} in {run['total_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
