"""The neuroscience pipeline of the study (diffusion MRI, HCP-like): mean b0 -> brain mask
-> noise sigma -> non-local-means denoising -> DTI fit (FA, MD).

Every dipy parameter is pinned here, because dipy's defaults have changed between versions
(nlmeans' default method and block radius, estimate_sigma's N, median_otsu's numpass).
Kernels are module-level functions of (partition, **shared) so any Python engine can ship
them to its workers; they read their inputs from files by path.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import nifti
from .errors import InputError
from .steps import Plan, RunContext, Step, check_range, run_steps

PIPELINE = "neuro"
UNIT = "voxels"  # what the work is counted in (Plan.voxels)


@dataclass(frozen=True)
class NeuroParams:
    """The study's parameters, pinned (paper-facts.md, steps 1N-3N)."""

    b0_threshold: float = 10.0  # gradient_table(..., b0_threshold=10) selects the b0 volumes
    median_radius: int = 4  # median_otsu(median_radius=4, numpass=2, autocrop=False, dilate=1)
    numpass: int = 2
    dilate: int = 1  # autocrop stays off: dipy 1.12 deprecates the argument, off by default
    sigma_coils: int = 0  # estimate_sigma(N=0): dipy's Gaussian-noise estimate, per volume
    sigma_background_masking: bool = True  # estimate_sigma(disable_background_masking=False)
    patch_radius: int = 1  # nlmeans(patch_radius=1, block_radius=5, rician=True, 'classic')
    block_radius: int = 5
    rician: bool = True
    nlmeans_method: str = "classic"
    fit_method: str = "WLS"  # TensorModel(gtab, fit_method='WLS', min_signal=1)
    # A fixed floor rather than dipy's data-derived default (the smallest positive signal of
    # the data being fitted), which would make a block's fit depend on its neighbours.
    min_signal: float = 1.0

    def __post_init__(self):  # values dipy would refuse, or misread, refused here by name
        positive, at_least_0 = (lambda v: v > 0, "positive"), (lambda v: v >= 0, ">= 0")
        check_range(self, b0_threshold=at_least_0, median_radius=positive,
                    numpass=positive, sigma_coils=at_least_0,
                    dilate=(lambda v: v is None or v >= 0, "None (no dilation) or >= 0"),
                    patch_radius=at_least_0, block_radius=positive,
                    nlmeans_method=(lambda v: v in ("classic", "blockwise"),
                                    "classic or blockwise"),
                    fit_method=(lambda v: v in ("WLS", "OLS", "NLLS"), "WLS, OLS or NLLS"),
                    min_signal=positive)


@dataclass(frozen=True)
class NeuroPartitioning:
    """How the work is cut. Results do not depend on it (tested); speed does."""

    volumes_per_task: int = 1  # noise sigma and denoising: the study's unit is one volume
    b0_per_task: int = 6  # mean b0: partial sums of this many b0 volumes come to the client
    block: tuple[int, int, int] = (16, 16, 16)  # DTI fit: voxel blocks (the study: ~500/subject)

    def __post_init__(self):
        if self.volumes_per_task < 1 or self.b0_per_task < 1 or min(self.block) < 1:
            raise ValueError(f"partition sizes must be positive: {self}")


# -- loading and validation --------------------------------------------------------------

