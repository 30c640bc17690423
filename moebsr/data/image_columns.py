"""Image columns of a ``datasets.Dataset`` as users have them, each read by a picklable getter of one image.

- ``Image()``: decoded by ``datasets``.
- ``{bytes, path}`` structs (what ``Image()`` becomes in a parquet file written by pyarrow or pandas, which keep no
  Hugging Face feature metadata) and ``binary`` columns of encoded files: decoded with PIL.
- Integer pixel arrays (``Array2D``/``Array3D``, nested lists): ``HxW``, ``HxWxC`` (channels last) or ``CxHxW``
  with C 1, 3 or 4, any integer type whose values are 0-255; the range of the whole column is checked up front.

Float pixels are refused: their scale (0-1, 0-255 or already normalised) is not recorded anywhere, and a wrong
guess trains on black or white images without a word. Anything else is refused in one line naming the column's
type and what is accepted.
"""

from __future__ import annotations

import io
from typing import Any, Callable, Optional

import numpy as np
from PIL import Image

from ..tasks.errors import TaskError

ACCEPTED = ("accepted: Image(), {bytes, path} structs or binary of encoded images, or integer arrays of 0-255 "
            "(Array2D/Array3D or nested lists: HxW, HxWxC or CxHxW with C 1, 3 or 4)")
CHANNEL_COUNTS = (1, 3, 4)


def _describe(feature: Any) -> str:
    return " ".join(repr(feature).split())


def _leaf_dtype(feature: Any) -> tuple[Optional[str], int]:
    """The value dtype of an array feature and its depth of nesting (``Array3D`` counts 3), or ``(None, 0)``."""
    import datasets
    if isinstance(feature, (datasets.Array2D, datasets.Array3D)):
        return feature.dtype, len(feature.shape)
    depth = 0
    while isinstance(feature, (datasets.List, datasets.LargeList)):
        feature, depth = feature.feature, depth + 1
    if depth and isinstance(feature, datasets.Value):
        return feature.dtype, depth
    return None, 0


def pixel_layout(shape: tuple[int, ...]) -> str:
    """``HW``, ``HWC`` or ``CHW`` for an image array's shape; ``ValueError`` when it is none or ambiguous.

    The channel axis is the one of size 1, 3 or 4 at either end; with such a size at both ends (``3x32x3``) the
    order cannot be told from the shape, and is refused rather than guessed."""
    if len(shape) == 2:
        return "HW"
    if len(shape) == 3:
        first, last = shape[0] in CHANNEL_COUNTS, shape[-1] in CHANNEL_COUNTS
        if last and not first:
            return "HWC"
        if first and not last:
            return "CHW"
        if first and last:
            raise ValueError(f"shape {shape} could be channels first or channels last")
    raise ValueError(f"shape {shape} is not HxW, HxWxC or CxHxW with C 1, 3 or 4")


def pixels_to_uint8(values: Any, where: str) -> np.ndarray:
    """An integer pixel array of 0-255 as a uint8 ``HxW`` or ``HxWxC`` array; anything else fails naming ``where``."""
    array = np.asarray(values)
    if array.dtype == object:  # ragged nested lists
        raise TaskError(f"{where}: ragged nested lists of pixels; expected one HxW, HxWxC or CxHxW array per image")
    if array.dtype.kind not in "iu":
        raise TaskError(f"{where}: pixels of dtype {array.dtype}; {ACCEPTED}")
    try:
        layout = pixel_layout(array.shape)
    except ValueError as error:
        raise TaskError(f"{where}: pixel array of {error}; {ACCEPTED}") from None
    if array.size and (array.min() < 0 or array.max() > 255):
        raise TaskError(f"{where}: pixel values {array.min()}..{array.max()}; integer pixels must be 0-255")
    array = array.astype(np.uint8, copy=False)
    return np.ascontiguousarray(array.transpose(1, 2, 0)) if layout == "CHW" else array


