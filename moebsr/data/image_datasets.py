"""The two dataset shapes loaders know: uint8 tensors in memory (batch-indexed) and images decoded one at a time.

Both expose ``labels`` (an int64 tensor, read without decoding images) so tasks can be validated, derived
(``with_labels``) and joined on shared images cheaply.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ..tasks.errors import TaskError
from .image_columns import column_image_getter

# PIL modes with an unambiguous 8-bit reading; float ('F') and 32-bit ('I') images need a task-specific scaling.
CONVERTIBLE_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "I;16", "LAB", "HSV")


class TensorImageDataset:
    """uint8 images ``[N, C, H, W]`` (C 1 or 3) and int64 labels, indexed a whole batch at a time.

    Also accepted, and converted: ``[N, H, W]`` grey, channels last ``[N, H, W, C]``, any integer type of 0-255."""

    def __init__(self, images: Any, labels: Any, name: str = "dataset") -> None:
        images = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
        labels = torch.as_tensor(np.asarray(labels)) if not isinstance(labels, torch.Tensor) else labels
        if images.dtype != torch.uint8:
            if images.dtype.is_floating_point or images.dtype.is_complex or images.dtype == torch.bool:
                raise TaskError(f"{name}: images have dtype {images.dtype}; expected uint8 or integer pixels 0-255 "
                                "(float pixels are refused: their scale, 0-1, 0-255 or normalised, is not recorded)")
            if images.numel() and (images.min() < 0 or images.max() > 255):
                raise TaskError(f"{name}: images of dtype {images.dtype} hold values {int(images.min())}.."
                                f"{int(images.max())}; integer pixels must be 0-255")
            images = images.to(torch.uint8)
        if images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
            images = images.permute(0, 3, 1, 2)  # channels last [N, H, W, C] -> [N, C, H, W]
        elif images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] in (1, 3):
            raise TaskError(f"{name}: images have shape {tuple(images.shape)}, channels first or last cannot be told "
                            "apart; expected [N, C, H, W] or [N, H, W, C] with C 1 or 3 at one end only")
        if images.ndim == 3:  # [N, H, W] grey
            images = images.unsqueeze(1)
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise TaskError(f"{name}: images have shape {tuple(images.shape)}; expected [N, H, W], [N, C, H, W] "
                            "or [N, H, W, C] with C 1 or 3")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise TaskError(f"{name}: {images.shape[0]} images but labels of shape {tuple(labels.shape)}")
        self.images = images.contiguous()
        self.labels = labels.long()
        self.name = name

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    def with_labels(self, labels: torch.Tensor, name: Optional[str] = None) -> "TensorImageDataset":
        """Same images (shared memory, same order), other labels: how derived tasks label the same pictures."""
        return TensorImageDataset(self.images, labels, name or self.name)


class ItemImageDataset:
    """Images fetched and decoded one at a time by ``get_image(index)`` (a hub dataset's Image column, files...)."""

    def __init__(self, get_image: Callable[[int], Any], labels: torch.Tensor, name: str = "dataset") -> None:
        self.get_image = get_image
        self.labels = torch.as_tensor(labels).long()
        self.name = name

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.get_image(index), int(self.labels[index])

    def with_labels(self, labels: torch.Tensor, name: Optional[str] = None) -> "ItemImageDataset":
        return ItemImageDataset(self.get_image, labels, name or self.name)


class _PairImage:
    def __init__(self, pairs: Sequence[Any]) -> None:
        self.pairs = pairs

    def __call__(self, index: int) -> Any:
        return self.pairs[int(index)][0]


def _hf_columns(dataset: Any, image_column: Optional[str], label_column: Optional[str], name: str) -> tuple[str, str]:
    from datasets import ClassLabel
    from datasets import Image as ImageFeature

    features = dataset.features
    if image_column is None:
        image_column = next((c for c, f in features.items() if isinstance(f, ImageFeature)), None)
        image_column = image_column or next((c for c in ("image", "img") if c in features), None)
    if label_column is None:
        class_labels = [c for c, f in features.items() if isinstance(f, ClassLabel)]
        if len(class_labels) > 1:  # e.g. CIFAR-100's coarse_label and fine_label: the first is a guess
            raise TaskError(f"{name}: several ClassLabel columns {class_labels}; pass label_column= one of them")
        label_column = class_labels[0] if class_labels else ("label" if "label" in features else None)
    for role, column in (("image", image_column), ("label", label_column)):
        if column is None or column not in features:
            raise TaskError(f"{name}: no {role} column {column or ''} among the dataset's columns "
                            f"{list(features)}; pass {role}_column=...")
    return image_column, label_column


def as_image_dataset(raw: Any, name: str, image_column: Optional[str] = None, label_column: Optional[str] = None,
                     num_outputs: Optional[int] = None) -> TensorImageDataset | ItemImageDataset:
    """Wrap what a task's dataset factory returned: one of ours, a ``datasets.Dataset``, a dict of ``images``/
    ``labels`` arrays, or any indexable of ``(image, label)`` pairs (its labels are read once, by indexing).

    ``num_outputs`` (a task whose labels are the column's own) must equal the class count of a ``ClassLabel`` label
    column: a column of 20 classes under a 100-way task is the wrong column, not a task with unused outputs."""
    if isinstance(raw, (TensorImageDataset, ItemImageDataset)):
        return raw
    if isinstance(raw, dict) and "images" in raw and "labels" in raw:
        return TensorImageDataset(raw["images"], raw["labels"], name)
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        datasets = None
    if datasets is not None and isinstance(raw, datasets.Dataset):
        image_column, label_column = _hf_columns(raw, image_column, label_column, name)
        feature = raw.features[label_column]
        if num_outputs is not None and isinstance(feature, datasets.ClassLabel) and feature.num_classes != num_outputs:
            raise TaskError(f"{name}: label column {label_column!r} has {feature.num_classes} classes but the task has "
                            f"{num_outputs} outputs; pass label_column= the right column, or num_outputs="
                            f"{feature.num_classes}")
        labels = np.asarray(raw.select_columns([label_column]).with_format("numpy")[label_column])
        if labels.dtype.kind not in "iu":
            raise TaskError(f"{name}: label column {label_column!r} holds {labels.dtype} values; expected integer "
                            "class ids (cast it with dataset.class_encode_column)")
        return ItemImageDataset(column_image_getter(raw, image_column, name), torch.as_tensor(labels), name)
    if hasattr(raw, "__len__") and hasattr(raw, "__getitem__"):
        labels = getattr(raw, "labels", None)
        if labels is None:
            labels = [int(raw[i][1]) for i in range(len(raw))]
        return ItemImageDataset(_PairImage(raw), torch.as_tensor(np.asarray(labels)), name)
    raise TaskError(f"{name}: the dataset factory returned {type(raw).__name__}; expected a datasets.Dataset, "
                    "a dict of 'images'/'labels' arrays, or an indexable of (image, label) pairs")


def to_pil(image: Any, in_chans: int, where: str) -> Image.Image:
    """A decoded image as PIL in the model's colour mode; anything ambiguous fails naming ``where`` and the problem."""
    if isinstance(image, torch.Tensor):
        image = image.numpy()
        if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4):
            image = image.transpose(1, 2, 0)  # CHW -> HWC
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TaskError(f"{where}: image array of dtype {image.dtype}; expected uint8")
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (3, 4))):
            raise TaskError(f"{where}: image array of shape {image.shape}; expected HxW, HxWx1, HxWx3 or HxWx4")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TaskError(f"{where}: got {type(image).__name__} for an image; expected a PIL image or a uint8 array")
    if image.mode not in CONVERTIBLE_MODES:
        raise TaskError(f"{where}: image of mode {image.mode!r} (size {image.size}); accepted modes: "
                        f"{', '.join(CONVERTIBLE_MODES)}")
    if image.width < 1 or image.height < 1:
        raise TaskError(f"{where}: empty image of size {image.size}")
    if image.mode == "I;16":
        image = Image.fromarray((np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8))
    return image.convert("L" if in_chans == 1 else "RGB")