def load_subject(dwi: str | Path, bvals: str | Path, bvecs: str | Path,
                 params: NeuroParams = NeuroParams()) -> dict[str, Any]:
    """Check a subject's files and return the pipeline's initial state (metadata only)."""
    from dipy.core.gradients import gradient_table

    img = nifti.open_image(dwi)
    if len(img.shape) != 4:
        raise InputError(f"{dwi}: expected a 4D diffusion image, found shape {img.shape}")
    n_volumes = img.shape[3]
    b = _read_table(bvals, "bvals")
    g = _read_table(bvecs, "bvecs", allow_nan=True)
    if b.ndim != 1:
        b = b.ravel() if 1 in b.shape else b
    if b.ndim != 1:
        raise InputError(f"{bvals}: expected one row of b-values, found shape {b.shape}")
    if g.ndim == 2 and g.shape[0] == 3 and g.shape[1] != 3:
        g = g.T  # FSL writes bvecs as 3 rows x V columns
    if g.ndim != 2 or g.shape[1] != 3:
        raise InputError(f"{bvecs}: expected 3 x N gradient directions, found shape {g.shape}")
    if not (len(b) == len(g) == n_volumes):
        raise InputError(f"gradient table does not match the image: {dwi} has {n_volumes} "
                         f"volumes, {Path(bvals).name} has {len(b)} b-values, "
                         f"{Path(bvecs).name} has {len(g)} directions")
    if (b < 0).any():
        raise InputError(f"{bvals}: negative b-values")
    b0 = b <= params.b0_threshold
    # Some scanners write NaN as the (undefined) direction of a b0 volume: harmless there.
    if not np.isfinite(g[~b0]).all():
        bad = int(np.flatnonzero(~np.isfinite(g).all(axis=1) & ~b0)[0])
        raise InputError(f"{bvecs}: direction of diffusion-weighted volume {bad} is NaN "
                         f"or infinite")
    g = np.where(np.isfinite(g), g, 0.0)
    if not b0.any():
        raise InputError(f"{bvals}: no b0 volume (b <= {params.b0_threshold:g}) among "
                         f"{len(b)} b-values; the brain mask needs at least one")
    if b0.all():
        raise InputError(f"{bvals}: every volume is a b0 volume; a tensor fit needs "
                         f"diffusion-weighted volumes")
    try:
        gtab = gradient_table(b, bvecs=g, b0_threshold=params.b0_threshold)
    except ValueError as exc:
        raise InputError(f"{bvecs}: {str(exc).splitlines()[0]}") from None
    return {
        "dwi": str(Path(dwi).resolve()),
        "shape": tuple(int(s) for s in img.shape[:3]),
        "n_volumes": n_volumes,
        "affine": img.affine,
        "bytes_per_voxel": img.get_data_dtype().itemsize,
        "bvals": np.asarray(gtab.bvals, dtype=np.float64),
        "bvecs": np.asarray(gtab.bvecs, dtype=np.float64),
        "b0_index": [int(i) for i in np.flatnonzero(gtab.b0s_mask)],
    }


def _read_table(path, what: str, allow_nan: bool = False) -> np.ndarray:
    try:
        arr = np.loadtxt(path, dtype=np.float64, ndmin=1)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read {what} ({str(exc).splitlines()[0]})") from None
    if not allow_nan and not np.isfinite(arr).all():
        raise InputError(f"{path}: {what} holds NaN or infinite values")
    return arr


# -- steps -------------------------------------------------------------------------------

def _chunks(items: list, size: int) -> list[list]:
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def planned_output_bytes(state) -> int:
    """What a run writes: the denoised series (float32), and three maps beside it."""
    return (state["n_volumes"] + 3) * int(np.prod(state["shape"])) * 4


def _volume_bytes(state) -> int:
    return int(np.prod(state["shape"])) * state["bytes_per_voxel"]


def mean_b0_kernel(part):
    dwi, indices = part
    return sum_volumes(nifti.read_volume(dwi, k) for k in indices)


def sum_volumes(volumes) -> np.ndarray:
    """Volumes summed in the order given, in float64: the kernel's sum, and the Myria
    UDF's over the volumes it was sent (one summation, so theirs cannot drift apart)."""
    volumes = iter(volumes)
    total = next(volumes).astype(np.float64)
    for volume in volumes:
        total += volume
    return total


def plan_mean_b0(state, ctx: RunContext) -> Plan:
    index = state["b0_index"]
    groups = _chunks(index, ctx.partitioning.b0_per_task)

    def combine(partial_sums):
        # Summed in partition order, in float64: the result does not depend on the engine.
        total = partial_sums[0].copy()
        for part in partial_sums[1:]:
            total += part
        return {"mean_b0": (total / len(index)).astype(np.float32)}

    return Plan([(state["dwi"], g) for g in groups], {}, combine,
                bytes_in=len(index) * _volume_bytes(state),
                voxels=len(index) * int(np.prod(state["shape"])))


