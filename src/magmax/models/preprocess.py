"""Image preprocessing as open_clip does it (protocol §3), in plain torch (torchvision is not required).

Train: RandomResizedCrop(size, scale=(0.9, 1.0), ratio=(3/4, 4/3), bicubic), no flip.
Eval:  Resize(size, bicubic) of the shorter edge, then CenterCrop(size).
Both:  x = (pixel / 255 − mean) / std per channel.

Resampling is PIL's antialiased bicubic (the kernel torchvision applies to PIL images, and the one
``torch.nn.functional.interpolate(mode="bicubic", antialias=True)`` reproduces): a separable filter
with Keys' cubic, a = −0.5, whose support widens by the downscaling factor. For output pixel o of a
crop that starts at ``start`` and spans ``length`` input pixels, resampled onto ``n_out`` pixels,

    scale = length / n_out,   f = max(scale, 1),   c_o = (o + 0.5) · scale
    w[o, x] = K((x + 0.5 − c_o) / f) / Σ_x' K((x' + 0.5 − c_o) / f),   x, x' ∈ [0, length)

(x in crop coordinates; pixels outside the crop get weight 0, as crop-then-resize gives). The 2-D
resample is ``W_y · X · W_xᵀ`` per channel, so a whole batch of equally sized arrays (CIFAR) is two
batched matrix products, each image with its own crop. As in PIL, the horizontal pass comes first and
each pass is clamped to [0, 255] (PIL's rounding to whole levels, ≤ 0.5/255, is not reproduced). File paths
are decoded with PIL and resampled by PIL itself (faster for large photos; the same kernel).

Training crops draw from a ``torch.Generator`` with torchvision's ``RandomResizedCrop.get_params``
algorithm (10 tries, then a centre crop), so a seed fixes every crop.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from magmax.errors import DataError
from magmax.models.hf_loading import first_line

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

CropBox = tuple[int, int, int, int]  # top, left, height, width


@dataclass(frozen=True)
class ImageTransform:
    """Size and per-channel normalisation of one backbone's input, plus the training crop's range."""

    size: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    scale: tuple[float, float] = (0.9, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)

    def __call__(self, items: Any, train: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        return preprocess_images(items, self, train, generator)


def bicubic_kernel(t: torch.Tensor) -> torch.Tensor:
    """Keys' cubic convolution kernel with a = −0.5 (PIL's BICUBIC), zero for |t| ≥ 2."""
    a = -0.5
    t = t.abs()
    near = ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0
    far = (((t - 5.0) * t + 8.0) * t - 4.0) * a
    return torch.where(t < 1.0, near, torch.where(t < 2.0, far, torch.zeros_like(t)))


def resample_weights(
    in_size: int,
    starts: torch.Tensor,
    lengths: torch.Tensor,
    n_total: int,
    out_offset: int = 0,
    n_out: int | None = None,
) -> torch.Tensor:
    """Antialiased bicubic resampling matrices, one per crop: [N, n_out, in_size] (float64).

    Crop k covers input pixels [starts[k], starts[k] + lengths[k]) and is resampled onto ``n_total``
    output pixels, of which rows ``out_offset .. out_offset + n_out`` are returned (a centre crop of the
    resized image is a row slice). Rows sum to 1; see the module docstring for the formula.
    """
    n_out = n_total if n_out is None else n_out
    starts = starts.to(torch.float64).view(-1, 1, 1)
    lengths = lengths.to(torch.float64).view(-1, 1, 1)
    scale = lengths / n_total
    filter_scale = scale.clamp(min=1.0)
    out_idx = torch.arange(out_offset, out_offset + n_out, dtype=torch.float64).view(1, -1, 1)
    centers = (out_idx + 0.5) * scale
    x = torch.arange(in_size, dtype=torch.float64).view(1, 1, -1) - starts  # crop coordinates
    weights = bicubic_kernel((x + 0.5 - centers) / filter_scale)
    inside = (x >= 0) & (x < lengths)
    weights = weights * inside
    return weights / weights.sum(dim=-1, keepdim=True)


@functools.lru_cache(maxsize=4096)
def crop_weights(
    in_size: int, start: int, length: int, n_total: int, out_offset: int = 0, n_out: int | None = None
) -> torch.Tensor:
    """``resample_weights`` for one crop, float32 [n_out, in_size], cached: small images have few
    distinct crops. The returned tensor is shared: read it, never modify it."""
    one = torch.ones(1)
    return resample_weights(in_size, one * start, one * length, n_total, out_offset, n_out)[0].to(torch.float32)


def stacked_crop_weights(in_size: int, starts: torch.Tensor, lengths: torch.Tensor, n_out: int) -> torch.Tensor:
    """``crop_weights`` of many crops [N, n_out, in_size], each distinct crop computed once."""
    pairs, inverse = torch.unique(torch.stack([starts, lengths], dim=1), dim=0, return_inverse=True)
    table = torch.stack([crop_weights(in_size, int(a), int(b), n_out) for a, b in pairs.tolist()])
    return table[inverse]


def sample_crop_box(
    height: int,
    width: int,
    generator: torch.Generator | None,
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
) -> CropBox:
    """torchvision's ``RandomResizedCrop.get_params``, drawing from ``generator``: (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator).item())
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """Shape after torchvision's Resize(size): the shorter edge becomes ``size``, aspect kept."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def center_offset(resized: int, size: int) -> int:
    """torchvision's CenterCrop offset: round((resized − size) / 2)."""
    return int(round((resized - size) / 2.0))


