"""YOLO v2: model, darknet I/O, loss, postprocess and the engine.

``from yolo import load_detector`` is the Python entry point for inference (see
:mod:`yolo.api`); it is imported on first use, so importing the package costs nothing.
"""


def __getattr__(name: str):
    if name == "load_detector":
        from yolo.api import load_detector

        return load_detector
    raise AttributeError(f"module 'yolo' has no attribute {name!r}")
