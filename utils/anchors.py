"""Anchor boxes (dimension priors): defaults, JSON files, and k-means on box shapes.

Anchors are a float tensor ``[A, 2]`` of (width, height) as fractions of the image. The files
are the seed's format: a JSON list of ``{"width": w, "height": h}``.

k-means follows YOLOv2 (arXiv 1612.08242, section "Dimension Clusters"): the distance between
a box and a centroid is ``1 - IoU`` of the two boxes placed on a common centre, so the
clustering does not favour large boxes as Euclidean distance would. Details of this version:

- initialisation: k-means++, each new centre sampled with probability proportional to the
  *squared* distance ``(1 - IoU)**2`` to its nearest chosen centre (Arthur and Vassilvitskii);
- update: the *mean* (w, h) of the boxes assigned to a centre, as ordinary k-means does;
- an empty cluster is re-seeded with the box farthest from its own centre (deterministic);
- all restarts run together as one batched tensor computation; the restart with the highest
  mean IoU wins. A run is deterministic for a seed.
"""

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from defusedxml import ElementTree

from utils.boxes import wh_iou

__all__ = [
    "DARKNET_VOC_ANCHORS_GRID",
    "KMeansResult",
    "default_anchors",
    "kmeans_anchors",
    "kmeans_sweep",
    "load_anchors",
    "read_voc_box_sizes",
    "run_kmeans",
    "save_anchors",
]

logger = logging.getLogger(__name__)

# darknet cfg/yolov2-voc.cfg [region] anchors, in units of the 13x13 output grid
DARKNET_VOC_ANCHORS_GRID = (
    (1.3221, 1.73145),
    (3.19275, 4.00944),
    (5.05587, 8.09892),
    (9.47112, 4.84053),
    (11.2364, 10.0071),
)
_DARKNET_GRID_SIZE = 13


def default_anchors() -> torch.Tensor:
    """darknet's yolov2-voc anchors as fractions of the image: float32 ``[5, 2]`` (w, h)."""
    return torch.tensor(DARKNET_VOC_ANCHORS_GRID, dtype=torch.float32) / _DARKNET_GRID_SIZE


# ---------------------------------------------------------------------------------------------
# JSON files


