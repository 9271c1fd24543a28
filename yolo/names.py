"""The names the command line chooses from (models, loss assignments), free of torch so that
parsing flags and ``--help`` import none of it. :mod:`yolo.model`, :mod:`yolo.resnet` and
:mod:`yolo.converter` build what the names stand for (tests check that they agree)."""

DARKNET_NAMES = ("darknet19", "tiny")
RESNET_NAMES = ("resnet18", "resnet50", "resnet101")
MODEL_NAMES = (*DARKNET_NAMES, *RESNET_NAMES)
ASSIGNMENTS = ("global", "darknet")  # the loss's target assignment (yolo.converter)
