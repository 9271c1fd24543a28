"""k-means of box shapes with distance 1 - IoU: YOLOv2's anchor boxes (dimension priors).

k-means follows YOLOv2 (arXiv 1612.08242, section "Dimension Clusters"): the distance between
a box and a centroid is ``1 - IoU`` of the two boxes placed on a common centre, so the
clustering does not favour large boxes as Euclidean distance would. Box shapes and centres are
(width, height) as fractions of the image. Details of this version:

- initialisation: k-means++, each new centre sampled with probability proportional to the
  *squared* distance ``(1 - IoU)**2`` to its nearest chosen centre (Arthur and Vassilvitskii);
- update: the *mean* (w, h) of the boxes assigned to a centre, as ordinary k-means does;
- empty clusters are re-seeded with the distinct box shapes farthest from their own centres
  (deterministic), so two empty clusters never get the same shape;
- boxes of equal shape always share a cluster, so Lloyd's iterations run on the distinct
  shapes weighted by their counts, with the same clusters as on the boxes themselves;
- all restarts run together as one batch; the restart with the highest mean IoU wins. A run
  is deterministic for a seed.
"""

from dataclasses import dataclass

import numpy as np
import torch

from utils.boxes import wh_iou

__all__ = ["KMeansResult", "run_kmeans"]


@dataclass(frozen=True)
class KMeansResult:
    """Outcome of :func:`run_kmeans`.

    ``anchors`` float32 ``[k, 2]`` (w, h) sorted by area; ``mean_iou`` the mean over boxes of
    the IoU with their nearest anchor (the paper's "Avg IOU", as a fraction); ``iterations``
    int64 ``[R]`` and ``restart_ious`` float32 ``[R]``, one per restart.
    """

    anchors: torch.Tensor
    mean_iou: float
    iterations: torch.Tensor
    restart_ious: torch.Tensor


def run_kmeans(
    wh: torch.Tensor, k: int, *, restarts: int = 10, max_iter: int = 300, seed: int = 0
) -> KMeansResult:
    """k-means of box shapes ``wh`` ``[M, 2]`` (positive w, h) into ``k`` centres.

    Lloyd's iterations (assign each box to the centre of highest IoU, ties to the lowest
    index; move each centre to the mean of its boxes); a restart stops when no assignment
    changes, or after ``max_iter`` updates. ``1 - IoU`` of centred boxes is the Jaccard
    distance, a metric, so Hamerly's bounds let an iteration recompute only the shapes whose
    nearest centre may have changed, with the same assignments as a full recomputation. All
    restarts run as one batch. Deterministic for a ``seed``.
    """
    boxes = _check_box_sizes(wh, k, restarts, max_iter)  # [3, M]
    centres = _kmeanspp_init(boxes, k, restarts, torch.Generator().manual_seed(seed))
    shapes = _distinct_shapes(boxes)
    final, iterations = _lloyd(shapes, centres, max_iter)  # [R, k, 2], [R]
    nearest = torch.from_numpy(_nearest_two(shapes.boxes, final.numpy())[0])  # [R*U]
    # torch's indexing keeps [R, M] row-major (numpy's would not), so the mean sums the boxes
    # of a restart in their order
    nearest = nearest.view(restarts, -1)[:, torch.from_numpy(shapes.inverse)]  # [R, U] -> [R, M]
    restart_ious = 1 - nearest.mean(dim=1)  # [R]
    best = int(torch.argmax(restart_ious))
    anchors = final[best][torch.argsort(final[best].prod(dim=1), stable=True)]  # [k, 2]
    return KMeansResult(anchors, float(restart_ious[best]), iterations, restart_ious)


