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


@dataclass
class _LloydState:
    """Lloyd's iteration for ``R`` restarts over ``M`` boxes, with Hamerly's bounds.

    Flat tensors are indexed ``r*M + m``. ``upper`` bounds from above the distance of a box to
    its assigned centre, ``lower`` from below its distance to every other centre.
    """

    centres: torch.Tensor  # [R, k, 2] float32
    assign: torch.Tensor  # [R*M] int64, centre index in 0..k-1
    upper: torch.Tensor  # [R*M] float32
    lower: torch.Tensor  # [R*M] float32
    sums: torch.Tensor  # [R, k, 2] float64, sum of the assigned boxes' (w, h)
    counts: torch.Tensor  # [R, k] int64, number of assigned boxes


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
    wh = _check_box_sizes(wh, k, restarts, max_iter)
    centres = _kmeanspp_init(wh, k, restarts, torch.Generator().manual_seed(seed))  # [R, k, 2]
    state = _start_lloyd(wh, centres)
    final = centres.clone()  # [R, k, 2]
    iterations = torch.zeros(restarts, dtype=torch.long)
    running = torch.arange(restarts)  # the restarts in ``state``
    for iteration in range(1, max_iter + 1):
        changed = _lloyd_step(wh, state)  # [R']
        iterations[running] = iteration
        if not bool(changed.all()):
            final[running[~changed]] = state.centres[~changed]
            running, state = running[changed], _select_restarts(state, changed)
            if running.numel() == 0:
                break
    final[running] = state.centres
    restart_ious = 1 - _nearest_two(wh, final)[0].mean(dim=1)  # [R]
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
    if k < 1 or restarts < 1 or max_iter < 1:
        raise ValueError(f"k, restarts and max_iter must be >= 1, got {k}, {restarts}, {max_iter}")
    if wh.ndim != 2 or wh.shape[1] != 2:
        raise ValueError(f"box sizes must have shape [M, 2], got {tuple(wh.shape)}")
    wh = wh.detach().to(device="cpu", dtype=torch.float32).contiguous()
    if not bool(torch.isfinite(wh).all()) or not bool((wh > 0).all()):
        raise ValueError("box sizes must be finite and positive; drop degenerate boxes first")
    num_unique = torch.unique(wh.view(torch.int64)).numel()  # one 64-bit key per (w, h) pair
    if num_unique < k:
        raise ValueError(
            f"cannot make k={k} clusters from {num_unique} distinct box sizes "
            f"({wh.shape[0]} boxes): lower k or use more data"
        )
    # column-major [M, 2]: w and h each contiguous, so the IoU arithmetic vectorises
    return wh.t().contiguous().t()


def _kmeanspp_init(
    wh: torch.Tensor, k: int, restarts: int, generator: torch.Generator
) -> torch.Tensor:
    """k-means++ centres ``[R, k, 2]``: each pick drawn with probability ∝ (1 - IoU)²."""
    num_boxes = wh.shape[0]
    picks = [torch.randint(num_boxes, (restarts,), generator=generator)]  # [R]
    nearest = 1 - wh_iou(wh[None, :, :], wh[picks[0]][:, None, :])  # [R, M]
    for _ in range(1, k):
        weights = nearest.clamp(min=0) ** 2  # [R, M]
        # float rounding can zero every weight when boxes differ by ~1e-7; fall back to uniform
        weights[weights.sum(dim=1) == 0] = 1.0
        pick = torch.multinomial(weights, 1, generator=generator).squeeze(1)  # [R]
        picks.append(pick)
        nearest = torch.minimum(nearest, 1 - wh_iou(wh[None, :, :], wh[pick][:, None, :]))
    return wh[torch.stack(picks, dim=1)]  # [R, k, 2]


