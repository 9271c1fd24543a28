"""Named pretrained weights: the registry against darknet's cfg files (verbatim copies in
tests/assets/darknet) and the models it names; downloads through file:// and http mirrors that
the tests make; wrong files, no network and unknown names. The torch hub cache is a temp dir."""

import filecmp
import functools
import hashlib
import http.server
import threading
import urllib.error
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from utils.data import VOC_CLASSES
from yolo.darknet import darknet_weights_nbytes, load_darknet_weights, save_darknet_weights
from yolo.model import ConvBlock, build_model
from yolo.weights import (
    DARKNET_COCO_CLASSES,
    DARKNET_RELEASES,
    MIRROR_ENV,
    ResolvedWeights,
    resolve_weights,
)

CFG_DIR = Path(__file__).parent / "assets" / "darknet"  # verbatim pjreddie/darknet cfg/ files
# Release -> (cfg, number of leading cfg layers the file holds; None: all).
RELEASE_CFGS = {
    "yolov2-voc": ("yolov2-voc.cfg", None),
    "yolov2-tiny-voc": ("yolov2-tiny-voc.cfg", None),
    "yolov2": ("yolov2.cfg", None),
    "darknet19_448.conv.23": ("darknet19_448.cfg", 23),
}
# Sizes reported for darknet's files outside this project (HTTP Content-Length, darkflow logs).
PUBLISHED_BYTES = {
    "yolov2-voc": 202_704_260,
    "yolov2-tiny-voc": 63_471_556,
    "yolov2": 203_934_260,
    "darknet19_448.conv.23": 79_327_120,
}
HEADER_BYTES = 16


def read_cfg(path: Path) -> list[tuple[str, dict[str, str]]]:
    """darknet's ``read_cfg``: ``[section]`` lines, ``key=value`` options, '#'/';' comments."""
    sections: list[tuple[str, dict[str, str]]] = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            sections.append((line.strip("[]"), {}))
        else:
            key, value = line.split("=", 1)
            sections[-1][1][key.strip()] = value.strip()
    return sections


def cfg_convs(sections, num_layers: int | None = None) -> list[tuple]:
    """``(in_channels, filters, size, stride, padding, batch_norm, activation)`` per conv
    layer, following channels through darknet's maxpool, route and reorg layers."""
    channels = int(sections[0][1]["channels"])
    outputs: list[int] = []  # channels out of each layer, as route's indices count them
    convs = []
    for kind, opt in sections[1:][:num_layers]:
        if kind == "convolutional":
            size, filters = int(opt["size"]), int(opt["filters"])
            padding = size // 2 if opt.get("pad") == "1" else int(opt.get("padding", 0))
            batch_norm = opt.get("batch_normalize") == "1"
            convs.append(
                (
                    channels,
                    filters,
                    size,
                    int(opt["stride"]),
                    padding,
                    batch_norm,
                    opt["activation"],
                )
            )
            channels = filters
        elif kind == "route":
            indices = [int(i) for i in opt["layers"].split(",")]
            channels = sum(outputs[i] if i >= 0 else outputs[len(outputs) + i] for i in indices)
        elif kind == "reorg":
            channels *= int(opt["stride"]) ** 2
        outputs.append(channels)
    return convs


def model_convs(model: nn.Module) -> list[tuple]:
    """The same tuples for a darknet model's conv layers, in ``.weights`` file order."""
    # the prediction conv is a plain linear nn.Conv2d; every other conv sits in a ConvBlock
    activations = {id(m.conv): m.act for m in model.modules() if isinstance(m, ConvBlock)}
    return [
        (
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size[0],
            conv.stride[0],
            conv.padding[0],
            bn is not None,
            "leaky" if isinstance(activations.get(id(conv)), nn.LeakyReLU) else "linear",
        )
        for conv, bn in model.darknet_layers()
    ]


def release_model(name: str) -> nn.Module:
    """The model a release names, on the meta device (shapes only, built in milliseconds)."""
    release = DARKNET_RELEASES[name]
    num_classes = len(release.classes) if release.classes else 20
    num_anchors = len(release.anchors) if release.anchors else 5
    with torch.device("meta"):
        return build_model(release.model, num_classes=num_classes, num_anchors=num_anchors)


