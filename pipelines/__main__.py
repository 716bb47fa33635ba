"""Run a pipeline on your own files (or a suite dataset) with any engine.

    python -m pipelines neuro --dwi dwi.nii.gz --bvals bvals --bvecs bvecs \\
        --engine dask --workers 8 --out results/

writes mask.nii.gz, denoised.nii, fa.nii.gz, md.nii.gz and run.json (engine, versions,
parameters, seconds per step) into --out. Errors in the input or the engine are one line
on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one BLAS thread per process; engines parallelise


def _parser() -> argparse.ArgumentParser:
    from engines import ENGINES

    p = argparse.ArgumentParser(prog="python -m pipelines", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="pipeline", required=True)
    n = sub.add_parser("neuro", help="diffusion MRI: mask, denoise, DTI fit -> FA, MD")
    src = n.add_argument_group("input: --dwi/--bvals/--bvecs, or --dataset")
    src.add_argument("--dwi", type=Path, help="4D diffusion image (NIfTI, .nii or .nii.gz)")
    src.add_argument("--bvals", type=Path, help="b-values, FSL format")
    src.add_argument("--bvecs", type=Path, help="gradient directions, FSL format (3 x N)")
    src.add_argument("--dataset", help="a suite dataset instead (e.g. phantom-small)")
    n.add_argument("--engine", default="reference", choices=list(ENGINES))
    n.add_argument("--workers", type=int, default=None,
                   help="workers of a local engine cluster (default: one per core)")
    n.add_argument("--dask-scheduler", metavar="ADDRESS",
                   help="use this existing Dask cluster")
    n.add_argument("--out", type=Path, required=True, help="output directory")
    n.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return p


def run_neuro(args) -> dict:
    from engines import create_engine
    from engines.base import print_progress
    from pipelines import neuro, nifti
    from pipelines.errors import InputError
    from pipelines.steps import RunContext

    if args.dataset:
        from fixtures.datasets import load_dataset

        files = load_dataset(args.dataset).subjects[0].files()
    elif args.dwi and args.bvals and args.bvecs:
        files = (args.dwi, args.bvals, args.bvecs)
    else:
        raise InputError("give --dwi, --bvals and --bvecs, or --dataset")
    params, partitioning = neuro.NeuroParams(), neuro.NeuroPartitioning()
    state = neuro.load_subject(*files, params=params)
    args.out.mkdir(parents=True, exist_ok=True)
    seconds = {}

    def on_step(name, s):
        seconds[name] = round(s, 3)
        if not args.quiet:
            print(f"{name}: {s:.2f} s", file=sys.stderr)

    with create_engine(args.engine, workers=args.workers,
                       dask_scheduler=args.dask_scheduler) as engine:
        if not args.quiet:
            engine.progress = print_progress
            print(f"{engine.name} with {engine.workers} worker(s) on {files[0]}",
                  file=sys.stderr)
        start = time.perf_counter()
        final = neuro.run_pipeline(engine, state, RunContext(args.out, params, partitioning),
                                   on_step=on_step)
        total = time.perf_counter() - start
        facts = engine.describe()
    for name in ("mask", "fa", "md"):
        nifti.save(args.out / f"{name}.nii.gz", final[name], state["affine"])
    run = {**facts, "input": [str(f) for f in files], "seconds": seconds,
           "total_seconds": round(total, 3), "params": dataclasses.asdict(params),
           "partitioning": dataclasses.asdict(partitioning),
           "outputs": ["mask.nii.gz", "denoised.nii", "fa.nii.gz", "md.nii.gz"]}
    (args.out / "run.json").write_text(json.dumps(run, indent=1))
    return run


def main(argv=None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the suite's root
    from pipelines.errors import EngineUnavailable, InputError

    args = _parser().parse_args(argv)
    try:
        run = run_neuro(args)
    except (InputError, EngineUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(f"wrote {', '.join(run['outputs'])} to {args.out} in {run['total_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