def brain_mask_kernel(mean_b0, params: NeuroParams):
    """dipy's `median_otsu`, step by step, with dipy's own Otsu threshold pinned:
    `median_otsu` thresholds with scikit-image's Otsu whenever scikit-image is importable
    (its bins' centres, where dipy's takes their left edges), and the two masks differ by
    tens of voxels, so the reference would depend on an unrelated package being there."""
    from dipy.segment.mask import multi_median
    from dipy.segment.threshold import otsu
    from scipy.ndimage import binary_dilation, generate_binary_structure

    smooth = multi_median(mean_b0, params.median_radius, params.numpass)
    mask = smooth > otsu(smooth)
    if params.dilate is not None:
        mask = binary_dilation(mask, generate_binary_structure(3, 1),
                               iterations=params.dilate)
    return np.asarray(mask, dtype=bool)


def plan_brain_mask(state, ctx: RunContext) -> Plan:
    def combine(results):
        mask = results[0]
        if not mask.any():
            raise InputError(f"{state['dwi']}: the brain mask is empty (is the mean b0 "
                             f"image blank?)")
        return {"mask": mask}

    # One 3D volume: a single task, as in the study.
    return Plan([state["mean_b0"]], {"params": ctx.params}, combine,
                bytes_in=state["mean_b0"].nbytes, voxels=state["mean_b0"].size)


def noise_sigma_kernel(part, params: NeuroParams):
    dwi, indices = part
    return [sigma_of(nifti.read_volume(dwi, k), params.sigma_coils,
                     params.sigma_background_masking) for k in indices]


def sigma_of(volume, coils: int, background_masking: bool) -> float:
    """One volume's noise: dipy's estimate_sigma (the kernels and SciDB's stream child)."""
    from dipy.denoise.noise_estimate import estimate_sigma

    return float(estimate_sigma(volume, disable_background_masking=not background_masking,
                                N=coils)[0])


def plan_noise_sigma(state, ctx: RunContext) -> Plan:
    groups = _chunks(list(range(state["n_volumes"])), ctx.partitioning.volumes_per_task)

    def combine(results):
        sigma = np.array([s for group in results for s in group], dtype=np.float64)
        flat = np.flatnonzero(~(sigma > 0))
        if flat.size:
            raise InputError(f"{state['dwi']}: volume {int(flat[0])} has no noise (sigma "
                             f"estimate {sigma[flat[0]]:g}); non-local means needs sigma > 0")
        return {"sigma": sigma}

    return Plan([(state["dwi"], g) for g in groups], {"params": ctx.params}, combine,
                bytes_in=state["n_volumes"] * _volume_bytes(state),
                voxels=state["n_volumes"] * int(np.prod(state["shape"])))


def denoise_kernel(part, mask, params: NeuroParams):
    dwi, out, items = part
    for k, sigma in items:
        den = denoise_volume(nifti.read_volume(dwi, k), sigma, mask, params.patch_radius,
                             params.block_radius, params.rician, params.nlmeans_method)
        nifti.write_volume(out, k, den)
    return len(items)


def denoise_volume(volume, sigma: float, mask, patch_radius: int, block_radius: int,
                   rician: bool, method: str) -> np.ndarray:
    """One volume through dipy's nlmeans, as float32 (the kernels and SciDB's child)."""
    from dipy.denoise.nlmeans import nlmeans

    # num_threads=1: the engine supplies the parallelism, one volume per worker core.
    return nlmeans(volume, sigma, mask=mask, patch_radius=patch_radius,
                   block_radius=block_radius, rician=rician, num_threads=1,
                   method=method).astype(np.float32)


def plan_denoise(state, ctx: RunContext) -> Plan:
    Path(ctx.workdir).mkdir(parents=True, exist_ok=True)
    out = nifti.create(Path(ctx.workdir) / "denoised.nii",
                       state["shape"] + (state["n_volumes"],), state["affine"])
    sigma = state["sigma"]
    groups = _chunks(list(range(state["n_volumes"])), ctx.partitioning.volumes_per_task)
    parts = [(state["dwi"], str(out), [(k, float(sigma[k])) for k in g]) for g in groups]

    def combine(_written):
        return {"denoised": str(out)}

    return Plan(parts, {"mask": state["mask"], "params": ctx.params}, combine,
                bytes_in=state["n_volumes"] * _volume_bytes(state),
                voxels=state["n_volumes"] * int(np.prod(state["shape"])))


