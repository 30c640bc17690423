"""Data: image datasets (tensor-cached or decoded per image), the model's image spec, and resumable loaders."""

from .image_datasets import ItemImageDataset, TensorImageDataset, as_image_dataset
from .image_spec import ImageSpec
from .loaders import BatchLoader, build_joint_loader, build_task_loader
from .sampler import EpochBatchSampler

__all__ = [
    "BatchLoader", "EpochBatchSampler", "ImageSpec", "ItemImageDataset", "TensorImageDataset", "as_image_dataset",
    "build_joint_loader", "build_task_loader",
]