def _check_box_sizes(wh: torch.Tensor, k: int, restarts: int, max_iter: int) -> torch.Tensor:
    """Validated box sizes ``[M, 2]`` -> float32 ``[3, M]``, rows w, h and area w*h."""
    if k < 1 or restarts < 1 or max_iter < 1:
        raise ValueError(f"k, restarts and max_iter must be >= 1, got {k}, {restarts}, {max_iter}")
    if wh.ndim != 2 or wh.shape[1] != 2:
        raise ValueError(f"box sizes must have shape [M, 2], got {tuple(wh.shape)}")
    wh = wh.detach().to(device="cpu", dtype=torch.float32).contiguous()
    area = wh[:, 0] * wh[:, 1]  # [M]; positive also rules out sizes whose product underflows
    if not bool(torch.isfinite(wh).all() & (wh > 0).all() & (area > 0).all()):
        raise ValueError("box sizes must be finite and positive; drop degenerate boxes first")
    num_unique = torch.unique(wh.view(torch.int64)).numel()  # one 64-bit key per (w, h) pair
    if num_unique < k:
        raise ValueError(
            f"cannot make k={k} clusters from {num_unique} distinct box sizes "
            f"({wh.shape[0]} boxes): lower k or use more data"
        )
    return torch.stack([wh[:, 0], wh[:, 1], area])  # [3, M]


def _kmeanspp_init(
    boxes: torch.Tensor, k: int, restarts: int, generator: torch.Generator
) -> torch.Tensor:
    """k-means++ centres ``[R, k, 2]`` from boxes ``[3, M]``: each pick drawn with probability
    ∝ (1 - IoU)² to the nearest centre picked so far (inverse-CDF sampling)."""
    num_boxes = boxes.shape[1]
    wh = boxes[:2].t()  # [M, 2]
    picks = [torch.randint(num_boxes, (restarts,), generator=generator)]  # [R]
    nearest = _distances(boxes, wh[picks[0]])  # [R, M]
    for _ in range(1, k):
        cdf = nearest.clamp(min=0).double().square_().cumsum_(dim=1)  # [R, M]
        total = cdf[:, -1:]  # [R, 1]
        uniform = torch.rand(restarts, 1, generator=generator, dtype=torch.float64)  # [R, 1]
        pick = torch.searchsorted(cdf, uniform * total, right=True)  # [R, 1]
        # float rounding can zero every weight when boxes differ by ~1e-7: pick uniformly
        pick = torch.where(total > 0, pick, (uniform * num_boxes).long()).clamp_(max=num_boxes - 1)
        picks.append(pick.squeeze(1))
        nearest = torch.minimum(nearest, _distances(boxes, wh[picks[-1]]))
    return wh[torch.stack(picks, dim=1)]  # [R, k, 2]


