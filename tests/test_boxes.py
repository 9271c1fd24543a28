"""utils.boxes against torchvision.ops on random boxes."""

import pytest
import torch
from torchvision.ops import box_area, box_convert
from torchvision.ops import box_iou as torchvision_box_iou

from utils.boxes import box_iou, box_iou_elementwise, cxcywh_to_xyxy, wh_iou, xyxy_to_cxcywh


def random_boxes(count: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    """``[count, 4]`` xyxy boxes, some of zero width or height, some outside [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    corner = 1.4 * torch.rand(count, 2, generator=gen, dtype=dtype) - 0.2
    size = 0.5 * torch.rand(count, 2, generator=gen, dtype=dtype)
    size[::7, 0] = 0.0
    size[3::11, 1] = 0.0
    return torch.cat([corner, corner + size], dim=1)


def test_box_iou_is_torchvisions():
    assert box_iou is torchvision_box_iou


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_elementwise_iou_is_the_diagonal_of_torchvisions_table(dtype):
    first, second = random_boxes(300, 0, dtype), random_boxes(300, 1, dtype)
    table = torchvision_box_iou(first, second)  # [300, 300]; NaN where both areas are 0
    expected = torch.nan_to_num(table, nan=0.0)
    torch.testing.assert_close(box_iou_elementwise(first[:, None], second[None]), expected)
    torch.testing.assert_close(box_iou_elementwise(first, second), expected.diagonal())
    assert (table > 0).sum() > 1000  # many overlapping pairs, not only zeros


def test_elementwise_iou_of_a_box_with_itself():
    boxes = random_boxes(200, 2)
    iou = box_iou_elementwise(boxes, boxes)
    has_area = box_area(boxes) > 0
    assert torch.equal(iou[has_area], torch.ones(int(has_area.sum()), dtype=boxes.dtype))
    assert torch.equal(iou[~has_area], torch.zeros(int((~has_area).sum()), dtype=boxes.dtype))


def test_wh_iou_is_the_iou_of_centred_boxes():
    gen = torch.Generator().manual_seed(3)
    first = 0.01 + 13 * torch.rand(40, 2, generator=gen, dtype=torch.float64)  # grid cells
    second = 0.01 + 13 * torch.rand(9, 2, generator=gen, dtype=torch.float64)
    centred = [torch.cat([-wh / 2, wh / 2], dim=1) for wh in (first, second)]
    expected = torchvision_box_iou(*centred)  # [40, 9]
    torch.testing.assert_close(wh_iou(first[:, None], second[None]), expected)
    shifted = [box + 5.0 for box in centred]  # the shared centre does not matter
    torch.testing.assert_close(wh_iou(first[:, None], second[None]), torchvision_box_iou(*shifted))


def test_wh_iou_of_empty_boxes_is_zero():
    assert wh_iou(torch.zeros(2), torch.zeros(2)).item() == 0.0


def test_conversions_are_torchvisions_and_invert_each_other():
    boxes = random_boxes(100, 4)
    centre = xyxy_to_cxcywh(boxes)
    torch.testing.assert_close(centre, box_convert(boxes, "xyxy", "cxcywh"))
    torch.testing.assert_close(cxcywh_to_xyxy(centre), boxes)
    batched = boxes.view(4, 25, 4)  # leading dimensions are kept
    assert cxcywh_to_xyxy(xyxy_to_cxcywh(batched)).shape == (4, 25, 4)