def _nearest_two(
    wh: torch.Tensor, centres: torch.Tensor, chunk_size: int = 2048
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distances (1 - IoU) to the nearest and second-nearest centre and the nearest's index.

    ``wh`` ``[M, 2]``, ``centres`` ``[R, k, 2]`` -> ``[R, M]`` float, ``[R, M]`` float (1 when
    k = 1, an upper bound on any distance), ``[R, M]`` int64. Chunks of boxes keep the
    ``[R, k, chunk]`` intermediates in cache.
    """
    parts = [
        _nearest_two_of(wh_iou(wh[None, None, start : start + chunk_size], centres[:, :, None]))
        for start in range(0, wh.shape[0], chunk_size)
    ]  # wh_iou: [1, 1, chunk, 2] with [R, k, 1, 2] -> [R, k, chunk]
    return tuple(torch.cat(tensors, dim=-1) for tensors in zip(*parts, strict=True))


def _nearest_two_of(iou: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``iou`` ``[..., k, P]`` of P boxes with k centres (overwritten) -> nearest distance,
    second-nearest distance (1 when k = 1) and nearest index, ``[..., P]`` each. Ties go to
    the lowest centre index."""
    k = iou.shape[-2]
    best_iou = iou.amax(dim=-2)  # [..., P]
    # amax and a masked amin beat max(dim) with indices, which does not vectorise here
    index = torch.arange(k, dtype=iou.dtype)[:, None]  # [k, 1]
    best = torch.where(iou == best_iou.unsqueeze(-2), index, k).amin(dim=-2)  # [..., P]
    iou.masked_fill_(index == best.unsqueeze(-2), -1.0)
    second_iou = iou.amax(dim=-2).clamp(min=0)  # [..., P]
    return 1 - best_iou, 1 - second_iou, best.long()


def _take_boxes(wh: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``wh[index]`` ``[P, 2]``, column-major like ``wh``."""
    return wh.t()[:, index].t()  # [2, P] -> [P, 2]


def _start_lloyd(wh: torch.Tensor, centres: torch.Tensor) -> _LloydState:
    """Exact assignment of every box for ``centres`` ``[R, k, 2]``, and the cluster sums."""
    restarts, k, _ = centres.shape
    upper, lower, assign = _nearest_two(wh, centres)  # [R, M] each
    flat = (assign + k * torch.arange(restarts)[:, None]).flatten()  # [R*M] cluster ids
    counts = torch.bincount(flat, minlength=restarts * k).view(restarts, k)
    wh64 = wh.double().repeat(restarts, 1)  # [R*M, 2]
    sums = torch.zeros(restarts * k, 2, dtype=torch.float64).index_add_(0, flat, wh64)
    flat_view = (upper.flatten(), lower.flatten(), assign.flatten())  # [R*M] each
    return _LloydState(
        centres, flat_view[2], flat_view[0], flat_view[1], sums.view(-1, k, 2), counts
    )


def _lloyd_step(wh: torch.Tensor, state: _LloydState) -> torch.Tensor:
    """Move the centres to their clusters' means, then reassign (in place) the boxes whose
    bounds allow a change. Returns ``[R]`` bool: whether any box of that restart moved."""
    restarts, k, _ = state.centres.shape
    new_centres = _cluster_means(wh, state)  # [R, k, 2]
    shift = 1 - wh_iou(state.centres, new_centres)  # [R, k] how far each centre moved
    state.centres = new_centres
    state.upper.view(restarts, -1).add_(shift.gather(1, state.assign.view(restarts, -1)))
    state.lower.view(restarts, -1).sub_(shift.amax(dim=1, keepdim=True))
    rows, cols, old, new = _reassign(wh, state)  # [Q] each: the boxes that moved
    flat_old, flat_new = rows * k + old, rows * k + new  # [Q] cluster ids
    wh64 = _take_boxes(wh, cols).double()  # [Q, 2]
    state.sums.view(-1, 2).index_add_(0, flat_new, wh64).index_add_(0, flat_old, -wh64)
    ones = torch.ones_like(flat_new)
    state.counts.view(-1).index_add_(0, flat_new, ones).index_add_(0, flat_old, -ones)
    changed = torch.zeros(restarts, dtype=torch.bool)
    changed[rows] = True
    return changed


def _reassign(
    wh: torch.Tensor, state: _LloydState
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hamerly's test, in place: a box whose upper bound is below its lower bound keeps its
    centre; the others get their bounds tightened and, if still in doubt, an exact nearest
    centre. Returns restart, box, old and new centre index of the boxes that moved, ``[Q]``."""
    margin = 1e-5  # float32 rounding of the bounds
    num_boxes, k = wh.shape[0], state.centres.shape[1]
    flat = torch.nonzero(state.upper + margin >= state.lower).squeeze(1)  # [P]
    old = state.assign[flat]  # [P]
    centre_of_box = state.centres.view(-1, 2)[flat // num_boxes * k + old]  # [P, 2]
    exact = 1 - wh_iou(_take_boxes(wh, flat % num_boxes), centre_of_box)  # [P]
    state.upper[flat] = exact
    doubt = exact + margin >= state.lower[flat]  # [P]
    flat, old = flat[doubt], old[doubt]  # [P']
    rows, cols = flat // num_boxes, flat % num_boxes
    nearest, second, new = _nearest_two_of(_iou_by_restart(wh, state.centres, rows, cols))
    state.assign[flat], state.upper[flat], state.lower[flat] = new, nearest, second
    moved = new != old
    return rows[moved], cols[moved], old[moved], new[moved]


def _iou_by_restart(
    wh: torch.Tensor, centres: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """IoU of boxes ``wh[cols]`` with the ``k`` centres of their restart ``rows`` (``[P]``,
    sorted): ``[k, P]``. A loop over the restarts avoids gathering ``[P, k]`` centres."""
    ends = torch.searchsorted(rows, torch.arange(1, centres.shape[0] + 1)).tolist()
    boxes = _take_boxes(wh, cols)  # [P, 2]
    iou = torch.empty(centres.shape[1], rows.numel())  # [k, P]
    for restart, (start, end) in enumerate(zip([0, *ends[:-1]], ends, strict=True)):
        if end > start:
            iou[:, start:end] = wh_iou(boxes[None, start:end], centres[restart, :, None])
    return iou


def _cluster_means(wh: torch.Tensor, state: _LloydState) -> torch.Tensor:
    """Mean (w, h) of each cluster -> float32 ``[R, k, 2]``; an empty cluster takes the box
    farthest from its own centre (ties to the lowest index), so the result is deterministic."""
    restarts = state.centres.shape[0]
    means = (state.sums / state.counts.clamp(min=1)[..., None]).float()  # [R, k, 2]
    empty = state.counts == 0  # [R, k]
    for restart in torch.nonzero(empty.any(dim=1)).flatten().tolist():
        clusters = torch.nonzero(empty[restart]).flatten()
        assign = state.assign.view(restarts, -1)[restart]  # [M]
        distance = 1 - wh_iou(wh, state.centres[restart, assign])  # [M]
        farthest = torch.argsort(distance, descending=True, stable=True)[: clusters.numel()]
        means[restart, clusters] = wh[farthest]
    return means


def _select_restarts(state: _LloydState, keep: torch.Tensor) -> _LloydState:
    """The restarts where ``keep`` ``[R]`` is true, as a new state."""
    restarts = state.centres.shape[0]
    flat = [t.view(restarts, -1)[keep].flatten() for t in (state.assign, state.upper, state.lower)]
    return _LloydState(state.centres[keep], *flat, state.sums[keep], state.counts[keep])
