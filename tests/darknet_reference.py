"""darknet's image preparation transcribed from its C as plain loops, for tests to compare with.

``src/image.c`` (``resize_image``, ``letterbox_image``, ``crop_image``, ``rgb_to_hsv``,
``hsv_to_rgb``, ``distort_image``) and ``src/data.c`` (``load_data_detection``,
``correct_boxes``) of darknet's yolov2 era, statement by statement, in float32 scalars as the C
code computes. Images are ``[c, h, w]`` float32 numpy arrays, as darknet's ``image``.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from utils.transforms import DarknetParams

F32 = np.float32


def darknet_resize(im: np.ndarray, w: int, h: int) -> np.ndarray:
    """``resize_image(im, w, h)``: ``[c, ih, iw]`` float32 -> ``[c, h, w]``."""
    channels, ih, iw = im.shape
    part = np.zeros((channels, ih, w), F32)
    resized = np.zeros((channels, h, w), F32)
    w_scale = F32(iw - 1) / F32(w - 1)
    h_scale = F32(ih - 1) / F32(h - 1)
    for k in range(channels):
        for r in range(ih):
            for c in range(w):
                if c == w - 1 or iw == 1:
                    val = im[k, r, iw - 1]
                else:
                    sx = F32(c) * w_scale
                    ix = int(sx)
                    dx = sx - F32(ix)
                    val = (F32(1) - dx) * im[k, r, ix] + dx * im[k, r, ix + 1]
                part[k, r, c] = val
    for k in range(channels):
        for r in range(h):
            sy = F32(r) * h_scale
            iy = int(sy)
            dy = sy - F32(iy)
            for c in range(w):
                resized[k, r, c] = (F32(1) - dy) * part[k, iy, c]
            if r == h - 1 or ih == 1:
                continue
            for c in range(w):
                resized[k, r, c] += dy * part[k, iy + 1, c]
    return resized


def darknet_letterbox(im: np.ndarray, w: int, h: int) -> np.ndarray:
    """``letterbox_image(im, w, h)``: ``[c, ih, iw]`` float32 -> ``[c, h, w]``."""
    channels, ih, iw = im.shape
    if F32(w) / F32(iw) < F32(h) / F32(ih):
        new_w, new_h = w, (ih * w) // iw
    else:
        new_h, new_w = h, (iw * h) // ih
    resized = darknet_resize(im, new_w, new_h)
    boxed = np.full((channels, h, w), 0.5, F32)
    dx, dy = (w - new_w) // 2, (h - new_h) // 2
    for k in range(channels):
        for y in range(new_h):
            for x in range(new_w):
                boxed[k, dy + y, dx + x] = resized[k, y, x]
    return boxed


def darknet_crop(im: np.ndarray, dx: int, dy: int, w: int, h: int) -> np.ndarray:
    """``crop_image(im, dx, dy, w, h)``: coordinates clamped into the image."""
    channels, ih, iw = im.shape
    cropped = np.zeros((channels, h, w), F32)
    for k in range(channels):
        for j in range(h):
            for i in range(w):
                r = min(max(j + dy, 0), ih - 1)
                c = min(max(i + dx, 0), iw - 1)
                cropped[k, j, i] = im[k, r, c]
    return cropped


def darknet_rgb_to_hsv(im: np.ndarray) -> np.ndarray:
    """``rgb_to_hsv``: grey pixels get darknet's 0/0 = NaN hue."""
    out = np.empty_like(im)
    for j, i in np.ndindex(im.shape[1:]):
        r, g, b = im[:, j, i]
        high = (r if r > b else b) if r > g else (g if g > b else b)
        low = (r if r < b else b) if r < g else (g if g < b else b)
        delta = high - low
        v = high
        if high == 0:
            s = h = F32(0)
        else:
            s = delta / high
            with np.errstate(invalid="ignore", divide="ignore"):
                if r == high:
                    h = (g - b) / delta
                elif g == high:
                    h = F32(2) + (b - r) / delta
                else:
                    h = F32(4) + (r - g) / delta
            if h < 0:
                h += F32(6)
            h = F32(float(h) / 6.0)  # h/6. in double
        out[:, j, i] = h, s, v
    return out