def region(sections) -> dict[str, str]:
    (options,) = [opt for kind, opt in sections if kind == "region"]
    return options


@pytest.fixture(autouse=True)
def hub_checkpoints(tmp_path, monkeypatch) -> Path:
    """An empty torch hub cache in tmp_path and no mirror from the environment."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(MIRROR_ENV, raising=False)
    assert Path(torch.hub.get_dir()) == tmp_path / "torch" / "hub"
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.fixture(scope="module")
def tiny_mirror(tmp_path_factory) -> Path:
    """A folder holding a real ``yolov2-tiny-voc.weights`` (random tiny model, darknet format)."""
    folder = tmp_path_factory.mktemp("mirror")
    torch.manual_seed(0)
    save_darknet_weights(build_model("tiny"), folder / "yolov2-tiny-voc.weights")
    return folder


def files_in(folder: Path) -> list[Path]:
    return sorted(folder.iterdir()) if folder.exists() else []


# ---------------------------------------------------------------------------------------------
# The registry against darknet's cfgs and the models


@pytest.mark.parametrize("name", list(RELEASE_CFGS))
def test_model_matches_the_cfg_layer_for_layer(name):
    cfg_name, num_layers = RELEASE_CFGS[name]
    expected = cfg_convs(read_cfg(CFG_DIR / cfg_name), num_layers)
    found = model_convs(release_model(name))
    if num_layers is not None:  # a backbone prefix: the model's leading conv layers
        found = found[: len(expected)]
    assert found == expected


@pytest.mark.parametrize("name", list(RELEASE_CFGS))
def test_release_size_is_the_size_of_the_model_it_names(name):
    cfg_name, num_layers = RELEASE_CFGS[name]
    convs = cfg_convs(read_cfg(CFG_DIR / cfg_name), num_layers)
    # Per conv: biases, [scales, mean, variance], weights, as darknet's load_convolutional_weights
    cfg_floats = sum(f * (4 if bn else 1) + f * c * k * k for c, f, k, _, _, bn, _ in convs)
    model_layers = None if num_layers is None else len(convs)
    nbytes = darknet_weights_nbytes(release_model(name), model_layers)
    assert DARKNET_RELEASES[name].num_bytes == nbytes == HEADER_BYTES + 4 * cfg_floats
    assert nbytes == PUBLISHED_BYTES[name]


@pytest.mark.parametrize("name", ["yolov2-voc", "yolov2-tiny-voc", "yolov2"])
def test_anchors_classes_and_input_size_are_the_cfgs(name):
    sections = read_cfg(CFG_DIR / RELEASE_CFGS[name][0])
    numbers = [float(v) for v in region(sections)["anchors"].split(",")]
    release = DARKNET_RELEASES[name]
    assert release.anchors == tuple(zip(numbers[::2], numbers[1::2], strict=True))
    assert len(release.anchors) == int(region(sections)["num"])
    assert len(release.classes) == int(region(sections)["classes"])
    net = sections[0][1]
    assert release.img_size == int(net["width"]) == int(net["height"])


def test_backbone_prefix_has_no_head_settings():
    release = DARKNET_RELEASES["darknet19_448.conv.23"]
    assert (release.model, release.classes, release.anchors, release.img_size) == (
        "darknet19",
        None,
        None,
        None,
    )


def test_coco_cfg_is_the_voc_cfg_with_80_classes_and_its_own_anchors_and_size():
    voc, coco = read_cfg(CFG_DIR / "yolov2-voc.cfg"), read_cfg(CFG_DIR / "yolov2.cfg")
    assert [kind for kind, _ in voc] == [kind for kind, _ in coco]
    differences = {
        (index, key)
        for index, ((_, a), (_, b)) in enumerate(zip(voc, coco, strict=True))
        for key in a.keys() | b.keys()
        if a.get(key) != b.get(key)
    }
    last_conv, region_index = len(voc) - 2, len(voc) - 1
    assert differences == {
        (0, "width"), (0, "height"), (0, "max_batches"), (0, "steps"),
        (last_conv, "filters"), (region_index, "anchors"), (region_index, "classes"),
    }  # fmt: skip
    assert coco[last_conv][1]["filters"] == str(5 * (5 + 80))


def test_coco_class_names_are_cocos_in_category_order_with_darknets_spelling():
    weights = torchvision.models.detection.FasterRCNN_ResNet50_FPN_Weights.DEFAULT
    coco = [c for c in weights.meta["categories"] if c not in ("N/A", "__background__")]
    darknet_spelling = {
        "motorcycle": "motorbike", "airplane": "aeroplane", "couch": "sofa",
        "potted plant": "pottedplant", "dining table": "diningtable", "tv": "tvmonitor",
    }  # fmt: skip
    assert tuple(darknet_spelling.get(c, c) for c in coco) == DARKNET_COCO_CLASSES
    assert set(VOC_CLASSES) <= set(DARKNET_COCO_CLASSES)


# ---------------------------------------------------------------------------------------------
# Resolving names and paths


def test_file_mirror_downloads_once_then_reads_the_cache(
    hub_checkpoints, tiny_mirror, tmp_path, monkeypatch
):
    monkeypatch.setenv(MIRROR_ENV, tiny_mirror.as_uri())
    got = resolve_weights("yolov2-tiny-voc", progress=False)
    assert got.path == hub_checkpoints / "yolov2-tiny-voc.weights"
    assert files_in(hub_checkpoints) == [got.path]  # no temp file left behind
    assert filecmp.cmp(got.path, tiny_mirror / "yolov2-tiny-voc.weights", shallow=False)
    assert (got.name, got.model, got.classes, got.img_size) == (
        "yolov2-tiny-voc",
        "tiny",
        VOC_CLASSES,
        416,
    )
    assert got.anchors.dtype == torch.float32 and got.anchors.shape == (5, 2)
    assert torch.equal(got.anchors, torch.tensor(DARKNET_RELEASES["yolov2-tiny-voc"].anchors))
    # What it returns builds the model the file fits, without guessing.
    model = build_model(got.model, num_classes=len(got.classes), num_anchors=len(got.anchors))
    assert load_darknet_weights(model, got.path)["layers_loaded"] == 9

    real_download = torch.hub.download_url_to_file
    calls = []
    monkeypatch.setattr(
        torch.hub,
        "download_url_to_file",
        lambda *args, **kwargs: calls.append(args) or real_download(*args, **kwargs),
    )
    monkeypatch.setenv(MIRROR_ENV, (tmp_path / "unreachable").as_uri())
    again = resolve_weights("yolov2-tiny-voc", progress=False)
    assert again == got and calls == []


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_http_mirror(hub_checkpoints, tiny_mirror):
    handler = functools.partial(QuietHandler, directory=str(tiny_mirror))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        got = resolve_weights("yolov2-tiny-voc", base_url=base, progress=False)
        with pytest.raises(ConnectionError) as err:  # the mirror has no yolov2.weights: 404
            resolve_weights("yolov2", base_url=base, progress=False)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert filecmp.cmp(got.path, tiny_mirror / "yolov2-tiny-voc.weights", shallow=False)
    assert f"could not download {base}yolov2.weights (HTTP Error 404" in str(err.value)
    assert str(hub_checkpoints / "yolov2.weights") in str(err.value)
    assert files_in(hub_checkpoints) == [got.path]


def test_download_of_the_wrong_size_is_deleted(hub_checkpoints, tiny_mirror, tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    truncated = (tiny_mirror / "yolov2-tiny-voc.weights").read_bytes()[:1_000_016]
    (mirror / "yolov2-tiny-voc.weights").write_bytes(truncated)
    monkeypatch.setenv(MIRROR_ENV, mirror.as_uri())
    with pytest.raises(ValueError) as err:
        resolve_weights("yolov2-tiny-voc", progress=False)
    message = str(err.value)
    assert "\n" not in message
    assert f"{mirror.as_uri()}/yolov2-tiny-voc.weights: 1,000,016 bytes, expected 63,471,556" in (
        message
    )
    assert f"deleted the download, nothing cached at {hub_checkpoints}" in message
    assert files_in(hub_checkpoints) == []


def test_wrong_cached_file_is_refused_and_kept(hub_checkpoints, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("a file at the cache path must not be downloaded again")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    hub_checkpoints.mkdir(parents=True)
    cached = hub_checkpoints / "yolov2-voc.weights"
    cached.write_bytes(bytes(1000))
    with pytest.raises(ValueError) as err:
        resolve_weights("yolov2-voc")
    message = str(err.value)
    assert "\n" not in message
    assert f"{cached}: 1,000 bytes, expected 202,704,260" in message and "kept it" in message
    assert cached.read_bytes() == bytes(1000)

    with cached.open("wb") as f:  # the right size, sparse, with a header that is not darknet's
        f.write(b"\xff" * 16)
        f.truncate(202_704_260)
    with pytest.raises(ValueError, match=r"not a darknet \.weights file.*kept it") as err:
        resolve_weights("yolov2-voc")
    assert str(err.value).startswith(f"{cached}: ") and "\n" not in str(err.value)
    assert cached.stat().st_size == 202_704_260


def test_unreachable_mirror_names_the_url_and_the_cache_path(
    hub_checkpoints, tmp_path, monkeypatch
):
    mirror = (tmp_path / "nowhere").as_uri()
    monkeypatch.setenv(MIRROR_ENV, mirror + "/")
    with pytest.raises(ConnectionError) as err:
        resolve_weights("yolov2-voc", progress=False)
    message = str(err.value)
    assert "\n" not in message
    assert f"could not download {mirror}/yolov2-voc.weights" in message
    assert f"at {hub_checkpoints / 'yolov2-voc.weights'}" in message
    assert "202,704,260 bytes" in message and MIRROR_ENV in message
    assert files_in(hub_checkpoints) == []


def test_offline_default_url_is_darknets(hub_checkpoints, monkeypatch):
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ConnectionError) as err:
        resolve_weights("darknet19_448.conv.23")
    message = str(err.value)
    assert "could not download https://pjreddie.com/media/files/darknet19_448.conv.23" in message
    assert str(hub_checkpoints / "darknet19_448.conv.23") in message
    assert files_in(hub_checkpoints) == []


def test_published_sha256_is_checked(hub_checkpoints, tiny_mirror):
    data = (tiny_mirror / "yolov2-tiny-voc.weights").read_bytes()
    release = DARKNET_RELEASES["yolov2-tiny-voc"]
    releases = {
        "bad": replace(release, sha256="0" * 64),
        "good": replace(release, sha256=hashlib.sha256(data).hexdigest()),
    }
    base = tiny_mirror.as_uri()
    with pytest.raises(ValueError, match=r"invalid hash value.*deleted the download"):
        resolve_weights("bad", releases=releases, base_url=base, progress=False)
    assert files_in(hub_checkpoints) == []
    got = resolve_weights("good", releases=releases, base_url=base, progress=False)
    assert got.path.read_bytes() == data


def test_unknown_name_lists_the_known_names():
    with pytest.raises(FileNotFoundError) as err:
        resolve_weights("yolov2-coco")
    message = str(err.value)
    assert "\n" not in message and "'yolov2-coco'" in message
    assert all(name in message for name in DARKNET_RELEASES)
    with pytest.raises(FileNotFoundError, match=r"yolov2\.weights, give the name 'yolov2'"):
        resolve_weights("weights/yolov2.weights")


def test_existing_path_is_returned_as_is(tmp_path, monkeypatch):
    path = tmp_path / "mine.weights"
    path.write_bytes(b"anything")
    assert resolve_weights(path) == ResolvedWeights(path)
    assert resolve_weights(str(path)).anchors is None
    monkeypatch.chdir(tmp_path)
    Path("yolov2-voc").write_bytes(b"a local file named like a release")
    assert resolve_weights("yolov2-voc") == ResolvedWeights(Path("yolov2-voc"))