def _distances(boxes: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """1 - IoU of boxes ``[3, M]`` (w, h, area rows) with one centre per restart ``[R, 2]``
    -> ``[R, M]``."""
    table = _centre_table(centres[:, None].numpy()).reshape(3, -1, 1)  # [3, 1, R] -> [3, R, 1]
    return 1 - torch.from_numpy(_iou_np(boxes.numpy()[:, None], table))  # [3, 1, M] -> [R, M]


@dataclass(frozen=True)
class _Shapes:
    """The distinct (w, h) pairs of ``M`` boxes: ``boxes`` float32 ``[3, U]`` (rows w, h and
    area w*h), ``counts`` float64 ``[U]`` (boxes of each shape), ``weighted`` float64 ``[2, U]``
    (count times w, count times h), ``first`` int64 ``[U]`` (the first box of each shape),
    ``inverse`` int64 ``[M]`` (the shape of each box)."""

    boxes: np.ndarray
    counts: np.ndarray
    weighted: np.ndarray
    first: np.ndarray
    inverse: np.ndarray


def _distinct_shapes(boxes: torch.Tensor) -> _Shapes:
    """The distinct shapes of boxes ``[3, M]`` (w, h, area rows), in a fixed shuffled order."""
    keys = boxes[:2].t().contiguous().view(torch.int64).squeeze(1).numpy()  # [M, 2] -> [M]
    keys, first, inverse, counts = np.unique(
        keys, return_index=True, return_inverse=True, return_counts=True
    )
    # shuffled, neighbouring shapes seldom share a cluster, so np.bincount's additions into a
    # cluster's sum do not wait on one another: 3x faster than in sorted order
    order = np.random.default_rng(0).permutation(len(keys))  # [U]
    wh = keys[order].view(np.float32).reshape(-1, 2).T  # [U] -> [U, 2] -> [2, U]
    counts = counts[order].astype(np.float64)
    boxes = np.stack([wh[0], wh[1], wh[0] * wh[1]])  # [3, U]
    # a count times a float32 is exact in float64 below 2**29 boxes
    return _Shapes(boxes, counts, counts * wh, first[order], np.argsort(order)[inverse])


@dataclass
class _LloydState:
    """Lloyd's iteration for ``R`` restarts over ``U`` shapes, with Hamerly's bounds.

    Hamerly keeps a shape's centre while an upper bound on its distance to it is below a
    lower bound on its distance to every other centre; each update adds the centre's shift
    to the first and subtracts the restart's largest shift from the second. ``drift`` sums
    both terms per centre, so the test needs no per-shape update: ``slack > drift[r, a]``
    (plus rounding margins), where ``slack`` is the exact second minus first distance plus
    the drift of the nearest centre when they were computed.
    """

    centres: np.ndarray  # [R, k, 2] float32
    clusters: np.ndarray  # [R, U] int64, cluster r*k + c of each shape (c: index of its centre)
    slack: np.ndarray  # [R, U] float32
    drift: np.ndarray  # [R, k] float64, summed shift of the centre plus largest shift
    counts: np.ndarray  # [R, k] float64, boxes per cluster: integers, so exact in any order


def _lloyd(
    shapes: _Shapes, centres: torch.Tensor, max_iter: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's iterations from ``centres`` ``[R, k, 2]`` for the boxes of ``shapes``, each
    shape weighted by its count.

    Returns each restart's centres after its last update ``[R, k, 2]``, and the number of
    updates of each restart, int64 ``[R]``. A restart that converged ends with the means of its
    final clusters; one stopped by ``max_iter`` ends with the means of the clusters before its
    last reassignment.
    """
    final = centres.numpy().copy()  # [R, k, 2]
    state = _start_lloyd(shapes, final.copy())
    weighted = np.tile(shapes.weighted, len(final))  # [2, U] -> [2, R*U], a copy per restart
    iterations = np.zeros(len(final), dtype=np.int64)
    running = np.arange(len(final))  # the restarts in ``state``
    for iteration in range(1, max_iter + 1):
        changed = _lloyd_step(shapes, weighted, state)  # [R']
        iterations[running] = iteration
        if not changed.all():
            final[running[~changed]] = state.centres[~changed]
            running, state = running[changed], _select_restarts(state, changed)
            if running.size == 0:
                break
    final[running] = state.centres
    return torch.from_numpy(final), torch.from_numpy(iterations)


def _start_lloyd(shapes: _Shapes, centres: np.ndarray) -> _LloydState:
    """Exact assignment of every shape for ``centres`` ``[R, k, 2]``, and the cluster counts."""
    restarts, k, _ = centres.shape
    nearest, second, assign, rows, cols = _nearest_two(shapes.boxes, centres)  # [R*U] each
    clusters = rows * k + assign  # [R*U]
    counts = np.bincount(clusters, shapes.counts.take(cols), restarts * k)  # [R*k]
    return _LloydState(
        centres,
        clusters.reshape(restarts, -1),  # [R*U] -> [R, U]
        (second - nearest).reshape(restarts, -1),  # [R*U] -> [R, U]
        np.zeros((restarts, k)),
        counts.reshape(restarts, k),  # [R*k] -> [R, k]
    )


def _lloyd_step(shapes: _Shapes, weighted: np.ndarray, state: _LloydState) -> np.ndarray:
    """Move the centres to their clusters' means, then reassign (in place) the shapes whose
    bounds allow a change. ``weighted`` is :attr:`_Shapes.weighted` tiled ``[2, R*U]`` for at
    least ``R`` restarts. Returns ``[R]`` bool: whether any shape of that restart moved."""
    restarts, k, _ = state.centres.shape
    new_centres = _cluster_means(shapes, weighted[:, : state.clusters.size], state)  # [R, k, 2]
    old64, new64 = (_centre_table(c.astype(np.float64)) for c in (state.centres, new_centres))
    shift = 1 - _iou_np(old64, new64).T  # [k, R] -> [R, k] how far each centre moved
    state.drift += shift + shift.max(axis=1, keepdims=True)
    state.centres = new_centres
    flat = _candidates(state)  # [P] flat indices r*U + u
    nearest, second, index, rows, cols = _nearest_two(shapes.boxes, new_centres, flat)  # [P]
    new = rows * k + index  # [P] clusters
    second -= nearest
    state.slack.ravel()[flat] = second + state.drift.astype(np.float32).ravel().take(new)
    old = state.clusters.ravel()[flat]  # [P]
    moved = np.flatnonzero(new != old)  # [Q]
    state.clusters.ravel()[flat[moved]] = new[moved]
    moving = shapes.counts.take(cols[moved])  # [Q] boxes of each moved shape
    arrived, left = (np.bincount(c[moved], moving, state.counts.size) for c in (new, old))
    state.counts += (arrived - left).reshape(restarts, k)  # [R*k] -> [R, k]
    return np.bincount(rows[moved], minlength=restarts) > 0


def _candidates(state: _LloydState) -> np.ndarray:
    """Sorted flat indices ``r*U + u`` of the shapes that fail Hamerly's test, int64 ``[P]``."""
    # margins for float32 rounding: about 1e-7 on a distance, 6e-8 relative on a slack
    threshold = (state.drift * (1 + 1e-6) + 1e-4).astype(np.float32)  # [R, k]
    return np.flatnonzero(state.slack.ravel() <= threshold.ravel().take(state.clusters.ravel()))


def _cluster_means(shapes: _Shapes, weighted: np.ndarray, state: _LloydState) -> np.ndarray:
    """Mean (w, h) of each cluster -> float32 ``[R, k, 2]``, from the shapes' ``weighted`` sizes
    ``[2, R*U]``; empty clusters take the distinct shapes farthest from their own centres.

    The float64 sums are recomputed from every assignment at each update, not kept as running
    totals: they are then exact where a plain loop's are (while a cluster's sum needs at most
    53 bits, e.g. fewer than 2**20 boxes no smaller than 1/1024 of the image) and beyond that
    are rounded once per update, with no error carried over from earlier iterations."""
    restarts, k, _ = state.centres.shape
    clusters = state.clusters.ravel()  # [R*U]
    sums = np.stack([np.bincount(clusters, row, restarts * k) for row in weighted], axis=-1)
    sums = sums.reshape(restarts, k, 2)  # [R*k, 2] -> [R, k, 2]
    means = (sums / np.maximum(state.counts, 1)[..., None]).astype(np.float32)
    empty = state.counts == 0  # [R, k]
    for restart in np.flatnonzero(empty.any(axis=1)):
        own_centres = state.centres.reshape(-1, 2)[state.clusters[restart]]  # [R*k, 2] -> [U, 2]
        reseeded = np.flatnonzero(empty[restart])
        means[restart, reseeded] = _farthest_shapes(shapes, own_centres, reseeded.size)
    return means


def _farthest_shapes(shapes: _Shapes, own_centres: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` distinct shapes farthest (1 - IoU) from their own centres ``[U, 2]``, ties
    to the shape of the lowest box index -> float32 ``[count, 2]``. Distinct, so that two
    re-seeded clusters never share a shape (and leave one of them empty)."""
    wh = torch.from_numpy(shapes.boxes[:2].T)  # [2, U] -> [U, 2]
    distance = (1 - wh_iou(wh, torch.from_numpy(own_centres))).numpy()  # [U]
    farthest = np.lexsort((shapes.first, -distance))[:count]  # distance descending, then first
    return shapes.boxes[:2, farthest].T  # [2, count] -> [count, 2]


def _select_restarts(state: _LloydState, keep: np.ndarray) -> _LloydState:
    """The restarts where ``keep`` ``[R]`` is true, as a new state (clusters renumbered)."""
    k = state.centres.shape[1]
    rows_up = np.flatnonzero(keep) - np.arange(np.count_nonzero(keep))  # [R'] rows moved up by
    clusters = state.clusters[keep] - (rows_up * k)[:, None]  # [R', U]
    arrays = (state.centres, state.slack, state.drift, state.counts)
    centres, slack, drift, counts = (array[keep] for array in arrays)
    return _LloydState(centres, clusters, slack, drift, counts)


def _centre_table(centres: np.ndarray) -> np.ndarray:
    """Centres ``[R, k, 2]`` -> ``[3, k, R]``, rows w, h and area w*h."""
    width, height = centres[..., 0].T, centres[..., 1].T  # [k, R] each
    return np.stack([width, height, width * height])


def _nearest_two(
    boxes: np.ndarray,
    centres: np.ndarray,
    flat: np.ndarray | None = None,
    chunk_size: int = 32768,
) -> tuple[np.ndarray, ...]:
    """:func:`_nearest_two_of` for pairs of a restart's centres ``[R, k, 2]`` and a box of
    ``[3, U]`` (w, h, area rows), at sorted flat indices ``r*U + u`` ``[P]`` (all pairs when
    ``None``) -> nearest distance, second distance, nearest index, r and u, ``[P]`` each.
    Chunks keep the boxes' ``[3, k, chunk]`` centres in cache."""
    restarts, num_boxes = len(centres), boxes.shape[1]
    flat = np.arange(restarts * num_boxes) if flat is None else flat
    per_restart = np.diff(np.searchsorted(flat, np.arange(restarts + 1) * num_boxes))  # [R]
    rows = np.repeat(np.arange(restarts), per_restart)  # [P]
    cols = flat - rows * num_boxes  # [P]
    table = _centre_table(centres)  # [3, k, R]
    parts = [
        _nearest_two_of(
            boxes.take(cols[start : start + chunk_size], axis=1),  # [3, chunk]
            np.repeat(table, np.bincount(rows[start : start + chunk_size], minlength=restarts), 2),
        )  # [3, k, chunk]
        for start in range(0, max(flat.size, 1), chunk_size)
    ]
    return *(np.concatenate(part) for part in zip(*parts, strict=True)), rows, cols


def _nearest_two_of(
    boxes: np.ndarray, centres: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distances (1 - IoU) to the nearest and second-nearest of ``k`` centres and the
    nearest's index (ties to the lowest), for boxes ``[3, P]`` (w, h, area rows) and the
    centres of each box ``[3, k, P]`` (w, h, area) -> float32 ``[P]``, float32 ``[P]`` (1 when
    k = 1, an upper bound on any distance), int64 ``[P]``.

    A loop over the centres, in place on contiguous rows: numpy's elementwise loops are
    vectorised there, while reductions over a short axis and scalar operands are not."""
    k, num_boxes = centres.shape[1:]
    best, second = _iou_np(boxes, centres[:, 0]), np.zeros(num_boxes, np.float32)
    index_type = np.min_scalar_type(k - 1).type  # small unsigned ints: cheap
    index, candidate = np.zeros(num_boxes, index_type), np.empty(num_boxes, index_type)
    iou, low, better = np.empty_like(best), np.empty_like(best), np.empty(num_boxes, bool)
    for centre in range(1, k):
        _iou_np(boxes, centres[:, centre], out=iou)
        np.maximum(second, np.minimum(iou, best, out=low), out=second)  # ties: second = best
        np.greater(iou, best, out=better)
        np.maximum(best, iou, out=best)
        np.multiply(better.view(np.uint8), index_type(centre), out=candidate)
        np.maximum(index, candidate, out=index)  # the last strict improvement
    one = np.float32(1)
    return np.subtract(one, best), np.subtract(one, second), index.astype(np.int64)


def _iou_np(boxes: np.ndarray, centres: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """IoU of centred boxes ``[3, ...]`` and centres ``[3, ...]`` (w, h, area rows) ->
    ``[...]``: the arithmetic of ``utils.boxes.wh_iou``, bitwise equal for positive sizes."""
    inter = np.minimum(boxes[0], centres[0], out=out)
    inter *= np.minimum(boxes[1], centres[1])
    union = np.add(boxes[2], centres[2])
    union -= inter
    inter /= union
    return inter