def darknet_hsv_to_rgb(im: np.ndarray) -> np.ndarray:
    """``hsv_to_rgb``."""
    out = np.empty_like(im)
    for j, i in np.ndindex(im.shape[1:]):
        h = F32(6) * im[0, j, i]
        s, v = im[1, j, i], im[2, j, i]
        if s == 0:
            r = g = b = v
        else:
            index = math.floor(h)
            f = h - F32(index)
            p = v * (F32(1) - s)
            q = v * (F32(1) - s * f)
            t = v * (F32(1) - s * (F32(1) - f))
            r, g, b = {0: (v, t, p), 1: (q, v, p), 2: (p, v, t), 3: (p, q, v), 4: (t, p, v)}.get(
                index, (v, p, q)
            )
        out[:, j, i] = r, g, b
    return out


def darknet_distort(im: np.ndarray, hue: float, sat: float, val: float) -> np.ndarray:
    """``distort_image``: to HSV, scale s and v, shift h, back to RGB, constrain."""
    hsv = darknet_rgb_to_hsv(im)
    hsv[1] *= F32(sat)
    hsv[2] *= F32(val)
    hsv[0] += F32(hue)
    hsv[0] = np.where(hsv[0] > 1, hsv[0] - F32(1), hsv[0])
    hsv[0] = np.where(hsv[0] < 0, hsv[0] + F32(1), hsv[0])
    return np.clip(darknet_hsv_to_rgb(hsv), 0, 1)


def darknet_correct_boxes(boxes, params: DarknetParams, ow: int, oh: int):
    """``load_data_detection``'s box arithmetic: ``fill_truth_detection(..., flip, dx, dy,
    1./sx, 1./sy)`` -> ``correct_boxes``, then the ``w < .001 || h < .001`` skip."""
    swidth, sheight = ow - params.pleft - params.pright, oh - params.ptop - params.pbot
    sx, sy = F32(swidth) / F32(ow), F32(sheight) / F32(oh)
    dx, dy = (F32(params.pleft) / F32(ow)) / sx, (F32(params.ptop) / F32(oh)) / sy
    sx, sy = F32(1.0 / float(sx)), F32(1.0 / float(sy))
    kept, rows = [], []
    for index, (left, top, right, bottom) in enumerate(np.asarray(boxes, F32)):
        left, right = left * sx - dx, right * sx - dx
        top, bottom = top * sy - dy, bottom * sy - dy
        if params.flip:
            left, right = F32(1) - right, F32(1) - left
        left, right, top, bottom = (min(max(x, F32(0)), F32(1)) for x in (left, right, top, bottom))
        if right - left < 0.001 or bottom - top < 0.001:
            continue
        kept.append(index)
        rows.append([left, top, right, bottom])
    return kept, np.asarray(rows, F32).reshape(-1, 4)


def darknet_load_detection(image: Image.Image, boxes, params: DarknetParams, size: int):
    """``load_data_detection`` for one image with the given random draws."""
    im = np.asarray(image).transpose(2, 0, 1).astype(F32) / F32(255)  # load_image_color
    oh, ow = im.shape[1:]
    swidth, sheight = ow - params.pleft - params.pright, oh - params.ptop - params.pbot
    sized = darknet_resize(darknet_crop(im, params.pleft, params.ptop, swidth, sheight), size, size)
    if params.flip:
        sized = sized[:, :, ::-1].copy()  # flip_image
    pixels = darknet_distort(sized, params.hue, params.saturation, params.exposure)
    return pixels, *darknet_correct_boxes(boxes, params, ow, oh)
