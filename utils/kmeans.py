"""k-means of box shapes with distance 1 - IoU: YOLOv2's anchors (arXiv 1612.08242, "Dimension
Clusters"). The distance between a box and a centre is 1 - IoU of the two placed on a common
centre (:func:`utils.boxes.wh_iou`), so large boxes do not dominate as with Euclidean distance.

Box sizes are (w, h) fractions of the image. Training resizes every image to one square, so a
box's size in grid cells is its fraction times the grid size; centred IoU is scale-invariant
and a mean scales with its boxes, so clustering fractions and scaling the anchors to cells
gives the clusters of cells (up to rounding), at any input size. Sizes in pixels of the
original images would not: they differ in size.

Lloyd's iterations, all restarts in one batch: k-means++ initialisation (each new centre drawn
with probability proportional to (1 - IoU)^2 to its nearest chosen centre); assign each box to
its centre of highest IoU (ties to the lowest index); move each centre to the mean (w, h) of
its boxes, an empty cluster to the box farthest from its centre (the i-th empty cluster of a
restart to its i-th farthest box, ties to the lowest index). Exact convergence (no box
changes cluster) can take hundreds of updates in which a few boxes flip between clusters, and
the mean is not the centre of highest IoU, so an update can lower the mean IoU: a restart
keeps its first update (the seeds are boxes, not means) and then each update that raises its
mean IoU or re-seeds an empty cluster; it stops at the first other one, or after ``max_iter``.
"""

from dataclasses import dataclass

import torch

from utils.boxes import wh_iou

__all__ = ["KMeansResult", "kmeanspp_init", "lloyd", "run_kmeans"]


@dataclass(frozen=True)
class KMeansResult:
    """``anchors`` float32 ``[k, 2]`` (w, h) sorted by area; ``mean_iou`` the mean over the
    boxes of their IoU with the nearest anchor (the paper's "Avg IOU", a fraction);
    ``iterations`` int64 ``[R]`` (updates kept) and ``restart_ious`` float64 ``[R]``."""

    anchors: torch.Tensor
    mean_iou: float
    iterations: torch.Tensor
    restart_ious: torch.Tensor


def run_kmeans(
    wh: torch.Tensor, k: int, *, restarts: int = 10, max_iter: int = 300, seed: int = 0
) -> KMeansResult:
    """k-means of box sizes ``wh`` ``[M, 2]`` (positive w, h) into ``k`` centres; the restart
    of highest mean IoU wins. Deterministic for a ``seed``."""
    wh = _check_box_sizes(wh, k, restarts, max_iter)
    centres = kmeanspp_init(wh, k, restarts, torch.Generator().manual_seed(seed))
    centres, restart_ious, iterations = lloyd(wh, centres, max_iter)
    best = int(restart_ious.argmax())
    anchors = centres[best][centres[best].prod(dim=1).argsort(stable=True)]  # [k, 2]
    return KMeansResult(anchors, float(restart_ious[best]), iterations, restart_ious)


def kmeanspp_init(
    wh: torch.Tensor, k: int, restarts: int, generator: torch.Generator
) -> torch.Tensor:
    """k-means++ centres ``[R, k, 2]`` from boxes ``[M, 2]``: the first uniform, each next one
    drawn with probability proportional to (1 - IoU)^2 to the nearest centre drawn so far."""
    picks = torch.randint(len(wh), (restarts, 1), generator=generator)  # [R, 1]
    distance = 1 - wh_iou(wh, wh[picks])  # [R, M]
    for _ in range(1, k):
        cdf = distance.double().square().cumsum(dim=1)  # [R, M]
        cdf[cdf[:, -1] == 0] = 1  # every box on a centre (to float precision): draw uniformly
        draw = torch.rand(restarts, 1, generator=generator, dtype=torch.float64) * cdf[:, -1:]
        pick = torch.searchsorted(cdf, draw, right=True).clamp(max=len(wh) - 1)  # [R, 1]
        picks = torch.cat([picks, pick], dim=1)
        distance = torch.minimum(distance, 1 - wh_iou(wh, wh[pick]))
    return wh[picks]  # [R, k, 2]