class ColumnImage:
    """One column of a Hugging Face dataset, read one row at a time (DataLoader workers pickle it)."""

    def __init__(self, dataset: Any, column: str, kind: str = "decoded", where: str = "dataset") -> None:
        self.dataset = dataset.select_columns([column])
        if kind == "pixels":
            self.dataset = self.dataset.with_format("numpy")
        self.column, self.kind, self.where = column, kind, where

    def __call__(self, index: int) -> Any:
        value = self.dataset[int(index)][self.column]
        where = f"{self.where}, example {index}, column {self.column!r}"
        if self.kind == "encoded":
            return _decode(value, where)
        if self.kind == "pixels":
            return pixels_to_uint8(value, where)
        return value


def _decode(value: Any, where: str) -> Image.Image:
    """An encoded image: bytes, or a ``{bytes, path}`` struct (bytes first, else the file at ``path``)."""
    data, path = (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (value, None)
    try:
        if data is not None:
            image = Image.open(io.BytesIO(data))
        elif path:
            image = Image.open(path)
        else:
            raise TaskError(f"{where}: neither bytes nor a path to read the image from")
        image.load()
    except (OSError, Image.DecompressionBombError) as error:
        raise TaskError(f"{where}: not a readable image ({type(error).__name__}: {error})".splitlines()[0]) from None
    return image


def _check_pixel_range(dataset: Any, column: str, where: str, described: str) -> None:
    """The minimum and maximum of a whole integer pixel column, read from Arrow without building one array."""
    import pyarrow as pa
    import pyarrow.compute as pc
    low = high = None
    for chunk in dataset.data.column(column).chunks:
        values = chunk.storage if isinstance(chunk, pa.ExtensionArray) else chunk
        while pa.types.is_list(values.type) or pa.types.is_large_list(values.type) or \
                pa.types.is_fixed_size_list(values.type):
            values = values.flatten()
        extremes = pc.min_max(values)
        if extremes["min"].is_valid:
            low = extremes["min"].as_py() if low is None else min(low, extremes["min"].as_py())
            high = extremes["max"].as_py() if high is None else max(high, extremes["max"].as_py())
    if low is not None and (low < 0 or high > 255):
        raise TaskError(f"{where}: image column {column!r} ({described}) holds values {low}..{high}; integer "
                        f"pixels must be 0-255 (rescale them to uint8 first)")


def column_image_getter(dataset: Any, column: str, where: str) -> Callable[[int], Any]:
    """The getter of ``column``'s images, after checking up front what can be checked without decoding them all:
    the column's type, a whole integer column's range, and the first image."""
    import datasets
    feature = dataset.features[column]
    described = _describe(feature)
    if isinstance(feature, datasets.Image):
        return ColumnImage(dataset, column, "decoded", where)
    is_struct = isinstance(feature, dict) and feature and set(feature) <= {"bytes", "path"}
    is_binary = isinstance(feature, datasets.Value) and feature.dtype in ("binary", "large_binary")
    dtype, depth = _leaf_dtype(feature)
    if is_struct or is_binary:
        getter = ColumnImage(dataset, column, "encoded", where)
    elif dtype is not None and depth in (2, 3):
        if dtype.startswith("float"):
            raise TaskError(f"{where}: image column {column!r} is {described}: float pixels are refused because "
                            "their scale (0-1? 0-255? normalised?) is not recorded; convert them to integers 0-255; "
                            f"{ACCEPTED}")
        if not dtype.startswith(("int", "uint")):
            raise TaskError(f"{where}: image column {column!r} is {described}; {ACCEPTED}")
        if dtype != "uint8":
            _check_pixel_range(dataset, column, where, described)
        getter = ColumnImage(dataset, column, "pixels", where)
    else:
        raise TaskError(f"{where}: image column {column!r} is {described}; {ACCEPTED}")
    if len(dataset):
        getter(0)  # the first image decodes here, so a shape or format the getter refuses fails before training
    return getter
