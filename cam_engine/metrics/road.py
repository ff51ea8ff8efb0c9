"""ROAD: RemOve And Debias (Rong et al., ICML 2022, arXiv:2202.00449), grad-cam 1.5.7 semantics.

Pixels are removed by *noisy linear imputation*: each missing pixel ``i`` takes the weighted mean
of its 8 neighbours (weight 1/6 for the 4 direct neighbours, 1/12 for the diagonals, renormalised at
the border), which for all missing pixels at once is the sparse linear system

    sum_{j in N(i)} w_ij v_j - (sum_{j in N(i)} w_ij) v_i = 0        (known v_j move to the right)

one unknown per missing pixel, ``C`` right-hand sides. It is assembled with vectorised index
arithmetic (no per-pixel Python) and solved with one sparse LU (``scipy.sparse.linalg.spsolve``);
then ``noise * N(0, 1)`` is added, drawn exactly as the reference draws it (so
``torch.manual_seed`` reproduces its numbers).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .perturbation_confidence import (
    AveragerAcrossThresholds,
    PerturbationConfidenceMetric,
    RemoveLeastRelevantFirst,
    RemoveMostRelevantFirst,
)

__all__ = [
    "NEIGHBORS_WEIGHTS",
    "NoisyLinearImputer",
    "ROADMostRelevantFirst",
    "ROADLeastRelevantFirst",
    "ROADMostRelevantFirstAverage",
    "ROADLeastRelevantFirstAverage",
    "ROADCombined",
]

#: ((row offset, column offset), weight) of the 8 neighbours
NEIGHBORS_WEIGHTS: tuple[tuple[tuple[int, int], float], ...] = (
    ((1, 1), 1 / 12), ((0, 1), 1 / 6), ((-1, 1), 1 / 12), ((1, -1), 1 / 12),
    ((0, -1), 1 / 6), ((-1, -1), 1 / 12), ((1, 0), 1 / 6), ((-1, 0), 1 / 6),
)
_PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)


def imputation_system(mask: np.ndarray, image: np.ndarray):
    """The sparse system ``A v = b`` for the missing pixels (``mask == 0``) of ``image`` ``[C, H, W]``.

    Returns ``(A`` CSC ``[N, N]``, ``b`` ``[N, C]``, ``missing`` flat indices ``[N])``.
    """
    height, width = mask.shape
    flat_mask = mask.reshape(-1)
    flat_image = image.reshape(image.shape[0], -1)
    missing = np.flatnonzero(flat_mask == 0)
    count = len(missing)
    variable = np.zeros(flat_mask.size, dtype=np.int64)
    variable[missing] = np.arange(count)
    rows0, cols0 = missing // width, missing % width
    b = np.zeros((count, image.shape[0]))
    diagonal = np.ones(count)
    a_rows, a_cols, a_vals = [], [], []
    for (d_row, d_col), weight in NEIGHBORS_WEIGHTS:
        rows, cols = rows0 + d_row, cols0 + d_col
        valid = (rows >= 0) & (cols >= 0) & (rows < height) & (cols < width)
        diagonal[~valid] -= weight
        ids = np.flatnonzero(valid)
        neighbours = rows[valid] * width + cols[valid]
        known = flat_mask[neighbours] > 0.5
        b[ids[known]] -= weight * flat_image[:, neighbours[known]].T
        unknown = flat_mask[neighbours] < 0.5
        a_rows.append(ids[unknown])
        a_cols.append(variable[neighbours[unknown]])
        a_vals.append(np.full(int(unknown.sum()), weight))
    a_rows.append(np.arange(count))
    a_cols.append(np.arange(count))
    a_vals.append(-diagonal)
    from scipy.sparse import coo_matrix  # here, not at import: scipy costs every server worker ~0.4 s to load

    matrix = coo_matrix(
        (np.concatenate(a_vals), (np.concatenate(a_rows), np.concatenate(a_cols))), shape=(count, count)
    ).tocsc()
    return matrix, b, missing


class NoisyLinearImputer:
    """``imputer(image [C, H, W], mask [H, W]) -> image``: missing pixels (mask 0) linearly imputed + noise.

    An image without any known pixel has no defined imputation; its pixels become ``0 + noise``
    (the reference's solver meets a singular system there).
    """

    def __init__(self, noise: float = 0.01, weighting: Sequence = NEIGHBORS_WEIGHTS):
        self.noise = noise
        self.weighting = weighting

    def __call__(self, img: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        flat = img.detach().cpu().reshape(img.shape[0], -1)
        mask_np = mask.detach().cpu().numpy()
        if not (mask_np == 0).any():
            return img.clone()
        matrix, b, missing = imputation_system(mask_np, flat.numpy().reshape(img.shape))
        if (mask_np > 0.5).any():
            from scipy.sparse.linalg import spsolve

            solution = spsolve(matrix, b)
            res = torch.tensor(np.asarray(solution).reshape(len(missing), -1), dtype=torch.float)
        else:
            res = torch.zeros((len(missing), img.shape[0]), dtype=torch.float)
        filled = flat.clone()
        filled[:, torch.from_numpy(missing)] = res.t() + self.noise * torch.randn_like(res.t())
        return filled.reshape(img.shape).to(img.device)


class ROADMostRelevantFirst(PerturbationConfidenceMetric):
    """Score change after imputing the ``100 - percentile`` % most relevant pixels."""

    def __init__(self, percentile: float | str = 80, batch_size: int = 64):
        super().__init__(RemoveMostRelevantFirst(percentile, NoisyLinearImputer()), batch_size)


class ROADLeastRelevantFirst(PerturbationConfidenceMetric):
    """Score change after imputing the ``percentile`` % least relevant pixels."""

    def __init__(self, percentile: float | str = 20, batch_size: int = 64):
        super().__init__(RemoveLeastRelevantFirst(percentile, NoisyLinearImputer()), batch_size)


class ROADMostRelevantFirstAverage(AveragerAcrossThresholds):
    """Mean of [`ROADMostRelevantFirst`][cam_engine.metrics.road.ROADMostRelevantFirst] over ``percentiles`` (lower is more faithful)."""

    def __init__(self, percentiles: Sequence[float] = _PERCENTILES):
        super().__init__(ROADMostRelevantFirst, percentiles)


class ROADLeastRelevantFirstAverage(AveragerAcrossThresholds):
    """Mean of [`ROADLeastRelevantFirst`][cam_engine.metrics.road.ROADLeastRelevantFirst] over ``percentiles`` (higher is more faithful)."""

    def __init__(self, percentiles: Sequence[float] = _PERCENTILES):
        super().__init__(ROADLeastRelevantFirst, percentiles)


class ROADCombined:
    """``(LeRF average - MoRF average) / 2`` per image: higher means a more faithful CAM."""

    def __init__(self, percentiles: Sequence[float] = _PERCENTILES):
        self.percentiles = list(percentiles)
        self.morf_averager = ROADMostRelevantFirstAverage(self.percentiles)
        self.lerf_averager = ROADLeastRelevantFirstAverage(self.percentiles)

    def __call__(self, input_tensor: torch.Tensor, cams, targets, model) -> np.ndarray:
        scores_lerf = self.lerf_averager(input_tensor, cams, targets, model)
        scores_morf = self.morf_averager(input_tensor, cams, targets, model)
        return (scores_lerf - scores_morf) / 2