def fit_tensor_kernel(block, denoised, mask, gradients, params: NeuroParams):
    fa, md = fit_block(nifti.read_block(denoised, block), mask[block], gradients,
                       params.b0_threshold, params.fit_method, params.min_signal)
    return block, fa, md


def fit_block(data, mask, gradients, b0_threshold: float, fit_method: str,
              min_signal: float) -> tuple[np.ndarray, np.ndarray]:
    """FA and MD (float32) of a voxel block: dipy's TensorModel (the kernels and SciDB's
    child)."""
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import TensorModel

    bvals, bvecs = gradients
    gtab = gradient_table(bvals, bvecs=bvecs, b0_threshold=b0_threshold)
    fit = TensorModel(gtab, fit_method=fit_method, min_signal=min_signal).fit(data,
                                                                             mask=mask)
    return fit.fa.astype(np.float32), fit.md.astype(np.float32)


def voxel_blocks(shape, block, mask=None) -> list[tuple[slice, slice, slice]]:
    """Grid of voxel blocks covering `shape`. With a mask, blocks holding no mask voxel are
    dropped and the rest come largest first, so that the last tasks an engine hands out
    are small ones and no worker is left finishing a big block alone."""
    edges = [range(0, n, b) for n, b in zip(shape, block)]
    blocks = [(slice(x, x + block[0]), slice(y, y + block[1]), slice(z, z + block[2]))
              for x in edges[0] for y in edges[1] for z in edges[2]]
    if mask is None:
        return blocks
    work = [int(np.count_nonzero(mask[b])) for b in blocks]
    order = sorted((i for i, w in enumerate(work) if w), key=lambda i: (-work[i], i))
    return [blocks[i] for i in order]


def plan_fit_tensor(state, ctx: RunContext) -> Plan:
    mask = state["mask"]
    blocks = voxel_blocks(state["shape"], ctx.partitioning.block, mask)

    def combine(results):
        fa = np.zeros(state["shape"], dtype=np.float32)
        md = np.zeros(state["shape"], dtype=np.float32)
        for block, fa_block, md_block in results:
            fa[block] = fa_block
            md[block] = md_block
        return {"fa": fa, "md": md}

    shared = {"denoised": state["denoised"], "mask": mask,
              "gradients": (state["bvals"], state["bvecs"]), "params": ctx.params}
    return Plan(blocks, shared, combine,
                bytes_in=state["n_volumes"] * int(np.prod(state["shape"])) * 4,
                voxels=int(mask.sum()))


# b0_threshold is read when a subject is loaded (it picks the b0 volumes, b0_index) and by
# the fit (its gradient table).
MEAN_B0 = Step("mean_b0", ("dwi", "b0_index"), ("mean_b0",), plan_mean_b0, mean_b0_kernel)
BRAIN_MASK = Step("brain_mask", ("mean_b0",), ("mask",), plan_brain_mask, brain_mask_kernel,
                  ("median_radius", "numpass", "dilate"))
NOISE_SIGMA = Step("noise_sigma", ("dwi",), ("sigma",), plan_noise_sigma, noise_sigma_kernel,
                   ("sigma_coils", "sigma_background_masking"))
DENOISE = Step("denoise", ("dwi", "mask", "sigma"), ("denoised",), plan_denoise,
               denoise_kernel, ("patch_radius", "block_radius", "rician", "nlmeans_method"))
FIT_TENSOR = Step("fit_tensor", ("denoised", "mask", "bvals", "bvecs"), ("fa", "md"),
                  plan_fit_tensor, fit_tensor_kernel, ("b0_threshold", "fit_method",
                                                       "min_signal"))

STEPS: tuple[Step, ...] = (MEAN_B0, BRAIN_MASK, NOISE_SIGMA, DENOISE, FIT_TENSOR)
STEP_BY_NAME = {s.name: s for s in STEPS}


def run_pipeline(engine, state: dict, ctx: RunContext,
                 on_step: Callable[[str, float], None] | None = None) -> dict[str, Any]:
    return run_steps(STEPS, engine, state, ctx, on_step)


Params, Partitioning = NeuroParams, NeuroPartitioning  # the names every pipeline offers