def load_anchors(path: str | os.PathLike) -> torch.Tensor:
    """Read an anchor JSON file -> float32 ``[A, 2]`` (w, h), fractions of the image in (0, 1]."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"anchor file {path} does not exist: give the path of a JSON file written by "
            "kmeans.py (a list of {'width': w, 'height': h})"
        )
    try:
        entries = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"anchor file {path} is not valid JSON ({err}): regenerate it") from err
    if not isinstance(entries, list) or not entries:
        raise ValueError(
            f"anchor file {path} holds {type(entries).__name__} {entries!r:.80}: expected a "
            "non-empty list of {'width': w, 'height': h}"
        )
    pairs = [_parse_anchor_entry(entry, index, path) for index, entry in enumerate(entries)]
    return torch.tensor(pairs, dtype=torch.float32)


def _parse_anchor_entry(entry: object, index: int, path: Path) -> tuple[float, float]:
    if not isinstance(entry, dict) or set(entry) != {"width", "height"}:
        raise ValueError(
            f"anchor file {path}, entry {index} is {entry!r:.80}: expected exactly the keys "
            "'width' and 'height'"
        )
    pair = []
    for key in ("width", "height"):
        value = entry[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
            raise ValueError(
                f"anchor file {path}, entry {index}: {key} = {value!r} is not a fraction of the "
                "image in (0, 1]; divide grid-unit anchors by the grid size (e.g. 13)"
            )
        pair.append(float(value))
    return pair[0], pair[1]


def save_anchors(anchors: torch.Tensor, path: str | os.PathLike) -> None:
    """Write ``[A, 2]`` (w, h) anchors (fractions of the image) as JSON, atomically."""
    if anchors.ndim != 2 or anchors.shape[1] != 2 or anchors.shape[0] == 0:
        raise ValueError(f"anchors must have shape [A, 2] with A >= 1, got {tuple(anchors.shape)}")
    if not bool(((anchors > 0) & (anchors <= 1)).all()):
        raise ValueError(f"anchors must be fractions of the image in (0, 1], got {anchors}")
    entries = [{"width": float(w), "height": float(h)} for w, h in anchors.tolist()]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as tmp_file:
            json.dump(entries, tmp_file, indent=2)
            tmp_file.write("\n")
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------
# Box sizes from a VOC-format dataset


def read_voc_box_sizes(
    root: str | os.PathLike,
    sets: list[tuple[str, str]],
    classes: list[str] | tuple[str, ...],
    *,
    keep_difficult: bool = False,
) -> torch.Tensor:
    """Widths and heights of every box of a VOC-format dataset, from the XML alone.

    A set ``("2007", "trainval")`` reads ``<root>/VOC2007/ImageSets/Main/trainval.txt`` and the
    listed ``<root>/VOC2007/Annotations/<id>.xml``. Sizes follow darknet's ``voc_label.py``:
    ``w = (xmax - xmin) / image_width``, clamped to at most 1. Difficult boxes are skipped
    unless ``keep_difficult`` (darknet's label files skip them); degenerate boxes are skipped.

    Returns float32 ``[M, 2]`` (w, h), fractions of the image.
    """
    class_set = set(classes)
    sizes: list[tuple[float, float]] = []
    for year, split in sets:
        year_dir = Path(root) / f"VOC{year}"
        list_file = year_dir / "ImageSets" / "Main" / f"{split}.txt"
        if not list_file.is_file():
            raise FileNotFoundError(
                f"image list {list_file} does not exist: check --data-root ({root}) and the set "
                f"{year}:{split} (expected <root>/VOC<year>/ImageSets/Main/<split>.txt)"
            )
        for image_id in list_file.read_text().split():
            xml_file = year_dir / "Annotations" / f"{image_id}.xml"
            sizes.extend(_read_xml_box_sizes(xml_file, class_set, keep_difficult))
    if not sizes:
        raise ValueError(f"no boxes found under {root} for sets {sets}: check the dataset")
    return torch.tensor(sizes, dtype=torch.float32)


def _read_xml_box_sizes(
    xml_file: Path, class_set: set[str], keep_difficult: bool
) -> list[tuple[float, float]]:
    if not xml_file.is_file():
        raise FileNotFoundError(f"annotation {xml_file} listed in the image set does not exist")
    root = ElementTree.parse(xml_file).getroot()
    try:
        width = float(root.findtext("size/width"))
        height = float(root.findtext("size/height"))
    except (TypeError, ValueError) as err:
        raise ValueError(f"annotation {xml_file}: missing or bad <size> ({err})") from err
    if width <= 0 or height <= 0:
        raise ValueError(f"annotation {xml_file}: image size {width}x{height} is not positive")
    sizes = []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in class_set:
            raise ValueError(
                f"annotation {xml_file}: class {name!r} is not in the class list; pass the "
                "dataset's classes with --classes FILE"
            )
        if not keep_difficult and (obj.findtext("difficult") or "0").strip() == "1":
            continue
        box = [float(obj.findtext(f"bndbox/{key}")) for key in ("xmin", "ymin", "xmax", "ymax")]
        box_w = min((box[2] - box[0]) / width, 1.0)
        box_h = min((box[3] - box[1]) / height, 1.0)
        if box_w > 0 and box_h > 0:
            sizes.append((box_w, box_h))
        else:
            logger.warning("%s: skipping degenerate box %s", xml_file, box)
    return sizes


# ---------------------------------------------------------------------------------------------
# k-means with distance 1 - IoU


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
    distance, a metric, so Hamerly's bounds let an iteration recompute only the boxes whose
    nearest centre may have changed, with the same assignments as a full recomputation. All
    restarts run as one batch. Deterministic for a ``seed``.
    """
    boxes = _check_box_sizes(wh, k, restarts, max_iter)  # [3, M]
    centres = _kmeanspp_init(boxes, k, restarts, torch.Generator().manual_seed(seed))
    final, iterations = _lloyd(boxes, centres, max_iter)  # [R, k, 2], [R]
    restart_ious = 1 - _nearest_two(boxes, final)[0].mean(dim=1)  # [R]
    best = int(torch.argmax(restart_ious))
    anchors = final[best][torch.argsort(final[best].prod(dim=1), stable=True)]  # [k, 2]
    return KMeansResult(anchors, float(restart_ious[best]), iterations, restart_ious)


def kmeans_anchors(
    wh: torch.Tensor, k: int, *, restarts: int = 10, max_iter: int = 300, seed: int = 0
) -> tuple[torch.Tensor, float]:
    """Anchors ``[k, 2]`` (sorted by area) and their mean IoU with the boxes ``wh`` ``[M, 2]``."""
    result = run_kmeans(wh, k, restarts=restarts, max_iter=max_iter, seed=seed)
    return result.anchors, result.mean_iou


def kmeans_sweep(
    wh: torch.Tensor, ks: list[int] | range, *, restarts: int = 10, seed: int = 0
) -> dict[int, tuple[torch.Tensor, float]]:
    """:func:`kmeans_anchors` for every k in ``ks``: ``{k: (anchors [k, 2], mean_iou)}``."""
    return {k: kmeans_anchors(wh, k, restarts=restarts, seed=seed) for k in ks}


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


def _iou(boxes: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """IoU of centred boxes ``[3, P]`` (w, h, area rows) with ``centres`` ``[..., 2]`` ->
    ``[..., P]``. The arithmetic of ``utils.boxes.wh_iou`` (bitwise equal for positive sizes)
    with the boxes' areas computed once, in place, as the k-means hot path needs."""
    centre_w, centre_h = centres[..., 0:1], centres[..., 1:2]  # [..., 1] each
    inter = torch.minimum(boxes[0], centre_w).mul_(torch.minimum(boxes[1], centre_h))
    union = (boxes[2] + centre_w * centre_h).sub_(inter)  # [..., P]
    return inter.div_(union)


def _kmeanspp_init(
    boxes: torch.Tensor, k: int, restarts: int, generator: torch.Generator
) -> torch.Tensor:
    """k-means++ centres ``[R, k, 2]`` from boxes ``[3, M]``: each pick drawn with probability
    ∝ (1 - IoU)² to the nearest centre picked so far (inverse-CDF sampling)."""
    num_boxes = boxes.shape[1]
    wh = boxes[:2].t()  # [M, 2]
    picks = [torch.randint(num_boxes, (restarts,), generator=generator)]  # [R]
    nearest = 1 - _iou(boxes, wh[picks[0]])  # [R, M]
    for _ in range(1, k):
        cdf = nearest.clamp(min=0).double().square_().cumsum_(dim=1)  # [R, M]
        total = cdf[:, -1:]  # [R, 1]
        uniform = torch.rand(restarts, 1, generator=generator, dtype=torch.float64)  # [R, 1]
        pick = torch.searchsorted(cdf, uniform * total, right=True)  # [R, 1]
        # float rounding can zero every weight when boxes differ by ~1e-7: pick uniformly
        pick = torch.where(total > 0, pick, (uniform * num_boxes).long()).clamp_(max=num_boxes - 1)
        picks.append(pick.squeeze(1))
        nearest = torch.minimum(nearest, 1 - _iou(boxes, wh[picks[-1]]))
    return wh[torch.stack(picks, dim=1)]  # [R, k, 2]


@dataclass
class _LloydState:
    """Lloyd's iteration for ``R`` restarts over ``M`` boxes, with Hamerly's bounds.

    ``upper`` bounds from above the distance of a box to its assigned centre, ``lower`` from
    below its distance to every other centre. Flat views of the ``[R, M]`` tensors are
    indexed ``r*M + m``.
    """

    centres: torch.Tensor  # [R, k, 2] float32
    assign: torch.Tensor  # [R, M] int64, centre index in 0..k-1
    upper: torch.Tensor  # [R, M] float32
    lower: torch.Tensor  # [R, M] float32
    sums: torch.Tensor  # [R, k, 2] float64, sum of the assigned boxes' (w, h)
    counts: torch.Tensor  # [R, k] int64, number of assigned boxes


def _nearest_two(
    boxes: torch.Tensor, centres: torch.Tensor, chunk_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distances (1 - IoU) to the nearest and second-nearest centre and the nearest's index.

    ``boxes`` ``[3, M]``, ``centres`` ``[R, k, 2]`` -> ``[R, M]`` float, ``[R, M]`` float (1
    when k = 1, an upper bound on any distance), ``[R, M]`` int64. Chunks of boxes keep the
    ``[R, k, chunk]`` intermediates in cache.
    """
    parts = [
        _nearest_two_of(_iou(boxes[:, start : start + chunk_size], centres))  # [R, k, chunk]
        for start in range(0, boxes.shape[1], chunk_size)
    ]
    return tuple(torch.cat(tensors, dim=-1) for tensors in zip(*parts, strict=True))


def _nearest_two_of(iou: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``iou`` ``[..., k, P]`` of P boxes with k centres (overwritten) -> nearest distance,
    second-nearest distance (1 when k = 1) and nearest index, ``[..., P]`` each. Ties go to
    the lowest centre index.

    Only float arithmetic and ``amax``: ``max`` with indices and comparisons to bool do not
    vectorise on the CPU and took most of the time."""
    k = iou.shape[-2]
    best_iou = iou.amax(dim=-2, keepdim=True)  # [..., 1, P]
    # sign(iou - best) is -1 or 0, exactly: the difference of unequal floats is never 0
    is_best = torch.sign(iou - best_iou).add_(1)  # [..., k, P] 1.0 at every maximum
    rank = torch.arange(k, 0, -1, dtype=iou.dtype)[:, None]  # [k, 1]: k for centre 0
    best = k - (is_best * rank).amax(dim=-2).long()  # [..., P] lowest index of a maximum
    ties = is_best.sum(dim=-2) > 1  # [..., P]
    second_iou = iou.sub_(is_best.mul_(2)).amax(dim=-2)  # [..., P] best among the others
    best_iou = best_iou.squeeze(-2)  # [..., P]
    second_iou = torch.where(ties, best_iou, second_iou).clamp_(min=0)
    return 1 - best_iou, 1 - second_iou, best


def _lloyd(
    boxes: torch.Tensor, centres: torch.Tensor, max_iter: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's iterations from ``centres`` ``[R, k, 2]`` for boxes ``[3, M]``.

    Returns the final centres ``[R, k, 2]`` (the means of the final clusters) and the number
    of centre updates of each restart, int64 ``[R]``.
    """
    restarts = centres.shape[0]
    tiled = boxes.repeat(1, restarts)  # [3, R*M]: column r*M + m holds box m
    state = _start_lloyd(boxes, centres)
    final = centres.clone()  # [R, k, 2]
    iterations = torch.zeros(restarts, dtype=torch.long)
    running = torch.arange(restarts)  # the restarts in ``state``
    for iteration in range(1, max_iter + 1):
        changed = _lloyd_step(boxes, tiled, state)  # [R']
        iterations[running] = iteration
        if not bool(changed.all()):
            final[running[~changed]] = state.centres[~changed]
            running, state = running[changed], _select_restarts(state, changed)
            if running.numel() == 0:
                break
    final[running] = state.centres
    return final, iterations


def _start_lloyd(boxes: torch.Tensor, centres: torch.Tensor) -> _LloydState:
    """Exact assignment of every box for ``centres`` ``[R, k, 2]``, and the cluster sums."""
    restarts, k, _ = centres.shape
    upper, lower, assign = _nearest_two(boxes, centres)  # [R, M] each
    flat = (assign + k * torch.arange(restarts)[:, None]).flatten()  # [R*M] cluster ids
    counts = torch.bincount(flat, minlength=restarts * k).view(restarts, k)
    wh64 = boxes[:2].t().double().repeat(restarts, 1)  # [R*M, 2]
    sums = torch.zeros(restarts * k, 2, dtype=torch.float64).index_add_(0, flat, wh64)
    return _LloydState(centres, assign, upper, lower, sums.view(restarts, k, 2), counts)


def _lloyd_step(boxes: torch.Tensor, tiled: torch.Tensor, state: _LloydState) -> torch.Tensor:
    """Move the centres to their clusters' means, then reassign (in place) the boxes whose
    bounds allow a change. Returns ``[R]`` bool: whether any box of that restart moved."""
    restarts, k, _ = state.centres.shape
    new_centres = _cluster_means(boxes, state)  # [R, k, 2]
    shift = 1 - wh_iou(state.centres, new_centres)  # [R, k] how far each centre moved
    state.centres = new_centres
    state.upper.add_(shift.gather(1, state.assign))  # [R, M]
    state.lower.sub_(shift.amax(dim=1, keepdim=True))  # [R, M]
    flat, old, new = _reassign(tiled, state)  # [Q] each: the boxes that moved
    rows = flat // boxes.shape[1]  # [Q] their restarts
    wh64 = tiled[:2].index_select(1, flat).t().double()  # [Q, 2]
    flat_old, flat_new = rows * k + old, rows * k + new  # [Q] cluster ids
    state.sums.view(-1, 2).index_add_(0, flat_new, wh64).index_add_(0, flat_old, -wh64)
    ones = torch.ones_like(flat_new)
    state.counts.view(-1).index_add_(0, flat_new, ones).index_add_(0, flat_old, -ones)
    changed = torch.zeros(restarts, dtype=torch.bool)
    changed[rows] = True
    return changed


def _flat_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """Sorted flat indices of the true entries of ``mask``: int64 ``[P]``."""
    # numpy's flatnonzero is about 10x faster than torch.nonzero on the CPU
    return torch.from_numpy(np.flatnonzero(mask.numpy()))


def _reassign(
    tiled: torch.Tensor, state: _LloydState
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hamerly's test, in place: a box whose upper bound is below its lower bound keeps its
    centre; the others get an exact nearest centre and new bounds. Returns the flat index, old
    and new centre of the boxes that moved, ``[Q]`` each."""
    margin = 1e-4  # float32 rounding: about 3e-7 per update of a bound, over hundreds of updates
    flat = _flat_nonzero(state.upper + margin >= state.lower)  # [P]
    nearest, second, new = _nearest_two_by_restart(
        tiled, state.centres, flat, state.assign.shape[1]
    )
    old = state.assign.view(-1).index_select(0, flat)  # [P]
    state.assign.view(-1).index_copy_(0, flat, new)
    state.upper.view(-1).index_copy_(0, flat, nearest)
    state.lower.view(-1).index_copy_(0, flat, second)
    moved = _flat_nonzero(new != old)  # [Q]
    return flat[moved], old[moved], new[moved]


def _nearest_two_by_restart(
    tiled: torch.Tensor,
    centres: torch.Tensor,
    flat: torch.Tensor,
    num_boxes: int,
    chunk_size: int = 16384,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_nearest_two_of` for the boxes at sorted flat indices ``flat`` ``[P]`` with the
    ``k`` centres of their own restart: ``[P]`` each. A loop over the restarts avoids
    gathering ``[P, k]`` centres."""
    restarts = centres.shape[0]
    boxes = tiled.index_select(1, flat)  # [3, P]
    ends = torch.searchsorted(flat, torch.arange(1, restarts + 1) * num_boxes).tolist()
    parts = [
        _nearest_two_of(_iou(boxes[:, low : min(low + chunk_size, end)], centres[restart]))
        for restart, (start, end) in enumerate(zip([0, *ends[:-1]], ends, strict=True))
        for low in range(start, end, chunk_size)
    ]  # [k, chunk] each
    if not parts:
        empty = torch.empty(0)
        return empty, empty, empty.long()
    return tuple(torch.cat(tensors) for tensors in zip(*parts, strict=True))


def _cluster_means(boxes: torch.Tensor, state: _LloydState) -> torch.Tensor:
    """Mean (w, h) of each cluster -> float32 ``[R, k, 2]``; an empty cluster takes the box
    farthest from its own centre (ties to the lowest index), so the result is deterministic."""
    means = (state.sums / state.counts.clamp(min=1)[..., None]).float()  # [R, k, 2]
    empty = state.counts == 0  # [R, k]
    for restart in torch.nonzero(empty.any(dim=1)).flatten().tolist():
        clusters = torch.nonzero(empty[restart]).flatten()
        own_centres = state.centres[restart, state.assign[restart]]  # [M, 2]
        distance = 1 - wh_iou(boxes[:2].t(), own_centres)  # [M]
        farthest = torch.argsort(distance, descending=True, stable=True)[: clusters.numel()]
        means[restart, clusters] = boxes[:2, farthest].t()
    return means


def _select_restarts(state: _LloydState, keep: torch.Tensor) -> _LloydState:
    """The restarts where ``keep`` ``[R]`` is true, as a new state."""
    tensors = (state.centres, state.assign, state.upper, state.lower, state.sums, state.counts)
    return _LloydState(*(tensor[keep] for tensor in tensors))
