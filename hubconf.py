"""torch.hub entry points: ``torch.hub.load(repo_or_dir, NAME, pretrained=True)``.

    model = torch.hub.load("path/to/this/repo", "yolov2_voc", source="local", pretrained=True)
    detector = torch.hub.load("path/to/this/repo", "detector", source="local",
                              weights="yolov2-voc")

A model entry returns the network in eval mode: images ``[N, 3, H, W]`` RGB in [0, 1] (H, W
multiples of 32) -> the raw head ``[N, A*(5+C), H/32, W/32]``; ``yolo.converter.decode`` and
``yolo.nms.postprocess`` turn it into boxes. ``pretrained=True`` loads darknet's published
weights from the torch hub cache (``<hub dir>/checkpoints``), downloading them on first use;
offline, a missing file is one error line naming the URL and the cache path to put it in.
``detector`` returns the callable detector of ``yolo.load_detector``.
"""

dependencies = ["torch", "torchvision", "PIL", "numpy"]


def _release_model(name: str, pretrained: bool):
    from yolo.model import build_model
    from yolo.weights import DARKNET_RELEASES, resolve_weights

    release = DARKNET_RELEASES[name]
    if not pretrained:
        return build_model(release.model, num_classes=len(release.classes),
                           num_anchors=len(release.anchors)).eval()  # fmt: skip
    found = resolve_weights(name)
    model = build_model(found.model, num_classes=len(found.classes),
                        num_anchors=len(found.anchors), pretrained=str(found.path))  # fmt: skip
    return model.eval()


def yolov2_voc(pretrained: bool = True):
    """Darknet-19 YOLOv2 on VOC's 20 classes (darknet's yolov2-voc, 416)."""
    return _release_model("yolov2-voc", pretrained)


def yolov2_tiny_voc(pretrained: bool = True):
    """Tiny YOLOv2 on VOC's 20 classes (darknet's yolov2-tiny-voc, 416)."""
    return _release_model("yolov2-tiny-voc", pretrained)


def yolov2_coco(pretrained: bool = True):
    """Darknet-19 YOLOv2 on COCO's 80 classes (darknet's yolov2, 608)."""
    return _release_model("yolov2", pretrained)


def darknet19(pretrained: bool = True, num_classes: int = 20, num_anchors: int = 5):
    """A Darknet-19 YOLOv2 whose backbone is darknet's ImageNet ``darknet19_448.conv.23``
    (with ``pretrained``), the detection layers freshly initialised: a start for training."""
    from yolo.model import build_model
    from yolo.weights import resolve_weights

    weights = str(resolve_weights("darknet19_448.conv.23").path) if pretrained else False
    return build_model("darknet19", num_classes=num_classes, num_anchors=num_anchors,
                       pretrained=weights)  # fmt: skip


def detector(weights: str = "yolov2-voc", **kwargs):
    """The callable detector of ``yolo.load_detector(weights, **kwargs)``."""
    from yolo.api import load_detector

    return load_detector(weights, **kwargs)