def as_uint8_batch(array: np.ndarray) -> np.ndarray:
    """[N,H,W] grey or [N,H,W,C] (C = 1, 3 or 4) uint8 → [N,H,W,3] RGB (grey replicated, alpha dropped)."""
    if array.dtype != np.uint8:
        raise DataError(
            f"image array has dtype {array.dtype}: expected uint8 pixels 0..255 (convert before preprocessing)"
        )
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3, 4):
        raise DataError(f"image batch has shape {array.shape}: expected [N,H,W] grey or [N,H,W,C] with C in 1, 3, 4")
    if array.shape[-1] == 1:
        return np.repeat(array, 3, axis=-1)
    return array[..., :3]


def resample_array_batch(
    images: np.ndarray, transform: ImageTransform, train: bool, generator: torch.Generator | None
) -> torch.Tensor:
    """Equally sized RGB uint8 images [N,H,W,3] → normalised model input [N,3,S,S] (crop + resize).

    The per-channel normalisation is affine and every resampling row sums to 1, so it is applied to the
    small input and the clamp to [0, 255] becomes a clamp to the normalised bounds: one pass over the
    large output instead of three. As PIL does, the horizontal pass comes first and both passes clamp.
    """
    n, height, width, _ = images.shape
    size = transform.size
    pixels = normalize_pixels(torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float(), transform)
    low = normalize_pixels(torch.zeros(1, 3, 1, 1), transform)
    high = normalize_pixels(torch.full((1, 3, 1, 1), 255.0), transform)

    def clamp(x: torch.Tensor) -> torch.Tensor:  # PIL's uint8 range, after each pass
        return torch.clamp(x, min=low, max=high, out=x)

    if train:
        boxes = torch.tensor(
            [sample_crop_box(height, width, generator, transform.scale, transform.ratio) for _ in range(n)]
        )
        rows = stacked_crop_weights(height, boxes[:, 0], boxes[:, 2], size)
        cols = stacked_crop_weights(width, boxes[:, 1], boxes[:, 3], size)
        out = rows.unsqueeze(1) @ clamp(pixels @ cols.transpose(1, 2).unsqueeze(1))
    else:
        new_h, new_w = resized_shape(height, width, size)
        rows = crop_weights(height, 0, height, new_h, center_offset(new_h, size), size)
        cols = crop_weights(width, 0, width, new_w, center_offset(new_w, size), size)
        out = rows @ clamp(pixels @ cols.T)
    return clamp(out)


