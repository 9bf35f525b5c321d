"""Which part of a camera frame the model input covers: the processor's pad / resize / crop, undone.

The patch grid tiles the processor's output canvas, not the camera frame. A CLIP processor
(llava-1.5) resizes the short side and center-crops, so on a 4:3 frame the grid covers only
the middle square; LLaVA's ``do_pad`` first pads the frame to a square. :func:`processor_view`
returns the frame region (a :class:`PixelBox` in frame pixels) that the canvas shows, using the
processor's own settings and transformers' own size rules, so an overlay cell or a relevance
box lands on the pixels its token saw.
"""

from __future__ import annotations

import numpy as np

from atp_ros.backends.results import PixelBox


def _resized(image_processor, height: int, width: int) -> tuple[int, int]:
    """``(height, width)`` after the processor's resize (unchanged when it does not resize)."""
    from transformers.image_transforms import get_resize_output_image_size, get_size_with_aspect_ratio
    from transformers.image_utils import ChannelDimension, get_image_size_for_max_height_width

    size = getattr(image_processor, "size", None)
    if not getattr(image_processor, "do_resize", False) or size is None:
        return height, width
    get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
    if get("shortest_edge") and get("longest_edge"):
        return tuple(get_size_with_aspect_ratio((height, width), get("shortest_edge"), get("longest_edge")))
    if get("shortest_edge"):
        shape_only = np.broadcast_to(np.uint8(0), (3, height, width))  # the rule reads only the shape
        return tuple(
            get_resize_output_image_size(
                shape_only, get("shortest_edge"), default_to_square=False, input_data_format=ChannelDimension.FIRST
            )
        )
    if get("max_height") and get("max_width"):
        return tuple(get_image_size_for_max_height_width((height, width), get("max_height"), get("max_width")))
    if get("height") and get("width"):
        return int(get("height")), int(get("width"))
    raise ValueError(f"{type(image_processor).__name__}: unknown resize rule {size!r}")


def processor_view(image_processor, height: int, width: int) -> PixelBox:
    """The region of a ``height x width`` frame that ``image_processor``'s output canvas covers.

    Follows the processor's steps in order: pad to a square (LLaVA ``do_pad``, centred), resize
    (short side, long side, max box or fixed size, as transformers computes it), center crop
    (``int((size - crop) / 2)`` offsets, as its crop does). A fixed-size resize without crop
    covers the whole frame, stretched.
    """
    # Frame region shown by the current canvas, and the canvas size; start: the frame itself.
    x0, y0, x1, y1 = 0.0, 0.0, float(width), float(height)
    ch, cw = height, width
    if getattr(image_processor, "do_pad", False):  # LlavaImageProcessor.pad_to_square
        side = max(height, width)
        x0, y0 = -float((side - width) // 2), -float((side - height) // 2)
        x1, y1 = x0 + side, y0 + side
        ch = cw = side
    rh, rw = _resized(image_processor, ch, cw)
    crop = getattr(image_processor, "crop_size", None)
    if getattr(image_processor, "do_center_crop", False) and crop is not None:
        get = crop.get if isinstance(crop, dict) else lambda key: getattr(crop, key, None)
        crop_h, crop_w = int(get("height")), int(get("width"))
        sx, sy = (x1 - x0) / rw, (y1 - y0) / rh  # frame pixels per resized pixel
        top, left = int((rh - crop_h) / 2.0), int((rw - crop_w) / 2.0)
        x0, y0 = x0 + left * sx, y0 + top * sy
        x1, y1 = x0 + crop_w * sx, y0 + crop_h * sy
    return PixelBox(x0, y0, x1, y1)
