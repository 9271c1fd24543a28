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
- boxes of equal shape always share a cluster, so Lloyd's iterations run on the distinct
  shapes weighted by their counts, with the same clusters as on the boxes themselves;
- all restarts run together as one batch; the restart with the highest mean IoU wins. A run
  is deterministic for a seed.
"""

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from defusedxml import ElementTree

from utils.boxes import wh_iou
from utils.fileio import atomic_write_text

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
    atomic_write_text(path, json.dumps(entries, indent=2) + "\n")


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
    area w*h), ``counts`` float64 ``[U]`` (boxes of each shape), ``inverse`` int64 ``[M]``
    (the shape of each box)."""

    boxes: np.ndarray
    counts: np.ndarray
    inverse: np.ndarray


def _distinct_shapes(boxes: torch.Tensor) -> _Shapes:
    """The distinct shapes of boxes ``[3, M]`` (w, h, area rows), sorted by (h, w)."""
    keys = boxes[:2].t().contiguous().view(torch.int64).squeeze(1).numpy()  # [M, 2] -> [M]
    keys, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    wh = keys.view(np.float32).reshape(-1, 2).T  # [U] -> [2, U]
    return _Shapes(np.stack([wh[0], wh[1], wh[0] * wh[1]]), counts.astype(np.float64), inverse)


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
    assign: np.ndarray  # [R, U] int64, centre index in 0..k-1
    slack: np.ndarray  # [R, U] float32
    drift: np.ndarray  # [R, k] float64, summed shift of the centre plus largest shift
    sums: np.ndarray  # [R, k, 2] float64, sum of the assigned boxes' (w, h)
    counts: np.ndarray  # [R, k] float64, number of assigned boxes


def _lloyd(
    shapes: _Shapes, centres: torch.Tensor, max_iter: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's iterations from ``centres`` ``[R, k, 2]`` for the boxes of ``shapes``, each
    shape weighted by its count.

    Returns the final centres ``[R, k, 2]`` (the means of the final clusters) and the number
    of centre updates of each restart, int64 ``[R]``.
    """
    final = centres.numpy().copy()  # [R, k, 2]
    state = _start_lloyd(shapes, final.copy())
    iterations = np.zeros(len(final), dtype=np.int64)
    running = np.arange(len(final))  # the restarts in ``state``
    for iteration in range(1, max_iter + 1):
        changed = _lloyd_step(shapes, state)  # [R']
        iterations[running] = iteration
        if not changed.all():
            final[running[~changed]] = state.centres[~changed]
            running, state = running[changed], _select_restarts(state, changed)
            if running.size == 0:
                break
    final[running] = state.centres
    return torch.from_numpy(final), torch.from_numpy(iterations)


def _start_lloyd(shapes: _Shapes, centres: np.ndarray) -> _LloydState:
    """Exact assignment of every shape for ``centres`` ``[R, k, 2]``, and the cluster sums."""
    restarts, k, _ = centres.shape
    nearest, second, assign, rows, cols = _nearest_two(shapes.boxes, centres)  # [R*U] each
    state = _LloydState(
        centres,
        assign.reshape(restarts, -1),  # [R, U]
        (second - nearest).reshape(restarts, -1),  # [R, U]
        *(np.zeros(shape) for shape in [(restarts, k), (restarts, k, 2), (restarts, k)]),
    )
    _add_shapes(shapes, state, cols, rows * k + assign)
    return state


def _lloyd_step(shapes: _Shapes, state: _LloydState) -> np.ndarray:
    """Move the centres to their clusters' means, then reassign (in place) the shapes whose
    bounds allow a change. Returns ``[R]`` bool: whether any shape of that restart moved."""
    restarts, k, _ = state.centres.shape
    new_centres = _cluster_means(shapes, state)  # [R, k, 2]
    old64, new64 = (_centre_table(c.astype(np.float64)) for c in (state.centres, new_centres))
    shift = 1 - _iou_np(old64, new64).T  # [k, R] -> [R, k] how far each centre moved
    state.drift += shift + shift.max(axis=1, keepdims=True)
    state.centres = new_centres
    flat = _candidates(state)  # [P] flat indices r*U + u
    nearest, second, new, rows, cols = _nearest_two(shapes.boxes, new_centres, flat)  # [P] each
    new_ids = rows * k + new  # [P] cluster ids
    second -= nearest
    state.slack.ravel()[flat] = second + state.drift.astype(np.float32).ravel().take(new_ids)
    old = state.assign.ravel()[flat]  # [P]
    moved = np.flatnonzero(new != old)  # [Q]
    state.assign.ravel()[flat[moved]] = new[moved]
    _add_shapes(shapes, state, cols[moved], new_ids[moved])
    _add_shapes(shapes, state, cols[moved], rows[moved] * k + old[moved], sign=-1.0)
    return np.bincount(rows[moved], minlength=restarts) > 0


def _candidates(state: _LloydState) -> np.ndarray:
    """Sorted flat indices ``r*U + u`` of the shapes that fail Hamerly's test, int64 ``[P]``."""
    # margins for float32 rounding: about 1e-7 on a distance, 6e-8 relative on a slack
    threshold = torch.from_numpy((state.drift * (1 + 1e-6) + 1e-4).astype(np.float32))  # [R, k]
    bound = torch.gather(threshold, 1, torch.from_numpy(state.assign))  # [R, U]
    return np.flatnonzero(state.slack <= bound.numpy())


def _add_shapes(
    shapes: _Shapes, state: _LloydState, cols: np.ndarray, ids: np.ndarray, sign: float = 1.0
) -> None:
    """Add the shapes ``cols`` to the clusters ``ids`` (flat ``r*k + c``), ``[Q]`` each, in the
    cluster counts and sums; ``sign = -1`` takes them out."""
    counts = sign * shapes.counts.take(cols)  # [Q]
    sums = (counts * shapes.boxes[coord].take(cols) for coord in (0, 1))  # [Q] each
    totals = (state.counts, state.sums[..., 0], state.sums[..., 1])  # [R, k] each
    for total, values in zip(totals, (counts, *sums), strict=True):
        total += np.bincount(ids, values, state.counts.size).reshape(total.shape)


def _cluster_means(shapes: _Shapes, state: _LloydState) -> np.ndarray:
    """Mean (w, h) of each cluster -> float32 ``[R, k, 2]``; an empty cluster takes the box
    farthest from its own centre (ties to the lowest index), so the result is deterministic."""
    means = (state.sums / np.maximum(state.counts, 1)[..., None]).astype(np.float32)
    empty = state.counts == 0  # [R, k]
    wh, inverse = torch.from_numpy(shapes.boxes[:2].T), torch.from_numpy(shapes.inverse)
    for restart in np.flatnonzero(empty.any(axis=1)):
        clusters = np.flatnonzero(empty[restart])
        own_centres = torch.from_numpy(state.centres[restart, state.assign[restart]])  # [U, 2]
        distance = (1 - wh_iou(wh, own_centres))[inverse]  # [M]
        farthest = torch.argsort(distance, descending=True, stable=True)[: clusters.size]
        means[restart, clusters] = wh[inverse[farthest]]
    return means


def _select_restarts(state: _LloydState, keep: np.ndarray) -> _LloydState:
    """The restarts where ``keep`` ``[R]`` is true, as a new state."""
    arrays = (state.centres, state.assign, state.slack, state.drift, state.sums, state.counts)
    return _LloydState(*(array[keep] for array in arrays))


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