def lloyd(
    wh: torch.Tensor, centres: torch.Tensor, max_iter: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lloyd's iterations for boxes ``[M, 2]`` from ``centres`` ``[R, k, 2]`` (see the module).
    Returns the final centres ``[R, k, 2]``, mean IoUs float64 ``[R]`` and updates kept ``[R]``."""
    centres, k = centres.clone(), centres.shape[1]
    best_iou, assign = _nearest_centre(wh, centres)  # [R, M] each
    mean_iou = best_iou.double().mean(dim=1)  # [R]
    iterations = torch.zeros(len(centres), dtype=torch.int64)
    running = torch.arange(len(centres))  # [R'] restarts still iterating
    for _ in range(max_iter):
        new_centres, reseeded = _update_centres(wh, assign[running], best_iou[running], k)
        new_iou, new_assign = _nearest_centre(wh, new_centres)  # [R', M] each
        new_mean = new_iou.double().mean(dim=1)  # [R']
        keep = (new_mean > mean_iou[running]) | reseeded | (iterations[running] == 0)  # [R']
        running = running[keep]
        centres[running], mean_iou[running] = new_centres[keep], new_mean[keep]
        best_iou[running], assign[running] = new_iou[keep], new_assign[keep]
        iterations[running] += 1
        if not len(running):
            break
    return centres, mean_iou, iterations


def _nearest_centre(
    wh: torch.Tensor, centres: torch.Tensor, chunk_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU of each box ``[M, 2]`` with its nearest centre of each restart ``[R, k, 2]``, and that
    centre's index (ties to the lowest) -> float32 ``[R, M]``, int64 ``[R, M]``. Chunks of
    boxes keep the ``[R, k, chunk]`` IoUs in cache."""
    parts = [wh_iou(part, centres[:, :, None]).max(dim=1) for part in wh.split(chunk_size)]
    return torch.cat([p.values for p in parts], dim=1), torch.cat([p.indices for p in parts], dim=1)


def _update_centres(
    wh: torch.Tensor, assign: torch.Tensor, best_iou: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (w, h) of each cluster of boxes ``[M, 2]``, from each box's centre index ``assign``
    ``[R, M]`` and IoU with it ``best_iou`` ``[R, M]`` -> float32 ``[R, k, 2]``, and ``[R]``
    bool: whether the restart had an empty cluster (re-seeded as the module says)."""
    restarts = len(assign)
    ones = torch.ones_like(assign)  # [R, M]
    counts = torch.zeros(restarts, k, dtype=torch.int64).scatter_add_(1, assign, ones)  # [R, k]
    index, boxes = assign[..., None].expand(-1, -1, 2), wh.double().expand(restarts, -1, -1)
    sums = torch.zeros(restarts, k, 2, dtype=torch.float64).scatter_add_(1, index, boxes)
    means = (sums / counts.clamp(min=1)[..., None]).float()  # [R, k, 2]
    empty = counts == 0  # [R, k]
    if empty.any():
        farthest = best_iou.argsort(dim=1, stable=True)  # [R, M], lowest IoU first
        rank = (empty.cumsum(dim=1) - 1).clamp(min=0)  # [R, k], i-th empty cluster -> i
        means = torch.where(empty[..., None], wh[farthest.gather(1, rank)], means)
    return means, empty.any(dim=1)


def _check_box_sizes(wh: torch.Tensor, k: int, restarts: int, max_iter: int) -> torch.Tensor:
    """Validated box sizes ``[M, 2]`` -> float32 ``[M, 2]`` on the CPU."""
    if k < 1 or restarts < 1 or max_iter < 1:
        raise ValueError(f"k, restarts and max_iter must be >= 1, got {k}, {restarts}, {max_iter}")
    if wh.ndim != 2 or wh.shape[1] != 2:
        raise ValueError(f"box sizes must have shape [M, 2], got {tuple(wh.shape)}")
    wh = wh.detach().to(device="cpu", dtype=torch.float32)
    if not bool(torch.isfinite(wh).all() and (wh.prod(dim=1) > 0).all() and (wh > 0).all()):
        raise ValueError("box sizes must be finite and positive; drop degenerate boxes first")
    num_shapes = len(torch.unique(wh.contiguous().view(torch.int64)))  # a key per (w, h)
    if num_shapes < k:
        raise ValueError(
            f"cannot make k={k} clusters from {num_shapes} distinct box sizes "
            f"({len(wh)} boxes): lower k or use more data"
        )
    return wh.t().contiguous().t()  # [M, 2] stored column by column: wh_iou reads rows fast