def resample_file(
    path: str | Path, transform: ImageTransform, train: bool, generator: torch.Generator | None
) -> np.ndarray:
    """Decode an image file with PIL (RGB) and crop + resize it with PIL's bicubic: [S,S,3] uint8."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except (OSError, ValueError) as err:
        raise DataError(
            f"cannot decode image file {path}: {first_line(err)}; check the file or remove it from the dataset"
        ) from err
    size = transform.size
    if train:
        top, left, h, w = sample_crop_box(image.height, image.width, generator, transform.scale, transform.ratio)
        image = image.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BICUBIC)
    else:
        new_h, new_w = resized_shape(image.height, image.width, size)
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        top, left = center_offset(new_h, size), center_offset(new_w, size)
        image = image.crop((left, top, left + size, top + size))
    return np.array(image, dtype=np.uint8)  # a writable copy


def normalize_pixels(pixels: torch.Tensor, transform: ImageTransform) -> torch.Tensor:
    """Float pixels [N,3,S,S] in 0..255 → (pixel / 255 − mean) / std."""
    mean = torch.tensor(transform.mean, dtype=pixels.dtype).view(1, 3, 1, 1)
    std = torch.tensor(transform.std, dtype=pixels.dtype).view(1, 3, 1, 1)
    return (pixels / 255.0 - mean) / std


def preprocess_images(
    items: Any, transform: ImageTransform, train: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Images → model input [N,3,S,S] float32.

    ``items``: a uint8 array [N,H,W] / [N,H,W,C] (axis 0 is the batch), or a sequence whose elements
    are HW / HWC uint8 arrays, file paths (str or Path) or PIL images. Arrays of one shape are
    resampled together; crops are drawn in item order, so one generator state gives one result.
    """
    if isinstance(items, np.ndarray):
        return resample_array_batch(as_uint8_batch(items), transform, train, generator)
    if not isinstance(items, Sequence) or isinstance(items, (str, bytes)) or len(items) == 0:
        raise DataError(f"images to preprocess must be a non-empty list or an array, got {type(items).__name__}")
    out = torch.empty(len(items), 3, transform.size, transform.size)
    arrays: dict[int, np.ndarray] = {}
    pending: list[int] = []  # indices of consecutive arrays with one shape, resampled as one batch

    def flush() -> None:
        if pending:
            batch = as_uint8_batch(np.stack([arrays.pop(i) for i in pending]))
            out[pending] = resample_array_batch(batch, transform, train, generator)
            pending.clear()

    for index, item in enumerate(items):
        if isinstance(item, (str, Path)):
            flush()
            pixels = torch.from_numpy(resample_file(item, transform, train, generator)).permute(2, 0, 1).float()
            out[index] = normalize_pixels(pixels.unsqueeze(0), transform)[0]
            continue
        array = item if isinstance(item, np.ndarray) else _pil_to_array(item)
        if pending and arrays[pending[0]].shape != array.shape:
            flush()
        arrays[index] = array
        pending.append(index)
    flush()
    return out


def _pil_to_array(item: Any) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - PIL ships with the project's dependencies
        Image = None
    if Image is not None and isinstance(item, Image.Image):
        return np.asarray(item.convert("RGB"), dtype=np.uint8)
    raise DataError(
        f"cannot preprocess an image item of type {type(item).__name__}: pass uint8 arrays, file paths or PIL images"
    )


def image_size_of(item: Any) -> tuple[int, int]:
    """(height, width) of one image item as :func:`preprocess_images` sees it; files: the header only."""
    if isinstance(item, (str, Path)):
        from PIL import Image

        try:
            with Image.open(item) as image:
                width, height = image.size
        except (OSError, ValueError) as err:
            raise DataError(
                f"cannot decode image file {item}: {first_line(err)}; check the file or remove it from the dataset"
            ) from err
        return height, width
    if isinstance(item, np.ndarray):
        return int(item.shape[0]), int(item.shape[1])
    return _pil_to_array(item).shape[:2]


def skip_crops(items: Any, transform: ImageTransform, generator: torch.Generator | None) -> None:
    """Advance ``generator`` past the training crops of ``items`` without resampling them: afterwards it
    draws what it would after ``preprocess_images(items, transform, True, generator)``. A rank of a
    data-parallel step skips the rows before its share, so its crops are those of the whole batch."""
    if isinstance(items, np.ndarray):
        _, height, width = items.shape[:3]
        sizes = [(int(height), int(width))] * len(items)
    else:
        sizes = [image_size_of(item) for item in items]
    for height, width in sizes:
        sample_crop_box(height, width, generator, transform.scale, transform.ratio)
